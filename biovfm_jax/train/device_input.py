"""Pretraining batches on the devices: normalised there, sent there ahead.

The loader (data_pipeline/loader.py) yields uint8 pixels, a quarter of
float32's bytes over the host-to-device link; the train step and the sample
images normalise them here, the one place that does. `Prefetch` issues each
batch's transfer a few steps ahead of the step that takes it.
"""
from __future__ import annotations

import collections
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The pixel arrays of the pretraining batches (MAE's one crop, DINOv2's views,
# DINOv3's Gram teacher crops).
PIXEL_KEYS = ("image", "global_crops", "local_crops", "gram_crops")


def normalize(batch: dict, mean: Sequence[float], std: Sequence[float]) -> dict:
  """`batch` with its uint8 pixel arrays as float32 (x / 255 - mean) / std
  (torchvision's ToTensor then Normalize); other arrays, and pixels already
  float (taken as normalised), pass through."""
  out = dict(batch)
  m, s = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  for k in PIXEL_KEYS:
    if k in out and out[k].dtype == jnp.uint8:
      out[k] = (out[k].astype(jnp.float32) / 255.0 - m) / s
  return out


class Prefetch:
  """Host batches -> global device batches, `depth` transfers in flight.

  Each batch's make_array_from_process_local_data (an asynchronous copy) is
  issued `depth` batches before the step that takes it, so that step finds
  its input on the device. Order is the host iterator's: what a step gets does
  not depend on `depth` (0 transfers each batch when asked for). close() drops
  the batches in flight and closes the host iterator.
  """

  def __init__(self, batches, sharding, depth: int):
    self._batches, self._sharding = batches, sharding
    self._depth = max(0, int(depth))
    self._ahead: collections.deque = collections.deque()

  def __iter__(self):
    return self

  def _put(self) -> bool:
    local = next(self._batches, None)
    if local is None:
      return False
    self._ahead.append({k: jax.make_array_from_process_local_data(self._sharding, np.asarray(v))
                        for k, v in local.items()})
    return True

  def __next__(self) -> dict:
    if not self._ahead and not self._put():
      raise StopIteration
    batch = self._ahead.popleft()
    while len(self._ahead) < self._depth and self._put():
      pass
    return batch

  def close(self) -> None:
    self._ahead.clear()
    close = getattr(self._batches, "close", None)
    if close:
      close()
