"""Shard writing (atomic shards, manifest) and shard spec resolution."""
import glob
import hashlib
import os

import numpy as np
import pytest
from grain.sources import ArrayRecordDataSource

from data_pipeline import records, shards


def _records(n, sources=("a", "b")):
  rng = np.random.default_rng(0)
  for i in range(n):
    pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    yield records.make_record(pixels, {"source": sources[i % len(sources)],
                                       "modality": "CT" if i % 3 else "MR", "index": i})


def test_write_shards_splits_and_writes_manifest(tmp_path):
  paths = shards.write_shards(_records(25), tmp_path, "set", records_per_shard=10)
  assert [os.path.basename(p) for p in paths] == [
      "set-00000.array_record", "set-00001.array_record", "set-00002.array_record"]
  source = ArrayRecordDataSource(paths)
  assert len(source) == 25
  assert [records.read_record(source[i])[1]["index"] for i in range(25)] == list(range(25))
  m = shards.read_manifest(tmp_path)
  assert m["num_records"] == 25 and m["num_shards"] == 3
  assert [s["num_records"] for s in m["shards"]] == [10, 10, 5]
  for s, p in zip(m["shards"], paths):
    assert s["sha256"] == hashlib.sha256(open(p, "rb").read()).hexdigest()
  assert m["sources"] == {"a": 13, "b": 12}
  assert m["modalities"] == {"CT": 16, "MR": 9}
  assert sum(sum(c.values()) for c in m["by_source"].values()) == 25
  assert not glob.glob(str(tmp_path / "*.tmp-*"))


def test_failure_leaves_no_partial_shard_or_manifest(tmp_path):
  def failing():
    yield from _records(15)
    raise RuntimeError("source died")
  with pytest.raises(RuntimeError, match="source died"):
    shards.write_shards(failing(), tmp_path, "x", records_per_shard=10)
  # The finished first shard is whole; the half-written second one is gone.
  assert sorted(os.listdir(tmp_path)) == ["x-00000.array_record"]
  assert len(ArrayRecordDataSource([str(tmp_path / "x-00000.array_record")])) == 10


def test_existing_shards_need_overwrite_and_stale_ones_go(tmp_path):
  shards.write_shards(_records(30), tmp_path, "s", records_per_shard=10)
  with pytest.raises(FileExistsError):
    shards.write_shards(_records(5), tmp_path, "s", records_per_shard=10)
  paths = shards.write_shards(_records(5), tmp_path, "s", records_per_shard=10, overwrite=True)
  assert shards.resolve_shards(str(tmp_path)) == paths and len(paths) == 1
  with pytest.raises(ValueError, match="not a valid record"):
    shards.write_shards([b"junk"], tmp_path / "other", "j")
  with pytest.raises(ValueError, match="no records"):
    shards.write_shards([], tmp_path / "empty", "e")


def test_resolve_shards_specs(tmp_path):
  a = shards.write_shards(_records(4), tmp_path / "a", "p", records_per_shard=2)
  b = shards.write_shards(_records(3), tmp_path / "b", "q", records_per_shard=2)
  assert shards.resolve_shards(str(tmp_path / "a")) == a
  assert shards.resolve_shards(str(tmp_path / "*" / "*.array_record")) == a + b
  assert shards.resolve_shards(f"{tmp_path / 'b'},{a[1]}") == b + [a[1]]
  assert shards.resolve_shards([a[0], str(tmp_path / "b")]) == [a[0]] + b
  with pytest.raises(FileNotFoundError, match="nowhere"):
    shards.resolve_shards(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match=r"\*\.nothing"):
    shards.resolve_shards(f"{tmp_path / 'a'},{tmp_path}/*.nothing")
