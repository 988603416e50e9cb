"""Orbax checkpoints of the train state plus a small JSON of run facts.

The input position is not stored separately: it is a pure function of
(seed, global step), so the restored step is the input position. The JSON
item records the facts that must match for that to hold (seed, batch size,
data spec) and a resume with different values is refused.

Orbax writes each step into a temporary directory and renames it when
complete, so a killed or failed write never leaves a step that restores.
A finished step that was damaged later (a truncated or deleted file) is moved
to `<workdir>/checkpoints_unreadable/<step>`, never deleted, and the newest
step that restores is used instead.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys

import orbax.checkpoint as ocp

from data_pipeline import storage
from data_pipeline.shards import InputDataError

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
    raise InputDataError(
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
# Run facts that define the model; a resume with others cannot restore the state.
_MODEL_KEYS = ("objective", "backbone", "encoder")
UNREADABLE_DIR = "checkpoints_unreadable"


class CheckpointError(RuntimeError):
  """A checkpoint cannot be written or restored; the message is one line."""


class ModelMismatch(CheckpointError):
  """The workdir's checkpoint was written for another model or objective."""


class _OrbaxOneLine(logging.Filter):
  """Orbax logs each failed background write with its traceback, from several
  threads; the Checkpointer reports the failure itself, in one line. Keep
  orbax's own lines, without the tracebacks."""

  def filter(self, record):
    if record.name == "asyncio":  # orbax's failed write tasks, collected later
      return "orbax" not in record.getMessage()
    if "/orbax/" in record.pathname and record.exc_info:
      record.msg, record.args = one_line(record.getMessage()), None
      record.exc_info = record.exc_text = None
    return True


for _name in ("absl", "asyncio"):
  logging.getLogger(_name).addFilter(_OrbaxOneLine())


def _closed_loop_one_line(hook):
  """After a failed async save, tensorstore's writer threads still report
  their results to orbax's closed event loop, and Python prints each
  "Event loop is closed" with its traceback (as an unraisable exception, from
  C++): say it once, in one line; anything else goes to `hook` as before."""
  said = []

  def unraisablehook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      if not said:
        said.append(True)
        logging.warning("Background checkpoint writes ended after their event loop "
                        "closed (after a failed save).")
      return
    hook(unraisable)
  return unraisablehook


sys.unraisablehook = _closed_loop_one_line(sys.unraisablehook)

# Tensorstore holds each OCDBT data file in host memory until it is full, and
# orbax's default for local paths is 2 GiB: a save then needs up to 3 GB of
# host memory beyond the state (a 3.9 GB fp32 ViT-L MAE state: +2.9-3.4 GB at
# the default, +0.5-0.7 GB at 64 MiB, and faster; benchmarks/RESULTS.md).
DATA_FILE_BYTES = 64 << 20


class Checkpointer:

  def __init__(self, directory: str, *, keep: int, async_save: bool):
    self.directory = directory
    self.saving = None  # the step of the last save, for the message if it fails
    self.manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        item_names=("state", "run"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, run: dict) -> None:
    self.check()  # the previous async save first: it may have failed meanwhile
    self.saving = step
    with self._save_errors():
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state, ocdbt_target_data_file_size=DATA_FILE_BYTES),
          run=ocp.args.JsonSave(run)), force=True)

  def check(self) -> None:
    """Raises CheckpointError if an async save has failed (cheap: call every step)."""
    if not self.manager.is_saving_in_progress():
      self.wait()  # returns at once; raises the failure of a finished save

  @contextlib.contextmanager
  def _save_errors(self):
    try:
      yield
    except Exception as e:  # pylint: disable=broad-exception-caught
      path = os.path.join(self.directory, str(self.saving))
      raise CheckpointError(f"saving the checkpoint of step {self.saving} to {path} failed: "
                            f"{one_line(e)}. The earlier checkpoints are kept.") from None

  def restore(self, abstract_state, run: dict, step: int | None = None):
    """Restores `step` (default: the newest step that restores) into the shardings
    of `abstract_state`, after checking that it was written for the same model."""
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    unreadable = []
    for step in steps:
      step_dir = os.path.join(self.directory, str(step))
      try:
        saved = dict(self.manager.restore(step, args=ocp.args.Composite(
            run=ocp.args.JsonRestore())).run or {})
      except Exception as e:  # pylint: disable=broad-exception-caught
        unreadable.append((step, e))
        continue
      check_same_model(saved, run, step_dir, abstract_state)
      try:
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract_state, restore_args=(
                ocp.checkpoint_utils.construct_restore_args(abstract_state))))).state
      except Exception as e:  # pylint: disable=broad-exception-caught
        unreadable.append((step, e))
        continue
      break
    else:  # none restores: move nothing, a config or library problem looks just like this
      bad, err = unreadable[0]
      raise CheckpointError(f"no checkpoint in {self.directory} restores (steps "
                            f"{[s for s, _ in unreadable]}); step {bad}: {one_line(err)}")
    # `saved`: the run facts read before the state. Checked before anything is
    # moved: a refused resume leaves the workdir as it was.
    check_input_facts(saved, run, step)
    for bad, err in unreadable:
      logging.warning("Checkpoint of step %d is unreadable (%s): moved to %s; resuming "
                      "from step %d.", bad, one_line(err), self._set_aside(bad), step)
    if unreadable:
      self.manager.reload()
    logging.info("Restored checkpoint at step %d", step)
    return state, saved

  def _set_aside(self, step: int) -> str:
    """Moves a damaged step out of orbax's sight (process 0 only; it is never deleted)."""
    import jax  # pylint: disable=import-outside-toplevel
    src = storage.join(self.directory, str(step))
    dest = storage.join(storage.dirname(self.directory.rstrip("/")), UNREADABLE_DIR, str(step))
    if jax.process_index() == 0:
      if storage.as_path(dest).exists():  # an older one set aside at the same step
        dest = f"{dest}.{len(list(storage.as_path(dest).parent.glob(f'{step}*')))}"
      storage.makedirs(storage.dirname(dest))
      storage.as_path(src).rename(dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"set_aside_{step}")
    return dest

  def wait(self) -> None:
    with self._save_errors():
      self.manager.wait_until_finished()
      self.manager.check_for_errors()

  def close(self) -> None:
    """Waits for the last async save; raises CheckpointError if it failed."""
    try:
      self.wait()
    finally:
      self.manager.close()


def check_same_model(saved: dict, run: dict, step_dir: str, abstract_state=None) -> None:
  """Raises ModelMismatch naming the differing keys when the checkpoint's
  objective/encoder (or, as a backstop, its array shapes) differ from `run`'s."""
  diffs = [f"{key}: checkpoint {a!r}, config {b!r}"  # objective first: it says most
           for k in _MODEL_KEYS if k in saved
           for key, a, b in _differences(saved[k], run.get(k), f"{k}.")]
  if not diffs and abstract_state is not None:
    try:
      found = shapes(state_metadata(step_dir))
    except Exception:  # pylint: disable=broad-exception-caught
      found = None  # unreadable metadata: the restore says so
    if found is not None:
      wanted = shapes(abstract_state)
      diffs = [f"{k}: checkpoint shape {found.get(k)}, config {wanted.get(k)}"
               for k in sorted(set(found) | set(wanted), key=_params_first)
               if found.get(k) != wanted.get(k)]
  if diffs:
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    raise ModelMismatch(f"{step_dir} was written for another model or objective: "
                        f"{'; '.join(diffs[:3])}{more}. Use a new --workdir, or the config "
                        "the workdir was trained with.")


def _params_first(path: str):
  return not path.startswith("params/"), path  # the optimiser's copies say less


def _differences(a, b, prefix=""):
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(set(a) | set(b)):
      yield from _differences(a.get(key), b.get(key), f"{prefix}{key}.")
  elif _plain(a) != _plain(b):
    yield prefix.rstrip("."), a, b


def _plain(x):
  return list(x) if isinstance(x, tuple) else x  # JSON turns tuples into lists


def shapes(tree) -> dict[str, tuple]:
  import jax  # pylint: disable=import-outside-toplevel
  return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path):
          tuple(getattr(x, "shape", ()))
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def one_line(e) -> str:
  """The gist of a (TensorStore, orbax) error: its first non-empty line, cut short."""
  text = str(e)
  line = next((l.strip() for l in text.splitlines() if l.strip()), type(e).__name__)
  # TensorStore puts the OS error (e.g. "No space left on device") at the end,
  # sometimes only as its number.
  line = line if len(line) <= 300 else f"{line[:140]} ... {line[-150:]}"
  oserror = re.search(r"os_error_code='?(\d+)", text)
  if oserror and os.strerror(int(oserror.group(1))) not in line:
    line += f" ({os.strerror(int(oserror.group(1)))})"
  return line



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


def progress(step_dir: str, run: dict | None = None) -> tuple[int, int | None]:
  """(step, total steps) of a checkpoint: its step and the step its run was
  to end at (None where the run JSON does not record it: imports, older runs)."""
  run = read_run(step_dir) if run is None else run
  total = run.get("total_steps")
  return int(os.path.basename(step_dir.rstrip("/"))), None if total is None else int(total)


def state_metadata(step_dir: str):
  """The saved state's tree of array metadata (shape, dtype), read without loading.
  From the item's handler: a Checkpointer would look for step metadata in the
  item folder `state/` (it lives in the step's) and log that it is missing."""
  return ocp.PyTreeCheckpointHandler().metadata(storage.as_path(step_dir) / "state").tree


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


def restore_host(step_dir: str, path: tuple[str, ...]):
  """The saved sub-tree at `path` as numpy arrays, in the saved layout."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  saved = state_metadata(step_dir)
  for key in path:
    saved = saved[key]
  saved = dict(saved) if hasattr(saved, "items") else saved  # a sub-tree, or one array
  item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
  for key in reversed(path):
    item, args = {key: item}, {key: args}
  restored = ocp.PyTreeCheckpointer().restore(
      os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
          item=item, restore_args=args, partial_restore=True))
  for key in path:
    restored = restored[key]
  return restored


def relaid_like(tree, like):
  """Host params `tree` in the keys and block layout of `like` (per layer or
  scanned); sub-trees `like` lacks are dropped, those `tree` lacks left out."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  return _restack(tree, like, stack=np.stack, take=lambda x, i: x[i])


def _looped(tree) -> bool:
  return bool(tree) and all(str(k).isdigit() for k in tree)


def _restack(tree, like, *, stack, take):
  """`tree` (saved params; string or int keys) in the keys and block layout of
  `like`; sub-trees `like` lacks are dropped, those `tree` lacks left out."""
  if not (hasattr(like, "items") and hasattr(tree, "items")):
    return tree
  src = {str(k): v for k, v in tree.items()}
  if _looped(src) and not _looped(like):  # per layer -> one stacked stack
    layers = [src[str(i)] for i in range(len(src)) if str(i) in src]
    return _restack(_stack_trees(layers, stack), like, stack=stack, take=take)
  if (_looped(like) and src and not _looped(src)
      and {_lead(x) for x in _leaves(tree)} == {len(like)}):  # stacked -> per layer
    return {k: _restack(_take_tree(tree, int(k), take), v, stack=stack, take=take)
            for k, v in like.items()}
  return {k: _restack(src[str(k)], v, stack=stack, take=take)
          for k, v in like.items() if str(k) in src}


def _leaves(tree) -> list:
  if not hasattr(tree, "items"):
    return [tree]
  return [x for v in tree.values() for x in _leaves(v)]


def _lead(x):
  shape = getattr(x, "shape", ())
  return shape[0] if shape else None


def _stack_trees(trees: list, stack):
  first = trees[0]
  if not hasattr(first, "items"):
    return stack(trees)
  return {str(k): _stack_trees([t[k] for t in trees if k in t], stack) for k in first}


def _take_tree(tree, i: int, take):
  if not hasattr(tree, "items"):
    return take(tree, i)
  return {str(k): _take_tree(v, i, take) for k, v in tree.items()}
