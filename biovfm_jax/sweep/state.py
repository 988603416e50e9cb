"""Where a sweep stands: one JSON state file per run (<root>/state/<name>.json)
and the progress line over the grid.

A run's status is pending, running, done or failed. "running" left behind by
a launcher that died (SIGKILL, power loss) or stopped (Ctrl-C, SIGTERM) means
"resume me": only one launcher holds a sweep root at a time (an flock on
<root>/run.lock), so a running state the new holder finds is stale.
"""
from __future__ import annotations

import json
import os
import time

from biovfm_jax import results
from data_pipeline import storage

STATUSES = ("pending", "running", "done", "failed")


class RunState:
  """The state file of one run; every change is written at once (atomically)."""

  def __init__(self, root: str, name: str):
    self.path = os.path.join(root, "state", f"{name}.json")
    self.name = name
    self.log = os.path.join(root, "logs", f"{name}.log")
    self.doc = {"name": name, "status": "pending", "attempts": 0, "error": "",
                "log": self.log, "seconds": 0.0, "started": "", "finished": ""}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.doc.update(json.load(f))

  @property
  def status(self) -> str:
    return self.doc["status"]

  def save(self, **changes) -> None:
    self.doc.update(changes)
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    storage.write_bytes_atomic(self.path, (json.dumps(self.doc, indent=1) + "\n").encode())

  def start(self) -> None:
    self._t0 = time.time()
    self.save(status="running", attempts=self.doc["attempts"] + 1, error="",
              started=results.now(), finished="")

  def _elapsed(self) -> float:
    return self.doc["seconds"] + time.time() - getattr(self, "_t0", time.time())

  def done(self) -> None:
    self.save(status="done", seconds=round(self._elapsed(), 1), finished=results.now())

  def failed(self, error: str) -> None:
    self.save(status="failed", error=error, seconds=round(self._elapsed(), 1),
              finished=results.now())

  def stopped(self) -> None:
    """Interrupted: stays "running" (resumable); the time so far counts."""
    self.save(seconds=round(self._elapsed(), 1))


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(states: list[RunState], sweep: str) -> str:
  """"sweep tiny: 3/8 done, 1 running, 0 failed, 4 pending; ETA 2m10s" (the ETA
  from the mean duration of the finished runs)."""
  counts = {s: 0 for s in STATUSES}
  for st in states:
    counts[st.status] += 1
  line = (f"sweep {sweep}: {counts['done']}/{len(states)} done, {counts['running']} running, "
          f"{counts['failed']} failed, {counts['pending']} pending")
  durations = [st.doc["seconds"] for st in states if st.status == "done"]
  left = counts["running"] + counts["pending"]
  if durations and left:
    mean = sum(durations) / len(durations)
    line += f"; ETA {_duration(mean * left)} ({_duration(mean)} per run)"
  return line
