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

import orbax.checkpoint as ocp

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

