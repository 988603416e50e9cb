"""What each categorical axis of a study changes: the effect of going from one
label to the next (objective dinov2 -> mae, data subset a -> b, model size
S -> B) on each benchmark, in percentage points, with a 95% interval.

An effect is compared within "contexts": the combinations of the other label
columns (objective, model_size, data_subset, modality_subset) and the
protocol, so a change of data subset is read at a fixed model size and
objective. In each context the cell is the mean over its replicate runs
(runs with equal labels, e.g. a sweep's --seeds; each run's latest step);
the effect is the mean over contexts of cell_b - cell_a. Its interval is a t
interval across the contexts (2 or more), else, in a single context, Welch's
interval from the replicates when both sides have 2 or more, else none. An
interval that includes 0, or none, is flagged "no measurable effect".
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from biovfm_jax.analysis import fit
from biovfm_jax.evaluate import report

AXES = ("objective", "model_size", "data_subset", "modality_subset")
COLUMNS = ("axis", "benchmark", "metric", "level_a", "level_b", "mean_a", "mean_b", "diff",
           "ci_low", "ci_high", "n_contexts", "n_runs", "flag")


def levels(df: pd.DataFrame, axis: str) -> list[str]:
  """The axis's labels in the order effects go: model sizes by their
  parameter count (the median of their runs'), others sorted."""
  names = sorted(set(df[axis].dropna().astype(str)) - {""})  # "": a run without the label
  if axis == "model_size" and "params_total" in df:
    size = df.groupby("model_size")["params_total"].agg(
        lambda v: pd.to_numeric(v, errors="coerce").median())
    names.sort(key=lambda n: (np.isnan(size.get(n, np.nan)), size.get(n, np.nan), n))
  return names


def _interval(diffs: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """95% interval of the mean of `diffs` (one per context); in one context,
  Welch's from its replicates `a` and `b`."""
  if len(diffs) >= 2:
    half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / len(diffs) ** 0.5
    return diffs.mean() - half, diffs.mean() + half
  if len(a) >= 2 and len(b) >= 2:
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    d = b.mean() - a.mean()
    if va + vb == 0:  # identical replicates: the difference is exact
      return d, d
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.975, dof) * (va + vb) ** 0.5
    return d - half, d + half
  return float("nan"), float("nan")


def _effect(cells: pd.DataFrame, axis: str, a: str, b: str) -> dict | None:
  """The a -> b effect from one benchmark's runs `cells` (value in percent)."""
  context = [c for c in AXES if c != axis] + ["protocol"]
  sides = {level: cells[cells[axis] == level] for level in (a, b)}
  means = {level: g.groupby(context, dropna=False)["value"].mean()
           for level, g in sides.items()}
  both = means[a].index.intersection(means[b].index)
  if not len(both):
    return None
  diffs = (means[b][both] - means[a][both]).to_numpy()
  used = {level: g[g.set_index(context).index.isin(both)] for level, g in sides.items()}
  low, high = _interval(diffs, used[a]["value"].to_numpy(), used[b]["value"].to_numpy())
  return {"level_a": a, "level_b": b, "mean_a": float(means[a][both].mean()),
          "mean_b": float(means[b][both].mean()), "diff": float(diffs.mean()),
          "ci_low": float(low), "ci_high": float(high), "n_contexts": len(both),
          "n_runs": int(used[a]["run"].nunique() + used[b]["run"].nunique()),
          "flag": "" if low > 0 or high < 0 else fit.NO_EFFECT}


def axis_effects(df: pd.DataFrame, metric: str = "auc") -> pd.DataFrame:
  """Per label axis with 2 or more labels in `df`, per benchmark (and "mean",
  each run's mean over its MedMNIST benchmarks, as fit_slopes'), the effect
  of each label (in `levels` order) against the one before it, or the nearest
  earlier one that shares a context: COLUMNS, in percentage points of 100 x
  value. `result.attrs["notes"]` lists what was left out."""
  notes: list[str] = []
  df = fit.latest(df[df["metric"] == metric], notes)
  df = df[df["value"].notna()]
  df = df.assign(**{c: df[c].fillna("").astype(str) for c in AXES})
  means = fit.run_means(df, ["protocol"], list(AXES), notes)
  table = pd.concat([df, means], ignore_index=True).assign(value=lambda t: 100 * t["value"])
  names = report.ordered(set(df["benchmark"])) + ([fit.MEAN] if len(means) else [])
  rows = []
  for axis in AXES:
    order = levels(df, axis)
    if len(order) < 2:
      continue
    for i, b in enumerate(order[1:], 1):
      for name in names:
        cells = table[table["benchmark"] == name]
        # Against the nearest earlier label with runs to compare: consecutive
        # where the grid is complete, a skip where one label's runs are elsewhere.
        row = next(filter(None, (_effect(cells, axis, a, b) for a in reversed(order[:i]))),
                   None)
        if row is None:
          notes.append(f"{axis} {b} on {name}: no effect: no run at an earlier {axis} "
                       f"({', '.join(order[:i])}) has its other labels and protocol")
          continue
        rows.append({"axis": axis, "benchmark": name, "metric": metric, **row})
  out = pd.DataFrame(rows, columns=list(COLUMNS))
  out.attrs["notes"] = notes
  return out
