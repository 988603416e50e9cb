"""The results store: one CSV row per (run, benchmark, metric), appended by
evaluate.py --results=FILE and by the sweep launcher, read back as a pandas
DataFrame by the analysis.

Columns (COLUMNS, in this order):
  run              the run's name (a sweep's run name, or the eval's name)
  objective        "mae" | "dinov2" (what the checkpoint records)
  model_size       "T", "S", "B", "L" or a custom label
  params_encoder   parameters of the evaluated encoder
  params_total     encoder + decoder / heads, as the paper counts (empty if unknown)
  train_flops      flops_per_example x images_seen (analytic; empty if unknown)
  images_seen      step x global batch (empty if unknown)
  data_subset      label of the pretraining data (a sweep's, else the shards spec)
  modality_subset  label of the modality mixture ("all": none)
  protocol         fast | biovfm | knn | finetune
  benchmark        e.g. "dermamnist", "mini_modality"
  metric           "auc" | "acc"
  value            the metric as a fraction in [0, 1] (nan when undefined)
  ci_low, ci_high  the bootstrap interval, empty without one
  checkpoint       the evaluated step folder
  step             its training step
  git_rev          `git rev-parse HEAD` of the code that evaluated (empty outside git)
  time             when the row was written, ISO 8601 UTC

Appending is safe when several evaluations finish at once: a writer holds an
flock on the file, writes all of its rows (and the header, if the file is
empty) in one write and fsyncs before letting go, so no reader or writer ever
sees half of a row from a live process. A row cut short anyway (power loss)
is reported by `read` in one line naming the file and line, and skipped; the
next append starts on a fresh line. Object stores (gs://) have no locks: there
an append rewrites the whole object, so give each writer its own file
(`read` takes a glob and concatenates).
"""
from __future__ import annotations

import csv
import datetime
import fcntl
import io
import logging
import math
import os
import subprocess

from data_pipeline import storage

COLUMNS = ("run", "objective", "model_size", "params_encoder", "params_total",
           "train_flops", "images_seen", "data_subset", "modality_subset", "protocol",
           "benchmark", "metric", "value", "ci_low", "ci_high", "checkpoint", "step",
           "git_rev", "time")
METRICS = ("auc", "acc")
INT_COLUMNS = ("params_encoder", "params_total", "images_seen", "step")
FLOAT_COLUMNS = ("train_flops", "value", "ci_low", "ci_high")
# May be empty: unknown for imported checkpoints, no bootstrap, no git checkout.
_OPTIONAL = ("params_total", "train_flops", "images_seen", "ci_low", "ci_high", "git_rev")


class ResultsError(ValueError):
  """A row or a results file that does not fit the store; one line."""


def _cell(key: str, value, where: str) -> str:
  """A row's value as its CSV text, checked against the column's type."""
  if value is None or (isinstance(value, str) and value == ""):
    if key in _OPTIONAL:
      return ""
    raise ResultsError(f"{where}: column {key!r} is empty")
  try:
    if key in INT_COLUMNS:
      if isinstance(value, float) and not value.is_integer():
        raise ValueError
      return str(int(value))
    if key in FLOAT_COLUMNS:
      v = float(value)
      if key in ("value", "ci_low", "ci_high") and not math.isnan(v) and not 0 <= v <= 1:
        raise ResultsError(f"{where}: {key}={value} is not a fraction in [0, 1]")
      return repr(v)
  except (TypeError, ValueError) as e:
    if isinstance(e, ResultsError):
      raise
    raise ResultsError(f"{where}: {key}={value!r} is not a "
                       f"{'whole number' if key in INT_COLUMNS else 'number'}") from None
  text = str(value)
  if key == "metric" and text not in METRICS:
    raise ResultsError(f"{where}: metric={text!r}; one of {METRICS}")
  return text


def validate(row: dict, where: str = "results row") -> list[str]:
  """The row as CSV cells in COLUMNS order; ResultsError (one line) for a
  missing or unknown column or a value of the wrong type."""
  missing = [k for k in COLUMNS if k not in row]
  if missing:
    raise ResultsError(f"{where} (run {row.get('run', '?')!r}) lacks column "
                       f"{missing[0]!r}" + (f" (and {len(missing) - 1} more)"
                                            if len(missing) > 1 else ""))
  unknown = sorted(set(row) - set(COLUMNS))
  if unknown:
    raise ResultsError(f"{where} (run {row.get('run', '?')!r}) has unknown column "
                       f"{unknown[0]!r}; the columns are {', '.join(COLUMNS)}")
  return [_cell(k, row[k], where) for k in COLUMNS]


def _csv_text(rows) -> str:
  buf = io.StringIO()
  csv.writer(buf, lineterminator="\n").writerows(rows)
  return buf.getvalue()


def append(path, rows) -> int:
  """Appends `rows` (dicts with every column) to the CSV at `path`, creating
  it with its header; returns how many rows were written. All rows are checked
  first: a bad one writes nothing."""
  path = os.fspath(path)
  cells = [validate(r, f"results row {i} for {path}") for i, r in enumerate(rows)]
  if not cells:
    return 0
  body = _csv_text(cells)
  if storage.is_remote(path):
    return _append_remote(path, body, len(cells))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes, also if we die
    size = os.fstat(fd).st_size
    if size == 0:
      body = _csv_text([COLUMNS]) + body
    else:
      os.lseek(fd, size - 1, os.SEEK_SET)
      if os.read(fd, 1) != b"\n":  # a row torn by power loss: keep it off ours
        body = "\n" + body
    data = body.encode()
    written = os.write(fd, data)  # O_APPEND: at the end, whatever the offset
    if written != len(data):  # a full disk: say so, the reader reports the torn row
      raise OSError(f"{path}: only {written} of {len(data)} bytes appended (disk full?)")
    os.fsync(fd)
  finally:
    os.close(fd)
  return len(cells)


def _append_remote(path: str, body: str, n: int) -> int:
  p = storage.as_path(path)
  old = p.read_text() if p.exists() else ""
  if not old:
    old = _csv_text([COLUMNS])
  elif not old.endswith("\n"):
    old += "\n"
  storage.write_bytes_atomic(path, (old + body).encode())
  return n


def _read_one(path: str, strict: bool) -> list[list[str]]:
  text = storage.as_path(path).read_text()
  if not text:
    return []
  lines = text.split("\n")
  torn_tail = not text.endswith("\n")
  header = next(csv.reader([lines[0]]))
  if tuple(header) != COLUMNS:
    raise ResultsError(f"{path}:1: not a results store header (expected "
                       f"{','.join(COLUMNS)})")
  rows = []
  last = len(lines) - (0 if torn_tail else 1)  # text ends with "\n": one empty item
  for number in range(2, last + 1):
    line = lines[number - 1]
    if not line and number != last:
      continue
    cells = next(csv.reader([line]), [])
    problem = None
    if number == last and torn_tail:
      problem = f"torn row ({len(cells)} of {len(COLUMNS)} fields, no line end)"
    elif len(cells) != len(COLUMNS):
      problem = f"torn row ({len(cells)} of {len(COLUMNS)} fields)"
    if problem:
      message = f"{path}:{number}: {problem}, skipped"
      if strict:
        raise ResultsError(message)
      logging.warning("%s", message)
      continue
    rows.append(cells)
  return rows


def read(path, *, strict: bool = False):
  """The store at `path` (a file or a glob of files) as a pandas DataFrame with
  COLUMNS, integers as nullable Int64, numbers as float, `time` as UTC
  timestamps. A torn row is reported (one warning naming file and line) and
  skipped; strict=True raises ResultsError instead."""
  import pandas as pd  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  paths = storage.glob(path) if any(c in path for c in "*?[") else [path]
  if not paths or not storage.as_path(paths[0]).exists():
    raise FileNotFoundError(f"no results store at {path}")
  rows = [r for p in paths for r in _read_one(p, strict)]
  frame = pd.DataFrame(rows, columns=list(COLUMNS))
  for key in INT_COLUMNS:
    frame[key] = pd.array([int(x) if x else None for x in frame[key]], dtype="Int64")
  for key in FLOAT_COLUMNS:
    frame[key] = [float(x) if x else math.nan for x in frame[key]]
  frame["time"] = pd.to_datetime(frame["time"], utc=True)
  return frame


def git_rev() -> str:
  """`git rev-parse HEAD` of this code's checkout; "" when it is not one."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                         text=True, timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return ""
  return out.stdout.strip() if out.returncode == 0 else ""


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def evaluation_rows(results: dict, *, run: str, run_facts: dict, checkpoint: str,
                    step: int, protocol: str, params_encoder: int, model_size: str,
                    data_subset: str, modality_subset: str) -> list[dict]:
  """The rows of one evaluation: `results` as runner.run returns it
  (benchmark -> {"auc", "acc", "auc_ci"?, ...}), `run_facts` the checkpoint's
  run JSON (objective, batch_size, params_total, flops_per_example)."""
  batch = run_facts.get("batch_size")
  images = step * int(batch) if batch is not None else None
  flops = run_facts.get("flops_per_example")
  common = {
      "run": run, "objective": run_facts.get("objective", ""), "model_size": model_size,
      "params_encoder": params_encoder, "params_total": run_facts.get("params_total"),
      "train_flops": float(flops) * images if flops is not None and images is not None
      else None, "images_seen": images, "data_subset": data_subset,
      "modality_subset": modality_subset, "protocol": protocol, "checkpoint": checkpoint,
      "step": step, "git_rev": git_rev(), "time": now()}
  rows = []
  for benchmark, r in results.items():
    for metric in METRICS:
      ci = r.get(f"{metric}_ci") or (None, None)
      rows.append({**common, "benchmark": benchmark, "metric": metric,
                   "value": float("nan") if r[metric] is None else r[metric],
                   "ci_low": ci[0], "ci_high": ci[1]})
  return rows
