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
_INPUT_KEYS = ("seed", "batch_size", "data_shards")


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
    for key in _INPUT_KEYS:
      if key in saved and saved[key] != run.get(key):
        raise ValueError(
            f"checkpoint at step {step} was written with {key}={saved[key]!r}, the config "
            f"now says {run.get(key)!r}: resuming would not continue the same input stream. "
            f"Use a new --workdir or restore the old value.")
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
