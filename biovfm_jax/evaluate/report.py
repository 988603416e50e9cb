"""Report tables for benchmark results: one run (markdown, CSV, JSON and
TensorBoard scalars) or several runs side by side.

Rows follow the paper's results table (Derma ... Path, then mean) so a report
can be read against "Results to beat" line by line. Values are stored raw in
[0, 1] (JSON) and shown x100 (markdown, CSV), as the paper does. Every file is
written to a temporary name in the same directory and renamed, so a reader
never sees half a table.

Command line, to compare runs:
  python -m biovfm_jax.evaluate.report --merge DIR1 DIR2 ... --out DIR [--metric auc]
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
  paths = {"md": os.path.join(out_dir, "report.md"), "csv": os.path.join(out_dir, "report.csv"),
           "json": os.path.join(out_dir, "report.json"), "tensorboard": out_dir}
  storage.write_bytes_atomic(paths["md"], md.encode())
  storage.write_bytes_atomic(paths["csv"], _csv(header, csv_rows).encode())
  storage.write_bytes_atomic(paths["json"],
                             (json.dumps(doc, indent=2, default=str) + "\n").encode())

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


def merge_reports(report_dirs_or_json_paths, out_dir, *, metric: str = "auc") -> dict[str, str]:
  """Writes comparison.md/.csv/.json: benchmarks as rows, one column per run
  (named by its report's name), and a mean row over the benchmarks every run has."""
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; known metrics: {', '.join(METRICS)}")
  runs, seen = [], {}
  for path in report_dirs_or_json_paths:
    json_path, doc = _load_report(path)
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
  parser.add_argument("--metric", default="auc", choices=METRICS)
  args = parser.parse_args(argv)
  try:
    paths = merge_reports(args.merge, args.out, metric=args.metric)
  except ValueError as e:
    parser.error(str(e))
  with open(paths["md"]) as f:
    print(f.read(), end="")


if __name__ == "__main__":
  main()
