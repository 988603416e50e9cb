"""Report tables: numbers parsed back from markdown/CSV/JSON/TensorBoard, and merging."""
from __future__ import annotations

import csv
import glob
import json
import os
import re

import numpy as np
import pytest

from biovfm_jax.evaluate import metrics, report

RUN_A = {  # deliberately out of order, with an unknown benchmark and CIs on two rows
    "pathmnist": {"auc": 0.99134, "acc": 0.9021, "auc_ci": [0.9890, 0.9935],
                  "acc_ci": [0.8950, 0.9090]},
    "mini_modality": {"auc": 0.8, "acc": 0.7},
    "dermamnist": {"auc": 0.89681, "acc": 0.7702},
    "chestmnist": {"auc": 0.74512, "acc": 0.9475, "auc_ci": [0.7400, 0.7502],
                   "acc_ci": [0.9460, 0.9490]},
}
RUN_B = {"dermamnist": {"auc": 0.9460, "acc": 0.80}, "chestmnist": {"auc": 0.7708, "acc": 0.95},
         "pathmnist": {"auc": 0.9922, "acc": 0.93}, "octmnist": {"auc": 0.9882, "acc": 0.88}}
ORDER_A = ["dermamnist", "chestmnist", "pathmnist", "mini_modality"]


def _md_rows(path):
  """{first cell: other cells} of the markdown table rows."""
  rows = {}
  for line in open(path).read().splitlines():
    if line.startswith("| ") and not line.startswith("| benchmark"):
      cells = [c.strip() for c in line.strip("|").split("|")]
      rows[cells[0]] = cells[1:]
  return rows


def test_order_and_names():
  assert report.ordered(["zeta", "pathmnist", "alpha", "Derma", "octmnist"]) == [
      "Derma", "octmnist", "pathmnist", "alpha", "zeta"]
  assert [report.display_name(f) for f, _ in report.BENCHMARKS] == [
      "Derma", "Pneumonia", "Breast", "Chest", "OCT", "Retina", "Blood", "Tissue",
      "OrganA", "OrganC", "OrganS", "Path"]
  assert report.display_name("mini_modality") == "mini_modality"


def test_write_report_round_trip(tmp_path):
  out = tmp_path / "a"
  meta = {"checkpoint": "/ckpt/vit_s_dinov2/100000", "protocol": "linear", "image_size": 224}
  paths = report.write_report(RUN_A, out, name="D-S", meta=meta, step=100000)
  assert set(paths) == {"md", "csv", "json", "tensorboard"}

  md = open(paths["md"]).read()
  assert md.startswith("# D-S\n")
  assert "checkpoint: /ckpt/vit_s_dinov2/100000" in md and "image_size: 224" in md
  rows = _md_rows(paths["md"])
  assert list(rows) == ["Derma", "Chest", "Path", "mini_modality", "mean"]
  assert rows["Path"] == ["99.13 (98.90-99.35)", "90.21 (89.50-90.90)"]
  assert rows["Derma"] == ["89.68", "77.02"]
  for m, col in (("auc", 0), ("acc", 1)):
    want = np.mean([RUN_A[b][m] for b in RUN_A]) * 100
    assert float(rows["mean"][col]) == pytest.approx(want, abs=0.005)
    parsed = [float(re.match(r"[\d.]+", rows[b][col]).group()) for b in list(rows)[:-1]]
    assert float(rows["mean"][col]) == pytest.approx(np.mean(parsed), abs=0.01)

  with open(paths["csv"]) as f:
    table = list(csv.DictReader(f))
  assert [r["benchmark"] for r in table] == ORDER_A + ["mean"]
  for r in table[:-1]:
    src = RUN_A[r["benchmark"]]
    assert float(r["auc"]) == pytest.approx(100 * src["auc"], abs=1e-6)
    assert float(r["acc"]) == pytest.approx(100 * src["acc"], abs=1e-6)
    if "auc_ci" in src:
      assert [float(r["auc_low"]), float(r["auc_high"])] == pytest.approx(
          [100 * v for v in src["auc_ci"]], abs=1e-6)
    else:
      assert r["auc_low"] == r["acc_high"] == ""
  assert float(table[-1]["auc"]) == pytest.approx(np.mean([float(r["auc"]) for r in table[:-1]]))
  assert float(table[-1]["acc"]) == pytest.approx(np.mean([float(r["acc"]) for r in table[:-1]]))

  doc = json.load(open(paths["json"]))
  assert doc["name"] == "D-S" and doc["step"] == 100000 and doc["meta"] == meta
  assert doc["order"] == ORDER_A
  assert doc["results"] == RUN_A
  assert doc["mean"]["auc"] == pytest.approx(np.mean([r["auc"] for r in RUN_A.values()]))

  # TensorBoard: read the scalars back from the event file.
  import tensorflow as tf
  events = glob.glob(os.path.join(out, "events.out.tfevents*"))
  assert len(events) == 1
  scalars = {}
  for event in tf.compat.v1.train.summary_iterator(events[0]):
    for v in event.summary.value:
      scalars[v.tag] = (event.step, float(tf.make_ndarray(v.tensor)))
  assert scalars["eval/pathmnist/auc"] == (100000, pytest.approx(0.99134, abs=1e-6))
  assert scalars["eval/chestmnist/acc_high"][1] == pytest.approx(0.9490, abs=1e-6)
  assert scalars["eval/mean/auc"][1] == pytest.approx(doc["mean"]["auc"], abs=1e-6)
  assert not any(".tmp" in p or p.startswith(".") for p in os.listdir(out))


def test_write_report_errors(tmp_path):
  with pytest.raises(ValueError, match="'dermamnist'.*outside \\[0, 1\\]"):
    report.write_report({"dermamnist": {"auc": 89.7, "acc": 0.7}}, tmp_path, name="x")
  with pytest.raises(ValueError, match="'octmnist'.*lacks \\['acc'\\]"):
    report.write_report({"octmnist": {"auc": 0.9}}, tmp_path, name="x")
  with pytest.raises(ValueError, match="results is empty"):
    report.write_report({}, tmp_path, name="x")


def test_merge_side_by_side(tmp_path, capsys):
  report.write_report(RUN_A, tmp_path / "a", name="D-S")
  # A real score dict, as the probe will produce, for the second run.
  rng = np.random.default_rng(0)
  y = rng.integers(0, 4, 400)
  s = np.eye(4)[y] * 0.3 + rng.random((400, 4))
  run_b = dict(RUN_B, octmnist=metrics.score(y, s, metrics.MULTI_CLASS))
  report.write_report(run_b, tmp_path / "b", name="M-S")

  paths = report.merge_reports([tmp_path / "a", tmp_path / "b" / "report.json"],
                               tmp_path / "cmp")
  rows = _md_rows(paths["md"])
  assert list(rows) == ["Derma", "Chest", "OCT", "Path", "mini_modality", "mean"]
  assert rows["Derma"] == ["89.68", "94.60"]
  assert rows["Path"] == ["99.13 (98.90-99.35)", "99.22"]
  assert rows["OCT"] == ["-", f"{100 * run_b['octmnist']['auc']:.2f}"]
  assert rows["mini_modality"] == ["80.00", "-"]
  common = ["dermamnist", "chestmnist", "pathmnist"]  # the benchmarks both runs have
  assert float(rows["mean"][0]) == pytest.approx(100 * np.mean([RUN_A[b]["auc"] for b in common]),
                                                 abs=0.005)
  assert float(rows["mean"][1]) == pytest.approx(100 * np.mean([RUN_B[b]["auc"] for b in common]),
                                                 abs=0.005)
  doc = json.load(open(paths["json"]))
  assert doc["runs"] == ["D-S", "M-S"] and doc["mean_over"] == common
  assert doc["values"]["octmnist"] == {"M-S": run_b["octmnist"]["auc"]}
  with open(paths["csv"]) as f:
    table = list(csv.reader(f))
  assert table[0] == ["benchmark", "D-S", "M-S"]
  assert table[3][:2] == ["octmnist", ""]
  assert float(table[3][2]) == pytest.approx(100 * run_b["octmnist"]["auc"], abs=1e-6)

  # The command line prints the same table, here for ACC.
  report.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
               str(tmp_path / "cmp2"), "--metric", "acc"])
  printed = capsys.readouterr().out
  assert printed.startswith("# ACC x 100")
  assert "| Derma | 77.02 | 80.00 |" in printed

  report.write_report(RUN_B, tmp_path / "c", name="D-S")
  with pytest.raises(ValueError, match="two reports share the name 'D-S'"):
    report.merge_reports([tmp_path / "a", tmp_path / "c"], tmp_path / "cmp3")
  with pytest.raises(ValueError, match="no report.json at .*empty"):
    os.makedirs(tmp_path / "empty")
    report.merge_reports([tmp_path / "a", tmp_path / "empty"], tmp_path / "cmp3")
