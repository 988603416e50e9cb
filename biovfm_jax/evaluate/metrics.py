"""AUC and ACC exactly as MedMNIST defines them (`medmnist.evaluator.getAUC`
and `getACC`), plus percentile-bootstrap intervals.

Numbers must be comparable with the published tables, so the reference's
choices are kept: binary tasks score the last column, multi-class and ordinal
tasks average one-vs-rest AUC over the score columns, multi-label averages
over labels, ACC thresholds raw scores at 0.5 (binary, multi-label) or takes
the argmax. AUC is the rank (Mann-Whitney) statistic with average ranks for
ties, which equals sklearn's `roc_auc_score`; it is written in numpy with
example weights so a bootstrap resample costs no sort and sklearn is not
needed at run time.

Undefined AUC: when a column has only one label value in y_true (a class
absent from the split, or present in every example), its AUC is NaN and so is
the task's mean AUC. This is what getAUC returns with the sklearn it is
tested against (1.9: NaN plus an UndefinedMetricWarning; sklearn < 1.7 raised
ValueError instead). `auc` warns in that case; the bootstrap drops resamples
whose AUC is undefined.

Departures from the reference, for inputs it mishandles: labels are reshaped,
not squeezed (so N = 1 works), and labels outside the score columns, non-0/1
binary labels and non-finite scores raise ValueError.
"""
from __future__ import annotations

import warnings

import numpy as np

MULTI_CLASS = "multi-class"
BINARY = "binary-class"
MULTI_LABEL = "multi-label, binary-class"
ORDINAL = "ordinal-regression"
TASKS = (MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL)

METRICS = ("auc", "acc")

# Bootstrap resamples are processed in chunks of about this many weights.
_CHUNK_ELEMENTS = 2_000_000


def check_task(task: str) -> str:
  """Returns `task` if it is one of MedMNIST's task strings, else ValueError."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(repr(t) for t in TASKS)}")
  return task


def _prepare(y_true, y_score, task: str):
  """Validates shapes and values; returns (labels, scores) as used by `task`:
  binary -> (N,) 0/1 and (N,) scores; multi-class/ordinal -> (N,) ints and
  (N, C); multi-label -> (N, L) 0/1 and (N, L)."""
  check_task(task)
  y_true = np.asarray(y_true)
  y_score = np.asarray(y_score, dtype=np.float64)
  if y_true.ndim == 0 or y_true.shape[0] == 0:
    raise ValueError(f"y_true must hold at least one example, got shape {y_true.shape}")
  n = y_true.shape[0]
  if y_score.shape[:1] != (n,):
    raise ValueError(f"y_score has shape {y_score.shape}, expected ({n}, ...) to match y_true")
  if not np.all(np.isfinite(y_score)):
    raise ValueError("y_score contains NaN or infinite values")

  if task == MULTI_LABEL:
    if y_true.ndim != 2 or y_score.shape != y_true.shape:
      raise ValueError(f"multi-label task needs y_true and y_score of equal shape (N, L), "
                       f"got {y_true.shape} and {y_score.shape}")
    if not np.all((y_true == 0) | (y_true == 1)):
      raise ValueError("multi-label y_true must be 0/1")
    return y_true.astype(bool), y_score

  if y_true.ndim > 2 or (y_true.ndim == 2 and y_true.shape[1] != 1):
    raise ValueError(f"{task} task needs y_true of shape (N,) or (N, 1), got {y_true.shape}")
  y_true = y_true.reshape(n)
  if task == BINARY:
    if not np.all((y_true == 0) | (y_true == 1)):
      raise ValueError("binary-class y_true must be 0/1")
    if y_score.ndim == 2:
      y_score = y_score[:, -1]  # the reference's choice, whatever the width
    elif y_score.ndim != 1:
      raise ValueError(f"binary-class y_score must be (N,) or (N, C), got {y_score.shape}")
    return y_true.astype(bool), y_score

  if y_score.ndim != 2:
    raise ValueError(f"{task} task needs y_score of shape (N, C), got {y_score.shape}")
  c = y_score.shape[1]
  if not np.all((y_true >= 0) & (y_true < c) & (y_true == np.round(y_true))):
    raise ValueError(f"{task} y_true must hold integer labels in [0, {c}) (the score columns)")
  return y_true.astype(np.int64), y_score


def _columns(labels, scores, task: str):
  """The binary (positive mask, score) problems whose AUCs are averaged."""
  if task == BINARY:
    return [(labels, scores)]
  if task == MULTI_LABEL:
    return [(labels[:, i], scores[:, i]) for i in range(scores.shape[1])]
  return [(labels == i, scores[:, i]) for i in range(scores.shape[1])]


class _RankedColumn:
  """One binary problem sorted once by score, so that the Mann-Whitney U of
  any example weighting (a bootstrap resample) is a pass of cumulative sums."""

  def __init__(self, positive, score):
    self.order = np.argsort(score, kind="stable")
    s = score[self.order]
    self.positive = positive[self.order]
    self.group_starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # tie groups

  def auc(self, weights):
    """weights (B, N) int32 counts -> (B,) AUC, NaN where a class is absent."""
    w = weights[:, self.order]
    gp = np.add.reduceat(w * self.positive, self.group_starts, axis=1)
    gn = np.add.reduceat(w, self.group_starts, axis=1) - gp
    # Float64 from here: integer-exact up to 2**53, no int32 overflow in U.
    gp, gn = gp.astype(np.float64), gn.astype(np.float64)
    below = np.cumsum(gn, axis=1) - gn
    # 2U = sum over tie groups of pos * (2 * negatives below + negatives tied).
    u2 = (gp * (2 * below + gn)).sum(axis=1)
    pairs = gp.sum(axis=1) * gn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(pairs > 0, u2 / (2.0 * pairs), np.nan)


def _auc_batch(ranked, weights):
  return np.mean([col.auc(weights) for col in ranked], axis=0)


def _correct(labels, scores, task: str, threshold: float):
  """Per-example fraction of correct predictions, so ACC is its (weighted) mean."""
  if task == MULTI_LABEL:
    return ((scores > threshold) == labels).mean(axis=1)
  if task == BINARY:
    return ((scores > threshold) == labels).astype(np.float64)
  return (np.argmax(scores, axis=1) == labels).astype(np.float64)


def auc(y_true, y_score, task: str) -> float:
  """MedMNIST's AUC (getAUC); NaN, with a warning, if any column is undefined."""
  labels, scores = _prepare(y_true, y_score, task)
  ranked = [_RankedColumn(p, s) for p, s in _columns(labels, scores, task)]
  value = float(_auc_batch(ranked, np.ones((1, labels.shape[0]), np.int32))[0])
  if np.isnan(value):
    warnings.warn(f"AUC undefined for task {task!r}: a class or label has only one "
                  "value in y_true", RuntimeWarning, stacklevel=2)
  return value


def acc(y_true, y_score, task: str, threshold: float = 0.5) -> float:
  """MedMNIST's ACC (getACC): scores > threshold for binary and multi-label
  (pass probabilities), argmax for multi-class and ordinal."""
  labels, scores = _prepare(y_true, y_score, task)
  return float(_correct(labels, scores, task, threshold).mean())


def _resample_counts(rng, n: int, b: int):
  """(b, n) counts of each example in b resamples of n drawn with replacement."""
  idx = rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]
  return np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.int32)


def bootstrap_ci(y_true, y_score, task: str, metric: str = "auc", num_samples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap interval of `metric` ("auc" or "acc") over examples.

  Resamples of examples with replacement, the same for a given seed whatever
  the metric. Resamples with an undefined AUC are dropped; (nan, nan) if all are.
  """
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; known metrics: {', '.join(METRICS)}")
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")
  labels, scores = _prepare(y_true, y_score, task)
  n = labels.shape[0]
  if metric == "auc":
    ranked = [_RankedColumn(p, s) for p, s in _columns(labels, scores, task)]
    stat = lambda w: _auc_batch(ranked, w)
  else:
    correct = _correct(labels, scores, task, 0.5)
    stat = lambda w: w @ correct / n

  rng = np.random.default_rng(seed)
  chunk = max(1, _CHUNK_ELEMENTS // n)
  values = []
  for start in range(0, num_samples, chunk):
    values.append(stat(_resample_counts(rng, n, min(chunk, num_samples - start))))
  values = np.concatenate(values)
  values = values[~np.isnan(values)]
  if values.size == 0:
    return float("nan"), float("nan")
  tail = 100 * (1 - level) / 2
  low, high = np.percentile(values, [tail, 100 - tail])
  return float(low), float(high)


def score(y_true, y_score, task: str, *, bootstrap: int = 0, seed: int = 0) -> dict:
  """{"auc", "acc"} in [0, 1], plus "auc_ci"/"acc_ci" [low, high] (95%
  percentile bootstrap with `bootstrap` resamples) when bootstrap > 0."""
  if bootstrap < 0:
    raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
  out = {"auc": auc(y_true, y_score, task), "acc": acc(y_true, y_score, task)}
  if bootstrap > 0:
    for m in METRICS:
      out[f"{m}_ci"] = list(bootstrap_ci(y_true, y_score, task, m, num_samples=bootstrap,
                                         seed=seed))
  return out
