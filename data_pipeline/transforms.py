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
from PIL import Image, ImageEnhance

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


def resized_crop(pixels: np.ndarray | Image.Image, box: tuple[int, int, int, int],
                 size: int | tuple[int, int]) -> np.ndarray:
  """Crop `box` (top, left, h, w) of uint8 pixels (or a PIL image) and resize
  to `size` with bicubic filtering.

  PIL resizes from the box directly (one pass, antialiased like torchvision's
  PIL path), which is both faster and sharper than crop-then-resize.
  """
  out_h, out_w = (size, size) if isinstance(size, int) else size
  top, left, h, w = box
  im = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
  im = im.resize((out_w, out_h), Image.Resampling.BICUBIC,
                 box=(left, top, left + w, top + h))
  return np.asarray(im)


def rows_read(box: tuple[int, int, int, int], out_h: int, height: int) -> int:
  """How many rows from the top of a `height`-row image the bicubic
  resized_crop of `box` to `out_h` rows reads: the box and the filter's reach
  below it (PIL's support, 2 px, times the downscale factor)."""
  top, _, h, _ = box
  support = 2.0 * max(h / out_h, 1.0)
  return min(height, math.ceil(top + h + support) + 1)


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
  """uint8 (..., 3) -> float32 (pixels / 255 - mean) / std."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  if pixels.dtype != np.uint8:
    return (pixels.astype(np.float32) * np.float32(1 / 255) - mean) / std
  # A 256 x 3 lookup table is one gather instead of four float passes, with
  # the same float32 arithmetic per value (so bit-identical).
  lut = (np.arange(256, dtype=np.float32)[:, None] * np.float32(1 / 255) - mean) / std
  index = pixels.astype(np.uint16) * 3 + np.arange(3, dtype=np.uint16)
  return np.take(lut.reshape(-1), index)


# --- photometric ops (the DINOv2 recipe; torchvision's PIL path) --------------
# They take and return uint8 (H, W, 3), or (H, W) for a grey image kept in one
# channel. Each treats the channels alike, so a grey image (three equal
# channels) stays grey through all of them.

def is_grey(pixels: np.ndarray) -> bool:
  """Whether the three channels of an (H, W, 3) image are equal."""
  return bool((pixels[..., 0] == pixels[..., 1]).all()
              and (pixels[..., 1] == pixels[..., 2]).all())


# The jitter ops work on PIL images so a chain of them converts to and from
# numpy once; the numpy-facing adjust_* wrap them.

def _brightness(im: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Brightness(im).enhance(factor)


def _contrast(im: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Contrast(im).enhance(factor)


def _saturation(im: Image.Image, factor: float) -> Image.Image:
  if im.mode == "L":  # one grey channel: nothing to saturate
    return im
  return ImageEnhance.Color(im).enhance(factor)


def _hue(im: Image.Image, factor: float) -> Image.Image:
  if not -0.5 <= factor <= 0.5:
    raise ValueError(f"hue factor {factor} not in [-0.5, 0.5]")
  shift = int(round(factor * 255)) % 256
  # Skip the lossy uint8 HSV round trip where it changes nothing: no shift, or
  # a grey image (most medical images), where it is also the costly part.
  if shift == 0 or im.mode != "RGB" or is_grey(np.asarray(im)):
    return im
  h, s, v = im.convert("HSV").split()
  # uint8 addition wraps around, which is what a hue rotation wants.
  h = Image.fromarray(np.asarray(h, np.uint8) + np.uint8(shift))
  return Image.merge("HSV", (h, s, v)).convert("RGB")


def adjust_brightness(pixels: np.ndarray, factor: float) -> np.ndarray:
  """Scale towards black (factor < 1) or brighter (> 1), clipped."""
  return np.asarray(_brightness(Image.fromarray(pixels), factor))


def adjust_contrast(pixels: np.ndarray, factor: float) -> np.ndarray:
  """Blend with the image's mean grey level."""
  return np.asarray(_contrast(Image.fromarray(pixels), factor))


def adjust_saturation(pixels: np.ndarray, factor: float) -> np.ndarray:
  """Blend with the image's own grey version (PIL's luma weights sum to exactly
  one in its fixed-point maths, so a grey image is its own grey version)."""
  return np.asarray(_saturation(Image.fromarray(pixels), factor))


def adjust_hue(pixels: np.ndarray, factor: float) -> np.ndarray:
  """Rotate the hue by `factor` turns (in [-0.5, 0.5]) in PIL's uint8 HSV, as
  torchvision does for PIL images. Grey pixels have saturation 0, so they
  convert back to grey whatever the hue."""
  return np.asarray(_hue(Image.fromarray(pixels), factor))


def color_jitter(pixels: np.ndarray, rng: np.random.Generator, *,
                 brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1,
                 p: float = 0.8) -> np.ndarray:
  """With probability `p`, brightness, contrast, saturation and hue jitter in a
  random order, as torchvision's RandomApply(ColorJitter) does.

  Factors are uniform in [1 - x, 1 + x] (hue: [-hue, hue]). Always draws the
  same count of numbers, so later draws do not depend on `p` or on the outcome.
  """
  apply = rng.random() < p
  order = rng.permutation(4)
  factors = (rng.uniform(max(0.0, 1 - brightness), 1 + brightness),
             rng.uniform(max(0.0, 1 - contrast), 1 + contrast),
             rng.uniform(max(0.0, 1 - saturation), 1 + saturation),
             rng.uniform(-hue, hue))
  if not apply:
    return pixels
  ops = (_brightness, _contrast, _saturation, _hue)
  im = Image.fromarray(pixels)
  for i in order:
    im = ops[i](im, factors[i])
  return np.asarray(im)


def grayscale(pixels: np.ndarray) -> np.ndarray:
  """(H, W, 3) -> luma repeated in three channels; (H, W) grey passes through."""
  if pixels.ndim == 2:
    return pixels
  return to_rgb(np.asarray(Image.fromarray(pixels).convert("L")))


def random_grayscale(pixels: np.ndarray, rng: np.random.Generator,
                     p: float = 0.2) -> np.ndarray:
  return grayscale(pixels) if rng.random() < p else pixels


def gaussian_blur(pixels: np.ndarray, sigma: float, kernel_size: int = 9) -> np.ndarray:
  """Separable Gaussian blur with a `kernel_size` kernel and reflected borders
  (torchvision's GaussianBlur, which DINOv2 uses with kernel 9), rounded back
  to uint8. Works on (H, W) and (H, W, C)."""
  if pixels.ndim == 3:
    # Plane by plane: contiguous slices make this ~2x faster than blurring
    # the interleaved channels at once (it is a hot spot of multi-crop).
    return np.stack([gaussian_blur(np.ascontiguousarray(pixels[..., c]), sigma, kernel_size)
                     for c in range(pixels.shape[-1])], axis=-1)
  half = kernel_size // 2
  x = np.arange(-half, half + 1, dtype=np.float32)
  k = np.exp(-0.5 * (x / np.float32(sigma)) ** 2)
  k /= k.sum()
  h, w = pixels.shape
  img = np.pad(pixels, half, mode="reflect").astype(np.float32)
  rows = np.multiply(img[:h], k[0])
  tmp = np.empty_like(rows)
  for i in range(1, kernel_size):
    rows += np.multiply(img[i:i + h], k[i], out=tmp)
  out = np.multiply(rows[:, :w], k[0])
  tmp = np.empty_like(out)
  for i in range(1, kernel_size):
    out += np.multiply(rows[:, i:i + w], k[i], out=tmp)
  np.rint(out, out=out)
  np.clip(out, 0, 255, out=out)
  return out.astype(np.uint8)


def random_gaussian_blur(pixels: np.ndarray, rng: np.random.Generator, p: float,
                         sigma: Sequence[float] = (0.1, 2.0)) -> np.ndarray:
  """With probability `p`, blur with sigma uniform in `sigma` (always draws both)."""
  apply = rng.random() < p
  s = rng.uniform(sigma[0], sigma[1])
  return gaussian_blur(pixels, s) if apply else pixels


def solarize(pixels: np.ndarray, threshold: int = 128) -> np.ndarray:
  """Invert the pixels at or above `threshold`."""
  return np.where(pixels >= threshold, 255 - pixels, pixels).astype(np.uint8)


def random_solarize(pixels: np.ndarray, rng: np.random.Generator, p: float,
                    threshold: int = 128) -> np.ndarray:
  return solarize(pixels, threshold) if rng.random() < p else pixels
