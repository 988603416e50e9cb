"""Report tables for benchmark results: one run (markdown, CSV, JSON and
TensorBoard scalars) or several runs side by side.

Rows follow the paper's results table (Derma ... Path, then mean) so a report
can be read against "Results to beat" line by line. Values are stored raw in
[0, 1] (JSON) and shown x100 (markdown, CSV), as the paper does. Every file is
written to a temporary name in the same directory and renamed, so a reader
never sees half a table.

Command line, to compare runs (--paper adds columns of the paper's published
table, "Results to beat", by their names there: BiomedCLIP, D-B, M-L ...):
  python -m biovfm_jax.evaluate.report --merge DIR1 DIR2 ... --out DIR [--metric auc]
      [--paper BiomedCLIP D-B ...]
Segmentation reports (write_segmentation_report) merge the same way with
--metric dice, iou or pixel_accuracy.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os

from data_pipeline import storage

# (flag, display name) in the paper's row order.
BENCHMARKS = (
    ("dermamnist", "Derma"), ("pneumoniamnist", "Pneumonia"), ("breastmnist", "Breast"),
    ("chestmnist", "Chest"), ("octmnist", "OCT"), ("retinamnist", "Retina"),
    ("bloodmnist", "Blood"), ("tissuemnist", "Tissue"), ("organamnist", "OrganA"),
    ("organcmnist", "OrganC"), ("organsmnist", "OrganS"), ("pathmnist", "Path"),
)
MEAN = "mean"
_RANK = {flag: i for i, (flag, _) in enumerate(BENCHMARKS)}
_RANK.update({display.lower(): i for i, (_, display) in enumerate(BENCHMARKS)})
_DISPLAY = {flag: display for flag, display in BENCHMARKS}
_DISPLAY.update({display.lower(): display for _, display in BENCHMARKS})

METRICS = ("auc", "acc")
# Segmentation reports (write_segmentation_report): foreground-mean Dice and
# IoU, pixel accuracy.
SEG_METRICS = ("dice", "iou", "pixel_accuracy")


def display_name(benchmark: str) -> str:
  """"dermamnist" (or "Derma") -> "Derma"; unknown names are kept as given."""
  return _DISPLAY.get(benchmark.lower(), benchmark)


def ordered(benchmarks) -> list[str]:
  """The paper's row order; unknown benchmarks after the known ones, sorted."""
  return sorted(benchmarks, key=lambda b: (0, _RANK[b.lower()], b) if b.lower() in _RANK
                else (1, 0, b))


def _nan_to_none(v):
  return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _none_to_nan(v):
  return float("nan") if v is None else float(v)


def _fmt(v, ci=None) -> str:
  """0.94123 -> "94.12"; with ci [0.935, 0.947] -> "94.12 (93.50-94.70)"."""
  if v is None or math.isnan(v):
    return "n/a"
  text = f"{100 * v:.2f}"
  if ci is not None and not any(c is None or math.isnan(c) for c in ci):
    text += f" ({100 * ci[0]:.2f}-{100 * ci[1]:.2f})"
  return text


def _num(v) -> str:
  """Plain x100 number for CSV; empty when missing, "nan" when undefined."""
  if v is None:
    return ""
  return "nan" if math.isnan(v) else f"{100 * v:.6f}"


def _mean(values) -> float:
  values = list(values)
  return sum(values) / len(values) if values else float("nan")


def markdown(header, rows) -> str:
  """A markdown table of string cells, header first."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def _csv(header, rows) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(header)
  w.writerows(rows)
  return buf.getvalue()


def _check_results(results: dict) -> dict:
  """Floats with NaN for undefined; ValueError naming the benchmark otherwise."""
  if not results:
    raise ValueError("results is empty: nothing to report")
  if MEAN in results:
    raise ValueError(f"{MEAN!r} is reserved for the mean row, not a benchmark name")
  clean = {}
  for bench, r in results.items():
    missing = [m for m in METRICS if m not in r]
    if missing:
      raise ValueError(f"results[{bench!r}] lacks {missing}; expected the dict from metrics.score")
    row = {}
    for key in METRICS + tuple(f"{m}_ci" for m in METRICS):
      if key not in r or r[key] is None:
        continue
      vals = [_none_to_nan(x) for x in r[key]] if key.endswith("_ci") else [_none_to_nan(r[key])]
      if any(not math.isnan(x) and not 0 <= x <= 1 for x in vals):
        raise ValueError(f"results[{bench!r}][{key!r}] = {r[key]} is outside [0, 1]; "
                         "pass raw metrics.score values, not x100")
      row[key] = vals if key.endswith("_ci") else vals[0]
    clean[bench] = row
  return clean


def _write_tables(out_dir: str, md: str, csv_text: str, doc: dict) -> dict[str, str]:
  """report.md, report.csv and report.json, each written atomically."""
  paths = {"md": os.path.join(out_dir, "report.md"), "csv": os.path.join(out_dir, "report.csv"),
           "json": os.path.join(out_dir, "report.json"), "tensorboard": out_dir}
  storage.write_bytes_atomic(paths["md"], md.encode())
  storage.write_bytes_atomic(paths["csv"], csv_text.encode())
  storage.write_bytes_atomic(paths["json"],
                             (json.dumps(doc, indent=2, default=str) + "\n").encode())
  return paths


def write_report(results: dict[str, dict], out_dir, *, name: str, meta: dict | None = None,
                 step: int = 0) -> dict[str, str]:
  """Writes report.md/.csv/.json and TensorBoard scalars (eval/<benchmark>/auc,
  ...) for one run into out_dir; returns their paths. The mean row averages
  every benchmark given."""
  if not name:
    raise ValueError("name must be a non-empty run name")
  results = _check_results(results)
  meta = dict(meta or {})
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  order = ordered(results)
  mean = {m: _mean(results[b][m] for b in order) for m in METRICS}
  has_ci = {m: any(f"{m}_ci" in results[b] for b in order) for m in METRICS}

  title = f"# {name}\n\n" + " · ".join(
      f"{k}: {v}" for k, v in list(meta.items()) + [("step", step)]) + "\n\n"
  md_rows = [[display_name(b)] + [_fmt(results[b][m], results[b].get(f"{m}_ci"))
                                  for m in METRICS] for b in order]
  md_rows.append([MEAN] + [_fmt(mean[m]) for m in METRICS])
  note = ("\nIntervals: percentile bootstrap over test examples.\n"
          if any(has_ci.values()) else "")
  md = title + markdown(["benchmark", "AUC", "ACC"], md_rows) + note

  header = ["benchmark", "auc", "acc", "auc_low", "auc_high", "acc_low", "acc_high"]
  csv_rows = []
  for b in order + [MEAN]:
    r = results.get(b, mean)
    cis = [r.get(f"{m}_ci", [None, None]) for m in METRICS]
    csv_rows.append([b, _num(r["auc"]), _num(r["acc"])] + [_num(v) for ci in cis for v in ci])

  doc = {
      "name": name, "step": step, "meta": meta, "order": order,
      "results": {b: {k: ([_nan_to_none(x) for x in v] if isinstance(v, list) else
                          _nan_to_none(v)) for k, v in results[b].items()} for b in order},
      "mean": {m: _nan_to_none(mean[m]) for m in METRICS},
  }
  paths = _write_tables(out_dir, md, _csv(header, csv_rows), doc)

  # Imported here: clu pulls in TensorFlow, which the merge command does not need.
  from clu import metric_writers
  scalars = {}
  for b in order + [MEAN]:
    r = results.get(b, mean)
    for m in METRICS:
      scalars[f"eval/{b}/{m}"] = r[m]
      if f"{m}_ci" in r:
        scalars[f"eval/{b}/{m}_low"], scalars[f"eval/{b}/{m}_high"] = r[f"{m}_ci"]
  writer = metric_writers.create_default_writer(out_dir)
  writer.write_scalars(step, scalars)
  writer.close()
  return paths


def _tag(text: str) -> str:
  """A class name as a TensorBoard tag part: 'background/CSF' -> 'background_CSF'."""
  return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in str(text))


def write_segmentation_report(results: dict[str, dict], out_dir, *, name: str,
                              meta: dict | None = None, step: int = 0,
                              images: dict | None = None) -> dict[str, str]:
  """report.md/.csv/.json and TensorBoard scalars (eval/<benchmark>/dice, ...,
  eval/<benchmark>/dice/<class>) of the segmentation probe for one run;
  `images` (benchmark -> uint8 (H, W, 3)) go to TensorBoard as
  eval/<benchmark>/overlays. `results`: benchmark -> segmentation.score's
  dict ('dice', 'iou' over foreground classes, 'pixel_accuracy', per-class
  lists, optional '<metric>_ci'). The mean row averages every benchmark."""
  if not name:
    raise ValueError("name must be a non-empty run name")
  if not results:
    raise ValueError("results is empty: nothing to report")
  if MEAN in results:
    raise ValueError(f"{MEAN!r} is reserved for the mean row, not a benchmark name")
  for bench, r in results.items():
    missing = [m for m in SEG_METRICS + ("classes", "dice_per_class", "iou_per_class")
               if m not in r]
    if missing:
      raise ValueError(f"results[{bench!r}] lacks {missing}; expected segmentation.score's dict")
  meta = dict(meta or {})
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  order = ordered(results)
  value = lambda r, m: _none_to_nan(r.get(m))  # noqa: E731
  mean = {m: _mean(value(results[b], m) for b in order) for m in SEG_METRICS}
  ci = lambda r, m: (None if r.get(f"{m}_ci") is None  # noqa: E731
                     else [_none_to_nan(x) for x in r[f"{m}_ci"]])

  title = f"# {name}\n\n" + " · ".join(
      f"{k}: {v}" for k, v in list(meta.items()) + [("step", step)]) + "\n\n"
  md_rows = [[b] + [_fmt(value(results[b], m), ci(results[b], m)) for m in SEG_METRICS]
             for b in order]
  md_rows.append([MEAN] + [_fmt(mean[m]) for m in SEG_METRICS])
  md = title + markdown(["benchmark", "Dice", "IoU", "pixel acc"], md_rows)
  md += "\nDice and IoU: means over the foreground classes (class 0 is background).\n"
  if any(ci(results[b], m) is not None for b in order for m in SEG_METRICS):
    md += "Intervals: percentile bootstrap over test images.\n"
  for b in order:
    r = results[b]
    counts = r.get("images_per_class") or [None] * len(r["classes"])
    rows = [[str(c), _fmt(_none_to_nan(d)), _fmt(_none_to_nan(i)),
             "" if n is None else str(n)]
            for c, d, i, n in zip(r["classes"], r["dice_per_class"], r["iou_per_class"],
                                  counts)]
    md += f"\n## {b}: per class\n\n" + markdown(
        ["class", "Dice", "IoU", "test images with it"], rows)

  header = ["benchmark", "class", "dice", "iou", "pixel_accuracy"] + [
      f"{m}_{side}" for m in SEG_METRICS for side in ("low", "high")]
  csv_rows = []
  for b in order + [MEAN]:
    r = results.get(b, mean)
    cis = [ci(r, m) or [None, None] for m in SEG_METRICS]
    csv_rows.append([b, "foreground mean"] + [_num(value(r, m)) for m in SEG_METRICS] +
                    [_num(v) for c in cis for v in c])
    if b != MEAN:
      for c, d, i in zip(r["classes"], r["dice_per_class"], r["iou_per_class"]):
        csv_rows.append([b, c, _num(_none_to_nan(d)), _num(_none_to_nan(i))] +
                        [""] * (len(header) - 4))

  def clean(v):  # NaN -> null, in lists too
    return [clean(x) for x in v] if isinstance(v, (list, tuple)) else _nan_to_none(v)

  doc = {
      "name": name, "step": step, "meta": meta, "order": order, "kind": "segmentation",
      "results": {b: {k: clean(v) for k, v in results[b].items()} for b in order},
      "mean": {m: _nan_to_none(mean[m]) for m in SEG_METRICS},
  }
  paths = _write_tables(out_dir, md, _csv(header, csv_rows), doc)

  from clu import metric_writers
  scalars = {}
  for b in order + [MEAN]:
    r = results.get(b, mean)
    for m in SEG_METRICS:
      scalars[f"eval/{b}/{m}"] = value(r, m)
      if ci(r, m) is not None:
        scalars[f"eval/{b}/{m}_low"], scalars[f"eval/{b}/{m}_high"] = ci(r, m)
    if b != MEAN:
      for c, d, i in zip(r["classes"], r["dice_per_class"], r["iou_per_class"]):
        scalars[f"eval/{b}/dice/{_tag(c)}"] = _none_to_nan(d)
        scalars[f"eval/{b}/iou/{_tag(c)}"] = _none_to_nan(i)
  writer = metric_writers.create_default_writer(out_dir)
  writer.write_scalars(step, scalars)
  if images:
    writer.write_images(step, {f"eval/{b}/overlays": im[None] for b, im in images.items()})
  writer.close()
  return paths


def _load_report(path) -> tuple[str, dict]:
  path = os.fspath(path)
  json_path = os.path.join(path, "report.json") if os.path.isdir(path) else path
  if not os.path.isfile(json_path):
    raise ValueError(f"no report.json at {path!r}")
  with open(json_path) as f:
    doc = json.load(f)
  if not isinstance(doc, dict) or "name" not in doc or "results" not in doc:
    raise ValueError(f"{json_path!r} is not a report.json written by write_report")
  return json_path, doc


# The paper's published table (a results store beside analysis/published.py,
# which reads it too; named by path: analysis imports this module).
PUBLISHED_CSV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "analysis", "published.csv")
# Its objectives -> the prefix of PAPER.md's column names (D-B, M-L; BiomedCLIP alone).
_PAPER_PREFIX = {"dinov2": "D", "mae": "M"}


def paper_columns() -> dict[str, dict[str, float]]:
  """The paper's "Results to beat" columns, {PAPER.md column name: {benchmark
  flag: AUC}}, from published.csv (AUC only: the paper gives no ACC)."""
  with open(PUBLISHED_CSV, newline="") as f:
    rows = list(csv.DictReader(f))
  out: dict[str, dict[str, float]] = {}
  for r in rows:
    if r["metric"] != "auc":
      continue
    prefix = _PAPER_PREFIX.get(r["objective"])
    name = f"{prefix}-{r['model_size']}" if prefix else "BiomedCLIP"
    out.setdefault(name, {})[r["benchmark"]] = float(r["value"])
  return out


def _paper_reports(columns, metric: str) -> list[tuple[str, dict]]:
  """(source, report document) per paper column, as merge_reports reads them."""
  if not columns:
    return []
  if metric != "auc":
    raise ValueError(f"the paper's columns are AUC only; --paper needs --metric=auc, "
                     f"not {metric!r}")
  known = paper_columns()
  unknown = [c for c in columns if c not in known]
  if unknown:
    raise ValueError(f"no column {', '.join(map(repr, unknown))} in the paper's table; "
                     f"its columns: {', '.join(known)}")
  return [(f"{PUBLISHED_CSV} ({c})",
           {"name": f"paper {c}", "meta": {"source": "PAPER.md, Results to beat"},
            "results": {b: {"auc": v} for b, v in known[c].items()}}) for c in columns]


def merge_reports(report_dirs_or_json_paths, out_dir, *, metric: str = "auc",
                  paper=()) -> dict[str, str]:
  """Writes comparison.md/.csv/.json: benchmarks as rows, one column per run
  (named by its report's name), and a mean row over the benchmarks every run has.
  `paper`: names of the paper's columns (paper_columns) to add after the runs,
  as "paper <name>"."""
  if metric not in METRICS + SEG_METRICS:
    raise ValueError(f"unknown metric {metric!r}; known metrics: "
                     f"{', '.join(METRICS + SEG_METRICS)}")
  runs, seen = [], {}
  loaded = [_load_report(path) for path in report_dirs_or_json_paths]
  for json_path, doc in loaded + _paper_reports(paper, metric):
    if doc["name"] in seen:
      raise ValueError(f"two reports share the name {doc['name']!r}: "
                       f"{seen[doc['name']]!r} and {json_path!r}")
    seen[doc["name"]] = json_path
    runs.append(doc)
  if not runs:
    raise ValueError("no reports to merge")

  names = [r["name"] for r in runs]
  order = ordered({b for r in runs for b in r["results"]})
  common = [b for b in order if all(b in r["results"] for r in runs)]

  def value(run, b):
    return _none_to_nan(run["results"][b].get(metric)) if b in run["results"] else None

  def ci(run, b):
    c = run["results"].get(b, {}).get(f"{metric}_ci")
    return None if c is None else [_none_to_nan(x) for x in c]

  means = {r["name"]: _mean(value(r, b) for b in common) for r in runs}
  md_rows = [[display_name(b)] + ["-" if value(r, b) is None else _fmt(value(r, b), ci(r, b))
                                  for r in runs] for b in order]
  md_rows.append([MEAN] + [_fmt(means[n]) for n in names])
  title = f"# {metric.upper()} x 100\n\n"
  if len(common) < len(order):
    title += (f"mean over the {len(common)} benchmarks every run has: "
              f"{', '.join(display_name(b) for b in common) or 'none'}\n\n")
  md = title + markdown(["benchmark"] + names, md_rows)

  csv_rows = [[b] + [_num(value(r, b)) for r in runs] for b in order]
  csv_rows.append([MEAN] + [_num(means[n]) for n in names])
  doc = {
      "metric": metric, "runs": names, "sources": [seen[n] for n in names], "order": order,
      "mean_over": common,
      "values": {b: {r["name"]: _nan_to_none(value(r, b)) for r in runs if b in r["results"]}
                 for b in order},
      "ci": {b: {r["name"]: ci(r, b) for r in runs if ci(r, b) is not None} for b in order},
      "mean": {n: _nan_to_none(means[n]) for n in names},
      "meta": {r["name"]: r.get("meta", {}) for r in runs},
  }
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  paths = {ext: os.path.join(out_dir, f"comparison.{ext}") for ext in ("md", "csv", "json")}
  storage.write_bytes_atomic(paths["md"], md.encode())
  storage.write_bytes_atomic(paths["csv"], _csv(["benchmark"] + names, csv_rows).encode())
  storage.write_bytes_atomic(paths["json"],
                             (json.dumps(doc, indent=2, default=str) + "\n").encode())
  return paths


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="Compare benchmark reports side by side.")
  parser.add_argument("--merge", nargs="+", required=True, metavar="DIR",
                      help="report directories (or report.json paths)")
  parser.add_argument("--out", required=True, help="directory for comparison.{md,csv,json}")
  parser.add_argument("--metric", default="auc", choices=METRICS + SEG_METRICS,
                      help="auc, acc (classification) or dice, iou, pixel_accuracy "
                      "(segmentation reports)")
  parser.add_argument("--paper", nargs="+", default=[], metavar="COLUMN",
                      help="add the paper's published columns (PAPER.md's names: "
                      "BiomedCLIP, D-T ... D-L, M-T ... M-L), AUC only")
  args = parser.parse_args(argv)
  try:
    paths = merge_reports(args.merge, args.out, metric=args.metric, paper=args.paper)
  except ValueError as e:
    parser.error(str(e))
  with open(paths["md"]) as f:
    print(f.read(), end="")


if __name__ == "__main__":
  main()
