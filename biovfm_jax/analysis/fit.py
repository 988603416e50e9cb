"""Scaling fits: ln(100 x AUC) = a + b ln(N), by least squares.

b is the paper's "scaling benefit". One fit per benchmark and per group of
runs that differ only along N, plus "mean": the fit on each run's mean AUC
over the MedMNIST benchmarks (the paper's mean row). N is a numeric column:
parameters (params_encoder, params_total), compute (train_flops) or data
(images_seen or any data-size column). What a group holds fixed follows N:
parameter fits keep the data subset fixed, data fits keep the model size
fixed, compute fits keep neither (HELD).

A slope is not a result just because a line fits: fit_slopes flags each fit
(column `flag`, "" when fine; several reasons joined with "; ", in this order):

  "fewer than 3 sizes"      fewer than 3 distinct N ("fewer than 3 values of N"
                            when N is not a parameter count): two sizes give a
                            line whatever the curve, and no test of its shape
  "within seed noise"       the fit's runs include replicates (runs with equal
                            labels at the same N, e.g. a sweep's --seeds) and the
                            spread of the mean ln(100 x value) over N is under
                            twice their pooled standard deviation (seed_sd)
  "no measurable effect"    the 95% interval of b includes 0, or there is none
                            (a line through two points)

measurable(row) says whether a slope is an effect at all, flagged(row) whether
it is to be drawn and printed as a result (neither of the last two flags).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from biovfm_jax.evaluate import report
from data_pipeline.readers import medmnist

BASE_KEYS = ("objective", "protocol", "metric")
MEAN = report.MEAN
FEW_SIZES, FEW_N = "fewer than 3 sizes", "fewer than 3 values of N"
IN_NOISE = "within seed noise"
NO_EFFECT = "no measurable effect"
NOISE_FACTOR = 2  # "within seed noise": spread < NOISE_FACTOR x seed_sd


def held(x: str) -> tuple[str, ...]:
  """The columns a group keeps fixed while N = column `x` varies."""
  if x.startswith("params"):
    return ("data_subset", "modality_subset")
  if x == "train_flops":
    return ()
  return ("model_size",)  # a data-size axis


def fit_line(x, y) -> dict:
  """y = a + b x by least squares: a, b, standard errors, 95% t interval of
  b (n - 2 degrees of freedom; NaN with two points), R^2 (NaN if y is flat)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n = len(x)
  sxx = float(((x - x.mean()) ** 2).sum())
  if n < 2 or sxx == 0:
    raise ValueError(f"a line needs at least 2 distinct x values, got {np.unique(x).size}")
  b = float(((x - x.mean()) * (y - y.mean())).sum() / sxx)
  a = float(y.mean() - b * x.mean())
  ssr = float(((y - a - b * x) ** 2).sum())
  sst = float(((y - y.mean()) ** 2).sum())
  dof = n - 2
  if dof > 0:
    s2 = ssr / dof
    se_b, se_a = (s2 / sxx) ** 0.5, (s2 * (1 / n + x.mean() ** 2 / sxx)) ** 0.5
    half = float(stats.t.ppf(0.975, dof)) * se_b
  else:
    se_b = se_a = half = float("nan")
  return {"a": a, "b": b, "se_a": se_a, "se_b": se_b, "ci_low": b - half,
          "ci_high": b + half, "r2": 1 - ssr / sst if sst > 0 else float("nan")}


def bootstrap_b(x, y, resamples: int, seed: int = 0) -> tuple[float, float]:
  """95% percentile interval of b over `resamples` resamples of the points
  (resamples with one distinct x are skipped; crude with four points)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  rng = np.random.default_rng(seed)
  bs = []
  for _ in range(resamples):
    i = rng.integers(0, len(x), len(x))
    if np.unique(x[i]).size >= 2:
      bs.append(fit_line(x[i], y[i])["b"])
  if not bs:
    return float("nan"), float("nan")
  return float(np.percentile(bs, 2.5)), float(np.percentile(bs, 97.5))


def latest(df: pd.DataFrame, notes: list) -> pd.DataFrame:
  """One row per (run, protocol, benchmark, metric): the latest step."""
  key = ["run", "protocol", "benchmark", "metric"]
  df = df.sort_values(["step", "time"], na_position="first", kind="stable")
  kept = df.drop_duplicates(key, keep="last")
  if len(kept) < len(df):
    notes.append(f"{len(df) - len(kept)} repeated (run, protocol, benchmark, metric) rows: "
                 "kept the latest step of each")
  return kept


def run_means(df: pd.DataFrame, keys: list[str], carry: list[str],
              notes: list) -> pd.DataFrame:
  """Per group of `keys`, each run's mean value over the group's MedMNIST
  benchmarks (benchmark "mean"), with its first value of each `carry` column;
  runs that lack one of those benchmarks are left out of the mean (noted)."""
  df = df[df["benchmark"].isin(medmnist.FLAGS)]
  out = []
  for group, g in df.groupby(keys, dropna=False, sort=False):
    wanted = set(g["benchmark"])
    per_run = g.groupby("run").agg(n=("benchmark", "nunique"), value=("value", "mean"),
                                   **{c: (c, "first") for c in carry})
    short = per_run[per_run["n"] < len(wanted)]
    if len(short):
      notes.append(f"{dict(zip(keys, group))}: mean leaves out runs {sorted(short.index)}, "
                   f"which lack some of the {len(wanted)} benchmarks")
    full = per_run[per_run["n"] == len(wanted)].reset_index()
    out.append(full[["run", "value"] + carry].assign(**dict(zip(keys, group)), benchmark=MEAN))
  return pd.concat(out, ignore_index=True) if out else df.iloc[:0]


def group_keys(table: pd.DataFrame, last: str = "benchmark") -> list[str]:
  """The group keys of a fit_slopes (or correlations, last="factor") table:
  the columns before `last`."""
  return list(table.columns[:table.columns.get_loc(last)])


def in_group(frame: pd.DataFrame, keys: list[str], group: tuple) -> pd.Series:
  """Rows of `frame` whose `keys` columns hold `group`."""
  return (frame[keys] == pd.Series(group, keys)).all(axis=1)


def group_labels(table: pd.DataFrame, keys: list[str]) -> dict[tuple, str]:
  """Group key tuple -> a short label: the objective and the values of the
  other keys that differ between groups (the objective alone in the usual
  case)."""
  groups = table[keys].drop_duplicates()
  varying = [k for k in keys if k == "objective" or groups[k].nunique() > 1]
  return {tuple(row): " ".join(str(v) for k, v in zip(keys, row) if k in varying)
          for row in groups.itertuples(index=False)}


def scaling_points(df: pd.DataFrame, x: str = "params_total", metric: str = "auc",
                   by: tuple[str, ...] | None = None) -> pd.DataFrame:
  """The points the fits use: the group keys (BASE_KEYS + `by`, default
  held(x)), benchmark, x and value, with each run's "mean" rows. Rows with
  no or non-positive x are dropped (`result.attrs["notes"]` says so);
  `result.attrs["keys"]` lists the group keys."""
  if x not in df.columns:
    raise ValueError(f"fit: no column {x!r} to use as N")
  if not pd.api.types.is_numeric_dtype(df[x]):
    raise ValueError(f"fit: column {x!r} is not numeric")
  keys = list(BASE_KEYS) + list(held(x) if by is None else by)
  notes: list[str] = []
  df = latest(df[df["metric"] == metric], notes)
  bad = ~(df[x].astype(float) > 0) | ~(df["value"] > 0)
  for objective, n in df[bad].groupby("objective").size().items():
    notes.append(f"{objective}: {n} rows without a positive {x} or value, not fitted")
  df = df[~bad]
  cols = keys + ["benchmark", x, "value"]
  out = pd.concat([df[cols], run_means(df, keys, [x], notes)[cols]], ignore_index=True)
  out[x] = out[x].astype(float)
  out.attrs.update(notes=notes, keys=keys)
  return out


def noise(x, y) -> tuple[float, float]:
  """(seed_sd, spread) of points y at x: the pooled standard deviation of y
  between points at the same x (NaN when no x has two), and max - min over
  the distinct x of the mean y there."""
  g = pd.DataFrame({"x": np.asarray(x, np.float64), "y": np.asarray(y, np.float64)})
  by = g.groupby("x")["y"]
  dof = int((by.size() - 1).sum())
  ss = float((by.transform(lambda v: v - v.mean()) ** 2).sum())
  means = by.mean()
  return (ss / dof) ** 0.5 if dof else float("nan"), float(means.max() - means.min())


def flags_of(row: dict) -> str:
  """The flag text of one fit (the module docstring's rules, in that order)."""
  out = []
  if row["n_x"] < 3:
    out.append(FEW_SIZES if str(row["x"]).startswith("params") else FEW_N)
  if not np.isnan(row["seed_sd"]) and row["spread"] < NOISE_FACTOR * row["seed_sd"]:
    out.append(IN_NOISE)
  if not row["ci_low"] > 0 and not row["ci_high"] < 0:  # includes 0, or NaN: none
    out.append(NO_EFFECT)
  return "; ".join(out)


def measurable(row) -> bool:
  """Whether a fit_slopes row (or effects row) is an effect: its 95% interval
  excludes 0 (not flagged "no measurable effect")."""
  return NO_EFFECT not in str(row["flag"])


def flagged(row) -> bool:
  """Whether a slope is not to be read as a result: no measurable effect, or
  its spread within seed noise (the plots draw these hollow, the tables
  bracket their b)."""
  return not measurable(row) or IN_NOISE in str(row["flag"])


def fit_slopes(df: pd.DataFrame, x: str = "params_total", metric: str = "auc",
               by: tuple[str, ...] | None = None, bootstrap: int = 0,
               seed: int = 0) -> pd.DataFrame:
  """b of ln(100 x value) = a + b ln(x) per group and benchmark, plus "mean"
  (see scaling_points). Groups with fewer than 2 distinct x are skipped and
  listed in `result.attrs["notes"]`. Columns: the group keys, benchmark, x,
  n_points, n_x, x_min, x_max, a, b, se_a, se_b, ci_low, ci_high, r2 (and
  boot_low, boot_high with `bootstrap` resamples), seed_sd, spread (both of
  ln(100 x value); see noise) and flag (the module docstring's rules).
  Replicates (runs at the same x in a group) are points of the fit, each.
  """
  points = scaling_points(df, x, metric, by)
  keys, notes = points.attrs["keys"], list(points.attrs["notes"])
  rows = []
  for group, g in points.groupby(keys + ["benchmark"], dropna=False, sort=False):
    lx, ly = np.log(g[x]), np.log(100 * g["value"])
    where = dict(zip(keys + ["benchmark"], group))
    if lx.nunique() < 2:
      notes.append(f"{where}: skipped, {lx.nunique()} distinct {x} (a fit needs 2)")
      continue
    row = {**where, "x": x, "n_points": len(g), "n_x": lx.nunique(),
           "x_min": float(g[x].min()), "x_max": float(g[x].max()), **fit_line(lx, ly)}
    if bootstrap:
      row["boot_low"], row["boot_high"] = bootstrap_b(lx, ly, bootstrap, seed)
    row["seed_sd"], row["spread"] = noise(lx, ly)
    row["flag"] = flags_of(row)
    rows.append(row)
  out = pd.DataFrame(rows) if rows else pd.DataFrame(
      columns=keys + ["benchmark", "x", "b", "flag"])
  if len(out):
    order = {b: i for i, b in enumerate(report.ordered(set(out["benchmark"]) - {MEAN}))}
    order[MEAN] = len(order)
    out = out.sort_values(keys + ["benchmark"], key=lambda s: s.map(order)
                          if s.name == "benchmark" else s, kind="stable")
    out = out.reset_index(drop=True)
  out.attrs["notes"] = notes
  return out
