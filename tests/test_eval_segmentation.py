"""The linear segmentation probe (configs/eval/segmentation_linear.py): the
head and its upsampling, the last-4-layers features, the binary's outputs on
mni_tissue with a tiny encoder (Dice and IoU recomputed by MONAI from the
saved predictions), and merged segmentation reports."""
import csv
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from biovfm_jax.evaluate import report
from biovfm_jax.evaluate import runner as evaluate_bin
from biovfm_jax.evaluate import segmentation as seg
from biovfm_jax.models.vit import VisionTransformer, vit_config
from biovfm_jax.train import checkpoint as ckpt_lib
from configs.eval import segmentation_linear

TINY = dict(width=32, depth=3, num_heads=2, mlp_dim=64, patch_size=8, image_size=64)


def _head_cfg(**kw):
  c = segmentation_linear.get_config().head
  c.update(kw)
  return c


def test_upsampling_is_torch_bilinear_and_the_head_learns_a_separable_task():
  import torch
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  ours = np.asarray(seg.upsample(jnp.asarray(logits), (16, 20)))
  theirs = torch.nn.functional.interpolate(
      torch.as_tensor(logits).permute(0, 3, 1, 2), size=(16, 20), mode="bilinear",
      align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-5)

  # Each token's class is written in its features (plus noise); masks are the
  # token labels at 4x.
  def make(n, seed):
    r = np.random.default_rng(seed)
    labels = r.integers(0, 3, (n, 4, 4))
    feats = r.normal(size=(n, 4, 4, 8)).astype(np.float32) * 0.3
    feats[..., :3] += 2.0 * np.eye(3, dtype=np.float32)[labels]
    return feats, labels.repeat(4, 1).repeat(4, 2).astype(np.uint8)
  (tf, tm), (vf, vm) = make(64, 1), make(16, 2)
  head, best = seg.train_fast(tf, tm, vf, vm, 3, _head_cfg(epochs=15, lr=1e-2, batch_size=16),
                              name="synthetic")
  loss, pred = head.evaluate(best["params"], best["bn"], vf, vm, 8)
  assert pred.shape == vm.shape and pred.dtype == np.uint8
  assert (pred == vm).mean() > 0.9 and loss < 0.8 < np.log(3)  # log 3: chance
  assert best["val_loss"] == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("variant", [
    dict(), dict(scan_layers=True, num_registers=2, pos_embed="learned"),
    dict(pos_embed="rope", class_token=False)])
def test_last4_features_are_the_last_blocks_through_the_final_norm(variant):
  cfg = vit_config(None, **{**TINY, "depth": 5, **variant})
  model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(1), (2, 32, 48, 3))
  outs = model.intermediate_tokens(images, 4)
  prefix = cfg.num_prefix_tokens
  assert len(outs) == 4 and all(o.shape == (2, prefix + 24, 32) for o in outs)
  np.testing.assert_allclose(outs[-1], model(images), atol=1e-5)
  assert not np.allclose(outs[0], outs[-1])
  # The second to last block's output: the model cut to its first 4 blocks.
  if not cfg.scan_layers:
    model.blocks.layers = nnx.List(list(model.blocks.layers)[:4])
    model.blocks.depth = 4
    np.testing.assert_allclose(outs[-2], model(images), atol=1e-5)
  with pytest.raises(ValueError, match="n=6"):
    model.intermediate_tokens(images, 6)


def save_encoder(path, seed=0, **overrides):
  cfg = vit_config(None, **{**TINY, **overrides})
  params = nnx.to_pure_dict(nnx.split(VisionTransformer(cfg, rngs=nnx.Rngs(seed)),
                                      nnx.Param, ...)[1])
  ckpt_lib.save_params(str(path), params, {"objective": "test", "backbone": "params",
                                           "encoder": dataclasses.asdict(cfg)})
  return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("seg_data"))


def seg_config(checkpoint, out_dir, data_dir, **flat):
  c = segmentation_linear.get_config()
  c.image_size = 64
  c.data_dir = data_dir
  c.head.epochs = 3
  c.overlays = 3
  c.update_from_flattened_dict(flat)
  return evaluate_bin.resolve_config(c, checkpoint=checkpoint, out_dir=str(out_dir))


def _monai(metric, pred, truth, num_classes):
  import torch
  from monai.networks.utils import one_hot
  oh = lambda m: one_hot(torch.as_tensor(m.astype(np.int64))[:, None],  # noqa: E731
                         num_classes=num_classes)
  metric(y_pred=oh(pred), y=oh(truth))
  return metric.aggregate().numpy()


def test_mni_tissue_scores_equal_monai_on_the_saved_predictions(tmp_path, data_dir):
  from monai.metrics import DiceMetric, MeanIoU
  from data_pipeline import seg_benchmarks
  out = tmp_path / "out"
  config = seg_config(save_encoder(tmp_path / "enc"), out, data_dir,
                      save_predictions="npz", **{"head.bootstrap": 20})
  result = evaluate_bin.run(config)["mni_tissue"]
  doc = json.load(open(out / "report.json"))
  assert doc["kind"] == "segmentation" and doc["order"] == ["mni_tissue"]
  saved = np.load(out / "mni_tissue" / "predictions.npz")
  test = seg_benchmarks.load_split("mni_tissue", "test", size=64, data_dir=data_dir)
  assert list(saved["ids"]) == test.ids and saved["masks"].shape == test.masks.shape
  # Some test images lack a class: MONAI's ignore_empty must agree there too.
  present = np.stack([(test.masks == c).any((1, 2)) for c in range(3)], 1)
  assert not present.all()
  dice = _monai(DiceMetric(include_background=True, reduction="mean_batch"),
                saved["masks"], test.masks, 3)
  iou = _monai(MeanIoU(include_background=True, reduction="mean_batch"),
               saved["masks"], test.masks, 3)
  r = doc["results"]["mni_tissue"]
  np.testing.assert_allclose(r["dice_per_class"], dice, rtol=1e-6)
  np.testing.assert_allclose(r["iou_per_class"], iou, rtol=1e-6)
  assert r["dice"] == pytest.approx(float(dice[1:].mean()), rel=1e-6)
  assert r["iou"] == pytest.approx(float(iou[1:].mean()), rel=1e-6)
  assert r["pixel_accuracy"] == pytest.approx(float((saved["masks"] == test.masks).mean()))
  assert r["dice"] == result["dice"] and 0 < r["dice"] < 1
  assert r["dice_ci"][0] <= r["dice"] <= r["dice_ci"][1]
  # Per-image CSV: one row per test image, NaN where the class is absent.
  rows = list(csv.DictReader(open(out / "mni_tissue" / "per_image.csv")))
  assert [row["id"] for row in rows] == test.ids
  per_dice = np.array([[float(row[f"dice_{c}"]) for c in
                        ("background_CSF", "grey_matter", "white_matter")] for row in rows])
  np.testing.assert_array_equal(np.isnan(per_dice), ~present)
  np.testing.assert_allclose(np.nanmean(per_dice, 0), dice, rtol=1e-6)
  # report.md / .csv, the overlay sheet (3 rows of image | truth | prediction).
  md = open(out / "report.md").read()
  assert "| mni_tissue |" in md and "grey matter" in md and "Intervals" in md
  table = list(csv.DictReader(open(out / "report.csv")))
  assert [(t["benchmark"], t["class"]) for t in table][:2] == [
      ("mni_tissue", "foreground mean"), ("mni_tissue", "background/CSF")]
  assert float(table[0]["dice"]) == pytest.approx(100 * r["dice"], abs=1e-5)
  from PIL import Image
  sheet = np.asarray(Image.open(out / "mni_tissue" / "overlays.png"))
  assert sheet.shape == (3 * 128, 3 * 128, 3)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
  assert len(os.listdir(out / "features")) == 3  # cached: train, val, test


@pytest.mark.slow
def test_augmented_last4_probe_and_merged_reports(tmp_path, data_dir):
  """head.augment recomputes the training features; layers=last4; PNG
  predictions; `report --merge` puts the two runs side by side."""
  enc = save_encoder(tmp_path / "enc", depth=4)
  a = seg_config(enc, tmp_path / "a", data_dir, name="last", overlays=0,
                 **{"head.epochs": 2})
  b = seg_config(enc, tmp_path / "b", data_dir, name="last4_aug", save_predictions="png",
                 **{"head.layers": "last4", "head.augment": True, "head.epochs": 2})
  ra = evaluate_bin.run(a)["mni_tissue"]
  cached = sorted(os.listdir(tmp_path / "a" / "features"))
  assert len(cached) == 3
  # A second run reads the features from the cache: the same scores.
  assert evaluate_bin.run(a)["mni_tissue"]["dice"] == ra["dice"]
  assert sorted(os.listdir(tmp_path / "a" / "features")) == cached
  rb = evaluate_bin.run(b)["mni_tissue"]
  assert len(os.listdir(tmp_path / "b" / "features")) == 2  # augment: val and test only
  from data_pipeline import seg_benchmarks
  test = seg_benchmarks.load_split("mni_tissue", "test", size=64, data_dir=data_dir)
  from PIL import Image
  pred = np.stack([np.asarray(Image.open(tmp_path / "b" / "mni_tissue" / "predictions" /
                                         f"{i}.png")) for i in test.ids])
  from biovfm_jax.evaluate import segmentation_metrics as sm
  assert sm.summarize(sm.per_image(pred, test.masks, 3))["mean_dice"] == \
      pytest.approx(rb["dice"], rel=1e-9)
  assert not os.path.exists(tmp_path / "a" / "mni_tissue" / "overlays.png")
  report.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"),
               "--out", str(tmp_path / "cmp"), "--metric", "dice"])
  cmp = json.load(open(tmp_path / "cmp" / "comparison.json"))
  assert cmp["runs"] == ["last", "last4_aug"]
  assert cmp["values"]["mni_tissue"]["last4_aug"] == pytest.approx(rb["dice"])


def _seg_result(dice, classes=("bg", "a", "b")):
  return {"dice": dice, "iou": dice / 2, "pixel_accuracy": 0.9, "classes": list(classes),
          "dice_per_class": [0.99, dice, float("nan")], "iou_per_class": [0.98, dice / 2, None],
          "images_per_class": [5, 4, 0], "dice_ci": [dice - 0.1, dice + 0.1]}


def test_segmentation_reports_merge_side_by_side(tmp_path, capsys):
  report.write_segmentation_report({"mni_tissue": _seg_result(0.6),
                                    "Task04": _seg_result(0.4)}, tmp_path / "r1", name="one")
  report.write_segmentation_report({"mni_tissue": _seg_result(0.7)}, tmp_path / "r2",
                                   name="two")
  doc = json.load(open(tmp_path / "r1" / "report.json"))
  assert doc["results"]["Task04"]["dice_per_class"][2] is None
  assert doc["mean"]["dice"] == pytest.approx(0.5)
  for metric, (one, two) in (("dice", (60.0, 70.0)), ("iou", (30.0, 35.0))):
    report.main(["--merge", str(tmp_path / "r1"), str(tmp_path / "r2"), "--out",
                 str(tmp_path / metric), "--metric", metric])
    cmp = json.load(open(tmp_path / metric / "comparison.json"))
    assert cmp["mean_over"] == ["mni_tissue"]
    assert 100 * cmp["mean"]["one"] == pytest.approx(one)
    assert 100 * cmp["mean"]["two"] == pytest.approx(two)
  out = capsys.readouterr().out
  assert "# DICE x 100" in out and "| mni_tissue | 60.00 (50.00-70.00) | 70.00" in out


def test_bad_segmentation_configs_fail_with_the_key(tmp_path):
  enc = save_encoder(tmp_path / "enc")
  for flat, key in ((dict(**{"head.layers": "last3"}), "config.head.layers"),
                    (dict(save_predictions="jpg"), "config.save_predictions"),
                    (dict(**{"head.dropout": 1.0}), "config.head.dropout"),
                    (dict(benchmarks="dermamnist"), "config.benchmarks"),
                    (dict(**{"results.file": "x.csv"}), "config.results.file")):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
      seg_config(enc, tmp_path / "o", str(tmp_path / "d"), **flat)
  # A misspelt key fails when the flags are parsed, naming it.
  from absl import flags
  from ml_collections import config_flags
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "eval", "segmentation_linear.py")
  argv = ["evaluate.py", f"--config={path}", "--config.head.layer=last"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  with pytest.raises(Exception, match="Did you mean \"layers\""):
    fv(argv)


def test_evaluate_binary_on_an_msd_folder_and_mni_tissue(tmp_path):
  """`python evaluate.py --benchmarks=mni_tissue,msd:<folder>` as a user runs it:
  an MSD task folder made here (NIfTI volumes, dataset.json), one report with
  both benchmarks, Dice equal to MONAI's on the saved predictions."""
  import subprocess
  import sys
  from monai.metrics import DiceMetric
  from test_seg_benchmarks import _msd
  from data_pipeline import seg_benchmarks
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  task = _msd(tmp_path / "Task99_Toy", n_cases=5)
  enc = save_encoder(tmp_path / "enc")
  out, data = tmp_path / "out", tmp_path / "data"
  r = subprocess.run(
      [sys.executable, "evaluate.py", "--config=configs/eval/segmentation_linear.py",
       f"--checkpoint={enc}", f"--out_dir={out}", "--image_size=32",
       f"--benchmarks=mni_tissue,msd:{task}", "--config.head.epochs=2",
       "--config.head.batch_size=4",
       "--config.save_predictions=npz", f"--config.data_dir={data}"],
      cwd=root, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "| Task99_Toy |" in r.stdout and "| mni_tissue |" in r.stdout
  doc = json.load(open(out / "report.json"))
  saved = np.load(out / "Task99_Toy" / "predictions.npz")
  test = seg_benchmarks.load_split(f"msd:{task}", "test", size=32, data_dir=str(data))
  assert list(saved["ids"]) == test.ids
  dice = _monai(DiceMetric(include_background=True, reduction="mean_batch"),
                saved["masks"], test.masks, 3)
  np.testing.assert_allclose(doc["results"]["Task99_Toy"]["dice_per_class"], dice, rtol=1e-6)
