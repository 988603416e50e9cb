"""Orbax checkpoints of the train state plus a small JSON of run facts.

The input position is not stored separately: it is a pure function of
(seed, global step), so the restored step is the input position. The JSON
item records the facts that must match for that to hold (seed, batch size,
data spec) and a resume with different values is refused.

Orbax writes each step into a temporary directory and renames it when
complete, so a killed or failed write never leaves a step that restores.
"""
from __future__ import annotations

import logging
import os

import orbax.checkpoint as ocp

from data_pipeline import storage

# Run facts that define the input stream; a resume must not change them.
_INPUT_KEYS = ("seed", "batch_size", "data_shards", "num_records", "shards")
# Those a run may change on purpose (run fact allow_input_change, from
# config.data.allow_input_change): the data, not the order it is read in.
_DATA_KEYS = ("data_shards", "num_records", "shards")


def check_input_facts(saved: dict, run: dict, step: int) -> None:
  """Refuses (ValueError, one line) a resume whose input stream differs from
  the one checkpoint `step` was trained on. Facts an older checkpoint lacks
  are not checked."""
  changed = [k for k in _INPUT_KEYS if k in saved and saved[k] != run.get(k)]
  if run.get("allow_input_change"):
    for key in (k for k in changed if k in _DATA_KEYS):
      logging.warning("Resuming on changed input (config.data.allow_input_change): %s",
                      _describe_change(key, saved[key], run.get(key)))
    changed = [k for k in changed if k not in _DATA_KEYS]
  if changed:
    what = "; ".join(_describe_change(k, saved[k], run.get(k)) for k in changed)
    allow = (" or set --config.data.allow_input_change=True if the change is intended"
             if all(k in _DATA_KEYS for k in changed) else "")
    raise ValueError(
        f"checkpoint at step {step} was trained on another input stream: {what}. "
        f"Use a new --workdir, restore the old input{allow}.")


def _describe_change(key: str, old, new) -> str:
  if key == "num_records":
    return f"records {old} -> {new}"
  if key != "shards":
    return f"{key} {old!r} -> {new!r}"
  old, new = dict(map(tuple, old)), dict(map(tuple, new or []))
  parts = [f"shard {n} missing" for n in old if n not in new]
  parts += [f"shard {n} new" for n in new if n not in old]
  parts += [f"shard {n} {old[n]} -> {new[n]} bytes" for n in old if n in new and old[n] != new[n]]
  if not parts:
    return "shards reordered"
  return ", ".join(parts[:3]) + (f" (and {len(parts) - 3} more)" if len(parts) > 3 else "")


class Checkpointer:

  def __init__(self, directory: str, *, keep: int, async_save: bool):
    self.manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        item_names=("state", "run"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, run: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), run=ocp.args.JsonSave(run)), force=True)

  def restore(self, abstract_state, run: dict, step: int | None = None):
    """Restores `step` (default latest) into the shardings of `abstract_state`."""
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), run=ocp.args.JsonRestore()))
    saved = dict(restored.run or {})
    check_input_facts(saved, run, step)
    logging.info("Restored checkpoint at step %d", step)
    return restored.state, saved

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()



# --- Reading checkpoints outside training (evaluation, export, imports).

def save_params(workdir: str, params, run: dict, step: int = 0) -> str:
  """Writes a params-only checkpoint in the layout `train` uses
  (`workdir/checkpoints/<step>/{state,run}`, state = {"params": params}):
  imported weights become a checkpoint like any other. Returns the step dir."""
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
  try:
    ckpt.save(step, {"params": params}, run)
  finally:
    ckpt.close()
  return os.path.join(workdir, "checkpoints", str(step))


def find_step_dir(path: str, step: int | None = None) -> str:
  """A workdir, its `checkpoints/` folder or one step's folder (local or
  gs://) -> that step's folder (the latest finished step unless `step` is given)."""
  path = os.fspath(path).rstrip("/")
  if _is_step_dir(path):
    if step is not None and int(os.path.basename(path)) != step:
      raise ValueError(f"{path} is the checkpoint of step {os.path.basename(path)}, "
                       f"not of the requested step {step}")
    return path
  for root in (storage.join(path, "checkpoints"), path):
    if not storage.as_path(root).is_dir():
      continue
    steps = sorted(int(d.name) for d in storage.as_path(root).iterdir()
                   if d.name.isdigit() and _is_step_dir(storage.join(root, d.name)))
    if not steps:
      continue
    if step is None:
      return storage.join(root, str(steps[-1]))
    if step not in steps:
      raise ValueError(f"no checkpoint of step {step} in {root}; it holds steps {steps}")
    return storage.join(root, str(step))
  raise FileNotFoundError(
      f"no finished checkpoint under {path} (expected <workdir>/checkpoints/<step>/state "
      "as written by main.py or `python -m biovfm_jax.interop import`)")


def _is_step_dir(path: str) -> bool:
  # Locally orbax renames a step's temporary folder once the write has finished;
  # on object stores it writes commit_success.txt last instead.
  p = storage.as_path(path)
  return (p.name.isdigit() and (p / "state").is_dir() and (p / "run").is_dir()
          and (not storage.is_remote(path) or (p / "commit_success.txt").exists()))


def read_run(step_dir: str) -> dict:
  """The run JSON saved beside the state (seed, objective, backbone, encoder ...)."""
  return dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
      os.path.join(step_dir, "run")) or {})


def state_metadata(step_dir: str):
  """The saved state's tree of array metadata (shape, dtype), read without loading."""
  return ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir, "state")).item_metadata.tree


def restore_subtree(step_dir: str, path: tuple[str, ...], target):
  """Restores only the sub-tree at `path` (e.g. ("params", "encoder")) of the
  saved state into `target` (a tree of jax.ShapeDtypeStruct with shardings),
  without reading the rest (optimiser moments, decoder ...)."""
  item = target
  for key in reversed(path):
    item = {key: item}
  restored = ocp.PyTreeCheckpointer().restore(
      os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
  for key in path:
    restored = restored[key]
  return restored
