"""The built-in "mini" corpus: contents, cache, atomic builds."""
import hashlib
import os
import threading
import time

import numpy as np
import pytest
from grain.sources import ArrayRecordDataSource

from data_pipeline import records, selection, shards
from data_pipeline import mini

SOURCES = {"nilearn_mni152", "nibabel_testdata", "pydicom_testdata", "skimage_cell",
           "skimage_ihc", "skimage_retina", "skimage_microaneurysms"}
MODALITIES = {"CT", "MR", "NM", "ultrasound", "microscopy", "pathology", "fundus"}


@pytest.fixture(scope="session")
def built(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("biovfm_cache"))
  start = time.time()
  paths = mini.build_mini_corpus(cache)
  return cache, paths, time.time() - start


def test_counts_per_source_and_modality(built):
  cache, paths, seconds = built
  m = shards.read_manifest(os.path.dirname(paths[0]))
  assert os.path.dirname(paths[0]) == os.path.join(cache, "mini_v1")
  assert 2000 <= m["num_records"] <= 4000
  assert set(m["sources"]) == SOURCES and set(m["modalities"]) == MODALITIES
  assert sum(m["sources"].values()) == sum(m["modalities"].values()) == m["num_records"]
  # Balanced: no source over a quarter, the big modalities all well present.
  assert max(m["sources"].values()) < 0.25 * m["num_records"]
  assert all(m["modalities"][k] >= 150 for k in ("CT", "MR", "microscopy", "pathology", "fundus"))
  assert m["by_source"]["nilearn_mni152"] == {"MR": m["sources"]["nilearn_mni152"]}
  assert m["version"] == "mini_v1" and seconds < 60


def test_every_record_decodes_with_meta_and_no_duplicates(built):
  _, paths, _ = built
  source = ArrayRecordDataSource(paths)
  m = shards.read_manifest(os.path.dirname(paths[0]))
  assert len(source) == m["num_records"]
  digests, seen_sources = set(), {}
  for i in range(len(source)):
    pixels, header = records.read_record(source[i])
    assert pixels.dtype == np.uint8 and pixels.ndim in (2, 3)
    assert max(pixels.shape[:2]) <= 256 and min(pixels.shape[:2]) >= 24
    assert header["format"] == "png" and header["transform"] and header["path"]
    seen_sources[header["source"]] = seen_sources.get(header["source"], 0) + 1
    digests.add(hashlib.sha1(pixels.tobytes() + str(pixels.shape).encode()).digest())
  assert seen_sources == m["sources"]
  assert len(digests) == len(source)  # exact duplicates would make KoLeo infinite
  for s, p in zip(m["shards"], paths):
    assert s["sha256"] == hashlib.sha256(open(p, "rb").read()).hexdigest()


def test_cached_call_is_fast_and_same(built, monkeypatch):
  cache, paths, _ = built
  start = time.time()
  assert mini.build_mini_corpus(cache) == paths
  assert selection.shard_paths("mini", cache) == paths
  monkeypatch.setenv("BIOVFM_CACHE", cache)
  assert mini.build_mini_corpus() == paths
  assert time.time() - start < 1.0


def _tiny_examples(calls):
  def examples():
    calls.append(1)
    rng = np.random.default_rng(len(calls))
    for i in range(30):
      yield rng.integers(0, 256, (32, 32), dtype=np.uint8), {
          "source": "s", "modality": "CT", "index": i, "transform": "none"}
  return examples


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
  def broken():
    yield from _tiny_examples([])()
    raise KeyboardInterrupt
  monkeypatch.setattr(mini, "iter_mini_examples", broken)
  with pytest.raises(KeyboardInterrupt):
    mini.build_mini_corpus(tmp_path)
  assert not os.path.exists(mini.corpus_dir(tmp_path))
  assert [n for n in os.listdir(tmp_path) if not n.endswith(".lock")] == []


def test_concurrent_builds_build_once(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(mini, "iter_mini_examples", _tiny_examples(calls))
  results = [None, None]

  def build(i):
    results[i] = mini.build_mini_corpus(tmp_path)
  threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert results[0] == results[1] and len(calls) == 1
  assert len(ArrayRecordDataSource(results[0])) == 30
  # force rebuilds in place, and the corpus stays whole.
  again = mini.build_mini_corpus(tmp_path, force=True)
  assert again == results[0] and len(calls) == 2
  assert sorted(os.listdir(tmp_path)) == [".mini_v1.lock", "mini_v1"]


def test_loader_reads_mini(built):
  from configs import mae_base
  from data_pipeline import loader
  cache, _, _ = built
  c = mae_base.get_config(None).data
  c.update(dict(shards="mini", cache_dir=cache, image_size=32))
  assert loader.resolve(c).num_records == shards.read_manifest(mini.corpus_dir(cache))["num_records"]
  b = next(loader.make_pretrain_loader(c, global_batch_size=4, seed=0, process_index=0,
                                       process_count=1))
  assert b["image"].shape == (4, 32, 32, 3) and np.isfinite(b["image"]).all()
  assert b["skipped"].tolist() == [0, 0, 0, 0]
