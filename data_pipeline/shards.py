"""ArrayRecord shards: writing them with a manifest, and finding them from a spec."""
from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from data_pipeline.records import decode_record

SHARD_SUFFIX = ".array_record"
MANIFEST = "manifest.json"


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def write_json_atomic(path: str, obj: Any) -> None:
  """Write JSON beside `path` and rename over it: readers never see half a file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _shard_name(prefix: str, i: int) -> str:
  return f"{prefix}-{i:05d}{SHARD_SUFFIX}"


def write_shards(records: Iterable[bytes], out_dir: str | os.PathLike, prefix: str,
                 records_per_shard: int = 1024, *, overwrite: bool = False,
                 extra_manifest: dict[str, Any] | None = None) -> list[str]:
  """Write `records` into ArrayRecord shards `<prefix>-00000.array_record`, ...

  Each shard is written under a temporary name and renamed when complete, so a
  failure never leaves a truncated shard behind. `manifest.json` in `out_dir`
  lists every shard (records, sha256) and the record counts per source and
  modality, read from the record headers. Every record must be a valid record
  (`records.decode_record`); a malformed one raises ValueError.

  Existing shards with this prefix raise FileExistsError unless `overwrite`, in
  which case they are replaced and any left over from a longer earlier run are
  removed. Returns the shard paths in order.
  """
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
  if records_per_shard < 1:
    raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  old = set(glob.glob(os.path.join(glob.escape(out_dir), f"{glob.escape(prefix)}-*{SHARD_SUFFIX}")))
  if old and not overwrite:
    raise FileExistsError(f"{out_dir} already holds shards named {prefix}-*{SHARD_SUFFIX}; "
                          "pass overwrite=True to replace them")

  shards: list[dict[str, Any]] = []
  sources: collections.Counter = collections.Counter()
  modalities: collections.Counter = collections.Counter()
  pairs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  writer, tmp, count = None, None, 0

  def finish():
    nonlocal writer, tmp, count
    writer.close()
    final = tmp.rsplit(".tmp-", 1)[0]
    os.replace(tmp, final)
    shards.append({"file": os.path.basename(final), "num_records": count,
                   "sha256": _sha256(final)})
    writer, tmp, count = None, None, 0

  try:
    for n, raw in enumerate(records):
      try:
        _, header = decode_record(raw)
      except ValueError as e:
        raise ValueError(f"record {n} for {prefix!r} is not a valid record: {e}") from e
      source = str(header.get("source") or "unknown")
      modality = str(header.get("modality") or "unknown")
      sources[source] += 1
      modalities[modality] += 1
      pairs[source][modality] += 1
      if writer is None:
        tmp = os.path.join(out_dir, _shard_name(prefix, len(shards))) + f".tmp-{os.getpid()}"
        writer = ArrayRecordWriter(tmp, "group_size:1")
      writer.write(raw)
      count += 1
      if count == records_per_shard:
        finish()
    if writer is not None:
      finish()
  except BaseException:
    if writer is not None:
      writer.close()
      os.remove(tmp)
    raise
  if not shards:
    raise ValueError(f"no records to write for {prefix!r} in {out_dir}")

  paths = [os.path.join(out_dir, s["file"]) for s in shards]
  for stale in old - set(paths):
    os.remove(stale)
  manifest = {
      "prefix": prefix,
      "num_records": sum(s["num_records"] for s in shards),
      "num_shards": len(shards),
      "shards": shards,
      "sources": dict(sorted(sources.items())),
      "modalities": dict(sorted(modalities.items())),
      "by_source": {s: dict(sorted(c.items())) for s, c in sorted(pairs.items())},
  }
  manifest.update(extra_manifest or {})
  write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
  return paths


def read_manifest(shard_dir: str | os.PathLike) -> dict[str, Any]:
  with open(os.path.join(os.fspath(shard_dir), MANIFEST)) as f:
    return json.load(f)


def _resolve_one(item: str, cache_dir: str | None) -> list[str]:
  if item == "mini":
    from data_pipeline.sources.mini import build_mini_corpus  # pylint: disable=import-outside-toplevel
    return build_mini_corpus(cache_dir)
  path = os.path.expanduser(item)
  if os.path.isdir(path):
    return sorted(glob.glob(os.path.join(glob.escape(path), f"*{SHARD_SUFFIX}")))
  if glob.has_magic(path):
    return sorted(p for p in glob.glob(path) if os.path.isfile(p))
  return [path] if os.path.isfile(path) else []


def resolve_shards(spec: str | os.PathLike | Sequence[str], cache_dir: str | None = None) -> list[str]:
  """Shard paths for `spec`, in a fixed order.

  spec: "mini" (the built-in corpus, built on first use in `cache_dir`), a
  directory (its `*.array_record`, sorted), a glob, a file, a comma-separated
  list of any of these, or a list of them. Raises FileNotFoundError naming the
  spec when nothing matches (or any one part of a list matches nothing).
  """
  items = ([os.fspath(s) for s in spec] if isinstance(spec, (list, tuple))
           else os.fspath(spec).split(","))
  items = [s.strip() for s in items if s.strip()]
  if not items:
    raise FileNotFoundError(f"empty shard spec {spec!r}")
  paths: list[str] = []
  for item in items:
    found = _resolve_one(item, cache_dir)
    if not found:
      raise FileNotFoundError(
          f"shard spec {spec!r}: {item!r} matches no {SHARD_SUFFIX} files "
          "(expected 'mini', a directory, a glob, a file or a comma-separated list)")
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
