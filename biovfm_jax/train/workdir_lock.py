"""One run at a time per workdir: an flock on <workdir>/run.lock for the run's life.

The kernel drops an flock when its process dies, however it dies, so the lock
left behind by a SIGKILLed run never blocks a restart; the file only tells
who held it last. Object stores (gs://) have no locks: there none is held,
and a log line says so.

`Added` notes what a workdir holds before a run starts, so that a run refused
before its first step leaves the workdir as it found it.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket

from data_pipeline import storage

LOCK_NAME = "run.lock"


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir."""


def acquire(workdir: str) -> int | None:
  """Locks `workdir` (creating it) and returns the lock's file descriptor, to
  keep open while the run lasts; None where no lock is possible (gs://)."""
  if storage.is_remote(workdir):
    logging.warning("%s is on an object store: no workdir lock is held, so make sure no "
                    "other run uses this --workdir.", workdir)
    return None
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown process"
    os.close(fd)
    raise WorkdirBusy(f"{workdir} is in use by another run ({holder}, see {path}): "
                      "wait for it to end or stop it, or use another --workdir.") from None
  os.ftruncate(fd, 0)
  os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
  return fd


@contextlib.contextmanager
def held(workdir: str, enabled: bool = True):
  """Holds the lock of `workdir` inside the block (nothing when not `enabled`:
  the other processes of a multi-process run, which process 0 covers)."""
  fd = acquire(workdir) if enabled else None
  try:
    yield
  finally:
    if fd is not None:
      os.close(fd)  # releases the flock


class Added:
  """What a run adds to `workdir`: noted before it creates anything (the lock
  does first), removed by `undo` unless `keep` was called (training began).

  Only entries that were not there are removed, never one that was: a folder
  the run created (and its parents) goes whole; in a workdir that existed, the
  new top-level entries (run.lock, checkpoints/, compile_cache/, summaries).
  """

  def __init__(self, workdir: str):
    self.workdir = storage.as_path(workdir)
    self.made = []  # folders this run will create, innermost first
    if not storage.is_remote(workdir):  # object stores have no folders to make
      path = self.workdir
      while not path.exists():
        self.made.append(path)
        path = path.parent
    self.before = ({p.name for p in self.workdir.iterdir()} if self.workdir.exists()
                   else set())
    self.kept = False

  def keep(self) -> None:
    self.kept = True

  def undo(self) -> None:
    """Removes what the run added; a failure only logs (the refusal is the error)."""
    if self.kept:
      return
    try:
      for entry in (self.workdir.iterdir() if self.workdir.exists() else ()):
        if entry.name in self.before:
          continue
        if entry.is_dir():
          entry.rmtree()
        else:
          entry.unlink()
      for folder in self.made:
        folder.rmdir()  # fails, and stops, where something else was put in it
    except OSError as e:
      logging.warning("Could not remove what this run added to %s: %s", self.workdir, e)
