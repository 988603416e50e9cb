"""Segmentation metrics on integer label masks, with MONAI's conventions.

Per image and class: Dice = 2|P∩T| / (|P| + |T|), IoU = |P∩T| / |P∪T|, NaN
where the class is absent from the truth (MONAI's ignore_empty=True, the
default of DiceMetric and MeanIoU), whatever was predicted there. A class's
score is the mean over the images where it is present (MONAI's mean_batch
reduction, which skips NaN); the summary is the mean of the foreground
classes' scores (class 0 is background). Pixel accuracy counts every pixel.
Bootstrap intervals resample images, as the classification report does.
"""
from __future__ import annotations

import numpy as np


def confusion_counts(pred: np.ndarray, truth: np.ndarray, num_classes: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(B, ...) int masks -> (intersection, predicted, true) pixel counts, each
  (B, num_classes)."""
  pred, truth = np.asarray(pred), np.asarray(truth)
  if pred.shape != truth.shape:
    raise ValueError(f"predicted masks {pred.shape} and true masks {truth.shape} differ")
  for name, m in (("predicted", pred), ("true", truth)):
    if m.size and (m.min() < 0 or m.max() >= num_classes):
      raise ValueError(f"{name} masks hold labels outside 0..{num_classes - 1}: "
                       f"{sorted(set(np.unique(m).tolist()) - set(range(num_classes)))}")
  b = pred.shape[0]
  p, t = pred.reshape(b, -1), truth.reshape(b, -1)
  # Label num_classes marks the pixels where prediction and truth disagree.
  count = lambda x: np.stack([np.bincount(row, minlength=num_classes + 1)
                              for row in x])[:, :num_classes].astype(np.float64)
  return count(np.where(p == t, p, num_classes)), count(p), count(t)


def per_image(pred, truth, num_classes: int) -> dict[str, np.ndarray]:
  """{'dice', 'iou'}: (B, num_classes), NaN where the class is absent from the
  truth; 'accuracy': (B,) pixel accuracy."""
  inter, npred, ntrue = confusion_counts(pred, truth, num_classes)
  present = ntrue > 0
  with np.errstate(invalid="ignore", divide="ignore"):
    dice = np.where(present, 2 * inter / (npred + ntrue), np.nan)
    iou = np.where(present, inter / (npred + ntrue - inter), np.nan)
  return {"dice": dice, "iou": iou, "accuracy": inter.sum(1) / ntrue.sum(1)}


def summarize(scores: dict[str, np.ndarray]) -> dict[str, object]:
  """Per-image scores -> per-class means (over images where the class is
  present) and the foreground means: {'dice_per_class', 'iou_per_class',
  'mean_dice', 'mean_iou', 'pixel_accuracy'}."""
  out: dict[str, object] = {}
  for name in ("dice", "iou"):
    s = scores[name]
    counted = (~np.isnan(s)).sum(0)
    per_class = np.where(counted > 0, np.nansum(s, 0) / np.maximum(counted, 1), np.nan)
    out[f"{name}_per_class"] = per_class
    fg = per_class[1:]
    out[f"mean_{name}"] = float(np.nanmean(fg)) if np.isfinite(fg).any() else float("nan")
  out["pixel_accuracy"] = float(np.mean(scores["accuracy"]))
  return out


def bootstrap(scores: dict[str, np.ndarray], n: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict[str, tuple[float, float]]:
  """Percentile intervals of mean_dice, mean_iou and pixel_accuracy over
  images resampled with replacement."""
  b = scores["accuracy"].shape[0]
  rng = np.random.default_rng(seed)
  draws = {k: [] for k in ("mean_dice", "mean_iou", "pixel_accuracy")}
  for _ in range(n):
    idx = rng.integers(0, b, b)
    s = summarize({k: v[idx] for k, v in scores.items()})
    for k in draws:
      draws[k].append(s[k])
  lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
  return {k: (float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi)))
          for k, v in draws.items()}
