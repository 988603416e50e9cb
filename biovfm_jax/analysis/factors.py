"""Benchmark factors and their correlation with the scaling slopes.

Per MedMNIST benchmark (PAPER.md "Scaling analysis"):
  train_samples    official training split size
  dataset_samples  train + val + test: the paper's "number of training samples"
                   correlations (D 0.51, M 0.33) come out with this count
  num_classes      classes; labels for multi-label (ChestMNIST: 14)
  gzip_ratio       gzip-compressed bytes / raw bytes of the training images,
                   each image compressed on its own at gzip's default level 6
                   (so the ratio does not depend on the order of the images);
                   needs the npz files
  db_index         Davies-Bouldin index of the classes in an encoder's feature
                   space (lower: better separated), per objective; needs the
                   features the eval binary caches and the npz labels

Multi-label rule (ChestMNIST): the mean over labels of the two-group index
(label present vs absent); a label with one group only is skipped.
Counts come from data_pipeline.readers.medmnist's table.
"""
from __future__ import annotations

import contextlib
import gzip
import itertools
import logging
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import davies_bouldin_score

from biovfm_jax.analysis import fit
from data_pipeline.readers import medmnist

STATIC = ("train_samples", "dataset_samples", "num_classes")
FACTORS = STATIC + ("gzip_ratio", "db_index")
GZIP_LEVEL = 6  # the gzip command's default


def static_factors(benchmarks: Sequence[str]) -> pd.DataFrame:
  rows = []
  for flag in benchmarks:
    b = medmnist.benchmark(flag)
    rows.append({"benchmark": flag, "train_samples": b.splits["train"],
                 "dataset_samples": sum(b.splits.values()), "num_classes": b.num_classes})
  return pd.DataFrame(rows, columns=("benchmark",) + STATIC)


def davies_bouldin(features: np.ndarray, labels: np.ndarray) -> float:
  """Davies-Bouldin index of `features` (N, D) grouped by `labels`: (N,) or
  (N, 1) class ids, or (N, L) 0/1 multi-label (the mean over labels of the
  present-vs-absent index). Fewer than two groups: NaN."""
  features = np.asarray(features, np.float64)
  labels = np.asarray(labels)
  if labels.ndim == 1 or labels.shape[1] == 1:
    y = labels.reshape(-1)
    return float(davies_bouldin_score(features, y)) if np.unique(y).size >= 2 else float("nan")
  scores = [davies_bouldin_score(features, col) for col in labels.T if np.unique(col).size == 2]
  return float(np.mean(scores)) if scores else float("nan")


def feature_file(features_dir: str, benchmark: str, split: str) -> str | None:
  """The cached features of `benchmark`/`split` in an eval's features dir
  (`{benchmark}_{split}_{key}.npy`, biovfm_jax/evaluate/features.py), or
  None. Several (another encoder or image size in the same dir) is an error."""
  if not os.path.isdir(features_dir):
    raise FileNotFoundError(f"features dir {features_dir} does not exist")
  pattern = re.compile(rf"{re.escape(benchmark)}_{re.escape(split)}_[0-9a-f]{{16}}\.npy")
  found = sorted(n for n in os.listdir(features_dir) if pattern.fullmatch(n))
  if len(found) > 1:
    raise ValueError(f"{features_dir}: several cached feature files for {benchmark}/{split} "
                     f"({', '.join(found)}); use one eval out_dir per encoder")
  return os.path.join(features_dir, found[0]) if found else None


def db_index(features_path: str, npz: str, benchmark: str, split: str) -> float:
  """Davies-Bouldin index of one cached feature file, labelled from the npz."""
  feats = np.load(features_path)
  labels = medmnist.load_npz(npz, benchmark, keys=(f"{split}_labels",))[f"{split}_labels"]
  if len(labels) != len(feats):
    raise ValueError(f"{features_path}: {len(feats)} feature rows but {npz} has "
                     f"{len(labels)} {split} labels")
  return davies_bouldin(feats, labels)


def gzip_ratio(npz: str, benchmark: str, max_images: int | None = None) -> float:
  """gzip-compressed bytes / raw bytes over the training images of an npz
  (the first `max_images` of them when given), each image on its own."""
  medmnist.npz_header(npz, benchmark)
  raw = packed = 0
  rows = (image for chunk in medmnist.iter_npz_rows(npz, "train_images", chunk=256)
          for image in chunk)
  with contextlib.closing(rows):  # closes the npz when max_images stops early
    for image in itertools.islice(rows, max_images):
      data = image.tobytes()
      raw += len(data)
      packed += len(gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0))
  if not raw:
    raise ValueError(f"{npz}: no training images")
  return packed / raw


def factor_table(benchmarks: Sequence[str], objectives: Sequence[str] = ("dinov2", "mae"), *,
                 features_dirs: Mapping[str, str] | None = None, npz_dir: str | None = None,
                 image_size: int = 224, db_split: str = "test",
                 gzip_max_images: int | None = None) -> pd.DataFrame:
  """Factors per (objective, benchmark) of the MedMNIST `benchmarks`.

  The static ones always; gzip_ratio when `npz_dir` is given (npz files at
  `image_size`); db_index for the objectives in `features_dirs` (objective
  -> an eval's features dir; labels from `npz_dir`). A benchmark without a
  feature file gets NaN; the reasons are in `result.attrs["notes"]`.
  """
  notes = [f"{b}: not a MedMNIST benchmark, no factors" for b in benchmarks
           if b not in medmnist.FLAGS]
  flags = [b for b in benchmarks if b in medmnist.FLAGS]
  features_dirs = dict(features_dirs or {})
  if features_dirs and not npz_dir:
    raise ValueError("db_index needs the npz files for the labels: give npz_dir")
  table = static_factors(flags)
  if npz_dir:
    ratios = []
    for flag in flags:  # minutes per benchmark at 224 px
      ratios.append(gzip_ratio(medmnist.npz_path(npz_dir, flag, image_size), flag,
                               gzip_max_images))
      logging.info("gzip ratio %s: %.4f", flag, ratios[-1])
    table["gzip_ratio"] = ratios
  parts = []
  for objective in list(objectives) + [o for o in features_dirs if o not in objectives]:
    part = table.copy()
    part.insert(0, "objective", objective)
    if objective in features_dirs:
      values = []
      for flag in flags:
        path = feature_file(features_dirs[objective], flag, db_split)
        if path is None:
          notes.append(f"{objective}/{flag}: no cached {db_split} features in "
                       f"{features_dirs[objective]}")
          values.append(float("nan"))
        else:
          values.append(db_index(path, medmnist.npz_path(npz_dir, flag, image_size), flag,
                                 db_split))
          logging.info("Davies-Bouldin %s/%s: %.4f", objective, flag, values[-1])
      part["db_index"] = values
    parts.append(part)
  out = pd.concat(parts, ignore_index=True)
  out.attrs["notes"] = notes
  return out


def correlations(slopes: pd.DataFrame, factors: pd.DataFrame) -> pd.DataFrame:
  """Pearson r (and its p-value) of each factor with the slopes b across
  benchmarks, per slope group (objective, protocol, ...); the mean row is
  left out. Factors with fewer than 3 benchmarks or no spread give NaN."""
  names = [c for c in factors.columns if c in FACTORS]
  slopes = slopes[slopes["benchmark"] != fit.MEAN]
  keys = fit.group_keys(slopes) + ["x"]
  merged = slopes.merge(factors, on=["objective", "benchmark"], how="inner")
  rows = []
  for group, g in merged.groupby(keys, dropna=False, sort=False):
    for name in names:
      ok = g[["b", name]].dropna()
      r = p = float("nan")
      if len(ok) >= 3 and ok[name].nunique() > 1 and ok["b"].nunique() > 1:
        r, p = (float(v) for v in stats.pearsonr(ok[name], ok["b"]))
      rows.append({**dict(zip(keys, group)), "factor": name, "n_benchmarks": len(ok),
                   "r": r, "p_value": p})
  return pd.DataFrame(rows, columns=keys + ["factor", "n_benchmarks", "r", "p_value"])
