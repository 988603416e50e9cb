"""Subsets (an index over existing shards) and mixture weights."""
import json
import os
import sys

import numpy as np
import pytest

from configs import mae_base
from data_pipeline import loader, records, selection, shards

# 60 records: modality A (10, source s1), B (20, s1), C (30, s2).
LAYOUT = [("A", "s1")] * 10 + [("B", "s1")] * 20 + [("C", "s2")] * 30


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  out = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  order = rng.permutation(len(LAYOUT))  # interleave modalities across shards
  recs = [records.make_record(np.full((16, 16), i, np.uint8),
                              {"modality": LAYOUT[i][0], "source": LAYOUT[i][1], "index": int(i)})
          for i in order]
  shards.write_shards(recs, out, "c", records_per_shard=16)
  modality = np.array([LAYOUT[i][0] for i in order])
  return str(out), modality


def test_index_matches_the_headers(corpus):
  out, modality = corpus
  index = shards.read_index(out)
  names = index["modality_names"]
  assert [names[m] for m in index["modality"]] == list(modality)
  assert list(index["shard"]) == [k for k in range(4) for _ in range(16)][:60]


def test_subsets_by_modality_source_and_count(corpus):
  out, modality = corpus
  path = selection.make_subset(out, "b_only", modalities=["B"])
  doc = json.load(open(path))
  ids = np.load(os.path.join(out, "subsets", "b_only.npy"))
  assert doc["num_records"] == 20 and doc["modalities"] == {"B": 20}
  assert set(modality[ids]) == {"B"} and list(ids) == sorted(ids)
  s2 = json.load(open(selection.make_subset(out, "s2", sources=["s2"])))
  assert s2["modalities"] == {"C": 30}
  a = np.load(os.path.join(out, "subsets", "s2.npy"))
  assert len(a) == 30
  small = selection.make_subset(out, "k12", count="12", seed=3)
  selection.make_subset(out, "k12b", count=12, seed=3)
  assert json.load(open(small))["num_records"] == 12
  np.testing.assert_array_equal(np.load(os.path.join(out, "subsets", "k12.npy")),
                                np.load(os.path.join(out, "subsets", "k12b.npy")))
  frac = json.load(open(selection.make_subset(out, "quarter", count="0.25")))
  assert frac["num_records"] == 15
  assert selection.parse_count("0.2M", 10**7) == 200_000
  assert selection.parse_count("200k", 10**7) == 200_000
  with pytest.raises(ValueError, match="no modality named"):
    selection.make_subset(out, "x", modalities=["US"])
  with pytest.raises(ValueError, match="asks for 99 records"):
    selection.make_subset(out, "x", count=99, modalities=["A"])


def test_loader_reads_only_the_subset(corpus):
  out, modality = corpus
  path = selection.make_subset(out, "a_only", modalities=["A"])
  data = selection.resolve(path, None)
  paths, chosen = data.paths, data.chosen
  assert chosen.size == 10 and len(paths) == 4
  read = {chosen.record(e, 0, seed=1) for e in range(200)}
  assert set(modality[list(read)]) == {"A"} and len(read) == 10   # each epoch covers all
  cfg = {"shards": path, "image_size": 16, "crop_scale": (1.0, 1.0), "hflip": False}
  assert loader.resolve(_Cfg(cfg)).num_records == 10
  example = loader.make_example(_Cfg(cfg), seed=1)
  # The loader yields uint8 pixels (normalised later, on the device).
  pixel_values = {int(round(float(example(e)["image"][..., 0].mean()))) for e in range(10)}
  # Records hold constant images of their original number; subset A is numbers 0..9.
  assert pixel_values <= set(range(10)), pixel_values


def _Cfg(d):
  """A pretraining data config with the test's values."""
  c = mae_base.get_config(None).data
  c.update(d)
  return c


def test_mixture_weights_set_the_sampled_proportions(corpus):
  """A (10 records) and C (30) drawn 0.7 / 0.3 although C is 3x bigger; B not at all."""
  out, modality = corpus
  chosen = selection.resolve(out, None, {"by": "modality", "weights": "A:0.7,C:0.3"}).chosen
  n = 20000
  drawn = modality[[chosen.record(e, 0, seed=0) for e in range(n)]]
  share_a = np.mean(drawn == "A")
  # Binomial sd = sqrt(0.21 / n) = 0.0032: 5 sd either side.
  assert abs(share_a - 0.7) < 0.016, share_a
  assert set(drawn) == {"A", "C"}
  # Within a group, records are drawn uniformly: each of A's 10 about n*0.07 times.
  counts = np.bincount([chosen.record(e, 0, seed=0) for e in range(n)], minlength=60)
  a_counts = counts[modality == "A"]
  assert a_counts.min() > 0.8 * n * 0.07 and a_counts.max() < 1.2 * n * 0.07
  # A pure function of (seed, e).
  assert [chosen.record(e, 0, 0) for e in range(50)] == [chosen.record(e, 0, 0) for e in range(50)]
  with pytest.raises(ValueError, match="no modality named 'US'"):
    selection.resolve(out, None, {"by": "modality", "weights": {"US": 1.0}})
  with pytest.raises(ValueError, match="not name:weight"):
    selection.resolve(out, None, {"by": "modality", "weights": "A=1"})
  by_source = selection.resolve(out, None, {"by": "source", "weights": {"s2": 1.0}}).chosen
  assert set(modality[[by_source.record(e, 0, 0) for e in range(300)]]) == {"C"}


@pytest.mark.slow
def test_a_subset_named_in_the_config_feeds_main(tmp_path):
  sys.path.insert(0, os.path.dirname(__file__))
  from test_train_e2e import run_main
  from data_pipeline.mini import build_mini_corpus
  mini_dir = os.path.dirname(build_mini_corpus()[0])
  path = selection.make_subset(mini_dir, f"mr_test_{os.getpid()}", modalities=["MR"])
  try:
    n = json.load(open(path))["num_records"]
    r = run_main(tmp_path / "run", "--config.num_train_steps=2", f"--config.data.shards={path}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{n} records" in r.stderr
  finally:
    os.remove(path)
    os.remove(path.replace(selection.SUBSET_SUFFIX, ".npy"))


def test_subset_command_line(corpus, capsys):
  out, _ = corpus
  selection.main([f"--shards={out}", "--name=cli_c", "--modality=C", "--count=0.5"])
  printed = capsys.readouterr().out
  assert "15 of 60 records" in printed and "'C': 15" in printed
  with pytest.raises(SystemExit):
    selection.main([f"--shards={out}", "--name=bad", "--modality=Z"])
  assert "no modality named ['Z']" in capsys.readouterr().err


def test_build_resolves_the_data_once_and_the_loader_reuses_it(corpus, monkeypatch):
  """train.loop.build opens the shards once; the resume facts and the loader
  take them from Setup.data instead of resolving config.data.shards again."""
  from biovfm_jax.train import loop
  from test_train_units import tiny_config
  out, _ = corpus
  subset = selection.make_subset(out, "a_and_c", modalities=["A", "C"])
  n = selection.resolve(subset, None).num_records
  opened = []
  real = selection.grain.sources.ArrayRecordDataSource
  monkeypatch.setattr(selection.grain.sources, "ArrayRecordDataSource",
                      lambda paths: opened.append(list(paths)) or real(paths))
  c = tiny_config()
  c.data.update(shards=subset, image_size=32, cache_dir=None)
  c.steps_per_epoch = None  # from the records, as a real run counts them
  s = loop.build(c)
  assert len(opened) == 1 and s.num_records == s.data.num_records == n < 60
  assert s.steps_per_epoch == max(1, n // c.batch_size)
  facts = loop._run_facts(c, s.data)  # pylint: disable=protected-access
  assert facts["num_records"] == n and [n for n, _ in facts["shards"]] == [
      os.path.basename(p) for p in s.data.paths]
  batch = next(loader.make_pretrain_loader(c.data, global_batch_size=4, seed=0,
                                           process_index=0, process_count=1, data=s.data))
  assert batch["image"].shape == (4, 32, 32, 3) and len(opened) == 1
  assert loop.build(c, num_records=100).data is None and len(opened) == 1
