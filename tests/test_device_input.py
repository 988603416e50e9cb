"""Batches on the device: uint8 pixels normalised there as the host did it
before (ToTensor + Normalize), and the prefetch keeps the loader's order."""
import jax
import numpy as np

from biovfm_jax.train import device_input, loop
from biovfm_jax.train import state as state_lib
from data_pipeline import transforms
from test_train_units import tiny_config

MEAN, STD = transforms.IMAGENET_MEAN, transforms.IMAGENET_STD


def test_normalize_is_the_host_arithmetic_in_float32():
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8),
           "global_crops": np.arange(256, dtype=np.uint8).reshape(2, 2, 8, 8, 1).repeat(3, -1),
           "masks": np.ones((4, 16), bool), "skipped": np.zeros(4, np.int32)}
  out = jax.jit(lambda b: device_input.normalize(b, MEAN, STD))(batch)
  for k in ("image", "global_crops"):
    assert out[k].dtype == np.float32
    # XLA may fuse the subtract or take 1/std once: a few float32 ulps.
    np.testing.assert_allclose(out[k], transforms.normalize(batch[k], MEAN, STD),
                               rtol=0, atol=1e-6)
  np.testing.assert_array_equal(out["masks"], batch["masks"])
  assert out["skipped"].dtype == np.int32
  # Pixels already float are taken as normalised.
  x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  np.testing.assert_array_equal(device_input.normalize({"image": x}, MEAN, STD)["image"], x)


def test_the_step_on_uint8_equals_the_step_on_host_normalised_pixels():
  c = tiny_config()
  s = loop.build(c, num_records=100)
  pixels = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  losses = []
  for image in (pixels, transforms.normalize(pixels, c.data.mean, c.data.std)):
    state = state_lib.create_state(s.spec, s.tx, s.objective, s.shardings)
    batch = {"image": jax.device_put(image, s.batch_sharding),
             "skipped": jax.device_put(np.zeros(16, np.int32), s.batch_sharding)}
    _, m = s.train_step(state, batch)
    losses.append(float(m["loss"]))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


class _Host:
  def __init__(self, n):
    self.items = iter([{"image": np.full((8, 2), i, np.uint8)} for i in range(n)])
    self.taken, self.closed = 0, False

  def __iter__(self):
    return self

  def __next__(self):
    self.taken += 1
    return next(self.items)

  def close(self):
    self.closed = True


def test_prefetch_keeps_order_runs_ahead_and_closes():
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("b",)),
                                        jax.sharding.PartitionSpec("b"))
  for depth in (0, 1, 2):
    host = _Host(5)
    it = device_input.Prefetch(host, sharding, depth)
    first = next(it)
    assert isinstance(first["image"], jax.Array) and first["image"].sharding == sharding
    assert host.taken == 1 + depth  # the next `depth` transfers are issued already
    got = [int(first["image"][0, 0])] + [int(b["image"][0, 0]) for b in it]
    assert got == [0, 1, 2, 3, 4]
    it.close()
    assert host.closed
