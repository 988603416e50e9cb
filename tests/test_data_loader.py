"""The pretraining loader (position = f(seed, step)) and the transforms under it."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from configs import mae_base
from data_pipeline import loader, records, selection, shards, transforms

N = 40


def cfg(spec, **kw):
  c = mae_base.get_config(None).data  # the recipe's keys; the test's values
  c.update(dict(shards=spec, image_size=16, crop_scale=(0.2, 1.0), hflip=True,
                mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD, num_workers=0,
                prefetch_buffer=2, read_threads=1,
                max_skipped_fraction=None), **kw)  # None: skip, never stop
  return c


def take(c, steps, **kw):
  it = loader.make_pretrain_loader(c, **kw)
  return [next(it) for _ in range(steps)]


def test_shapes_dtypes_and_uint8_pixels(shard_dir):
  b, = take(cfg(shard_dir), 1, global_batch_size=8, seed=0, process_count=1, process_index=0)
  # Pixels leave the host as uint8, not normalised: the train step does that.
  assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.uint8
  assert b["skipped"].shape == (8,) and b["skipped"].dtype == np.int32
  assert not b["skipped"].any()
  # Uniform noise records (smoothed by the downscale): about 127.5 per channel.
  np.testing.assert_allclose(b["image"].reshape(-1, 3).mean(0), 127.5, atol=8)
  # mean/std are the device's business: the host batch does not change with them.
  other, = take(cfg(shard_dir, mean=(0, 0, 0), std=(1, 1, 1)), 1, global_batch_size=8,
                seed=0, process_count=1, process_index=0)
  np.testing.assert_array_equal(other["image"], b["image"])
  # Grey records (even indices) come out with three equal channels.
  grey = [i for i in range(8) if np.ptp(b["image"][i], axis=-1).max() == 0]
  assert 0 < len(grey) < 8


def test_same_seed_same_batches_other_seed_differs(shard_dir):
  kw = dict(global_batch_size=8, process_count=1, process_index=0)
  a = take(cfg(shard_dir), 3, seed=7, **kw)
  b = take(cfg(shard_dir, read_threads=0, prefetch_buffer=0), 3, seed=7, **kw)
  c = take(cfg(shard_dir), 3, seed=8, **kw)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  assert not np.array_equal(a[0]["image"], a[1]["image"])


def test_resume_at_step_k_equals_uninterrupted(shard_dir):
  kw = dict(global_batch_size=8, seed=3, process_count=1, process_index=0)
  full = take(cfg(shard_dir), 8, **kw)  # 64 examples: crosses the epoch at 40
  resumed = take(cfg(shard_dir), 3, start_step=5, **kw)
  for x, y in zip(full[5:], resumed):
    np.testing.assert_array_equal(x["image"], y["image"])


@pytest.mark.parametrize("count", [2, 4])
def test_process_batches_concatenate_to_single_process_batch(shard_dir, count):
  one = take(cfg(shard_dir), 2, global_batch_size=8, seed=1, start_step=4,
             process_count=1, process_index=0)
  parts = [take(cfg(shard_dir), 2, global_batch_size=8, seed=1, start_step=4,
                process_count=count, process_index=i) for i in range(count)]
  for step in range(2):
    assert all(p[step]["image"].shape[0] == 8 // count for p in parts)
    joined = np.concatenate([p[step]["image"] for p in parts])
    np.testing.assert_array_equal(joined, one[step]["image"])


def test_each_epoch_is_a_permutation_of_all_records():
  for epoch in range(3):
    idx = [selection.record_index(epoch * N + k, 5, N) for k in range(N)]
    assert sorted(idx) == list(range(N))
  first = [selection.record_index(k, 5, N) for k in range(N)]
  second = [selection.record_index(N + k, 5, N) for k in range(N)]
  assert first != second and first != list(range(N))
  assert selection.record_index(0, 0, 1) == 0


def _write_with_corruption(path, good, bad_at):
  """Shard of the `good` records with junk records at positions `bad_at`;
  returns the layout (None for junk)."""
  writer = ArrayRecordWriter(path, "group_size:1")
  junk = [b"not a record", records.encode_record(b"\x89PNG broken", {"source": "x"}),
          records.MAGIC + b"\xff\xff\xff\xff{}"]
  good = list(good)
  out = []
  for pos in range(len(good) + len(bad_at)):
    rec = junk[pos % len(junk)] if pos in bad_at else good.pop(0)
    writer.write(rec)
    out.append(None if pos in bad_at else rec)
  writer.close()
  return out


def test_corrupt_records_are_skipped_and_counted(tmp_path):
  rng = np.random.default_rng(1)
  good = [records.make_record(rng.integers(0, 256, (24, 24), dtype=np.uint8)) for _ in range(12)]
  bad = {0, 3, 4, 5, 11}
  layout = _write_with_corruption(str(tmp_path / "c-00000.array_record"), good, bad)
  n = len(layout)
  c = cfg(str(tmp_path))
  assert loader.resolve(c).num_records == n == 17
  batches = take(c, 4, global_batch_size=n, seed=2, process_count=1, process_index=0)

  def expected_skips(e):
    r, k = selection.record_index(e, 2, n), 0
    while layout[(r + k) % n] is None:
      k += 1
    return k
  for step, b in enumerate(batches):
    want = [expected_skips(step * n + j) for j in range(n)]
    np.testing.assert_array_equal(b["skipped"], want)
    assert np.isfinite(b["image"]).all()
  # One epoch starts at each record once: the skips add up to run lengths.
  assert batches[0]["skipped"].sum() == 1 + (3 + 2 + 1) + 1
  # The substitute is the next good record.
  data = selection.resolve(str(tmp_path / "c-00000.array_record"), None)
  example = loader.PretrainExample(data, 2, image_size=8, crop_scale=(1, 1), crop_ratio=(1, 1),
                                   hflip=False)
  e = next(e for e in range(n) if selection.record_index(e, 2, n) == 3)
  pixels, skipped = example.read(e)
  assert skipped == 3
  np.testing.assert_array_equal(pixels, records.read_record(layout[6])[0])


def test_all_corrupt_raises_naming_the_spec(tmp_path):
  _write_with_corruption(str(tmp_path / "bad.array_record"), [], set(range(20)))
  with pytest.raises(RuntimeError, match=r"bad\.array_record.*none of 16"):
    take(cfg(str(tmp_path / "bad.array_record")), 1, global_batch_size=2, seed=0,
         process_count=1, process_index=0)


def test_bad_arguments(shard_dir):
  with pytest.raises(ValueError, match="multiple of the process count"):
    loader.make_pretrain_loader(cfg(shard_dir), global_batch_size=6, seed=0,
                                process_count=4, process_index=0)
  with pytest.raises(FileNotFoundError, match="no_such_dir"):
    loader.make_pretrain_loader(cfg("/no_such_dir"), global_batch_size=2, seed=0,
                                process_count=1, process_index=0)


def test_default_process_index_comes_from_jax(shard_dir):
  a = take(cfg(shard_dir), 1, global_batch_size=4, seed=0)
  b = take(cfg(shard_dir), 1, global_batch_size=4, seed=0, process_count=1, process_index=0)
  np.testing.assert_array_equal(a[0]["image"], b[0]["image"])


@pytest.mark.parametrize("fields", [
    dict(image_size=16),
    dict(base="dinov2_base", global_crop_size=32, local_crop_size=16, num_local_crops=2,
         patch_size=8)], ids=["single", "multicrop"])
def test_worker_processes_give_the_same_batches(shard_dir, tmp_path, fields):
  script = tmp_path / "mp_loader.py"
  script.write_text(textwrap.dedent(f"""
      import numpy as np
      import importlib
      from data_pipeline import loader

      def batches(workers):
        fields = dict({fields!r})
        base = importlib.import_module("configs." + fields.pop("base", "mae_base"))
        c = base.get_config(None).data
        c.update(dict(shards={shard_dir!r}, num_workers=workers, read_threads=1, **fields))
        it = loader.make_pretrain_loader(c, global_batch_size=4, seed=9, start_step=2,
                                         process_index=0, process_count=1)
        out = [next(it) for _ in range(5)]
        if hasattr(it, "close"):
          it.close()
        return out

      if __name__ == "__main__":
        a, b = batches(0), batches(2)
        same = all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
        print("SAME" if same else "DIFFERENT")
      """))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo)
  res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       env=env, timeout=240, cwd=repo)
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.strip().splitlines()[-1] == "SAME"


# --- transforms ------------------------------------------------------------------

def test_random_resized_crop_shapes_and_box_bounds():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
  assert transforms.random_resized_crop(img, 32, rng=rng).shape == (32, 32, 3)
  assert transforms.random_resized_crop(img[..., 0], (20, 30), rng=rng).shape == (20, 30)
  for _ in range(200):
    top, left, h, w = transforms.sample_crop_box(60, 90, (0.2, 1.0), (3 / 4, 4 / 3), rng)
    assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90
    assert 0.2 * 5400 * 0.9 <= h * w <= 5400
    assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_random_resized_crop_full_box_and_fallback():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (40, 40), dtype=np.uint8)
  # scale 1 and ratio 1 on a square image: the whole image, bicubic-resized.
  out = transforms.random_resized_crop(img, 24, (1.0, 1.0), (1.0, 1.0), rng=rng)
  ref = np.asarray(Image.fromarray(img).resize((24, 24), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(out, ref)
  # A 10x200 strip cannot hold a square of 90% of its area: centre crop fallback.
  assert transforms.sample_crop_box(10, 200, (0.9, 1.0), (1.0, 1.0), rng) == (0, 95, 10, 10)
  # A tall strip: the tallest allowed box (ratio 0.5), centred.
  assert transforms.sample_crop_box(200, 10, (0.9, 1.0), (0.5, 2.0), rng) == (90, 0, 20, 10)


def test_hflip_and_to_rgb_and_normalize():
  img = np.arange(12, dtype=np.uint8).reshape(3, 4)
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(transforms.random_hflip(img, rng, p=1.0), img[:, ::-1])
  np.testing.assert_array_equal(transforms.random_hflip(img, rng, p=0.0), img)
  flips = sum(transforms.random_hflip(img, rng)[0, 0] != 0 for _ in range(400))
  assert 150 < flips < 250
  rgb = transforms.to_rgb(img)
  assert rgb.shape == (3, 4, 3) and (rgb == img[..., None]).all()
  assert transforms.to_rgb(rgb) is rgb
  x = transforms.normalize(np.full((2, 2, 3), 255, np.uint8), (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
  assert x.dtype == np.float32
  np.testing.assert_allclose(x[0, 0], [2.0, 1.0, 0.5], rtol=1e-6)


def test_input_parallelism_from_the_host_cores_when_unset(monkeypatch):
  c = cfg("unused", num_workers=None, read_threads=None)
  for cores, want in ((1, (0, 1)), (2, (0, 2)), (8, (7, 2)), (200, (32, 2))):
    monkeypatch.setattr(loader, "host_cores", lambda n=cores: n)
    assert loader.input_parallelism(c) == want, cores
  c.update(dict(num_workers=0))  # in-process: one read thread per core, at most 16
  assert loader.input_parallelism(c) == (0, 16)
  c.update(dict(num_workers=3, read_threads=5))  # explicit values are kept
  assert loader.input_parallelism(c) == (3, 5)


def test_crop_first_partial_decode_gives_the_full_decodes_bytes(tmp_path):
  """The MAE crop decodes only the rows it reads (PNG) and crops grey in one
  channel: the bytes of decoding all, to RGB, then crop and flip. Records
  of 40 to 400 px, so boxes both up- and downscale; JPEG decodes whole."""
  rng = np.random.default_rng(3)
  recs = []
  for i in range(24):
    h, w = (int(x) for x in rng.integers(40, 400, 2))
    yy, xx = np.mgrid[:h, :w]
    img = ((np.sin(xx / 9) + np.cos(yy / 13)) * 50 + 128 + rng.normal(0, 8, (h, w))).clip(0, 255)
    img = img.astype(np.uint8)
    img = np.stack([img, img[::-1], 255 - img], -1) if i % 2 else img
    recs.append(records.make_record(img, fmt="jpeg" if i % 6 == 3 else "png"))
  # A PNG stops after the rows asked for (the rest black); JPEG gives all rows.
  for i, stops in ((0, True), (3, False)):
    top = np.asarray(records.decode_rows(records.open_image(records.decode_record(recs[i])[0]), 10))
    assert top[:10].any() and (top[10:].max() == 0) == stops
  shards.write_shards(recs, tmp_path, "p", records_per_shard=24)
  data = selection.resolve(str(tmp_path), None)
  for size, scale in ((32, (0.05, 1.0)), (224, (0.2, 1.0))):
    example = loader.PretrainExample(data, 5, image_size=size, crop_scale=scale,
                                     crop_ratio=(3 / 4, 4 / 3), hflip=True)
    for e in range(96):
      pixels, _ = example.read(e)
      rng = np.random.default_rng([5, e])
      want = transforms.random_resized_crop(transforms.to_rgb(pixels), size, scale,
                                            (3 / 4, 4 / 3), rng=rng)
      want = transforms.random_hflip(want, rng)
      got = example(e)["image"]
      assert got.dtype == np.uint8 and got.shape == (size, size, 3)
      np.testing.assert_array_equal(got, want, err_msg=f"example {e} at {size}")
