"""Scaling analysis: the published table, the fits, the factors and the CLI."""
from __future__ import annotations

import gzip
import os
import re
import types

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from biovfm_jax import analysis
from biovfm_jax.analysis import __main__ as cli
from biovfm_jax.analysis import published
from data_pipeline.readers import medmnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_MD = os.path.join(os.path.dirname(ROOT), "shared", "PAPER.md")
needs_paper = pytest.mark.skipif(not os.path.exists(PAPER_MD), reason="no ../shared/PAPER.md")

PAPER_SLOPES = published.PAPER_SLOPES  # (DINOv2, MAE) per benchmark and "mean"


@pytest.fixture(scope="module")
def table():
  return analysis.load_results()


@pytest.fixture(scope="module")
def paper_slopes(table):
  return analysis.fit_slopes(table, x="params_total")


def _rows(points, **common):
  """A results frame from [(run, N, benchmark, value)] with contract columns."""
  base = {c: "" for c in analysis.COLUMNS}
  base.update(dict(objective="mae", model_size="X", protocol="biovfm", metric="auc",
                   data_subset="d", modality_subset="all"), **common)
  rows = [{**base, "run": run, "params_encoder": n, "params_total": n, "benchmark": b,
           "value": v} for run, n, b, v in points]
  return analysis.check_results(pd.DataFrame(rows), "synthetic")


# --- the published table --------------------------------------------------------

@needs_paper
def test_published_csv_is_paper_md(tmp_path):
  """The committed CSV is what the generator makes of PAPER.md, byte for byte,
  and its 12 benchmarks average to the table's mean row."""
  out = str(tmp_path / "published.csv")
  cli.main(["published", f"--paper={PAPER_MD}", f"--out={out}"])
  assert open(out).read() == open(analysis.PUBLISHED_CSV).read()
  with pytest.raises(SystemExit) as e:  # never replaces a file unasked
    cli.main(["published", f"--paper={PAPER_MD}", f"--out={out}"])
  assert e.value.code == 2
  text = open(PAPER_MD).read()
  header, *rows = published.markdown_table(text, "Results to beat")
  mean_row = [float(c) for c in next(r for r in rows if r[0] == "mean")[1:]]
  df = analysis.load_results()
  for column, want in zip(header[1:], mean_row):
    prefix, _, size = column.partition("-")
    objective = published.OBJECTIVES.get(prefix, "biomedclip")
    sel = (df["objective"] == objective) & (df["model_size"] == (size or "B"))
    assert sel.sum() == 12
    # The paper averaged unrounded AUCs: its mean row is up to ~0.015 off ours.
    assert abs(100 * df[sel]["value"].mean() - want) < 0.02, column
  assert published.paper_params(text) == {"T": 31_200_000, "S": 47_400_000,
                                          "B": 111_660_000, "L": 329_240_000}


def test_published_table_shape(table):
  assert len(table) == 9 * 12 and set(table["metric"]) == {"auc"}
  assert sorted(table["benchmark"].unique()) == sorted(medmnist.FLAGS)
  ssl = table[table["objective"].isin(["mae", "dinov2"])]
  assert len(ssl) == 96 and ssl["params_total"].notna().all()
  assert set(ssl["protocol"]) == {"biovfm"} and set(ssl["data_subset"]) == {"biovfm21m"}
  one = ssl[(ssl["objective"] == "mae") & (ssl["model_size"] == "B")
            & (ssl["benchmark"] == "octmnist")]
  assert one["value"].item() == pytest.approx(0.9822)


def test_published_encoder_counts_follow_configs(table):
  """published.ENCODER_OVERRIDES is each recipe's encoder as the configs build it."""
  import importlib
  from biovfm_jax.models.vit import vit_config, vit_config_from
  shape_fields = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "image_size",
                  "in_channels", "pos_embed", "class_token", "num_registers", "ffn",
                  "mask_token")
  for objective, overrides in published.ENCODER_OVERRIDES.items():
    for size in published.SIZES:
      config = importlib.import_module(f"configs.vit_{size.lower()}_{objective}").get_config()
      theirs, ours = vit_config_from(config.model), vit_config(size, **overrides)
      for field in shape_fields:
        assert getattr(theirs, field) == getattr(ours, field), (objective, size, field)
      assert (theirs.layerscale_init is None) == (ours.layerscale_init is None)
  # The depth-linear count is the full model's (MAE: no position table, fixed
  # sin-cos; DINOv2: learned positions, mask token, LayerScale).
  for objective in published.ENCODER_OVERRIDES:
    full = published._count(vit_config("T", **published.ENCODER_OVERRIDES[objective]))
    assert published.encoder_params(objective, "T") == full
    rows = table[(table["objective"] == objective) & (table["model_size"] == "T")]
    assert set(rows["params_encoder"]) == {full}


# --- fits -------------------------------------------------------------------------

def test_paper_slopes_reproduce(paper_slopes):
  assert not paper_slopes["objective"].eq("biomedclip").any()
  assert any("biomedclip" in n for n in paper_slopes.attrs["notes"])
  got = paper_slopes.set_index(["objective", "benchmark"])["b"]
  for flag, (d, m) in PAPER_SLOPES.items():
    assert abs(got["dinov2", flag] - d) < 0.001, flag
    assert abs(got["mae", flag] - m) < 0.001, flag
  assert round(got["dinov2", "mean"], 4) == 0.0088
  assert round(got["mae", "mean"], 4) == 0.0191
  assert (paper_slopes["n_points"] == 4).all()


@needs_paper
def test_paper_slopes_constants_are_paper_md():
  _, *rows = published.markdown_table(open(PAPER_MD).read(), "Scaling analysis")
  flags = {d.lower(): f for f, d in analysis.fit.report.BENCHMARKS}
  flags["mean"] = "mean"
  assert {flags[r[0].lower()]: (float(r[1]), float(r[2])) for r in rows} == PAPER_SLOPES
  assert published.PAPER_OBJECTIVES == ("dinov2", "mae")  # the table's column order


@needs_paper
def test_paper_correlation_constants_are_paper_md():
  text = " ".join(open(PAPER_MD).read().split())  # the sentence wraps
  words = {"dataset_samples": "number of training samples",
           "db_index": "Davies-Bouldin index of the benchmark's classes in feature space",
           "num_classes": "number of classes", "gzip_ratio": "gzip compressibility of the images"}
  got = {}
  for factor, phrase in words.items():
    m = re.search(rf"{re.escape(phrase)} \(D (-?[\d.]+), M (-?[\d.]+)\)", text)
    assert m, phrase
    got[factor] = (float(m.group(1)), float(m.group(2)))
  assert got == published.PAPER_CORRELATIONS


def test_fit_recovers_a_line_exactly():
  a, b = 3.9, 0.021
  ns = [2e6, 9e6, 4e7, 3e8]
  points = [(f"r{i}", n, bench, np.exp(a + b * np.log(n) + off) / 100)
            for i, n in enumerate(ns) for bench, off in (("dermamnist", 0.0),
                                                         ("octmnist", 0.01))]
  s = analysis.fit_slopes(_rows(points)).set_index("benchmark")
  assert s.loc["dermamnist", "a"] == pytest.approx(a, abs=1e-9)
  assert s.loc["octmnist", "a"] == pytest.approx(a + 0.01, abs=1e-9)
  for bench in ("dermamnist", "octmnist"):
    assert s.loc[bench, "b"] == pytest.approx(b, abs=1e-10)
    assert s.loc[bench, "se_b"] == pytest.approx(0, abs=1e-8)
    assert s.loc[bench, "r2"] == pytest.approx(1.0)
  # The mean row: each run's mean AUC, one fit over the 4 runs.
  mean_auc = [np.mean([np.exp(a + b * np.log(n) + o) for o in (0.0, 0.01)]) for n in ns]
  ref = stats.linregress(np.log(ns), np.log(mean_auc))
  assert s.loc["mean", "b"] == pytest.approx(ref.slope, rel=1e-9)
  assert list(s.index) == ["dermamnist", "octmnist", "mean"]


def test_fit_statistics_match_scipy():
  rng = np.random.default_rng(1)
  x = np.log([1e6, 3e6, 1e7, 3e7, 1e8, 3e8])
  y = 4.4 + 0.015 * x + rng.normal(0, 0.004, x.size)
  got, ref = analysis.fit_line(x, y), stats.linregress(x, y)
  assert got["b"] == pytest.approx(ref.slope) and got["a"] == pytest.approx(ref.intercept)
  assert got["se_b"] == pytest.approx(ref.stderr)
  assert got["se_a"] == pytest.approx(ref.intercept_stderr)
  assert got["r2"] == pytest.approx(ref.rvalue ** 2)
  half = stats.t.ppf(0.975, x.size - 2) * ref.stderr
  assert (got["ci_low"], got["ci_high"]) == pytest.approx((ref.slope - half, ref.slope + half))
  two = analysis.fit_line(x[:2], y[:2])  # no residual dof: no SE, no interval
  assert np.isnan(two["se_b"]) and np.isnan(two["ci_low"]) and two["r2"] == 1.0
  with pytest.raises(ValueError, match="2 distinct"):
    analysis.fit_line([1.0, 1.0], [2.0, 3.0])
  low, high = analysis.fit.bootstrap_b(x, y, 300, seed=0)
  assert low < got["b"] < high and high - low < 0.02


def test_fit_skips_and_notes():
  points = [("r1", 1e6, "dermamnist", 0.8), ("r2", 1e7, "dermamnist", 0.85),
            ("r1", 1e6, "octmnist", 0.7), ("r2", 1e7, "octmnist", 0.75),
            ("r3", 1e8, "dermamnist", 0.9),  # r3 lacks octmnist: left out of the mean
            ("r4", 1e6, "mini_modality", 0.6)]  # one x: skipped
  df = _rows(points)
  df.loc[df["run"] == "r4", "objective"] = "dinov2"
  s = analysis.fit_slopes(df)
  assert set(zip(s["objective"], s["benchmark"])) == {
      ("mae", "dermamnist"), ("mae", "octmnist"), ("mae", "mean")}
  assert s.set_index("benchmark").loc["mean", "n_points"] == 2
  notes = " ".join(s.attrs["notes"])
  assert "r3" in notes and "skipped, 1 distinct params_total" in notes
  with pytest.raises(ValueError, match="no column 'nope'"):
    analysis.fit_slopes(df, x="nope")


def test_fit_over_data_and_compute():
  """Data fits hold the model size and pool data subsets; compute fits hold nothing."""
  rows = []
  for size, offset in (("S", 0.0), ("B", 0.02)):
    for subset, seen in (("us", 1e6), ("0.2m", 1e7), ("21m", 1e8)):
      rows.append((f"{size}{subset}", 1e7, "dermamnist",
                   np.exp(4.4 + offset + 0.01 * np.log(seen)) / 100, size, subset, seen))
  df = _rows([r[:4] for r in rows])
  df["model_size"] = [r[4] for r in rows]
  df["data_subset"] = [r[5] for r in rows]
  df["images_seen"] = pd.array([int(r[6]) for r in rows], dtype="Int64")
  df["train_flops"] = [r[6] * (2 if r[4] == "B" else 1) for r in rows]
  data = analysis.fit_slopes(df, x="images_seen")
  per = data[data["benchmark"] == "dermamnist"].set_index("model_size")
  assert per.loc["S", "b"] == pytest.approx(0.01) and per.loc["B", "b"] == pytest.approx(0.01)
  assert (per["n_points"] == 3).all()
  flops = analysis.fit_slopes(df, x="train_flops")
  assert len(flops) == 2 and (flops["n_points"] == 6).all()
  # A parameter fit keeps each data subset apart: one N per group, nothing to fit.
  assert analysis.fit_slopes(df).empty


# --- reading results --------------------------------------------------------------

def test_load_results_errors(tmp_path, table):
  good = tmp_path / "good.csv"
  extra = table.assign(note="x", data_size=table["params_total"] // 10)
  extra.to_csv(good, index=False)
  back = analysis.load_results(good)
  assert back["note"].iloc[0] == "x" and pd.api.types.is_numeric_dtype(back["data_size"])
  by_size = analysis.fit_slopes(back, x="data_size", by=("data_subset", "modality_subset"))
  assert by_size.shape[0] == 26
  cases = {
      "missing column 'protocol'": table.drop(columns=["protocol"]),
      "column 'value' line 5: 95.33 is not a fraction": table.assign(
          value=[95.33 if i == 3 else v for i, v in enumerate(table["value"])]),
      "column 'params_total' line 2: 'big' is not a number": table.astype(
          {"params_total": object}).assign(
          params_total=["big"] + list(table["params_total"][1:])),
      "column 'metric' line 2: 'AUC'": table.assign(metric=["AUC"] + ["auc"] * 107),
      "column 'run' line 3 is empty": table.assign(run=["a", ""] + ["b"] * 106),
  }
  for i, (message, frame) in enumerate(cases.items()):
    path = tmp_path / f"bad{i}.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(analysis.ResultsError) as e:
      analysis.load_results(path)
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)
  with pytest.raises(analysis.ResultsError, match="cannot read"):
    analysis.load_results(tmp_path / "absent.csv")


# --- factors ----------------------------------------------------------------------

def test_davies_bouldin_by_hand():
  # Two clusters on a line: centroids 0 and 10, mean distances to them 1 and 2.
  feats = np.array([[-1.0, 0], [1, 0], [8, 0], [12, 0]])
  labels = np.array([0, 0, 1, 1])
  assert analysis.davies_bouldin(feats, labels) == pytest.approx((1 + 2) / 10)
  assert analysis.davies_bouldin(feats, labels[:, None]) == pytest.approx(0.3)
  rng = np.random.default_rng(0)
  many = rng.normal(size=(60, 5)) + np.repeat(np.eye(5)[:4] * 3, 15, axis=0)
  y = np.repeat(np.arange(4), 15)
  from sklearn.metrics import davies_bouldin_score
  assert analysis.davies_bouldin(many, y) == pytest.approx(davies_bouldin_score(many, y))
  # Multi-label: the mean of the present-vs-absent index per label; a label
  # present everywhere (one group) is skipped.
  multi = np.stack([labels, 1 - labels, np.ones(4, int)], axis=1)
  assert analysis.davies_bouldin(feats, multi) == pytest.approx(0.3)
  assert np.isnan(analysis.davies_bouldin(feats, np.zeros(4, int)))


def _npz(path, images, labels_width=1, seed=0):
  """A MedMNIST-format npz holding `images` as every split."""
  labels = np.random.default_rng(seed).integers(0, 2, (len(images), labels_width))
  arrays = {}
  for split in medmnist.SPLITS:
    arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels.astype(np.uint8)
  np.savez(path, **arrays)
  return str(path)


def test_gzip_ratio(tmp_path):
  rng = np.random.default_rng(0)
  flat = _npz(tmp_path / "flat.npz", np.full((20, 28, 28), 7, np.uint8))
  noise = _npz(tmp_path / "noise.npz", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8))
  assert analysis.gzip_ratio(flat, "breastmnist") < 0.1
  assert analysis.gzip_ratio(noise, "breastmnist") > 0.99
  syn = medmnist.make_synthetic_npz(tmp_path / "dermamnist.npz", "dermamnist", 28,
                                    counts=(300, 4, 4))
  train = medmnist.load_npz(syn, "dermamnist")["train_images"]
  for limit in (None, 5, 257):
    ims = train[:limit]
    want = sum(len(gzip.compress(im.tobytes(), 6, mtime=0)) for im in ims) / ims.nbytes
    assert analysis.gzip_ratio(syn, "dermamnist", limit) == pytest.approx(want)
  with pytest.raises(medmnist.NpzFormatError):  # grey images are not a colour benchmark
    analysis.gzip_ratio(flat, "dermamnist")


def _cache_features(monkeypatch, cache_dir, flag, split, feats):
  """Writes `feats` where the eval binary's feature cache puts them."""
  from biovfm_jax.evaluate import features as feat_lib
  monkeypatch.setattr(feat_lib, "extract", lambda *a, **k: feats)
  encoder = types.SimpleNamespace(source="", config="vit")
  split_ = types.SimpleNamespace(name=flag, split=split, num_examples=len(feats),
                                 image_size=28)
  return feat_lib.cached(encoder, split_, str(cache_dir), how="mean_patch", image_size=28)


def test_factor_table(tmp_path, monkeypatch):
  npz_dir = tmp_path / "npz"
  for flag in ("dermamnist", "chestmnist"):
    medmnist.make_synthetic_npz(npz_dir / f"{flag}.npz", flag, 28, counts=(12, 4, 10))
  labels = medmnist.load_npz(npz_dir / "dermamnist.npz", "dermamnist")["test_labels"]
  feats = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
  _cache_features(monkeypatch, tmp_path / "f", "dermamnist", "test", feats)
  t = analysis.factor_table(["dermamnist", "chestmnist", "mini_modality"],
                            features_dirs={"mae": str(tmp_path / "f")},
                            npz_dir=str(npz_dir), image_size=28)
  assert list(t["objective"]) == ["dinov2", "dinov2", "mae", "mae"]
  row = t.set_index(["objective", "benchmark"])
  assert row.loc[("mae", "chestmnist"), "num_classes"] == 14
  assert row.loc[("mae", "chestmnist"), "train_samples"] == 78468
  assert row.loc[("dinov2", "dermamnist"), "dataset_samples"] == 7007 + 1003 + 2005
  assert row.loc[("mae", "dermamnist"), "db_index"] == pytest.approx(
      analysis.davies_bouldin(feats, labels))
  assert np.isnan(row.loc[("dinov2", "dermamnist"), "db_index"])  # no dinov2 features
  assert np.isnan(row.loc[("mae", "chestmnist"), "db_index"])
  assert 0 < row.loc[("mae", "chestmnist"), "gzip_ratio"] < 1.1  # noise: gzip's header
  notes = " ".join(t.attrs["notes"])
  assert "mini_modality" in notes and "mae/chestmnist: no cached test features" in notes
  with pytest.raises(ValueError, match="npz_dir"):
    analysis.factor_table(["dermamnist"], features_dirs={"mae": str(tmp_path / "f")})
  # A second encoder's features in the same dir are ambiguous.
  _cache_features(monkeypatch, tmp_path / "f", "dermamnist", "test", feats[:9])
  with pytest.raises(ValueError, match="several cached feature files"):
    analysis.factor_table(["dermamnist"], features_dirs={"mae": str(tmp_path / "f")},
                          npz_dir=str(npz_dir), image_size=28)


def test_paper_correlations(paper_slopes):
  factors = analysis.factor_table(list(medmnist.FLAGS))
  r = analysis.correlations(paper_slopes, factors).set_index(["objective", "factor"])["r"]
  assert (r.index.get_level_values("objective").unique().sort_values() == ["dinov2", "mae"]).all()
  # The paper's "training samples" figures come out with the whole dataset size.
  for factor in ("num_classes", "dataset_samples"):
    for objective, want in zip(published.PAPER_OBJECTIVES, published.PAPER_CORRELATIONS[factor]):
      assert abs(r[objective, factor] - want) < 0.01, (objective, factor)


# --- beside the paper -------------------------------------------------------------

def test_slope_table_beside_the_paper(paper_slopes):
  t = analysis.slope_table(paper_slopes)
  assert list(t.columns) == ["benchmark", "dinov2 b", "dinov2 SE", "dinov2 R²", "dinov2 flag",
                             "paper dinov2", "mae b", "mae SE", "mae R²", "mae flag",
                             "paper mae"]
  assert list(t["benchmark"]) == [f for f, _ in analysis.fit.report.BENCHMARKS] + ["mean"]
  fitted = paper_slopes.set_index(["objective", "benchmark"])
  for row in t.itertuples(index=False):
    f = fitted.loc[("dinov2", row[0])]
    # A flagged b is bracketed text, the others the number itself.
    assert row[1] == (f"({f.b:.4f})" if analysis.flagged(f) else f.b)
    assert row[4] == f.flag
    assert row[7] == fitted.loc[("mae", row[0]), "se_b"]
    assert (row[5], row[10]) == PAPER_SLOPES[row[0]]
  # With 4 sizes most of the paper's own 95% intervals include 0; Pneumonia's not.
  assert t.loc[t["benchmark"] == "pneumoniamnist", "mae flag"].item() == ""
  md = analysis.markdown(t).splitlines()
  assert md[0] == "| " + " | ".join(t.columns) + " |"
  assert md[2].startswith("| Derma | (0.0223) | ")
  assert md[-1].startswith("| mean | (0.0088) | ") and "| 0.0088 | (0.0191) |" in md[-1]
  assert "| 0.0030 | 0.0003 | 0.9795 |  | 0.0031 |" in md[3]  # Pneumonia, unflagged


def test_slope_table_of_own_runs():
  """Several groups of one objective, a benchmark the paper lacks, the other
  objective only published: every paper column and row stays."""
  points = [(f"{d}{n}", n, b, v) for d in ("u", "a") for n, v in ((1e6, 0.7), (1e7, 0.8))
            for b in ("dermamnist", "mini_modality")]
  df = _rows(points)
  df["data_subset"] = [run[0] for run, *_ in points]
  s = analysis.fit_slopes(df)
  t = analysis.slope_table(s)
  # Two sizes per group: b alone (no SE, R² = 1), bracketed: no interval, no result.
  assert list(t.columns) == ["benchmark", "mae a b", "mae a flag", "mae u b", "mae u flag",
                             "paper mae", "paper dinov2"]
  assert list(t["benchmark"])[-2:] == ["mini_modality", "mean"] and len(t) == 14
  row = t.set_index("benchmark")
  want = np.log(80 / 70) / np.log(10)
  assert row.loc["mini_modality", "mae u b"] == f"({want:.4f})"
  assert row.loc["mini_modality", "mae u flag"] == "fewer than 3 sizes; no measurable effect"
  assert np.isnan(row.loc["mini_modality", "paper mae"])
  assert np.isnan(row.loc["octmnist", "mae a b"]) and row.loc["octmnist", "paper mae"] == 0.0692
  md = analysis.markdown(t)
  assert "| OCT |  |  |  |  | 0.0692 | 0.0141 |" in md
  assert f"| mini_modality | ({want:.4f}) | fewer than 3 sizes; no measurable effect |" in md
  assert "nan" not in md
  # Nothing fitted: the paper's columns alone.
  assert list(analysis.slope_table(s.iloc[:0]).columns) == ["benchmark", "paper dinov2",
                                                            "paper mae"]


def test_correlation_table_beside_the_paper(paper_slopes):
  corr = analysis.correlations(paper_slopes, analysis.factor_table(list(medmnist.FLAGS)))
  t = analysis.correlation_table(corr).set_index("factor")
  assert list(t.index) == ["train_samples", "dataset_samples", "num_classes", "gzip_ratio",
                           "db_index"]  # the static ones computed, the paper's all shown
  assert list(t.columns) == ["dinov2 r", "paper dinov2", "mae r", "paper mae"]
  assert t.loc["num_classes", "paper mae"] == -0.24
  assert np.isnan(t.loc["train_samples", "paper mae"]) and np.isnan(t.loc["db_index", "mae r"])
  md = analysis.markdown(t.reset_index(), digits=2)
  assert "| num_classes | 0.05 | 0.05 | -0.24 | -0.24 |" in md


# --- command line -----------------------------------------------------------------

def _png(path):
  with open(path, "rb") as f:
    head = f.read(8)
  return head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
  npz_dir = tmp_path / "npz"
  for flag in medmnist.FLAGS:
    medmnist.make_synthetic_npz(npz_dir / f"{flag}.npz", flag, 28, counts=(8, 2, 6))
  _cache_features(monkeypatch, tmp_path / "feats", "octmnist", "test",
                  np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32))
  out = tmp_path / "out"
  cli.main(["fit", f"--out={out}", "--x=params_total", f"--npz_dir={npz_dir}",
            "--image_size=28", f"--features_dir=dinov2={tmp_path / 'feats'}",
            "--bootstrap=50"])
  printed = capsys.readouterr().out
  assert "mae: mean-auc slope b = 0.0191" in printed
  slopes = pd.read_csv(out / "slopes.csv")
  assert len(slopes) == 26 and {"boot_low", "boot_high", "se_b", "r2"} <= set(slopes.columns)
  factors = pd.read_csv(out / "factors.csv")
  assert factors["gzip_ratio"].notna().all() and factors["db_index"].notna().sum() == 1
  corr = pd.read_csv(out / "correlations.csv")
  assert set(corr["factor"]) == set(analysis.factors.FACTORS)
  assert corr[corr["factor"] == "db_index"]["r"].isna().all()  # one benchmark only
  for name in ("curves.png", "slopes.png", "factors.png"):
    assert _png(out / name), name
  # The default axis is the paper's; another one on the paper's table gets a note.
  cli.main(["fit", f"--out={tmp_path / 'default'}"])
  assert "dinov2: mean-auc slope b = 0.0088" in capsys.readouterr().out
  cli.main(["fit", f"--out={tmp_path / 'enc'}", "--x=params_encoder"])
  assert "use --x=params_total" in capsys.readouterr().out
  bad = tmp_path / "bad.csv"
  analysis.load_results().drop(columns=["benchmark"]).to_csv(bad, index=False)
  with pytest.raises(SystemExit) as e:
    cli.main(["fit", f"--results={bad}", f"--out={tmp_path / 'x'}"])
  assert e.value.code == 2 and "missing column 'benchmark'" in capsys.readouterr().err


# --- what `fit` prints and draws (issue 24) ---------------------------------------

def _store(path, benchmarks, sizes=(("w16", 6_000, 9_000), ("w32", 21_000, 30_000)),
           subsets=("mini",)):
  """A results store as a sweep leaves it (biovfm_jax/results.py's rows): each
  objective x data subset x size a run scored on `benchmarks`, AUC rising with size."""
  from biovfm_jax import results
  for objective, base in (("mae", 0.62), ("dinov2", 0.70)):
    for s, subset in enumerate(subsets):
      for i, (size, encoder, total) in enumerate(sizes):
        scores = {b: {"auc": base + 0.04 * i + 0.01 * s + 0.02 * j + 0.003 * (i * j % 2),
                      "acc": 0.5} for j, b in enumerate(benchmarks)}
        results.append(path, results.evaluation_rows(
            scores, run=f"{objective}_{subset}_{size}", checkpoint="/ckpt", step=3,
            protocol="fast", params_encoder=encoder, model_size=size, data_subset=subset,
            modality_subset="all", run_facts={"objective": objective, "batch_size": 16,
                                              "params_total": total,
                                              "flops_per_example": 1e6}))
  return str(path)


def _texts(fig) -> list[str]:
  from matplotlib.text import Text
  return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def test_fit_prints_the_slope_table_beside_the_paper(tmp_path, capsys):
  cli.main(["fit", f"--out={tmp_path}"])
  out = capsys.readouterr().out
  assert "Empty DataFrame" not in out
  slopes = pd.read_csv(tmp_path / "slopes.csv").fillna({"flag": ""}).set_index(
      ["objective", "benchmark"])
  for (objective, flag), s in slopes.iterrows():
    paper = PAPER_SLOPES[flag][published.PAPER_OBJECTIVES.index(objective)]
    name = analysis.fit.report.display_name(flag)
    b = re.escape(f"({s.b:.4f})") if s.flag else f"{s.b:.4f}"  # flagged: bracketed
    row = (rf"^{re.escape(name)} +{objective} +{b} +\[{s.ci_low:.4f}, {s.ci_high:.4f}\] "
           rf"+{s.r2:.2f} +4 +{paper:.4f}" + (f" +{s.flag}$" if s.flag else "$"))
    assert re.search(row, out, re.M), row
  assert "(b): flagged, not a result: no measurable effect" in out
  assert "warning:" not in out  # 4 sizes, no replicates: nothing to warn of
  # The correlations beside the paper's: num_classes 0.05 (0.05) and -0.24 (-0.24).
  assert re.search(r"^num_classes +0\.05 +0\.05 +-0\.24 +-0\.24$", out, re.M), out
  assert "mae: mean-auc slope b = 0.0191 (SE 0.0067); flagged: no measurable effect" in out


def test_fit_on_a_tiny_sweep_says_why_there_are_no_factors(tmp_path, capsys):
  """The tiny sweep's shape: 2 sizes x 2 objectives (x 2 data subsets) on the
  mini benchmark, which is not MedMNIST."""
  csv = _store(tmp_path / "results.csv", ["mini_modality"], subsets=("mini", "mini_mr_ct"))
  cli.main(["fit", f"--results={csv}", f"--out={tmp_path / 'fit'}"])
  out = capsys.readouterr().out
  assert "Empty DataFrame" not in out
  slopes = analysis.fit_slopes(analysis.load_results(csv))
  assert len(slopes) == 4
  for s in slopes.itertuples():  # two points: b bracketed, no interval, no R², flagged
    assert re.search(rf"^mini_modality +{s.objective} {s.data_subset} +\({s.b:.4f}\) +- +- +2 "
                     r"+fewer than 3 sizes; no measurable effect$", out, re.M), out
  assert ("warning: fewer than 3 sizes: every group (mini_modality): a line through 2 values "
          "of N = params_total fits any curve") in out
  assert "a line through two points has no interval" in out
  assert ("Pearson r of the slopes with each benchmark factor: no MedMNIST benchmark in these "
          "results: no factors") in out
  # Two MedMNIST benchmarks: correlations need three.
  csv = _store(tmp_path / "two.csv", ["dermamnist", "octmnist"])
  cli.main(["fit", f"--results={csv}", f"--out={tmp_path / 'fit2'}"])
  out = capsys.readouterr().out
  assert "slopes on 2 MedMNIST benchmark(s): an r needs 3 or more" in out
  assert re.search(r"^Derma +mae +\([\d.]+\) +- +- +2 +0\.0269 +fewer than 3 sizes; no "
                   r"measurable effect$", out, re.M), out


def test_curves_are_readable(tmp_path):
  csv = _store(tmp_path / "results.csv", ["mini_modality"], subsets=("mini", "mini_mr_ct"))
  df = analysis.load_results(csv)
  slopes = analysis.fit_slopes(df)
  fig = analysis.plot_curves(df, slopes, tmp_path / "curves.png")
  fig.draw_without_rendering()
  ax = fig.axes[0]
  assert ax.get_xlabel() == "parameters, encoder + decoder (K)"
  assert ax.get_ylabel() == "100 × AUC"
  assert [t.get_text() for t in ax.get_xticklabels()] == ["9", "30"]  # the sizes, in K
  assert sum(bool(t.get_text()) for t in ax.get_yticklabels()) >= 4
  assert "ln(100·AUC) = a + b ln N" in fig._suptitle.get_text()
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  assert legend == [f"{o} {d}: b = {b:.4f} (2 points)\n(fewer than 3 sizes; no measurable "
                    "effect)" for o, d, b in zip(["DINOv2", "DINOv2", "MAE", "MAE"],
                                                 ["mini", "mini_mr_ct"] * 2, slopes["b"])]
  # Each group its own marker and line style, so overlapping lines stay apart.
  styles = {(h.get_marker(), h.get_linestyle()) for h in ax.get_legend().legend_handles}
  assert len(styles) == 4
  with open(tmp_path / "curves.png", "rb") as f:
    from PIL import Image
    assert Image.open(f).size[0] >= 1000
  # The paper's: legends give the interval and R², panels their benchmark.
  table = analysis.load_results()
  paper = analysis.fit_slopes(table)
  fig = analysis.plot_curves(table, paper)
  derma = next(a for a in fig.axes if a.get_title() == "Derma")
  mae = paper.set_index(["objective", "benchmark"]).loc[("mae", "dermamnist")]
  assert (f"MAE: b = 0.0269 [{mae.ci_low:.4f}, {mae.ci_high:.4f}], R² {mae.r2:.2f}\n"
          "(no measurable effect)" in [t.get_text() for t in derma.get_legend().get_texts()])
  pneumonia = next(a for a in fig.axes if a.get_title() == "Pneumonia")  # no flag, one line
  assert all("\n" not in t.get_text() for t in pneumonia.get_legend().get_texts())
  assert derma.get_xlabel() == "parameters, encoder + decoder (M)"
  fig.draw_without_rendering()
  assert [t.get_text() for t in derma.get_xticklabels()] == ["31.2", "47.4", "112", "329"]


def test_slopes_and_factors_figures(tmp_path):
  table = analysis.load_results()
  paper = analysis.fit_slopes(table)
  fig = analysis.plot_slopes(paper, tmp_path / "slopes.png")
  assert fig._suptitle.get_text().startswith("Scaling slope b of ln(100·AUC) = a + b ln N")
  labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
  assert labels == ["paper's b", "DINOv2", "MAE", "hollow: flagged, not a result\n"
                    "(no measurable effect\nor within seed noise)"]
  # Flagged slopes hollow (white, hatched), the others filled: Pneumonia's alone.
  bars = [p for p in fig.axes[0].patches if p.get_height() != 0]
  filled = [p for p in bars if p.get_facecolor()[:3] != (1.0, 1.0, 1.0)]
  assert len(bars) == 26 and len(filled) == 2 and all(p.get_hatch() is None for p in filled)
  factors = analysis.factor_table(list(medmnist.FLAGS))
  corr = analysis.correlations(paper, factors)
  fig = analysis.plot_factors(paper, factors, corr)
  classes = next(a for a in fig.axes if a.get_xlabel().startswith("classes"))
  assert [t.get_text() for t in classes.get_legend().get_texts()] == [
      "DINOv2: r = 0.05 (paper 0.05)", "MAE: r = -0.24 (paper -0.24)"]
  assert "no data" not in _texts(fig)
  # No MedMNIST benchmark: one panel that says so, not empty axes.
  tiny = analysis.load_results(_store(tmp_path / "r.csv", ["mini_modality"]))
  slopes = analysis.fit_slopes(tiny)
  empty = analysis.factor_table(["mini_modality"], ["mae", "dinov2"])
  fig = analysis.plot_factors(slopes, empty, analysis.correlations(slopes, empty))
  assert "no data" in _texts(fig)
  assert "no MedMNIST benchmark in these results: no factors" in _texts(fig)
  assert all(not a.axison for a in fig.axes)
  assert "no data" in _texts(analysis.plot_curves(tiny, slopes.iloc[:0]))


# --- replicates, flags and axis effects (issue: slopes fitted to noise) ------------

def _replicates(values: dict, benchmark="mini_modality", **common):
  """A results frame of replicate runs: {N: [value per seed]} -> runs "n<N>-s<k>"."""
  return _rows([(f"n{n:g}-s{k}", n, benchmark, v) for n, vs in values.items()
                for k, v in enumerate(vs)], **common)


def test_two_sizes_with_replicates_are_flagged_but_measured():
  """2 sizes x 3 seeds, a real gain: too few sizes for a scaling law, yet
  the replicates give b an interval, and it excludes 0."""
  df = _replicates({1e6: [0.700, 0.705, 0.698], 1e7: [0.800, 0.795, 0.803]})
  (s,) = analysis.fit_slopes(df).to_dict("records")
  assert (s["n_points"], s["n_x"]) == (6, 2)
  assert s["flag"] == "fewer than 3 sizes"
  assert 0 < s["ci_low"] < s["b"] < s["ci_high"]
  assert analysis.measurable(s) and not analysis.flagged(s)
  y = np.log(100 * np.array([[0.700, 0.705, 0.698], [0.800, 0.795, 0.803]]))
  pooled = ((y - y.mean(axis=1, keepdims=True)) ** 2).sum() / 4
  assert s["seed_sd"] == pytest.approx(pooled ** 0.5)
  assert s["spread"] == pytest.approx(y[1].mean() - y[0].mean())
  # Another axis than parameters says "values of N".
  df["images_seen"] = df["params_total"]
  (d,) = analysis.fit_slopes(df, x="images_seen").to_dict("records")
  assert d["flag"] == "fewer than 3 values of N"


def test_sizes_within_seed_noise_are_no_result():
  """3 sizes whose means differ by less than the seeds do: within seed noise,
  and b's interval includes 0."""
  df = _replicates({1e6: [0.70, 0.74, 0.66], 1e7: [0.71, 0.67, 0.73], 1e8: [0.69, 0.72, 0.70]})
  (s,) = analysis.fit_slopes(df).to_dict("records")
  assert s["flag"] == "within seed noise; no measurable effect"
  assert s["spread"] < 2 * s["seed_sd"] and s["ci_low"] < 0 < s["ci_high"]
  assert not analysis.measurable(s) and analysis.flagged(s)
  # No replicates: no seed_sd, so no "within seed noise", whatever the spread.
  (one,) = analysis.fit_slopes(_replicates({1e6: [0.70], 1e7: [0.71], 1e8: [0.69]})).to_dict(
      "records")
  assert np.isnan(one["seed_sd"]) and one["flag"] == "no measurable effect"
  # A clean 3-size gain: no flag at all.
  (good,) = analysis.fit_slopes(_replicates({1e6: [0.70, 0.701], 1e7: [0.75, 0.751],
                                             1e8: [0.80, 0.801]})).to_dict("records")
  assert good["flag"] == ""


def _grid(seeds=2, size_gain=0.05, benchmarks=("mini_modality",)):
  """objective x model size x data subset, `seeds` runs each: size B beats S by
  `size_gain`; the data subset changes nothing but the seed noise."""
  rng = np.random.default_rng(0)
  frames = []
  for objective, base in (("mae", 0.70), ("dinov2", 0.74)):
    for size, n, gain in (("S", 9e6, 0.0), ("B", 3e7, size_gain)):  # sorted: B before S
      for subset in ("all", "mr_ct"):
        points = [(f"{objective}-{size}-{subset}-s{k}", n, bench,
                   base + gain + rng.normal(0, 0.004)) for k in range(seeds)
                  for bench in benchmarks]
        frames.append(_rows(points, objective=objective, model_size=size, data_subset=subset,
                            protocol="fast"))
  return pd.concat(frames, ignore_index=True)


def test_axis_effects_find_the_real_one():
  e = analysis.axis_effects(_grid())
  assert list(e.columns) == list(analysis.effects.COLUMNS)
  assert list(e["axis"]) == ["objective", "model_size", "data_subset"]  # modality: one label
  by = e.set_index("axis")
  size = by.loc["model_size"]
  assert (size.level_a, size.level_b) == ("S", "B")  # by parameter count, not by name
  assert size["diff"] == pytest.approx(5.0, abs=0.6) and size.ci_low > 0
  assert size.mean_b - size.mean_a == pytest.approx(size["diff"])
  assert (size.n_contexts, size.n_runs, size.flag) == (4, 16, "")
  data = by.loc["data_subset"]
  assert (data.level_a, data.level_b) == ("all", "mr_ct")
  assert abs(data["diff"]) < 0.6 and data.ci_low < 0 < data.ci_high
  assert data.flag == "no measurable effect"
  objective = by.loc["objective"]
  assert (objective.level_a, objective.level_b) == ("dinov2", "mae")
  assert objective["diff"] == pytest.approx(-4.0, abs=0.6) and objective.flag == ""
  # The published table: no replicates; objective across the 4 sizes, sizes across
  # the 2 objectives, BiomedCLIP beside DINOv2 at B only (no interval).
  paper = analysis.axis_effects(analysis.load_results())
  mean = paper[paper["benchmark"] == "mean"].set_index(["level_a", "level_b"])
  assert mean.loc[("dinov2", "mae"), "n_contexts"] == 4
  assert mean.loc[("dinov2", "mae"), "diff"] == pytest.approx(-1.771, abs=0.001)
  assert mean.loc[("T", "S"), "n_contexts"] == 2
  assert np.isnan(mean.loc[("biomedclip", "dinov2"), "ci_low"])
  assert mean.loc[("biomedclip", "dinov2"), "flag"] == "no measurable effect"


def test_axis_effect_in_one_context_uses_the_replicates():
  """One context: Welch's interval from the seeds; without seeds, none."""
  df = _grid(seeds=3)
  one = df[(df["objective"] == "mae") & (df["data_subset"] == "all")]
  (size,) = analysis.axis_effects(one).to_dict("records")
  a = 100 * one[one["model_size"] == "S"]["value"].to_numpy()
  b = 100 * one[one["model_size"] == "B"]["value"].to_numpy()
  ref = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
  assert (size["ci_low"], size["ci_high"]) == pytest.approx((ref.low, ref.high))
  assert (size["n_contexts"], size["n_runs"], size["flag"]) == (1, 6, "")
  single = one[one["run"].str.endswith("-s0")]
  (size,) = analysis.axis_effects(single).to_dict("records")
  assert np.isnan(size["ci_low"]) and size["flag"] == "no measurable effect"
  # Nothing varies but N: no effects to show.
  assert analysis.axis_effects(_replicates({1e6: [0.7], 1e7: [0.8]})).empty


def test_fit_warns_about_few_sizes_and_seed_noise(tmp_path, capsys):
  """A store with both problems: dinov2 on 2 sizes (3 seeds), mae on 3 sizes
  within its seed noise; and the axis effects beside the slopes."""
  dino = _replicates({1e6: [0.700, 0.705, 0.698], 1e7: [0.800, 0.795, 0.803]},
                     objective="dinov2")
  dino["run"] = "dinov2-" + dino["run"]
  mae = _replicates({1e6: [0.70, 0.74, 0.66], 1e7: [0.71, 0.67, 0.73], 1e8: [0.69, 0.72, 0.70]})
  df = pd.concat([dino, mae], ignore_index=True)
  df["model_size"] = df["params_total"].map({1e6: "S", 1e7: "B", 1e8: "L"})
  csv = tmp_path / "results.csv"
  df.to_csv(csv, index=False)
  cli.main(["fit", f"--results={csv}", f"--out={tmp_path / 'fit'}"])
  out = capsys.readouterr().out
  warnings = [l for l in out.splitlines() if l.startswith("warning:")]
  assert warnings == [
      "warning: fewer than 3 sizes: dinov2 (mini_modality): a line through 2 values of N = "
      "params_total fits any curve",
      "warning: within seed noise: mae (mini_modality): the change over N is under 2 x the "
      "standard deviation between replicate runs"]
  assert re.search(r"^mini_modality +dinov2 +0\.\d{4} +\[0\.\d{4}, 0\.\d{4}\] +[\d.]+ +6 "
                   r"+fewer than 3 sizes$", out, re.M), out
  assert re.search(r"^mini_modality +mae +\(-?0\.\d{4}\) +.* 9 +within seed noise; no "
                   r"measurable effect$", out, re.M), out
  assert "Axis effects on AUC" in out
  effects = pd.read_csv(tmp_path / "fit" / "effects.csv")
  assert list(effects.columns) == list(analysis.effects.COLUMNS)
  assert set(effects["axis"]) == {"objective", "model_size"}
  row = effects[effects["axis"] == "objective"].set_index(["level_a", "level_b"])
  assert row.loc[("dinov2", "mae"), "n_contexts"] == 2  # at S and B, where both ran
  # One label per axis: one line that says so, and an empty effects.csv with its header.
  alone = tmp_path / "alone.csv"
  _replicates({1e6: [0.7, 0.71], 1e7: [0.8, 0.81]}).to_csv(alone, index=False)
  cli.main(["fit", f"--results={alone}", f"--out={tmp_path / 'alone'}"])
  out = capsys.readouterr().out
  assert ("Axis effects on AUC: no label axis (objective, model_size, data_subset, "
          "modality_subset) has 2 or more labels") in out
  assert list(pd.read_csv(tmp_path / "alone" / "effects.csv").columns) == list(
      analysis.effects.COLUMNS)
