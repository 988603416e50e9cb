"""Fitted slopes and factor correlations beside the paper's (published.py's
PAPER_SLOPES and PAPER_CORRELATIONS), as the tables the scaling notebook
prints.

A slope that is not a result (fit.flagged: its 95% interval includes 0 or
there is none, or its spread is within seed noise) is not printed as one: its
b is bracketed, "(0.0123)", and the group's "flag" column says why.

Columns come in one block per slope group (fit.group_labels: the objective
alone in the usual case), and each objective the paper fitted gets its
"paper <objective>" column after its groups' block: always, fitted here or
not, so a user's own runs are read beside the published numbers.
"""
from __future__ import annotations

import math

import pandas as pd

from biovfm_jax.analysis import factors as factors_lib
from biovfm_jax.analysis import fit
from biovfm_jax.analysis import published
from biovfm_jax.evaluate import report


def _blocks(table: pd.DataFrame, keys: list[str]) -> list[tuple[str, list[tuple[tuple, str]]]]:
  """[(objective, [(group, label), ...])]: the table's objectives in its
  order, then the paper's that it lacks (no groups)."""
  labels = fit.group_labels(table, keys) if len(table) else {}
  objectives = list(dict.fromkeys(g[keys.index("objective")] for g in labels))
  objectives += [o for o in published.PAPER_OBJECTIVES if o not in objectives]
  return [(o, [(g, label) for g, label in labels.items() if g[keys.index("objective")] == o])
          for o in objectives]


def _paper_column(values: dict, objective: str, rows: list[str]) -> list[float]:
  i = published.PAPER_OBJECTIVES.index(objective)
  return [values[r][i] if r in values else math.nan for r in rows]


def _table(table: pd.DataFrame, keys: list[str], row_key: str, rows: list[str],
           columns: dict[str, str], paper: dict) -> pd.DataFrame:
  """Rows `rows` of `table` (long, one row per group and `row_key`), wide:
  per group its `columns` (name in table -> header suffix), per paper
  objective the paper's values."""
  out = pd.DataFrame({row_key: rows})
  for objective, groups in _blocks(table, keys):
    for group, label in groups:
      g = table[fit.in_group(table, keys, group)].set_index(row_key)
      for column, suffix in columns.items():
        out[f"{label} {suffix}"] = g[column].reindex(rows).to_numpy(dtype=float)
    if objective in published.PAPER_OBJECTIVES:
      out[f"paper {objective}"] = _paper_column(paper, objective, rows)
  return out


def bracket(b: float, flagged: bool) -> str | float:
  """A b as the tables show it: bracketed, "(0.0123)", where it is flagged."""
  return f"({b:.4f})" if flagged and not math.isnan(b) else b


def slope_table(slopes: pd.DataFrame) -> pd.DataFrame:
  """fit_slopes' b (with SE, R^2 and flag) beside the paper's b. Rows: the
  benchmarks fitted here and the paper's, in the paper's order, mean last.
  A group fitted on two sizes only has no SE and an R^2 of 1: its b alone.
  A flagged b (fit.flagged) is the text "(b)"; the others stay numbers."""
  keys = fit.group_keys(slopes)
  names = set(slopes["benchmark"]) | set(published.PAPER_SLOPES)
  rows = report.ordered(names - {fit.MEAN}) + [fit.MEAN]
  out = _table(slopes, keys, "benchmark", rows, {"b": "b", "se_b": "SE", "r2": "R²"},
               published.PAPER_SLOPES)
  for group, label in (fit.group_labels(slopes, keys) if len(slopes) else {}).items():
    if out[f"{label} SE"].isna().all():  # lines through two points: no SE, R² = 1
      out = out.drop(columns=[f"{label} SE", f"{label} R²"])
    g = slopes[fit.in_group(slopes, keys, group)].set_index("benchmark").reindex(rows)
    marked = [fit.flagged(r) if isinstance(r["flag"], str) else False
              for r in g.to_dict("records")]
    out[f"{label} b"] = pd.Series([bracket(b, m) for b, m in zip(out[f"{label} b"], marked)],
                                  dtype=object)
    last = [c for c in out.columns if c.startswith(f"{label} ")][-1]
    out.insert(out.columns.get_loc(last) + 1, f"{label} flag", g["flag"].fillna("").to_numpy())
  return out


def paper_slope(objective: str, benchmark: str) -> float:
  """The paper's b for this objective and benchmark; NaN where it has none."""
  if objective not in published.PAPER_OBJECTIVES or benchmark not in published.PAPER_SLOPES:
    return math.nan
  return published.PAPER_SLOPES[benchmark][published.PAPER_OBJECTIVES.index(objective)]


def paper_correlation(objective: str, factor: str) -> float:
  """The paper's Pearson r of this objective's slopes with `factor`; NaN
  where it has none."""
  if objective not in published.PAPER_OBJECTIVES or factor not in published.PAPER_CORRELATIONS:
    return math.nan
  return published.PAPER_CORRELATIONS[factor][published.PAPER_OBJECTIVES.index(objective)]


def slope_rows(slopes: pd.DataFrame) -> pd.DataFrame:
  """fit_slopes long, for reading: one row per benchmark (the paper's order,
  mean last) and group: the group's label (fit.group_labels), b, its 95%
  interval (and bootstrap one, if any), R², the number of points, the flag,
  and the paper's b (NaN where the paper has none)."""
  slopes = slopes.reset_index(drop=True)
  keys = fit.group_keys(slopes)
  labels = fit.group_labels(slopes, keys) if len(slopes) else {}
  rank = {b: i for i, b in enumerate(report.ordered(set(slopes["benchmark"]) - {fit.MEAN}))}
  rank[fit.MEAN] = len(rank)
  columns = ["b", "ci_low", "ci_high", "boot_low", "boot_high", "r2", "n_points", "flag"]
  out = slopes[["benchmark"] + [c for c in columns if c in slopes.columns]].copy()
  out.insert(1, "group", [labels[tuple(g)] for g in slopes[keys].itertuples(index=False)])
  out["paper"] = [paper_slope(o, b) for o, b in zip(slopes["objective"], slopes["benchmark"])]
  order = out["benchmark"].map(rank).to_numpy()
  return out.iloc[order.argsort(kind="stable")].reset_index(drop=True)


def correlation_table(corr: pd.DataFrame) -> pd.DataFrame:
  """correlations' Pearson r beside the paper's. Rows: the factors computed
  here and the paper's, in factors.FACTORS order."""
  keys = fit.group_keys(corr, last="factor")
  names = set(corr["factor"]) | set(published.PAPER_CORRELATIONS)
  rows = [f for f in factors_lib.FACTORS if f in names]
  return _table(corr, keys, "factor", rows, {"r": "r"}, published.PAPER_CORRELATIONS)


def markdown(table: pd.DataFrame, digits: int = 4) -> str:
  """A slope or correlation table as markdown: benchmark display names,
  numbers to `digits` decimals, missing ones empty."""
  def cell(v) -> str:
    if isinstance(v, str):
      return report.display_name(v)
    return "" if v is None or math.isnan(v) else f"{v:.{digits}f}"
  return report.markdown(list(table.columns),
                         [[cell(v) for v in row] for row in table.itertuples(index=False)])
