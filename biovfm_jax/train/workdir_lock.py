"""One run at a time per workdir: an flock on <workdir>/run.lock for the run's life.

The kernel drops an flock when its process dies, however it dies, so the lock
left behind by a SIGKILLed run never blocks a restart; the file only tells
who held it last. Object stores (gs://) have no locks: there none is held,
and a log line says so.
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
