"""Reading the results table: one row per (run, benchmark, metric).

The columns are the results store's contract (COLUMNS). Extra columns are
kept; a missing one, an empty required value or a value that does not parse
stops with one line naming the file, the column and the line. AUC and ACC
are stored as fractions in [0, 1] (the plots and fits show 100 x AUC).
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

# The store's contract, in one place: biovfm_jax/results.py.
from biovfm_jax.results import COLUMNS, FLOAT_COLUMNS, INT_COLUMNS, METRICS, ResultsError

# Empty elsewhere is allowed (a published row has no checkpoint, no FLOPs).
NOT_EMPTY = ("run", "objective", "model_size", "benchmark", "metric", "value")
PUBLISHED_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published.csv")


def _line(df: pd.DataFrame, mask) -> int:
  """The CSV line of the first flagged row (header is line 1)."""
  return int(np.flatnonzero(np.asarray(mask))[0]) + 2


def check_results(df: pd.DataFrame, where: str = "<results>") -> pd.DataFrame:
  """A copy of `df` with the contract's types: integer columns as Int64,
  float columns as float64, the rest as strings ('' when empty)."""
  missing = [c for c in COLUMNS if c not in df.columns]
  if missing:
    raise ResultsError(f"{where}: missing column {missing[0]!r} (needs {', '.join(COLUMNS)})")
  df = df.reset_index(drop=True).copy()
  for col in INT_COLUMNS + FLOAT_COLUMNS:
    raw = df[col]
    num = pd.to_numeric(raw, errors="coerce")
    bad = num.isna() & raw.notna() & (raw.astype(str).str.strip() != "")
    if bad.any():
      raise ResultsError(f"{where}: column {col!r} line {_line(df, bad)}: "
                         f"{raw[bad].iloc[0]!r} is not a number")
    if col in INT_COLUMNS:
      frac = num.notna() & (num != num.round())
      if frac.any():
        raise ResultsError(f"{where}: column {col!r} line {_line(df, frac)}: "
                           f"{num[frac].iloc[0]!r} is not an integer")
      num = num.astype("Int64")
    df[col] = num
  for col in df.columns:
    if (col not in COLUMNS and not pd.api.types.is_numeric_dtype(df[col])
        and df[col].notna().any()):
      num = pd.to_numeric(df[col], errors="coerce")
      if num.notna().sum() == df[col].notna().sum():
        df[col] = num  # an extra numeric column (a data size to fit over)
  for col in df.columns:
    if col not in INT_COLUMNS + FLOAT_COLUMNS and not pd.api.types.is_numeric_dtype(df[col]):
      df[col] = df[col].astype(object).where(df[col].notna(), "").astype(str)
  for col in NOT_EMPTY:
    empty = df[col].isna() | (df[col].astype(str) == "")
    if empty.any():
      raise ResultsError(f"{where}: column {col!r} line {_line(df, empty)} is empty")
  bad = ~df["metric"].isin(METRICS)
  if bad.any():
    raise ResultsError(f"{where}: column 'metric' line {_line(df, bad)}: "
                       f"{df['metric'][bad].iloc[0]!r} is not one of {METRICS}")
  bad = (df["value"] < 0) | (df["value"] > 1)
  if bad.any():
    raise ResultsError(f"{where}: column 'value' line {_line(df, bad)}: "
                       f"{df['value'][bad].iloc[0]} is not a fraction in [0, 1]")
  return df


def load_results(path: str | os.PathLike | None = None) -> pd.DataFrame:
  """The results CSV at `path` (None: the paper's published table), checked."""
  path = PUBLISHED_CSV if path is None else os.fspath(path)
  try:
    raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
  except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
    raise ResultsError(f"{path}: cannot read as CSV: {e}") from e
  return check_results(raw, path)
