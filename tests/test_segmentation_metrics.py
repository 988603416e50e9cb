"""Segmentation metrics against MONAI's DiceMetric and MeanIoU, recomputed
from the same masks, including images where a class is absent."""
import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, MeanIoU
from monai.networks.utils import one_hot

from biovfm_jax.evaluate import segmentation_metrics as sm

C = 4


def _masks(seed=0, b=6, hw=(12, 10)):
  rng = np.random.default_rng(seed)
  truth = rng.integers(0, C, (b,) + hw)
  truth[0][truth[0] == 3] = 0      # class 3 absent from image 0's truth ...
  truth[1][truth[1] == 2] = 1      # ... class 2 from image 1's
  truth[2][truth[2] == 3] = 0
  pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, C, truth.shape))
  pred[2][pred[2] == 3] = 1        # class 3 neither true nor predicted in image 2
  return pred, truth


def _monai(metric, pred, truth):
  oh = lambda m: one_hot(torch.as_tensor(m)[:, None], num_classes=C)
  metric(y_pred=oh(pred), y=oh(truth))
  return metric.aggregate().numpy()


def test_per_class_scores_equal_monai():
  pred, truth = _masks()
  scores = sm.per_image(pred, truth, C)
  summary = sm.summarize(scores)
  dice = _monai(DiceMetric(include_background=True, reduction="mean_batch"), pred, truth)
  iou = _monai(MeanIoU(include_background=True, reduction="mean_batch"), pred, truth)
  np.testing.assert_allclose(summary["dice_per_class"], dice, rtol=1e-6)
  np.testing.assert_allclose(summary["iou_per_class"], iou, rtol=1e-6)
  # Absent classes are NaN per image, as MONAI's ignore_empty gives them.
  assert np.isnan(scores["dice"][0, 3]) and np.isnan(scores["iou"][2, 3])
  assert summary["mean_dice"] == pytest.approx(float(np.mean(dice[1:])))
  assert summary["pixel_accuracy"] == pytest.approx(float(np.mean(pred == truth)))


def test_perfect_and_wrong_predictions():
  _, truth = _masks(seed=1)
  perfect = sm.summarize(sm.per_image(truth, truth, C))
  assert perfect["mean_dice"] == perfect["mean_iou"] == perfect["pixel_accuracy"] == 1.0
  wrong = sm.summarize(sm.per_image((truth + 1) % C, truth, C))
  assert wrong["mean_dice"] == wrong["pixel_accuracy"] == 0.0
  lo, hi = sm.bootstrap(sm.per_image(*_masks(seed=2), C), n=200)["mean_dice"]
  assert 0 < lo < hi < 1


def test_labels_out_of_range_are_named():
  pred, truth = _masks()
  truth[0, 0, 0] = 7
  with pytest.raises(ValueError, match=r"true masks hold labels outside 0..3: \[7\]"):
    sm.per_image(pred, truth, C)
