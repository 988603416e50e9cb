"""Figures of the scaling analysis (matplotlib, no pyplot: nothing here picks
a backend, so a notebook shows the returned Figure and a script saves it).

  plot_curves   one panel per benchmark (and mean): 100 x AUC against N on a
                log axis, the points and the fitted a + b ln N
  plot_slopes   the slopes b per benchmark, one bar per group, +- one SE
  plot_factors  one panel per factor: the slope of each benchmark against it
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from biovfm_jax.analysis import factors as factors_lib
from biovfm_jax.analysis import fit
from biovfm_jax.evaluate import report


def _colors(labels: dict) -> dict[tuple, str]:
  return {g: f"C{i % 10}" for i, g in enumerate(labels)}


def _benchmarks(slopes: pd.DataFrame) -> list[str]:
  names = report.ordered(set(slopes["benchmark"]) - {fit.MEAN})
  return names + ([fit.MEAN] if (slopes["benchmark"] == fit.MEAN).any() else [])


def _grid(n: int, cols: int, size: float = 3.0) -> tuple[Figure, list]:
  rows = max(1, math.ceil(n / cols))
  fig = Figure(figsize=(size * cols, size * 0.85 * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax in axes[n:]:
    ax.set_axis_off()
  return fig, list(axes[:n])


def _save(fig: Figure, path) -> Figure:
  if path is not None:
    fig.savefig(path, dpi=110)
  return fig


def plot_curves(df: pd.DataFrame, slopes: pd.DataFrame, path=None, metric: str = "auc",
                by: tuple[str, ...] | None = None) -> Figure:
  """Scaling curves of the results `df` with the fits `slopes` (fit_slopes
  of the same df, x, metric and by)."""
  x = str(slopes["x"].iloc[0])
  points = fit.scaling_points(df, x, metric, by)
  keys = fit.group_keys(slopes)
  labels = fit.group_labels(slopes, keys)
  colors = _colors(labels)
  names = _benchmarks(slopes)
  fig, axes = _grid(len(names), cols=min(4, len(names)))
  for ax, name in zip(axes, names):
    for group, label in labels.items():
      pts = points[(points["benchmark"] == name) & fit.in_group(points, keys, group)]
      fitted = slopes[(slopes["benchmark"] == name) & fit.in_group(slopes, keys, group)]
      if pts.empty:
        continue
      ax.scatter(pts[x], 100 * pts["value"], s=14, color=colors[group])
      if len(fitted):
        f = fitted.iloc[0]
        grid = np.geomspace(f["x_min"], f["x_max"], 50)
        ax.plot(grid, np.exp(f["a"] + f["b"] * np.log(grid)), color=colors[group],
                label=f"{label} b={f['b']:.4f}")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges
    ax.set_title(report.display_name(name), fontsize=9)
    ax.tick_params(labelsize=7)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=6)
  fig.supxlabel(x)
  fig.supylabel(f"100 x {metric.upper()}")
  return _save(fig, path)


def plot_slopes(slopes: pd.DataFrame, path=None) -> Figure:
  """Bar chart of b per benchmark (paper order, mean last), +- one SE."""
  keys = fit.group_keys(slopes)
  labels = fit.group_labels(slopes, keys)
  colors = _colors(labels)
  names = _benchmarks(slopes)
  fig = Figure(figsize=(max(6.0, 0.7 * len(names) * max(1, len(labels)) ** 0.5), 3.5),
               layout="constrained")
  ax = fig.subplots()
  width = 0.8 / max(1, len(labels))
  for i, (group, label) in enumerate(labels.items()):
    g = slopes[fit.in_group(slopes, keys, group)].set_index("benchmark")
    b = g["b"].reindex(names)
    se = g["se_b"].reindex(names).fillna(0)
    ax.bar(np.arange(len(names)) + (i - (len(labels) - 1) / 2) * width, b, width,
           yerr=se, color=colors[group], label=label, capsize=2)
  ax.set_xticks(np.arange(len(names)), [report.display_name(n) for n in names],
                rotation=45, ha="right", fontsize=8)
  ax.axhline(0, color="k", lw=0.5)
  ax.set_ylabel(f"slope b ({slopes['x'].iloc[0]})")
  ax.legend(fontsize=8)
  return _save(fig, path)


def plot_factors(slopes: pd.DataFrame, factors: pd.DataFrame, correlations=None,
                 path=None) -> Figure:
  """The benchmarks' slopes against each factor; Pearson r in the legend."""
  keys = fit.group_keys(slopes)
  labels = fit.group_labels(slopes, keys)
  colors = _colors(labels)
  names = [c for c in factors.columns if c in factors_lib.FACTORS]
  merged = slopes[slopes["benchmark"] != fit.MEAN].merge(
      factors, on=["objective", "benchmark"], how="inner")
  fig, axes = _grid(len(names), cols=min(3, max(1, len(names))), size=3.4)
  for ax, name in zip(axes, names):
    for group, label in labels.items():
      g = merged[fit.in_group(merged, keys, group)].dropna(subset=[name])
      if g.empty:
        continue
      text = label
      if correlations is not None:
        c = correlations[(correlations["factor"] == name)
                         & fit.in_group(correlations, keys, group)]
        if len(c):
          text += f" r={c['r'].iloc[0]:.2f}"
      ax.scatter(g[name], g["b"], s=16, color=colors[group], label=text)
      for _, row in g.iterrows():
        ax.annotate(report.display_name(row["benchmark"]), (row[name], row["b"]),
                    fontsize=5, alpha=0.7)
    if name.endswith("samples"):
      ax.set_xscale("log")
    ax.set_xlabel(name, fontsize=8)
    ax.set_ylabel("slope b", fontsize=8)
    ax.tick_params(labelsize=7)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  return _save(fig, path)
