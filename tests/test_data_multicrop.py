"""DINOv2 multi-crop input: the photometric ops, iBOT block masks, and the
loader's "multicrop" mode (shapes, determinism, process split, skipping)."""
import threading

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from configs import dinov2_base
from data_pipeline import loader, masking, multicrop, records, selection, transforms
from data_pipeline.errors import ConfigError

N = 40
SMALL = dict(global_crop_size=32, local_crop_size=16, num_local_crops=3, patch_size=4)


def cfg(spec, small=True, **kw):
  """A multicrop data config; small crops unless `small` is False (defaults)."""
  c = dinov2_base.get_config(None).data
  c.update(dict(shards=spec, read_threads=1, prefetch_buffer=2, num_workers=0,
                max_skipped_fraction=None))  # None: skip, never stop
  c.update(SMALL if small else {})
  c.update(kw)
  return c


def take(c, steps, **kw):
  kw.setdefault("process_count", 1)
  kw.setdefault("process_index", 0)
  it = loader.make_pretrain_loader(c, **kw)
  try:
    return [next(it) for _ in range(steps)]
  finally:  # its prefetch thread stops after the batch in flight, not after many
    it.close()


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def has_2x2(mask_2d):
  m = mask_2d
  return bool((m[:-1, :-1] & m[1:, :-1] & m[:-1, 1:] & m[1:, 1:]).any())


# --- loader ------------------------------------------------------------------------

def test_shapes_and_dtypes(shard_dir):
  b, = take(cfg(shard_dir), 1, global_batch_size=4, seed=0)
  assert set(b) == {"global_crops", "local_crops", "masks", "skipped"}
  # uint8 crops: the train step normalises them on the device.
  assert b["global_crops"].shape == (4, 2, 32, 32, 3) and b["global_crops"].dtype == np.uint8
  assert b["local_crops"].shape == (4, 3, 16, 16, 3) and b["local_crops"].dtype == np.uint8
  assert b["masks"].shape == (4, 2, 64) and b["masks"].dtype == bool
  assert b["skipped"].shape == (4,) and b["skipped"].dtype == np.int32 and not b["skipped"].any()
  for k in ("global_crops", "local_crops"):  # noise records, not normalised
    assert 60 < b[k].mean() < 195 and b[k].std() > 10, k


@pytest.mark.parametrize("patch,local,grid", [(16, 96, 14), (14, 98, 16)])
def test_reference_sizes(shard_dir, patch, local, grid):
  c = cfg(shard_dir, small=False, local_crop_size=local, patch_size=patch)
  b, = take(c, 1, global_batch_size=2, seed=0)
  assert b["global_crops"].shape == (2, 2, 224, 224, 3)
  assert b["local_crops"].shape == (2, 8, local, local, 3)
  assert b["masks"].shape == (2, 2, grid * grid)


def test_same_seed_same_batches_other_seed_differs(shard_dir):
  a = take(cfg(shard_dir), 3, global_batch_size=4, seed=7)
  b = take(cfg(shard_dir, read_threads=2, prefetch_buffer=0), 3, global_batch_size=4, seed=7)
  c = take(cfg(shard_dir), 1, global_batch_size=4, seed=8)
  for x, y in zip(a, b):
    assert_batches_equal(x, y)
  assert not np.array_equal(a[0]["global_crops"], c[0]["global_crops"])
  assert not np.array_equal(a[0]["local_crops"], a[1]["local_crops"])
  # The two global crops of an example are different views.
  assert not np.array_equal(a[0]["global_crops"][:, 0], a[0]["global_crops"][:, 1])


def test_resume_at_step_k_equals_uninterrupted(shard_dir):
  full = take(cfg(shard_dir), 12, global_batch_size=4, seed=3)  # crosses the epoch at 40
  resumed = take(cfg(shard_dir), 3, global_batch_size=4, seed=3, start_step=9)
  for x, y in zip(full[9:], resumed):
    assert_batches_equal(x, y)


def test_two_process_batches_concatenate_to_single_process_batch(shard_dir):
  one = take(cfg(shard_dir), 2, global_batch_size=4, seed=1, start_step=4)
  parts = [take(cfg(shard_dir), 2, global_batch_size=4, seed=1, start_step=4,
                process_count=2, process_index=i) for i in range(2)]
  for step in range(2):
    joined = {k: np.concatenate([p[step][k] for p in parts]) for k in one[step]}
    assert_batches_equal(joined, one[step])


def test_more_local_crops_leave_global_crops_and_masks_alone(shard_dir):
  a, = take(cfg(shard_dir), 1, global_batch_size=4, seed=5)
  b, = take(cfg(shard_dir, num_local_crops=5), 1, global_batch_size=4, seed=5)
  np.testing.assert_array_equal(a["global_crops"], b["global_crops"])
  np.testing.assert_array_equal(a["masks"], b["masks"])
  np.testing.assert_array_equal(a["local_crops"], b["local_crops"][:, :3])
  c, = take(cfg(shard_dir, num_local_crops=0), 1, global_batch_size=4, seed=5)
  assert c["local_crops"].shape == (4, 0, 16, 16, 3)


def test_grey_records_stay_grey(shard_dir):
  b, = take(cfg(shard_dir), 1, global_batch_size=8, seed=0)
  kinds = set()
  for j in range(8):
    # Per crop: the largest channel spread over its pixels.
    spread = np.concatenate([np.ptp(b[k][j], axis=-1).max(axis=(1, 2))
                             for k in ("global_crops", "local_crops")])
    grey_record = selection.record_index(j, 0, N) % 2 == 0  # even records are grey
    kinds.add(grey_record)
    if grey_record:  # every crop of a grey record keeps three equal channels
      assert (spread == 0).all()
    else:  # colour noise turns grey only by the random grayscale (p=0.2)
      assert (spread > 0).any()
  assert kinds == {True, False}


def test_loader_masks_are_stratified_per_batch_shard(shard_dir):
  """mask_sampling "shard" (the default): each batch shard's 2 B_s global
  crops hold exactly n = int(0.5 x 2 B_s) masked ones, the k-th smallest
  within the k-th stratum of mask_ratio (0.1, 0.5) (at most: a mask can fall
  a little short of its count)."""
  c = cfg(shard_dir, patch_size=2, num_local_crops=0)  # 16 x 16 mask grid
  for shards in (1, 4):
    n = 32 // shards
    upper = np.linspace(0.1, 0.5, n + 1)[1:]
    for b in take(c, 2, global_batch_size=32, seed=0, batch_shards=shards):
      frac = b["masks"].reshape(shards, 32 // shards * 2, 256).mean(-1)
      assert ((frac > 0).sum(1) == n).all(), shards
      assert (np.sort(frac, axis=1)[:, -n:] <= upper + 1e-9).all()
      assert (frac[frac > 0] >= 0.09).all()


def test_shard_masks_are_a_function_of_seed_step_and_shard_count(shard_dir):
  c = cfg(shard_dir, num_local_crops=0)  # 8 x 8 mask grid
  kw = dict(global_batch_size=8, seed=4, start_step=3)
  a = take(c, 2, **kw, batch_shards=2)
  assert_batches_equal(take(c, 2, **kw, batch_shards=2)[1], a[1])  # rebuilt
  resumed, = take(c, 1, **{**kw, "start_step": 4}, batch_shards=2)
  assert_batches_equal(resumed, a[1])
  # The shard count, not the process count, sets them: processes' batches join up.
  parts = [take(c, 1, **kw, batch_shards=2, process_count=2, process_index=i)[0]
           for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([p["masks"] for p in parts]), a[0]["masks"])
  # Another shard count (a resume on other devices): other masks, the same crops.
  other = take(c, 2, **kw, batch_shards=4)
  for x, y in zip(a, other):
    assert not np.array_equal(x["masks"], y["masks"])
    np.testing.assert_array_equal(x["global_crops"], y["global_crops"])
  assert ((other[0]["masks"].reshape(4, 4, 64).sum(-1) > 0).sum(1) == 2).all()
  # "example" sampling: each crop its own coin, for any shard count.
  c = cfg(shard_dir, num_local_crops=0, mask_sampling="example")
  one, four = (take(c, 1, **kw, batch_shards=s)[0]["masks"] for s in (1, 4))
  np.testing.assert_array_equal(one, four)


def test_bad_config(shard_dir):
  with pytest.raises(ValueError, match="single' or 'multicrop"):
    loader.make_pretrain_loader(cfg(shard_dir, crops="many"), global_batch_size=2, seed=0,
                                process_count=1, process_index=0)
  with pytest.raises(ValueError, match="multiple of patch_size"):
    loader.make_pretrain_loader(cfg(shard_dir, patch_size=5), global_batch_size=2, seed=0,
                                process_count=1, process_index=0)
  with pytest.raises(ConfigError, match="config.data.mask_sampling='often'"):
    loader.make_pretrain_loader(cfg(shard_dir, mask_sampling="often"), global_batch_size=2,
                                seed=0, process_count=1, process_index=0)
  with pytest.raises(ConfigError, match=r"config.data.mask_sampling='shard' .* \(6\) .* 4 batch"):
    loader.make_pretrain_loader(cfg(shard_dir), global_batch_size=6, seed=0, batch_shards=4,
                                process_count=1, process_index=0)


def test_corrupt_records_are_skipped_in_multicrop_mode(tmp_path):
  rng = np.random.default_rng(1)
  good = [records.make_record(rng.integers(0, 256, (40, 40), dtype=np.uint8))
          for _ in range(10)]
  writer = ArrayRecordWriter(str(tmp_path / "c-00000.array_record"), "group_size:1")
  bad = {0, 3, 4, 9}
  for pos in range(len(good) + len(bad)):
    writer.write(b"not a record" if pos in bad else good.pop(0))
  writer.close()
  n = 14
  multi = take(cfg(str(tmp_path)), 2, global_batch_size=n, seed=2)
  single = take(cfg(str(tmp_path), crops="single", image_size=8, crop_scale=(0.2, 1.0),
                    hflip=True), 2, global_batch_size=n, seed=2)
  # Both modes share `read`: the same substitutions, counted the same.
  for m, s in zip(multi, single):
    np.testing.assert_array_equal(m["skipped"], s["skipped"])
    assert np.isfinite(m["global_crops"]).all() and np.isfinite(m["local_crops"]).all()
  assert multi[0]["skipped"].sum() == 1 + (2 + 1) + 1  # run lengths of 1, 2, 1


# --- the recipe's wiring -------------------------------------------------------------

def test_blur_and_solarize_probabilities_per_crop(monkeypatch):
  calls = []

  me = threading.current_thread()

  def spy(name, fn):
    def wrapped(img, rng, p, *args, **kw):
      if threading.current_thread() is me:  # not an earlier test's loader finishing a batch
        calls.append((name, p))
      return fn(img, rng, p, *args, **kw)
    return wrapped

  monkeypatch.setattr(transforms, "random_gaussian_blur",
                      spy("blur", transforms.random_gaussian_blur))
  monkeypatch.setattr(transforms, "random_solarize", spy("solarize", transforms.random_solarize))
  mc = multicrop.MultiCrop(global_crop_size=16, local_crop_size=8, num_local_crops=2,
                           patch_size=4)
  mc(np.zeros((20, 20), np.uint8), np.random.default_rng(0))
  assert calls == [("blur", 1.0), ("solarize", 0.0),   # global crop 1
                   ("blur", 0.1), ("solarize", 0.2),   # global crop 2
                   ("blur", 0.5), ("solarize", 0.0),   # local crops
                   ("blur", 0.5), ("solarize", 0.0)]


def test_only_global_crop_2_is_solarised():
  # A white image stays >= 153 through brightness jitter (factor >= 0.6); the
  # other ops keep a constant image constant. Only solarising takes it < 128.
  mc = multicrop.MultiCrop(global_crop_size=8, local_crop_size=8, num_local_crops=2,
                           patch_size=4)
  white = np.full((24, 24), 255, np.uint8)
  solarised = {"g1": 0, "g2": 0, "local": 0}
  n = 400
  for e in range(n):
    out = mc(white, np.random.default_rng([0, e]))
    g = out["global_crops"].reshape(2, -1).max(-1) < 128
    solarised["g1"] += int(g[0])
    solarised["g2"] += int(g[1])
    solarised["local"] += int((out["local_crops"].reshape(2, -1).max(-1) < 128).any())
  assert solarised["g1"] == 0 and solarised["local"] == 0
  assert 0.14 < solarised["g2"] / n < 0.26


def test_grey_images_take_the_one_channel_path_bit_identically():
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:50, 0:70]
  smooth = ((np.sin(xx / 7) + np.cos(yy / 5)) * 60 + 128).astype(np.uint8)
  for img in (rng.integers(0, 256, (50, 70), dtype=np.uint8), smooth):
    for seed in range(60):
      for kw in (dict(size=24, scale=(0.32, 1), blur_p=1.0, solarize_p=0.2),
                 dict(size=12, scale=(0.05, 0.32), blur_p=0.5, solarize_p=0.0)):
        a = multicrop.augment(img, np.random.default_rng(seed), **kw)
        b = multicrop.augment(transforms.to_rgb(img), np.random.default_rng(seed), **kw)
        np.testing.assert_array_equal(a, b)
  assert multicrop.as_grey_or_rgb(transforms.to_rgb(smooth)).shape == (50, 70)
  colour = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
  assert multicrop.as_grey_or_rgb(colour) is colour


# --- photometric ops ------------------------------------------------------------------

def test_jitter_keeps_grey_grey_and_changes_colour():
  rng = np.random.default_rng(0)
  grey = transforms.to_rgb(rng.integers(0, 256, (24, 24), dtype=np.uint8))
  colour = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
  for f in (0.0, 0.5, 1.5, 3.0):
    for op in (transforms.adjust_brightness, transforms.adjust_contrast,
               transforms.adjust_saturation):
      assert transforms.is_grey(op(grey, f)), (op, f)
  for h in (-0.5, -0.1, 0.03, 0.1, 0.5):
    np.testing.assert_array_equal(transforms.adjust_hue(grey, h), grey)
  for _ in range(50):
    out = transforms.color_jitter(grey, rng, p=1.0)
    assert out.shape == grey.shape and out.dtype == np.uint8 and transforms.is_grey(out)
  assert not np.array_equal(transforms.adjust_hue(colour, 0.1), colour)
  assert transforms.is_grey(transforms.adjust_saturation(colour, 0.0))
  np.testing.assert_array_equal(transforms.adjust_brightness(colour, 1.0), colour)


def test_jitter_draws_the_same_numbers_whatever_p():
  img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  a, b = np.random.default_rng(1), np.random.default_rng(1)
  assert transforms.color_jitter(img, a, p=0.0) is img
  transforms.color_jitter(img, b, p=1.0)
  assert a.random() == b.random()
  applied = sum(not np.array_equal(transforms.color_jitter(img, a), img) for _ in range(400))
  assert 280 < applied < 360  # p = 0.8


def test_gaussian_blur_matches_direct_convolution():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  for sigma in (0.1, 0.8, 2.0):
    x = np.arange(-4, 5)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img.astype(np.float64), ((4, 4), (4, 4), (0, 0)), mode="reflect")
    want = np.zeros(img.shape)
    for i in range(9):
      for j in range(9):
        want += k[i] * k[j] * pad[i:i + 20, j:j + 30]
    got = transforms.gaussian_blur(img, sigma)
    assert got.dtype == np.uint8 and got.shape == img.shape
    assert np.abs(got.astype(int) - np.rint(want)).max() <= 1
    np.testing.assert_array_equal(transforms.gaussian_blur(img[..., 1], sigma), got[..., 1])
  flat = np.full((12, 12), 77, np.uint8)
  np.testing.assert_array_equal(transforms.gaussian_blur(flat, 2.0), flat)


def test_solarize_grayscale_and_their_coins():
  img = np.array([[0, 127, 128, 255]], np.uint8)
  np.testing.assert_array_equal(transforms.solarize(img), [[0, 127, 127, 0]])
  rgb = np.array([[[255, 0, 0], [0, 255, 0]]], np.uint8)
  g = transforms.grayscale(rgb)
  assert g.shape == (1, 2, 3) and transforms.is_grey(g)
  assert g[0, 0, 0] == 76 and g[0, 1, 0] == 150  # luma 0.299, 0.587
  rng = np.random.default_rng(0)
  n = sum(transforms.random_solarize(img, rng, 0.2)[0, 3] == 0 for _ in range(1000))
  assert 150 < n < 250
  n = sum(transforms.is_grey(transforms.random_grayscale(rgb, rng)) for _ in range(1000))
  assert 150 < n < 250


# --- iBOT masks -------------------------------------------------------------------------

def test_block_mask_counts_and_edges():
  rng = np.random.default_rng(0)
  assert not masking.block_mask(14, 14, 0, rng).any()
  assert masking.block_mask(14, 14, 0, rng).shape == (196,)
  assert masking.block_mask(3, 5, 100, rng).sum() <= 15
  counts = []
  for _ in range(300):
    target = int(rng.integers(4, 99))
    m = masking.block_mask(14, 14, target, rng)
    assert m.dtype == bool and m.shape == (196,) and m.sum() <= target
    counts.append(m.sum() / target)
  assert np.mean(counts) > 0.95  # falls short only a little, rarely


def test_block_masks_are_blocks():
  rng = np.random.default_rng(1)
  with_2x2, neighbour = 0, []
  for _ in range(300):
    m = masking.block_mask(14, 14, int(rng.integers(20, 99)), rng).reshape(14, 14)
    with_2x2 += has_2x2(m)
    p = np.pad(m, 1)
    has_nb = p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    neighbour.append((has_nb & m).sum() / m.sum())
  assert with_2x2 >= 290
  assert np.mean(neighbour) > 0.95  # a scattered 10-50% mask would be far lower


def test_crop_mask_probability_and_ratio():
  rng = np.random.default_rng(2)
  frac = np.array([masking.crop_mask(14, 14, rng).mean() for _ in range(2000)])
  masked = frac > 0
  assert 0.45 < masked.mean() < 0.55
  assert frac[masked].min() >= 0.09 and frac[masked].max() <= 0.5
  assert 0.27 < frac[masked].mean() < 0.32  # ratio uniform in (0.1, 0.5)
  assert not masking.crop_mask(14, 14, rng, probability=0.0).any()
  assert masking.crop_mask(14, 14, rng, probability=1.0, ratio=(0.5, 0.5)).sum() > 80


def test_gram_crops_share_the_global_crop():
  """With a Gram crop size the global crop is cut once at max(G, R): both
  views show the same region (the Gram one sharper), with or without the
  shared distortions; at R == G the global crops are the old ones, byte for byte."""
  from PIL import Image
  coarse = (np.random.default_rng(3).random((8, 10)) * 255).astype(np.uint8)
  pixels = np.asarray(Image.fromarray(coarse).resize((80, 64), Image.Resampling.BICUBIC))
  kw = dict(global_crop_size=16, local_crop_size=8, num_local_crops=1, patch_size=8)
  plain = multicrop.MultiCrop(**kw)(pixels, np.random.default_rng(7))
  same = multicrop.MultiCrop(**kw, gram_crop_size=16)(pixels, np.random.default_rng(7))
  np.testing.assert_array_equal(same["global_crops"], plain["global_crops"])
  np.testing.assert_array_equal(same["gram_crops"], plain["global_crops"])
  assert "gram_crops" not in plain
  corr = lambda a, b: np.corrcoef(a[..., 0].ravel().astype(float),
                                  b[..., 0].ravel().astype(float))[0, 1]
  for no_distortions in (False, True):
    for seed in range(4):
      out = multicrop.MultiCrop(**kw, gram_crop_size=32, gram_no_distortions=no_distortions)(
          pixels, np.random.default_rng(seed))
      assert out["gram_crops"].shape == (2, 32, 32, 3) and out["gram_crops"].dtype == np.uint8
      g, r = out["global_crops"][0], out["gram_crops"][0]   # crop 1: no solarisation
      down = multicrop.resize(r, 16)
      # The Gram crop brought down to 16 px shows the global crop's region
      # (through the global crop's own blur when the distortions are not shared).
      assert corr(down, g) > (0.7 if no_distortions else 0.95), (seed, corr(down, g))
      if not no_distortions:   # shared distortions: the same pixels, up to resizing
        assert np.abs(down.astype(float) - g).mean() < 8
