"""ArrayRecord shards: writing them with a manifest, and finding them from a spec."""
from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from data_pipeline import storage
from data_pipeline.records import UNKNOWN, decode_record

SHARD_SUFFIX = ".array_record"
MANIFEST = "manifest.json"
INDEX = "index.npz"


class InputDataError(ValueError):
  """The shards on disk are not what the run expects (missing, resized,
  changed since the checkpoint, too many unreadable records); one line."""


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def write_json_atomic(path: str, obj: Any) -> None:
  """Readers never see half a file (local or gs://)."""
  storage.write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _shard_name(prefix: str, i: int) -> str:
  return f"{prefix}-{i:05d}{SHARD_SUFFIX}"


class ShardWriter:
  """Appends records to shards `<prefix>-00000.array_record`, ... of at most
  `records_per_shard` records and (when set) `max_bytes` bytes each.

  A shard is written under a temporary name and renamed when complete, so a
  crash never leaves a truncated shard behind. `write` returns the shard's
  entry ({"file", "num_records", "bytes", "sha256"}) when a record completes a
  shard, else None; `close` completes the last one. Per-record (source,
  modality) from the headers are kept for the index (see write_index).
  """

  def __init__(self, out_dir: str | os.PathLike, prefix: str, *,
               records_per_shard: int | None = None, max_bytes: int | None = None,
               first_shard: int = 0):
    if records_per_shard is not None and records_per_shard < 1:
      raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    if max_bytes is not None and max_bytes < 1:
      raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    self.out_dir, self.prefix = os.fspath(out_dir), prefix
    self.records_per_shard, self.max_bytes = records_per_shard, max_bytes
    self.next_shard = first_shard
    self.sources: list[str] = []       # per record of the shard being written
    self.modalities: list[str] = []
    self._writer = self._tmp = None
    self._count = self._bytes = 0
    os.makedirs(self.out_dir, exist_ok=True)

  def write(self, raw: bytes, n: int | None = None) -> dict[str, Any] | None:
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
    try:
      _, header = decode_record(raw)
    except ValueError as e:
      where = f"record {n}" if n is not None else "a record"
      raise ValueError(f"{where} for {self.prefix!r} is not a valid record: {e}") from e
    if self._writer is None:
      final = os.path.join(self.out_dir, _shard_name(self.prefix, self.next_shard))
      self._tmp = f"{final}.tmp-{os.getpid()}"
      self._writer = ArrayRecordWriter(self._tmp, "group_size:1")
      self.sources, self.modalities = [], []
    self._writer.write(raw)
    self.sources.append(str(header.get("source") or UNKNOWN))
    self.modalities.append(str(header.get("modality") or UNKNOWN))
    self._count += 1
    self._bytes += len(raw)
    if ((self.records_per_shard and self._count >= self.records_per_shard)
        or (self.max_bytes and self._bytes >= self.max_bytes)):
      return self._finish()
    return None

  def close(self) -> dict[str, Any] | None:
    return self._finish() if self._writer is not None else None

  def abort(self) -> None:
    """Drops the shard being written (its records are lost, nothing else)."""
    if self._writer is not None:
      self._writer.close()
      os.remove(self._tmp)
      self._writer = None
      self._count = self._bytes = 0

  def _finish(self) -> dict[str, Any]:
    self._writer.close()
    final = self._tmp.rsplit(".tmp-", 1)[0]
    os.replace(self._tmp, final)
    entry = {"file": os.path.basename(final), "num_records": self._count,
             "bytes": os.path.getsize(final), "sha256": _sha256(final)}
    self._writer = None
    self._count = self._bytes = 0
    self.next_shard += 1
    return entry


def manifest_counts(sources: Sequence[str], modalities: Sequence[str]) -> dict[str, Any]:
  """Counts per source, per modality and per (source, modality) pair."""
  pairs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for s, m in zip(sources, modalities):
    pairs[s][m] += 1
  return {"sources": dict(sorted(collections.Counter(sources).items())),
          "modalities": dict(sorted(collections.Counter(modalities).items())),
          "by_source": {s: dict(sorted(c.items())) for s, c in sorted(pairs.items())}}


def write_index(out_dir: str | os.PathLike, shard_of: Sequence[int],
                sources: Sequence[str], modalities: Sequence[str]) -> str:
  """`index.npz`: per record, in shard order, its shard number, source and
  modality (as ids into the name tables): subsets and mixtures select
  records by these without reading the shards."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  source_names = sorted(set(sources))
  modality_names = sorted(set(modalities))
  s_id = {n: i for i, n in enumerate(source_names)}
  m_id = {n: i for i, n in enumerate(modality_names)}
  path = storage.join(out_dir, INDEX)
  buf = io.BytesIO()
  np.savez(buf, shard=np.asarray(shard_of, np.int32),
           source=np.asarray([s_id[s] for s in sources], np.int32),
           modality=np.asarray([m_id[m] for m in modalities], np.int32),
           source_names=np.asarray(source_names, str),
           modality_names=np.asarray(modality_names, str))
  storage.write_bytes_atomic(path, buf.getvalue())
  return path


def read_index(shard_dir: str | os.PathLike) -> dict[str, Any]:
  """The arrays of `index.npz` (see write_index). Shards written before the
  index existed get one built from their record headers (once, then saved)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  shard_dir = os.fspath(shard_dir)
  path = storage.as_path(storage.join(shard_dir, INDEX))
  if not path.exists():
    _index_from_headers(shard_dir)
  with path.open("rb") as f, np.load(f) as z:
    return {k: z[k] for k in z.files}


def _index_from_headers(shard_dir: str) -> None:
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=import-outside-toplevel
  shard_of, sources, modalities = [], [], []
  paths = storage.files_in(shard_dir, SHARD_SUFFIX)
  if not paths:
    raise FileNotFoundError(f"no {SHARD_SUFFIX} files in {shard_dir}")
  for k, path in enumerate(paths):
    reader = ArrayRecordReader(path)
    try:
      for raw in reader.read_all():
        try:
          header = decode_record(raw)[1]
        except ValueError:
          header = {}
        shard_of.append(k)
        sources.append(str(header.get("source") or UNKNOWN))
        modalities.append(str(header.get("modality") or UNKNOWN))
    finally:
      reader.close()
  write_index(shard_dir, shard_of, sources, modalities)


def write_shards(records: Iterable[bytes], out_dir: str | os.PathLike, prefix: str,
                 records_per_shard: int = 1024, *, overwrite: bool = False,
                 extra_manifest: dict[str, Any] | None = None) -> list[str]:
  """Write `records` into ArrayRecord shards `<prefix>-00000.array_record`, ...

  `manifest.json` in `out_dir` lists every shard (records, bytes, sha256) and
  the record counts per source and modality, read from the record headers;
  `index.npz` holds them per record. Every record must be a valid record
  (`records.decode_record`); a malformed one raises ValueError. A failure
  never leaves a truncated shard behind.

  Existing shards with this prefix raise FileExistsError unless `overwrite`, in
  which case they are replaced and any left over from a longer earlier run are
  removed. Returns the shard paths in order.
  """
  if records_per_shard < 1:
    raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  old = set(glob.glob(os.path.join(glob.escape(out_dir), f"{glob.escape(prefix)}-*{SHARD_SUFFIX}")))
  if old and not overwrite:
    raise FileExistsError(f"{out_dir} already holds shards named {prefix}-*{SHARD_SUFFIX}; "
                          "pass overwrite=True to replace them")
  writer = ShardWriter(out_dir, prefix, records_per_shard=records_per_shard)
  shards: list[dict[str, Any]] = []
  sources: list[str] = []
  modalities: list[str] = []
  shard_of: list[int] = []

  def done(entry):
    shards.append(entry)
    sources.extend(writer.sources)
    modalities.extend(writer.modalities)
    shard_of.extend([len(shards) - 1] * entry["num_records"])

  try:
    for n, raw in enumerate(records):
      entry = writer.write(raw, n)
      if entry:
        done(entry)
    entry = writer.close()
    if entry:
      done(entry)
  except BaseException:
    writer.abort()
    raise
  if not shards:
    raise ValueError(f"no records to write for {prefix!r} in {out_dir}")

  paths = [os.path.join(out_dir, s["file"]) for s in shards]
  for stale in old - set(paths):
    os.remove(stale)
  write_index(out_dir, shard_of, sources, modalities)
  manifest = {
      "prefix": prefix,
      "num_records": sum(s["num_records"] for s in shards),
      "num_shards": len(shards),
      "shards": shards,
      **manifest_counts(sources, modalities),
  }
  manifest.update(extra_manifest or {})
  write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
  return paths


def read_manifest(shard_dir: str | os.PathLike) -> dict[str, Any]:
  return json.loads(storage.as_path(storage.join(shard_dir, MANIFEST)).read_text())


def shard_sizes(paths: Sequence[str]) -> list[int]:
  """Bytes of each file; threads, since each is a round trip on a bucket."""
  from concurrent.futures import ThreadPoolExecutor  # pylint: disable=import-outside-toplevel
  with ThreadPoolExecutor(16) as pool:
    return list(pool.map(lambda p: storage.as_path(p).stat().length, paths))


def check_manifest(shard_dir: str, found: Sequence[str]) -> None:
  """Raises ValueError naming the first shard of `shard_dir` that its
  manifest.json lists but is missing or has another size, or that it does not
  list: a folder of shards trains on what its manifest says or not at all."""
  listed = {s["file"]: s for s in read_manifest(shard_dir)["shards"]}
  sizes = dict(zip((os.path.basename(p) for p in found), shard_sizes(found)))
  problems = [f"{name} missing (listed with {s.get('num_records', '?')} records)"
              for name, s in listed.items() if name not in sizes]
  problems += [f"{name} is {sizes[name]} bytes, listed as {s['bytes']}"
               for name, s in listed.items()
               if name in sizes and s.get("bytes") not in (None, sizes[name])]
  problems += [f"{name} is not listed" for name in sizes if name not in listed]
  if problems:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise InputDataError(
        f"{storage.join(shard_dir, MANIFEST)} does not match the shards beside it: "
        f"{problems[0]}{more}. Restore the shard, or name the shards to use by a glob "
        f"in config.data.shards")


def _resolve_one(item: str, named: Mapping[str, Callable[[], list[str]]]) -> list[str]:
  if item in named:
    return named[item]()
  path = storage.as_path(item)
  if path.is_dir():
    found = storage.files_in(item, SHARD_SUFFIX)
    if (path / MANIFEST).exists():
      check_manifest(item, found)
    return found
  if glob.has_magic(item):
    return storage.glob(item)
  return [os.fspath(path)] if path.is_file() else []


def resolve_shards(spec: str | os.PathLike | Sequence[str],
                   named: Mapping[str, Callable[[], list[str]]] | None = None) -> list[str]:
  """Shard paths for `spec`, in a fixed order.

  spec: a name in `named` (a built-in corpus: its function gives its paths), a
  directory (its `*.array_record`, sorted), a glob, a file, a comma-separated
  list of any of these, or a list of them; local or in a bucket (gs://...). Raises FileNotFoundError naming the
  spec when nothing matches (or any one part of a list matches nothing).
  """
  items = ([os.fspath(s) for s in spec] if isinstance(spec, (list, tuple))
           else os.fspath(spec).split(","))
  items = [s.strip() for s in items if s.strip()]
  if not items:
    raise FileNotFoundError(f"empty shard spec {spec!r}")
  named = named or {}
  paths: list[str] = []
  for item in items:
    found = _resolve_one(item, named)
    if not found:
      raise FileNotFoundError(
          f"shard spec {spec!r}: {item!r} matches no {SHARD_SUFFIX} files "
          f"(expected {''.join(repr(n) + ', ' for n in named)}a directory, a glob, a file "
          "or a comma-separated list)")
    paths.extend(found)
  return paths


@contextlib.contextmanager
def file_lock(path: str):
  """An exclusive lock across processes (a no-op where fcntl is missing: the
  final rename still keeps the corpus whole, two builds just waste time)."""
  try:
    import fcntl  # pylint: disable=import-outside-toplevel
  except ImportError:
    yield
    return
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
