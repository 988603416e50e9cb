"""Command line of the scaling analysis.

  python -m biovfm_jax.analysis fit [--results=FILE] --out=DIR [--x=params_total]
      [--metric=auc] [--bootstrap=0] [--features_dir=OBJECTIVE=DIR ...]
      [--npz_dir=DIR] [--image_size=224] [--db_split=test] [--gzip_max_images=N]

prints the slope table (per benchmark and group: b, its 95% interval, R²,
the number of points, the flag and the paper's b; a flagged b, one with no
measurable effect or within seed noise, bracketed "(0.0123)": see fit.py),
one warning line per reason a slope is doubtful (fewer than 3 sizes, spread
within seed noise) naming the groups and benchmarks, the axis effects
(effects.py: each label's change to the next, in percentage points), and the
factor correlations beside the paper's (or one line saying why there are
none); writes slopes.csv, effects.csv, factors.csv, correlations.csv,
curves.png, slopes.png and factors.png into --out.
Without --results it reads the paper's published table (its slopes:
--x=params_total). gzip_ratio needs --npz_dir; db_index needs --features_dir
(an eval's <out_dir>/features, one per objective) and --npz_dir for the
labels.

  python -m biovfm_jax.analysis published --paper=PAPER.md [--out=CSV] [--overwrite]

rewrites the package's published.csv from PAPER.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import pandas as pd

from biovfm_jax import analysis
from biovfm_jax.analysis import compare
from biovfm_jax.analysis import fit as fit_lib
from biovfm_jax.analysis import published
from biovfm_jax.evaluate import report
from data_pipeline import storage
from data_pipeline.readers import medmnist


def _features_dir(spec: str) -> tuple[str, str]:
  objective, sep, path = spec.partition("=")
  if not sep or not objective or not path:
    raise argparse.ArgumentTypeError(f"{spec!r} is not OBJECTIVE=DIR")
  return objective, storage.expand(path)


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m biovfm_jax.analysis", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="command", required=True)
  f = sub.add_parser("fit", help="slopes, axis effects, factors, correlations and plots")
  f.add_argument("--results", default=None, help="results CSV (default: the paper's table)")
  f.add_argument("--out", required=True, help="directory for the CSVs and PNGs")
  f.add_argument("--x", default="params_total",
                 help="column to scale over: params_encoder, params_total, train_flops, "
                 "images_seen or another numeric column")
  f.add_argument("--metric", default="auc", choices=analysis.results.METRICS)
  f.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples of b")
  f.add_argument("--features_dir", type=_features_dir, action="append", default=[],
                 metavar="OBJECTIVE=DIR", help="cached eval features, per objective")
  f.add_argument("--npz_dir", default=None, help="MedMNIST npz files (gzip, labels)")
  f.add_argument("--image_size", type=int, default=224, choices=medmnist.SIZES,
                 help="size of the npz files to read")
  f.add_argument("--db_split", default="test", choices=medmnist.SPLITS,
                 help="split whose cached features give the Davies-Bouldin index")
  f.add_argument("--gzip_max_images", type=int, default=None,
                 help="compress only the first N training images of each benchmark")
  p = sub.add_parser("published", help="write published.csv from PAPER.md")
  p.add_argument("--paper", required=True, help="PAPER.md")
  p.add_argument("--out", default=analysis.PUBLISHED_CSV)
  p.add_argument("--overwrite", action="store_true")
  return ap


def run_fit(args) -> dict[str, str]:
  """The `fit` command: writes the tables and figures, returns their paths."""
  df = analysis.load_results(storage.expand(args.results))
  slopes = analysis.fit_slopes(df, x=args.x, metric=args.metric, bootstrap=args.bootstrap)
  if slopes.empty:
    raise analysis.ResultsError(f"{args.results or analysis.PUBLISHED_CSV}: nothing to fit "
                                f"over {args.x}: {'; '.join(slopes.attrs['notes'])}")
  benchmarks = [b for b in slopes["benchmark"].unique() if b != fit_lib.MEAN]
  factors = analysis.factor_table(
      benchmarks, sorted(slopes["objective"].unique()),
      features_dirs=dict(args.features_dir), npz_dir=storage.expand(args.npz_dir),
      image_size=args.image_size, db_split=args.db_split,
      gzip_max_images=args.gzip_max_images)
  corr = analysis.correlations(slopes, factors)
  effects = analysis.axis_effects(df, metric=args.metric)
  out = storage.expand(args.out)
  os.makedirs(out, exist_ok=True)
  paths = {name: os.path.join(out, name) for name in (
      "slopes.csv", "effects.csv", "factors.csv", "correlations.csv", "curves.png",
      "slopes.png", "factors.png")}
  slopes.to_csv(paths["slopes.csv"], index=False)
  effects.to_csv(paths["effects.csv"], index=False)
  factors.to_csv(paths["factors.csv"], index=False)
  corr.to_csv(paths["correlations.csv"], index=False)
  analysis.plot_curves(df, slopes, paths["curves.png"], metric=args.metric)
  analysis.plot_slopes(slopes, paths["slopes.png"], metric=args.metric)
  analysis.plot_factors(slopes, factors, corr, paths["factors.png"])
  notes = slopes.attrs["notes"] + factors.attrs["notes"] + effects.attrs["notes"]
  if args.results is None and args.x != "params_total":
    notes.append("the paper's slopes are fitted over its size axis: use --x=params_total")
  for note in notes:
    print(f"note: {note}")
  print_slopes(slopes, args.x, args.metric)
  print_warnings(slopes, args.x)
  print_effects(effects, args.metric)
  print_correlations(slopes, factors, corr)
  keys = fit_lib.group_keys(slopes)
  labels = fit_lib.group_labels(slopes, keys)
  for row in slopes[slopes["benchmark"] == fit_lib.MEAN].to_dict("records"):
    se = "" if pd.isna(row["se_b"]) else f" (SE {row['se_b']:.4f})"
    flag = f"; flagged: {row['flag']}" if row["flag"] else ""
    print(f"{labels[tuple(row[k] for k in keys)]}: mean-{args.metric} slope b = "
          f"{row['b']:.4f}{se}{flag}")
  print(f"wrote {', '.join(paths)} to {out}")
  return paths


def _number(v, digits: int = 4) -> str:
  return "" if pd.isna(v) else f"{v:.{digits}f}"


def _interval(low, high, digits: int = 4) -> str:
  return "-" if pd.isna(low) else f"[{low:.{digits}f}, {high:.{digits}f}]"


def _text(table: pd.DataFrame, left: int) -> str:
  """The table as aligned text: its first `left` (name) columns flush left,
  the numbers flush right."""
  cells = [list(table.columns)] + [[str(v) for v in row] for row in table.itertuples(index=False)]
  widths = [max(len(row[i]) for row in cells) for i in range(table.shape[1])]
  return "\n".join("  ".join(c.ljust(w) if i < left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths))).rstrip()
                   for row in cells)


def print_slopes(slopes: pd.DataFrame, x: str, metric: str) -> None:
  """The slope table: per benchmark and group, b, its interval, R² and the
  paper's b."""
  rows = compare.slope_rows(slopes)
  who = "objective" if set(rows["group"]) <= set(slopes["objective"]) else "group"
  marked = [fit_lib.flagged(r) for r in rows.to_dict("records")]
  table = pd.DataFrame({
      "benchmark": rows["benchmark"].map(report.display_name), who: rows["group"],
      "b": [compare.bracket(b, m) if m else _number(b) for b, m in zip(rows["b"], marked)],
      "95% interval": [_interval(lo, hi) for lo, hi in zip(rows["ci_low"], rows["ci_high"])]})
  if "boot_low" in rows:
    table["bootstrap 95%"] = [_interval(lo, hi)
                              for lo, hi in zip(rows["boot_low"], rows["boot_high"])]
  # Through two points a line has no interval and R² = 1 whatever the data: say "-".
  table["R²"] = ["-" if pd.isna(lo) else _number(r, 2)
                 for lo, r in zip(rows["ci_low"], rows["r2"])]
  table["points"] = rows["n_points"].to_numpy()
  if rows["paper"].notna().any():
    table["paper b"] = rows["paper"].map(_number)
  table["flag"] = rows["flag"].to_numpy()
  print(f"Slopes b of ln(100 x {metric.upper()}) = a + b ln(N), N = {x}, "
        f"per benchmark and {who}:")
  print(_text(table, left=2))
  if (table["95% interval"] == "-").any():
    print("-: a line through two points has no interval, and its R² is 1 by construction")
  if any(marked):
    print(f"(b): flagged, not a result: {fit_lib.NO_EFFECT} (the 95% interval of b includes "
          f"0, or there is none),\n     or {fit_lib.IN_NOISE} (its change over N is under "
          f"{fit_lib.NOISE_FACTOR} x the SD between replicate runs)")
  if rows["paper"].notna().any() and (x != "params_total" or metric != "auc"):
    print(f"note: the paper's b are of AUC over params_total, these of {metric} over {x}: "
          "not on one scale")


def print_warnings(slopes: pd.DataFrame, x: str) -> None:
  """One `warning:` line per reason a slope is doubtful (fewer than 3 values
  of N, spread within seed noise), naming each group and its benchmarks."""
  if slopes.empty:
    return
  keys = fit_lib.group_keys(slopes)
  labels = fit_lib.group_labels(slopes, keys)
  few = f"a line through 2 values of N = {x} fits any curve"
  why = {fit_lib.FEW_SIZES: few, fit_lib.FEW_N: few,
         fit_lib.IN_NOISE: f"the change over N is under {fit_lib.NOISE_FACTOR} x the "
                           "standard deviation between replicate runs"}
  reasons = slopes["flag"].str.split("; ")
  for reason, because in why.items():
    parts = {}  # group label -> its benchmarks with this flag
    for group, label in labels.items():
      mine = fit_lib.in_group(slopes, keys, group)
      hit = slopes[mine & reasons.map(lambda f, r=reason: r in f)]
      if len(hit):
        parts[label] = ("all benchmarks" if len(hit) == mine.sum() and len(hit) > 1 else
                        ", ".join(map(report.display_name, hit["benchmark"])))
    if len(parts) == len(labels) > 1 and len(set(parts.values())) == 1:
      where = f"every group ({next(iter(parts.values()))})"  # the tiny sweep's case
    else:
      where = "; ".join(f"{label} ({names})" for label, names in parts.items())
    if parts:
      print(f"warning: {reason}: {where}: {because}")


def print_effects(effects: pd.DataFrame, metric: str) -> None:
  """The axis effects (effects.py), or one line saying there are none."""
  title = f"Axis effects on {metric.upper()}"
  if effects.empty:
    print(f"{title}: no label axis ({', '.join(analysis.effects.AXES)}) has 2 or more "
          "labels with runs that differ only there: no effects")
    return
  table = pd.DataFrame({
      "axis": effects["axis"],
      "change": effects["level_a"] + " -> " + effects["level_b"],
      "benchmark": effects["benchmark"].map(report.display_name),
      "from": effects["mean_a"].map(lambda v: _number(v, 2)),
      "to": effects["mean_b"].map(lambda v: _number(v, 2)),
      "diff": effects["diff"].map(lambda v: f"{v:+.2f}"),
      "95% interval": [_interval(lo, hi, 2) for lo, hi in zip(effects["ci_low"],
                                                              effects["ci_high"])],
      "contexts": effects["n_contexts"], "runs": effects["n_runs"], "flag": effects["flag"]})
  print(f"{title} (100 x {metric.upper()}; diff: mean over contexts, runs equal in the other "
        "labels and protocol, of to - from):")
  print(_text(table, left=3))
  if (table["95% interval"] == "-").any():
    print("-: no interval (one context, without replicates on both sides)")
  if (effects["flag"] != "").any():
    print(f"{fit_lib.NO_EFFECT}: the 95% interval includes 0, or there is none")


def print_correlations(slopes: pd.DataFrame, factors: pd.DataFrame,
                       corr: pd.DataFrame) -> None:
  """Pearson r of the slopes with each factor beside the paper's, or one line
  saying why there is none."""
  title = "Pearson r of the slopes with each benchmark factor"
  flags = [b for b in slopes["benchmark"].unique() if b in medmnist.FLAGS]
  if not flags:
    print(f"{title}: no MedMNIST benchmark in these results: no factors")
    return
  if len(flags) < 3:
    print(f"{title}: slopes on {len(flags)} MedMNIST benchmark(s): an r needs 3 or more")
    return
  table = compare.correlation_table(corr)
  print(f"{title}, beside the paper's:")
  print(_text(table.assign(**{c: table[c].map(lambda v: _number(v, 2))
                              for c in table.columns[1:]}), left=1))
  needs = {"gzip_ratio": "--npz_dir", "db_index": "--features_dir and --npz_dir"}
  missing = [f"{f} (needs {n})" for f, n in needs.items() if f not in factors.columns]
  if missing:
    print(f"not computed: {'; '.join(missing)}")


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    if args.command == "fit":
      run_fit(args)
    else:
      print(published.write_published(storage.expand(args.paper), storage.expand(args.out),
                                      overwrite=args.overwrite))
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
  main()
