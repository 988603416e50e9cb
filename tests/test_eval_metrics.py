"""AUC/ACC against MedMNIST's own getAUC/getACC, and the bootstrap intervals."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from medmnist.evaluator import getACC, getAUC
from sklearn.metrics import roc_auc_score

from biovfm_jax.evaluate import metrics

# (task, number of score columns, label shape)
CASES = [
    (metrics.MULTI_CLASS, 9, "column"),     # PathMNIST-like, labels (N, 1)
    (metrics.MULTI_CLASS, 11, "flat"),      # Organ*-like, labels (N,)
    (metrics.BINARY, 2, "column"),          # two softmax columns
    (metrics.BINARY, 1, "column"),          # a single sigmoid column
    (metrics.MULTI_LABEL, 14, "multi"),     # ChestMNIST-like
    (metrics.ORDINAL, 5, "column"),         # RetinaMNIST-like
]


def _inputs(task, c, kind, seed, n=300):
  rng = np.random.default_rng(seed)
  if kind == "multi":
    y = (rng.random((n, c)) < rng.uniform(0.05, 0.5, c)).astype(np.int64)
  else:
    y = rng.integers(0, max(c, 2), n)
    y = y[:, None] if kind == "column" else y
  # Scores that carry signal, rounded to 1 decimal so ties are frequent.
  signal = y if kind == "multi" else np.eye(max(c, 2))[y.reshape(n)][:, -c:]
  s = np.clip(0.35 * signal + rng.random((n, c)) * 0.7, 0, 1).round(1)
  return y, s


@pytest.mark.parametrize("task,c,kind", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_medmnist(task, c, kind, seed):
  y, s = _inputs(task, c, kind, seed)
  assert len(np.unique(s)) <= 11  # ties present
  np.testing.assert_allclose(metrics.auc(y, s, task), getAUC(y, s, task), rtol=0, atol=1e-12)
  assert metrics.acc(y, s, task) == pytest.approx(getACC(y, s, task), abs=1e-12)
  # Another threshold, for the tasks that threshold.
  assert metrics.acc(y, s, task, threshold=0.3) == pytest.approx(
      getACC(y, s, task, threshold=0.3), abs=1e-12)


def test_auc_equals_sklearn_on_heavy_ties():
  rng = np.random.default_rng(3)
  y = rng.integers(0, 2, 1000)
  s = rng.integers(0, 4, 1000).astype(float) + 0.5 * y
  got = metrics.auc(y, s, metrics.BINARY)
  assert got == pytest.approx(roc_auc_score(y, s), abs=1e-12)
  assert 0.6 < got < 0.9


def test_hand_computed_values():
  # Positives score 0.8, 0.4; negatives 0.4, 0.1: pairs won 1 + 1 + 0.5 + 1 -> 3.5 / 4.
  y, s = np.array([1, 1, 0, 0]), np.array([0.8, 0.4, 0.4, 0.1])
  assert metrics.auc(y, s, metrics.BINARY) == 0.875
  # Threshold is strict: 0.5 is predicted negative.
  assert metrics.acc([1, 0], [0.5, 0.2], metrics.BINARY) == 0.5
  # Multi-class ACC takes the argmax (first column wins a tie).
  assert metrics.acc([0, 1], [[0.5, 0.5], [0.5, 0.5]], metrics.MULTI_CLASS) == 0.5


def test_class_absent_gives_nan_like_reference():
  y, s = _inputs(metrics.MULTI_CLASS, 9, "flat", 0)
  y = np.where(y == 4, 3, y)  # class 4 never occurs
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert np.isnan(getAUC(y, s, metrics.MULTI_CLASS))
  with pytest.warns(RuntimeWarning, match="AUC undefined"):
    assert np.isnan(metrics.auc(y, s, metrics.MULTI_CLASS))
  # ACC is still defined.
  assert metrics.acc(y, s, metrics.MULTI_CLASS) == pytest.approx(getACC(y, s, metrics.MULTI_CLASS))


def test_unknown_task_and_bad_inputs():
  y, s = np.array([0, 1, 1]), np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
  with pytest.raises(ValueError, match="unknown task 'multiclass'.*'multi-class'.*'ordinal"):
    metrics.auc(y, s, "multiclass")
  with pytest.raises(ValueError, match="unknown task"):
    metrics.score(y, s, "binary")
  assert metrics.check_task("binary-class") == "binary-class"
  with pytest.raises(ValueError, match="y_score has shape"):
    metrics.acc(y, s[:2], metrics.BINARY)
  with pytest.raises(ValueError, match=r"labels in \[0, 2\)"):
    metrics.auc(np.array([0, 1, 2]), s, metrics.MULTI_CLASS)
  with pytest.raises(ValueError, match="NaN"):
    metrics.auc(y, np.array([0.1, np.nan, 0.3]), metrics.BINARY)
  with pytest.raises(ValueError, match="unknown metric"):
    metrics.bootstrap_ci(y, s, metrics.BINARY, metric="f1")


@pytest.mark.parametrize("task,c,kind", [CASES[0], CASES[2], CASES[4]])
def test_bootstrap_equals_resampling_with_reference(task, c, kind):
  """The weighted AUC of each resample equals getAUC on the resampled rows."""
  y, s = _inputs(task, c, kind, 5, n=120)
  n, b = len(y), 25
  idx = np.random.default_rng(7).integers(0, n, size=(b, n))  # the draws bootstrap_ci makes
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    aucs = np.array([getAUC(y[i], s[i], task) for i in idx])
  accs = np.array([getACC(y[i], s[i], task) for i in idx])
  aucs = aucs[~np.isnan(aucs)]
  for metric, vals in (("auc", aucs), ("acc", accs)):
    got = metrics.bootstrap_ci(y, s, task, metric, num_samples=b, seed=7)
    np.testing.assert_allclose(got, np.percentile(vals, [2.5, 97.5]), rtol=0, atol=1e-12)


def test_bootstrap_contains_estimate_and_narrows():
  widths = []
  for n in (200, 4000):
    y, s = _inputs(metrics.MULTI_CLASS, 9, "column", 11, n=n)
    out = metrics.score(y, s, metrics.MULTI_CLASS, bootstrap=300, seed=1)
    assert set(out) == {"auc", "acc", "auc_ci", "acc_ci"}
    for m in ("auc", "acc"):
      low, high = out[f"{m}_ci"]
      assert low < out[m] < high
    widths.append(out["auc_ci"][1] - out["auc_ci"][0])
  assert widths[1] < 0.5 * widths[0]  # ~ 1/sqrt(20) in theory

  # Deterministic given the seed; a narrower level gives a narrower interval.
  a = metrics.bootstrap_ci(y, s, metrics.MULTI_CLASS, num_samples=200, seed=3)
  assert a == metrics.bootstrap_ci(y, s, metrics.MULTI_CLASS, num_samples=200, seed=3)
  assert a != metrics.bootstrap_ci(y, s, metrics.MULTI_CLASS, num_samples=200, seed=4)
  half = metrics.bootstrap_ci(y, s, metrics.MULTI_CLASS, num_samples=200, seed=3, level=0.5)
  assert a[0] < half[0] < half[1] < a[1]
  assert set(metrics.score(y, s, metrics.MULTI_CLASS)) == {"auc", "acc"}
