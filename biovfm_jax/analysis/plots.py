"""Figures of the scaling analysis (matplotlib, no pyplot: nothing here picks
a backend, so a notebook shows the returned Figure and a script saves it).

  plot_curves   one panel per benchmark (and mean): 100 x AUC against N on a
                log axis, the runs as markers and the fitted a + b ln N as a
                line; the legend gives each group's b, its interval and R²
  plot_slopes   the slopes b per benchmark, one bar per group, with their 95%
                interval and the paper's b; a flagged slope (fit.flagged: no
                measurable effect, or within seed noise) hollow
  plot_factors  one panel per factor: the slope of each benchmark against it

Drawn for reading at a paper's size: 150 dpi, 10-14 pt text, axes named in
words with units, each group its own colour, marker and line style (so two
lines that overlap stay visible), and a "no data" panel that says why
wherever there is nothing to draw.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

from biovfm_jax.analysis import compare
from biovfm_jax.analysis import factors as factors_lib
from biovfm_jax.analysis import fit
from biovfm_jax.evaluate import report

DPI = 150
TEXT, SMALL = 12, 10  # axis labels and titles; ticks, legends, annotations
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINES = ("-", "--", "-.", ":")
OBJECTIVES = {"mae": "MAE", "dinov2": "DINOv2", "biomedclip": "BiomedCLIP"}
# N in words; counts get K/M/B and FLOPs G..E prefixes (_axis).
X_WORDS = {"params_total": "parameters, encoder + decoder", "params_encoder":
           "encoder parameters", "train_flops": "training compute", "images_seen":
           "images seen"}
FACTOR_WORDS = {
    "train_samples": "training samples (train split)",
    "dataset_samples": "samples (train + val + test)",
    "num_classes": "classes (labels if multi-label)",
    "gzip_ratio": "gzip-compressed / raw image bytes",
    "db_index": "Davies-Bouldin index of the classes\n(lower: better separated)"}
_COUNTS = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))
_FLOPS = ((1e18, "EFLOPs"), (1e15, "PFLOPs"), (1e12, "TFLOPs"), (1e9, "GFLOPs"))


def _style(groups) -> dict[tuple, dict]:
  """Per group: colour, marker and line style, all three cycling apart."""
  return {g: dict(color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)],
                  linestyle=LINES[i % len(LINES)]) for i, g in enumerate(groups)}


def _label(label: str) -> str:
  """"mae mini" -> "MAE mini": the objective as the papers write it."""
  head, _, rest = label.partition(" ")
  return " ".join(filter(None, [OBJECTIVES.get(head, head), rest]))


def _benchmarks(slopes: pd.DataFrame) -> list[str]:
  names = report.ordered(set(slopes["benchmark"]) - {fit.MEAN})
  return names + ([fit.MEAN] if (slopes["benchmark"] == fit.MEAN).any() else [])


def _title(name: str) -> str:
  return "mean over MedMNIST" if name == fit.MEAN else report.display_name(name)


def _grid(n: int, cols: int, width: float, height: float) -> tuple[Figure, list]:
  rows = max(1, math.ceil(n / cols))
  # At least 7 inches (1050 px) wide, so a single panel is still readable.
  fig = Figure(figsize=(max(7.0, width * cols), height * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax in axes[n:]:
    ax.set_axis_off()
  return fig, list(axes[:n])


def no_data(ax, why: str) -> None:
  """An empty panel that says so, and why."""
  ax.set_axis_off()
  ax.text(0.5, 0.55, "no data", ha="center", va="bottom", fontsize=TEXT + 4,
          fontweight="bold", color="0.35", transform=ax.transAxes)
  ax.text(0.5, 0.5, why, ha="center", va="top", fontsize=TEXT, color="0.35", wrap=True,
          transform=ax.transAxes)


def _no_data_figure(title: str, why: str) -> Figure:
  fig = Figure(figsize=(7.0, 3.0), layout="constrained")
  fig.suptitle(title, fontsize=TEXT + 2)
  no_data(fig.subplots(), why)
  return fig


def _save(fig: Figure, path) -> Figure:
  if path is not None:
    fig.savefig(path, dpi=DPI)
  return fig


def x_axis(x: str, values) -> tuple[float, str]:
  """(scale, label) of the N axis: values / scale are shown, the label names
  N in words with the unit, e.g. (1e6, "parameters, encoder + decoder (M)")."""
  flops = x.endswith("flops")
  words = X_WORDS.get(x, x.replace("_", " "))
  top = float(np.nanmax(values)) if len(values) else 1.0
  for scale, unit in _FLOPS if flops else _COUNTS:
    if top >= scale:
      return scale, f"{words} ({unit})"
  return 1.0, f"{words} (FLOPs)" if flops else words


def _log_ticks(ax, values, scale: float) -> None:
  """Log x axis with labelled ticks: at the values themselves when there
  are few (the model sizes), else at 1, 2, 5 x 10^k."""
  ax.set_xscale("log")
  distinct = np.unique(np.asarray(values, float))
  if len(distinct) <= 6:
    # Sizes within 25% of a labelled one (MAE's and DINOv2's counts of one
    # width) share its tick: their labels would print over each other.
    kept = list(distinct[:1])
    for v in distinct[1:]:
      if v > 1.25 * kept[-1]:
        kept.append(v)
    ax.xaxis.set_major_locator(FixedLocator(kept))
  else:
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
  ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / scale:.3g}"))
  ax.xaxis.set_minor_formatter(NullFormatter())


def _fit_text(f) -> str:
  """b, its 95% interval and R² of one fit, as the legend shows them; a
  flagged fit's flag on a second line, in brackets."""
  if pd.isna(f["ci_low"]):  # two points: no interval, R² is 1 by construction
    text = f"b = {f['b']:.4f} ({f['n_points']} points)"
  else:
    text = f"b = {f['b']:.4f} [{f['ci_low']:.4f}, {f['ci_high']:.4f}], R² {f['r2']:.2f}"
  flag = f["flag"]
  return f"{text}\n({flag})" if isinstance(flag, str) and flag else text


def plot_curves(df: pd.DataFrame, slopes: pd.DataFrame, path=None, metric: str = "auc",
                by: tuple[str, ...] | None = None) -> Figure:
  """Scaling curves of the results `df` with the fits `slopes` (fit_slopes
  of the same df, x, metric and by)."""
  if slopes.empty:
    return _save(_no_data_figure("Scaling curves", "no fitted slopes: a fit needs runs at "
                                 "two or more values of N"), path)
  x = str(slopes["x"].iloc[0])
  points = fit.scaling_points(df, x, metric, by)
  keys = fit.group_keys(slopes)
  labels = fit.group_labels(slopes, keys)
  style = _style(labels)
  names = _benchmarks(slopes)
  scale, xlabel = x_axis(x, points[x])
  # Room under each panel for its legend: one line per group, two if flagged.
  lines = len(labels) * (2 if (slopes["flag"] != "").any() else 1)
  fig, axes = _grid(len(names), cols=min(4, len(names)), width=4.3,
                    height=3.6 + 0.25 * lines)
  for ax, name in zip(axes, names):
    handles = []
    for group, label in labels.items():
      pts = points[(points["benchmark"] == name) & fit.in_group(points, keys, group)]
      fitted = slopes[(slopes["benchmark"] == name) & fit.in_group(slopes, keys, group)]
      if pts.empty:
        continue
      s = style[group]
      # Half-transparent markers and lines: where two groups coincide, both show.
      ax.plot(pts[x], 100 * pts["value"], marker=s["marker"], color=s["color"],
              linestyle="none", markersize=7, alpha=0.75, markeredgecolor="white")
      text = _label(label)
      if len(fitted):
        f = fitted.iloc[0]
        grid = np.geomspace(f["x_min"], f["x_max"], 50)
        weak = fit.flagged(f)  # no result: a thinner, fainter line
        ax.plot(grid, np.exp(f["a"] + f["b"] * np.log(grid)), color=s["color"],
                linestyle=s["linestyle"], linewidth=1.2 if weak else 2,
                alpha=0.5 if weak else 0.8)
        text += f": {_fit_text(f)}"
      handles.append(Line2D([], [], label=text, linewidth=2, markersize=7, **s))
    _log_ticks(ax, points.loc[points["benchmark"] == name, x], scale)
    ax.set_title(_title(name), fontsize=TEXT, fontweight="bold")
    ax.tick_params(labelsize=SMALL)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel(xlabel, fontsize=SMALL)
    ax.set_ylabel(f"100 × {metric.upper()}", fontsize=SMALL)
    # Below the panel: the legend never hides a point.
    ax.legend(handles=handles, fontsize=SMALL - 1, loc="upper center",
              bbox_to_anchor=(0.5, -0.2), frameon=False)
  why = " (flags); thin line: not a result" if (slopes["flag"] != "").any() else ""
  fig.suptitle(f"Scaling curves: ln(100·{metric.upper()}) = a + b ln N per benchmark\n"
               f"legend: slope b [95% interval], R² of the fit{why}", fontsize=TEXT + 1)
  return _save(fig, path)


def plot_slopes(slopes: pd.DataFrame, path=None, metric: str = "auc") -> Figure:
  """Bar chart of b per benchmark (paper order, mean last) with its 95%
  interval, and the paper's b (black ticks) where it has one."""
  title = f"Scaling slope b of ln(100·{metric.upper()}) = a + b ln N per benchmark"
  if slopes.empty:
    return _save(_no_data_figure(title, "no fitted slopes"), path)
  x = str(slopes["x"].iloc[0])
  keys = fit.group_keys(slopes)
  labels = fit.group_labels(slopes, keys)
  style = _style(labels)
  names = _benchmarks(slopes)
  fig = Figure(figsize=(max(7.0, 0.55 * len(names) * max(2, len(labels))), 4.8),
               layout="constrained")
  ax = fig.subplots()
  width = 0.8 / max(1, len(labels))
  paper_drawn = False
  handles = []  # the legend's: the paper's b, each group's colour, then "hollow"
  for i, (group, label) in enumerate(labels.items()):
    g = slopes[fit.in_group(slopes, keys, group)].set_index("benchmark").reindex(names)
    at = np.arange(len(names)) + (i - (len(labels) - 1) / 2) * width
    weak = np.array([isinstance(f, str) and fit.flagged({"flag": f}) for f in g["flag"]])
    color = style[group]["color"]
    ax.bar(at[~weak], g["b"][~weak], width, color=color, edgecolor="white")
    # Flagged: hollow, so they do not read as results beside the filled ones.
    ax.bar(at[weak], g["b"][weak], width, facecolor="white", edgecolor=color, hatch="//",
           linewidth=1.2)
    handles.append(Patch(facecolor=color, label=_label(label)))
    ok = g["ci_low"].notna().to_numpy()  # two-point fits have no interval
    ax.errorbar(at[ok], g["b"][ok], yerr=[(g["b"] - g["ci_low"])[ok], (g["ci_high"] - g["b"])[ok]],
                fmt="none", ecolor="0.2", capsize=3, linewidth=1)
    paper = [compare.paper_slope(group[keys.index("objective")], n) for n in names]
    if x == "params_total" and metric == "auc" and not np.isnan(paper).all():  # its axis
      tick = ax.scatter(at, paper, marker="_", s=(72 * width * 0.9) ** 2, color="black",
                        zorder=3, linewidths=2.5, label="paper's b")
      if not paper_drawn:
        handles.insert(0, tick)
      paper_drawn = True
  ax.set_xticks(np.arange(len(names)), [_title(n) for n in names], rotation=30, ha="right",
                fontsize=SMALL)
  pad = max(0.0, (3 - len(names)) / 2)  # a lone benchmark's bars stay bar-sized
  ax.set_xlim(-0.6 - pad, len(names) - 0.4 + pad)
  ax.tick_params(axis="y", labelsize=SMALL)
  ax.axhline(0, color="k", lw=0.6)
  ax.grid(True, axis="y", alpha=0.3)
  ax.set_ylabel("slope b", fontsize=TEXT)
  words = x_axis(x, slopes["x_max"])[1].rsplit(" (", 1)[0]
  whiskers = "95% interval" + ("" if slopes["ci_low"].notna().all() else
                                " (2-point lines: none)")
  fig.suptitle(f"{title}\nN: {words}; whiskers: {whiskers}", fontsize=TEXT)
  if any(fit.flagged(r) for r in slopes.to_dict("records")):
    handles.append(Patch(facecolor="white", edgecolor="0.4", hatch="//",
                         label=f"hollow: flagged, not a result\n({fit.NO_EFFECT}\n"
                               f"or {fit.IN_NOISE})"))
  ax.legend(handles=handles, fontsize=SMALL, loc="upper left", bbox_to_anchor=(1.01, 1),
            frameon=False)
  return _save(fig, path)


def plot_factors(slopes: pd.DataFrame, factors: pd.DataFrame, correlations=None,
                 path=None) -> Figure:
  """The benchmarks' slopes against each factor; Pearson r in the legend."""
  title = "Scaling slope b against benchmark factors"
  names = [c for c in factors.columns if c in factors_lib.FACTORS]
  merged = slopes[slopes["benchmark"] != fit.MEAN].merge(
      factors, on=["objective", "benchmark"], how="inner")
  if merged.empty or not names:
    return _save(_no_data_figure(title, "no MedMNIST benchmark in these results: no factors"),
                 path)
  keys = fit.group_keys(slopes)
  labels = fit.group_labels(slopes, keys)
  style = _style(labels)
  fig, axes = _grid(len(names), cols=min(3, len(names)), width=4.6, height=4.2)
  for ax, name in zip(axes, names):
    handles = []
    for group, label in labels.items():
      g = merged[fit.in_group(merged, keys, group)].dropna(subset=[name])
      if g.empty:
        continue
      text = _label(label)
      if correlations is not None:
        c = correlations[(correlations["factor"] == name)
                         & fit.in_group(correlations, keys, group)]
        if len(c) and not np.isnan(c["r"].iloc[0]):
          text += f": r = {c['r'].iloc[0]:.2f}"
          paper = compare.paper_correlation(group[keys.index("objective")], name)
          text += "" if np.isnan(paper) else f" (paper {paper:.2f})"
      s = style[group]
      handles.append(ax.scatter(g[name], g["b"], s=45, color=s["color"], marker=s["marker"],
                                alpha=0.8, edgecolors="white", label=text))
      for _, row in g.iterrows():
        ax.annotate(report.display_name(row["benchmark"]), (row[name], row["b"]),
                    xytext=(4, 3), textcoords="offset points", fontsize=SMALL - 2,
                    color=s["color"])
    if not handles:
      no_data(ax, f"{name}: not computed")
      continue
    if name.endswith("samples"):
      ax.set_xscale("log")
    ax.set_xlabel(FACTOR_WORDS.get(name, name), fontsize=SMALL)
    ax.set_ylabel("slope b", fontsize=SMALL)
    ax.tick_params(labelsize=SMALL)
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, fontsize=SMALL - 1, loc="best")
  fig.suptitle(f"{title} (Pearson r across benchmarks in the legend)", fontsize=TEXT + 1)
  return _save(fig, path)
