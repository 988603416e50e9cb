"""Per-example image ops for grain pipelines, in numpy and PIL.

They run in grain worker processes, so they never touch jax. Randomness always
comes from an explicit `np.random.Generator`, which the loader seeds from the
example's global position; that is what makes the input resumable.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from data_pipeline.records import read_record

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode(raw: bytes) -> tuple[np.ndarray, dict[str, Any]]:
  """Record bytes -> (uint8 pixels, header). Raises records.CorruptRecordError."""
  return read_record(raw)


def to_rgb(pixels: np.ndarray) -> np.ndarray:
  """(H, W) or (H, W, 1) grey -> (H, W, 3); colour passes through."""
  if pixels.ndim == 3 and pixels.shape[-1] == 3:
    return pixels
  if pixels.ndim == 3 and pixels.shape[-1] == 1:
    pixels = pixels[..., 0]
  if pixels.ndim != 2:
    raise ValueError(f"to_rgb wants (H, W), (H, W, 1) or (H, W, 3), got {pixels.shape}")
  return np.repeat(pixels[..., None], 3, axis=-1)


def sample_crop_box(height: int, width: int, scale: Sequence[float],
                    ratio: Sequence[float],
                    rng: np.random.Generator) -> tuple[int, int, int, int]:
  """(top, left, h, w) of a random crop, the torchvision RandomResizedCrop way.

  Ten tries at an area fraction uniform in `scale` and an aspect ratio (w / h)
  log-uniform in `ratio`; if none fits, a centre crop at the nearest allowed
  aspect ratio.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(pixels: np.ndarray, box: tuple[int, int, int, int],
                 size: int | tuple[int, int]) -> np.ndarray:
  """Crop `box` (top, left, h, w) and resize to `size` with bicubic filtering.

  PIL resizes from the box directly (one pass, antialiased like torchvision's
  PIL path), which is both faster and sharper than crop-then-resize.
  """
  out_h, out_w = (size, size) if isinstance(size, int) else size
  top, left, h, w = box
  im = Image.fromarray(pixels)
  im = im.resize((out_w, out_h), Image.Resampling.BICUBIC,
                 box=(left, top, left + w, top + h))
  return np.asarray(im)


def random_resized_crop(pixels: np.ndarray, size: int | tuple[int, int],
                        scale: Sequence[float] = (0.2, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3), *,
                        rng: np.random.Generator) -> np.ndarray:
  """RandomResizedCrop: a random box (see `sample_crop_box`) resized to `size`."""
  box = sample_crop_box(pixels.shape[0], pixels.shape[1], scale, ratio, rng)
  return resized_crop(pixels, box, size)


def random_hflip(pixels: np.ndarray, rng: np.random.Generator,
                 p: float = 0.5) -> np.ndarray:
  """Mirror left-right with probability `p` (always draws one number, so the
  generator's later draws do not depend on `p`)."""
  return pixels[:, ::-1] if rng.random() < p else pixels


def normalize(pixels: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
  """uint8 (H, W, 3) -> float32 (pixels / 255 - mean) / std."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (pixels.astype(np.float32) * np.float32(1 / 255) - mean) / std
