"""The results store (biovfm_jax/results.py): concurrent appends from several
processes, torn rows, validation, and the rows an evaluation appends."""
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time

import pandas as pd
import pytest
from flax import nnx

from biovfm_jax import results
from biovfm_jax.models.vit import VisionTransformer, vit_config
from biovfm_jax.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def row(run="r", **changes):
  r = {"run": run, "objective": "mae", "model_size": "T", "params_encoder": 5_500_000,
       "params_total": 31_200_000, "train_flops": 1.5e18, "images_seen": 4096 * 10,
       "data_subset": "all", "modality_subset": "all", "protocol": "fast",
       "benchmark": "dermamnist", "metric": "auc", "value": 0.9123, "ci_low": 0.9,
       "ci_high": 0.92, "checkpoint": "/runs/r/checkpoints/10", "step": 10, "git_rev": "abc",
       "time": "2026-12-01T10:00:00+00:00"}
  r.update(changes)
  return r


_WRITER = """
import os, sys, time
from biovfm_jax import results
path, who = sys.argv[1], sys.argv[2]
open(f"{path}.ready-{who}", "w").close()
while not os.path.exists(f"{path}.go"):  # all four start appending together
  time.sleep(0.005)
pad = "x" * 3000  # rows longer than a pipe's atomic write: interleaving would show
for i in range(50):
  results.append(path, [dict(ROW, run=f"{who}-{i}", checkpoint=f"/c/{pad}/{i}", step=i)])
"""


def test_concurrent_appends_from_processes_keep_every_row(tmp_path):
  path = tmp_path / "store" / "results.csv"  # not there yet: all four race to create it
  script = f"ROW = {row()!r}\n" + _WRITER
  path.parent.mkdir()
  procs = [subprocess.Popen([sys.executable, "-c", script, str(path), f"p{k}"], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT)) for k in range(4)]
  for _ in range(1200):
    if len(list(path.parent.glob("*.ready-*"))) == 4:
      break
    time.sleep(0.05)
  (path.parent / "results.csv.go").touch()
  assert [p.wait(timeout=120) for p in procs] == [0] * 4
  text = path.read_text()
  assert text.count("run,objective,") == 1 and text.startswith("run,objective,")
  frame = results.read(path, strict=True)
  assert len(frame) == 200
  assert sorted(frame["run"]) == sorted(f"p{k}-{i}" for k in range(4) for i in range(50))
  assert all(c.endswith(f"/{s}") and len(c) > 3000
             for c, s in zip(frame["checkpoint"], frame["step"]))
  assert list(frame.columns) == list(results.COLUMNS)
  assert str(frame["step"].dtype) == "Int64" and frame["value"].dtype == float


def test_a_torn_row_is_reported_with_its_line_and_the_next_append_is_intact(tmp_path, caplog):
  path = tmp_path / "results.csv"
  results.append(path, [row("a"), row("b", metric="acc", ci_low=None, ci_high=None)])
  with open(path, "a") as f:  # power loss in the middle of a row
    f.write("c,mae,T,55000")
  with caplog.at_level(logging.WARNING):
    frame = results.read(path)
  assert list(frame["run"]) == ["a", "b"]
  assert f"{path}:4: torn row (4 of 19 fields, no line end), skipped" in caplog.text
  with pytest.raises(results.ResultsError, match=f"^{path}:4: torn row"):
    results.read(path, strict=True)
  results.append(path, [row("d")])
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    frame = results.read(path)
  assert list(frame["run"]) == ["a", "b", "d"]
  assert f"{path}:4: torn row (4 of 19 fields), skipped" in caplog.text
  assert path.read_text().count("run,objective,") == 1
  b = frame.iloc[1]
  assert b.metric == "acc" and b.ci_low != b.ci_low  # empty interval -> NaN
  assert frame.iloc[0].ci_low == 0.9 and frame.iloc[0].params_total == 31_200_000


def test_rows_are_validated_and_a_bad_one_writes_nothing(tmp_path):
  path = tmp_path / "results.csv"
  incomplete = row()
  del incomplete["ci_low"]
  cases = [
      (incomplete, r"results row 1 for .*results.csv \(run 'r'\) lacks column 'ci_low'"),
      (row(extra=1), "has unknown column 'extra'"),
      (row(metric="f1"), r"metric='f1'; one of \('auc', 'acc'\)"),
      (row(value=91.2), r"value=91.2 is not a fraction in \[0, 1\]"),
      (row(step="ten"), "step='ten' is not a whole number"),
      (row(run=""), "column 'run' is empty"),
  ]
  for bad, message in cases:
    with pytest.raises(results.ResultsError, match=message) as e:
      results.append(path, [row(), bad])
    assert "\n" not in str(e.value)
  assert not path.exists()
  assert results.append(path, []) == 0 and not path.exists()
  results.append(path, [row(value=float("nan"), params_total=None, train_flops=None,
                            images_seen=None, git_rev="")])
  frame = results.read(path)
  assert frame["value"].isna().all() and frame["params_total"].isna().all()
  (tmp_path / "other.csv").write_text("a,b\n1,2\n")
  with pytest.raises(results.ResultsError, match="other.csv:1: not a results store header"):
    results.read(tmp_path / "other.csv")
  with pytest.raises(FileNotFoundError, match="no results store"):
    results.read(tmp_path / "missing.csv")


def test_read_concatenates_a_glob_of_stores(tmp_path):
  for name in ("a", "b"):
    results.append(tmp_path / name / "results.csv", [row(name), row(name, metric="acc")])
  frame = results.read(str(tmp_path / "*" / "results.csv"))
  assert sorted(frame["run"]) == ["a", "a", "b", "b"]


# --- The rows of an evaluation (evaluate.py --results, the runner in-process).

@pytest.fixture(scope="module")
def medmnist_data(tmp_path_factory):
  from data_pipeline.readers import medmnist
  root = tmp_path_factory.mktemp("medmnist")
  medmnist.make_synthetic_npz(medmnist.npz_path(root / "npz", "breastmnist", 28),
                              "breastmnist", 28, counts=(128, 32, 48), seed=1)
  return {"npz_dir": str(root / "npz"), "data_dir": str(root / "tfds")}


def _checkpoint(path, run_facts, step):
  cfg = vit_config(None, width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4,
                   image_size=28)
  params = nnx.to_pure_dict(nnx.split(VisionTransformer(cfg, rngs=nnx.Rngs(0)), nnx.Param,
                                      ...)[1])
  ckpt_lib.save_params(str(path), params, {"backbone": "params",
                                           "encoder": dataclasses.asdict(cfg), **run_facts},
                       step=step)


def _eval(medmnist_data, checkpoint, out_dir, store, **labels):
  sys.path.insert(0, os.path.dirname(__file__))
  from test_eval_protocols import eval_config
  from biovfm_jax.evaluate import runner
  c = eval_config("knn", medmnist_data, str(checkpoint), out_dir, benchmarks="breastmnist")
  c.knn.bootstrap = 20
  c.results.update(labels)
  runner.resolve_config(c, results=str(store))
  runner.run(c)
  return c


def test_an_evaluation_appends_its_rows_with_the_run_facts(medmnist_data, tmp_path):
  store = tmp_path / "results.csv"
  facts = {"objective": "mae", "model_size": "T", "batch_size": 16, "params_total": 99_999,
           "flops_per_example": 2.5e6, "data_shards": "/data/c", "data_mixture": "MR:1,CT:1",
           "total_steps": 30}
  _checkpoint(tmp_path / "run", facts, step=30)
  _eval(medmnist_data, tmp_path / "run", tmp_path / "eval", store)
  frame = results.read(store, strict=True)
  report = json.load(open(tmp_path / "eval" / "report.json"))
  assert list(frame["metric"]) == ["auc", "acc"] and set(frame["benchmark"]) == {"breastmnist"}
  for _, r in frame.iterrows():
    got = report["results"]["breastmnist"]
    assert r.value == pytest.approx(got[r.metric], abs=1e-12)
    assert [r.ci_low, r.ci_high] == pytest.approx(got[f"{r.metric}_ci"], abs=1e-12)
    assert (r.run, r.objective, r.model_size, r.data_subset, r.modality_subset) == (
        "run", "mae", "T", "/data/c", "MR:1,CT:1")
    assert (r.params_encoder, r.params_total, r.images_seen, r.step) == (
        report["meta"]["parameters"], 99_999, 30 * 16, 30)
    assert r.train_flops == pytest.approx(2.5e6 * 30 * 16)
    assert (r.protocol, r.checkpoint) == ("knn", str(tmp_path / "run" / "checkpoints" / "30"))
    assert r.git_rev == results.git_rev() and r.time.tzname() == "UTC"
  # Labels given win; an imported encoder (no run facts) leaves them empty.
  _checkpoint(tmp_path / "imported", {"objective": "dinov2"}, step=0)
  _eval(medmnist_data, tmp_path / "imported", tmp_path / "eval2", store, run="lvd",
        data_subset="lvd142m")
  frame = results.read(store, strict=True)
  imported = frame[frame["run"] == "lvd"].iloc[0]
  assert (imported.model_size, imported.data_subset, imported.modality_subset) == (
      "w32d2", "lvd142m", "all")
  assert pd.isna(imported.params_total) and pd.isna(imported.images_seen)
  assert store.read_text().count("run,objective,") == 1 and len(frame) == 4


def test_finished_only_refuses_a_checkpoint_before_the_last_step(medmnist_data, tmp_path):
  _checkpoint(tmp_path / "run", {"objective": "mae", "batch_size": 16, "total_steps": 30},
              step=10)
  with pytest.raises(ValueError, match=r"checkpoints/10 is step 10 of its run's 30: the run "
                                       r"has not finished \(config.results.finished_only\)"):
    _eval(medmnist_data, tmp_path / "run", tmp_path / "eval", tmp_path / "r.csv",
          finished_only=True)
  assert not (tmp_path / "r.csv").exists() and not (tmp_path / "eval").exists()
