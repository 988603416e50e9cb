"""Files on a local disk or in a bucket (gs://, s3://), through one API.

Reading goes through etils.epath (tf.io.gfile or fsspec underneath), the
file-system layer grain and orbax already use; ArrayRecord opens gs:// shards
itself. Writes are all-or-nothing: local files are written beside their
target and renamed over it, and an object-store upload only appears once it
is complete.
"""
from __future__ import annotations

import fnmatch
import glob as glob_lib
import os
import posixpath

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def expand(path: str | os.PathLike | None) -> str | None:
  """A user's path as the program keeps it: '~' expanded and made absolute
  (orbax refuses relative paths; a literal './~' folder invites `rm -rf ~`).
  gs:// and other URLs pass as given, as does an empty value. Applied once,
  where flags and config fields enter (main.py, evaluate.py, the CLIs)."""
  if not path:
    return path
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def expand_list(spec: str) -> str:
  """`expand` on each item of a comma-separated list (shard specs); names
  that are not paths ('mini') stay as they are."""
  items = [s.strip() for s in spec.split(",")]
  return ",".join(s if s in ("", "mini") else expand(s) for s in items)


def as_path(path: str | os.PathLike) -> epath.Path:
  path = os.fspath(path)
  return epath.Path(path if is_remote(path) else os.path.expanduser(path))


def join(base: str | os.PathLike, *parts: str) -> str:
  """os.path.join + normpath that keeps 'gs://' whole ('..' resolved too)."""
  base = os.fspath(base)
  if not is_remote(base):
    return os.path.normpath(os.path.join(os.path.expanduser(base), *parts))
  scheme, rest = base.split("://", 1)
  return f"{scheme}://{posixpath.normpath(posixpath.join(rest, *parts))}"


def dirname(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.dirname(path)
  scheme, rest = path.split("://", 1)
  return f"{scheme}://{posixpath.dirname(rest)}"


def glob(pattern: str) -> list[str]:
  """Files matching `pattern` (sorted); magic may sit in any path component."""
  if not is_remote(pattern):
    pattern = os.path.expanduser(pattern)
    return sorted(p for p in glob_lib.glob(pattern) if os.path.isfile(p))
  scheme, rest = pattern.split("://", 1)
  parts = rest.split("/")
  first = next(i for i, p in enumerate(parts) if glob_lib.has_magic(p))
  root = as_path(f"{scheme}://" + "/".join(parts[:first]))
  found = [os.fspath(p) for p in root.glob("/".join(parts[first:]))]
  # Some backends treat '*' as crossing '/'; keep fnmatch's one-component meaning.
  return sorted(p for p in found if fnmatch.fnmatchcase(p, pattern) and as_path(p).is_file())


def files_in(directory: str | os.PathLike, suffix: str) -> list[str]:
  """Files in `directory` (not below it) ending in `suffix`, sorted."""
  directory = os.fspath(directory)
  if not is_remote(directory):
    directory = os.path.expanduser(directory)
    return sorted(glob_lib.glob(os.path.join(glob_lib.escape(directory), f"*{suffix}")))
  return sorted(os.fspath(p) for p in as_path(directory).iterdir()
                if os.fspath(p).endswith(suffix))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Readers see the old file or the new one, never half of one; a failed
  write leaves no temporary file behind."""
  path = os.fspath(path)
  if is_remote(path):
    as_path(path).write_bytes(data)  # an upload is visible only when complete
    return
  # open(), not mkstemp: the file gets the umask's mode (0644), not 0600, so a
  # corpus or report written by one user stays readable to the others.
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())  # the rename must not land before the bytes do
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def makedirs(path: str | os.PathLike) -> None:
  """Local only: object stores have no directories to make."""
  if not is_remote(path):
    os.makedirs(os.path.expanduser(os.fspath(path)), exist_ok=True)
