"""Image reader (PNG/JPEG/TIFF/BMP/GIF) and the pixel helpers all readers share.

Pixels are uint8, (H, W) for grayscale or (H, W, 3) for colour.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, ImageSequence

from data_pipeline.readers import common
from data_pipeline.readers.common import Item, ReaderError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# Percentiles need not see every voxel of a big volume; a strided sample of
# this many values gives the same window to well under one grey level.
_PERCENTILE_SAMPLE = 1 << 22


def percentile_window(array: np.ndarray, low_pct: float = 0.5,
                      high_pct: float = 99.5) -> tuple[float, float]:
  """The (low, high) intensity percentiles of the finite values of `array`."""
  if not 0.0 <= low_pct < high_pct <= 100.0:
    raise ValueError(f"need 0 <= low_pct < high_pct <= 100, got {low_pct}, {high_pct}")
  flat = np.asarray(array).ravel(order="K")  # a view when contiguous in any order
  if flat.size > _PERCENTILE_SAMPLE:
    flat = flat[::flat.size // _PERCENTILE_SAMPLE + 1]
  flat = flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat
  if flat.size == 0:
    return 0.0, 0.0
  lo, hi = np.percentile(flat, [low_pct, high_pct])
  return float(lo), float(hi)


def apply_window(array: np.ndarray, low: float, high: float) -> np.ndarray:
  """Linear map of [low, high] onto [0, 255], clipped, as uint8.

  An empty window (high <= low: a constant image) maps everything to 0.
  """
  a = np.asarray(array, dtype=np.float32)
  if high <= low:
    return np.zeros(a.shape, np.uint8)
  scaled = (a - np.float32(low)) * np.float32(255.0 / (high - low))
  scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
  return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


def to_uint8(array: np.ndarray, low_pct: float = 0.5,
             high_pct: float = 99.5) -> np.ndarray:
  """Percentile intensity scaling to uint8; (0, 100) is plain min-max scaling."""
  return apply_window(array, *percentile_window(array, low_pct, high_pct))


def is_near_constant(pixels: np.ndarray, tol: int = 8,
                     min_fraction: float = 0.02) -> bool:
  """True when fewer than `min_fraction` of the pixels differ from the median by
  more than `tol` grey levels: a blank slice, or background with a speck."""
  p = np.asarray(pixels)
  if p.ndim == 3:
    p = p.mean(axis=-1)
  if p.dtype == np.uint8:
    # Median from the histogram: much faster than a sort for uint8.
    counts = np.bincount(p.ravel(), minlength=256)
    median = int(np.searchsorted(np.cumsum(counts), (p.size + 1) // 2))
    lo, hi = max(0, median - tol), min(255, median + tol)
    return 1.0 - counts[lo:hi + 1].sum() / p.size < min_fraction
  p = p.astype(np.float32)
  differs = np.abs(p - np.median(p)) > tol
  return float(differs.mean()) < min_fraction


def squeeze_gray(pixels: np.ndarray) -> np.ndarray:
  """(H, W, 3) with three equal channels -> (H, W); otherwise unchanged."""
  if (pixels.ndim == 3 and pixels.shape[-1] == 3
      and np.array_equal(pixels[..., 0], pixels[..., 1])
      and np.array_equal(pixels[..., 0], pixels[..., 2])):
    return np.ascontiguousarray(pixels[..., 0])
  return pixels


def resize_max(pixels: np.ndarray, max_side: int) -> np.ndarray:
  """Downscale (never upscale) so the longer side is at most `max_side`."""
  h, w = pixels.shape[:2]
  if max(h, w) <= max_side:
    return pixels
  f = max_side / max(h, w)
  size = (max(1, round(w * f)), max(1, round(h * f)))
  return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))


def resize_scale(pixels: np.ndarray, scale: float) -> np.ndarray:
  """Resize uint8 pixels by `scale` (bicubic up, Lanczos down)."""
  if scale == 1.0:
    return pixels
  h, w = pixels.shape[:2]
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  method = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
  return np.asarray(Image.fromarray(pixels).resize(size, method))


def tile_starts(length: int, size: int, stride: int) -> list[int]:
  """Start offsets of windows of `size` every `stride` along `length`; a last
  window flush with the end is added so the whole length is covered."""
  if length <= size:
    return [0]
  starts = list(range(0, length - size + 1, stride))
  if starts[-1] != length - size:
    starts.append(length - size)
  return starts


def tile(image: np.ndarray, size: int,
         stride: int | None = None) -> list[tuple[tuple[int, int], np.ndarray]]:
  """Cut `image` into `size` x `size` crops every `stride` pixels (default: no
  overlap). Returns `[((y, x), crop), ...]` in row-major order.

  Edge crops are shifted inwards rather than padded, so every crop is real
  image. An image shorter than `size` along an axis keeps its full extent there.
  """
  if size <= 0:
    raise ValueError(f"tile size must be positive, got {size}")
  stride = size if stride is None else stride
  if stride <= 0:
    raise ValueError(f"tile stride must be positive, got {stride}")
  h, w = image.shape[:2]
  return [((y, x), image[y:y + size, x:x + size])
          for y in tile_starts(h, size, stride) for x in tile_starts(w, size, stride)]


def _pil_to_uint8(im: Image.Image, low_pct: float,
                  high_pct: float) -> tuple[np.ndarray, str]:
  """One PIL frame -> (uint8 pixels, description of the intensity transform)."""
  mode = im.mode
  if mode in ("L", "RGB"):
    return squeeze_gray(np.asarray(im)), "none"
  if mode in ("1", "LA", "La"):
    return np.asarray(im.convert("L")), f"{mode}->L"
  if mode in ("P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
    return squeeze_gray(np.asarray(im.convert("RGB"))), f"{mode}->RGB"
  # 16-bit and 32-bit integer or float grey levels: the range is arbitrary
  # (12-bit cameras, float exports), so scale by percentiles.
  a = np.asarray(im)
  if a.dtype.byteorder not in ("=", "|"):
    a = a.astype(a.dtype.newbyteorder("="))
  lo, hi = percentile_window(a, low_pct, high_pct)
  return apply_window(a, lo, hi), (
      f"{mode} percentile {low_pct}-{high_pct} window [{lo:g}, {hi:g}] -> uint8")


def _tifffile_pages(path: str, low_pct: float,
                    high_pct: float) -> list[tuple[np.ndarray, str]]:
  """Fallback for TIFFs PIL cannot open (16-bit RGB, multi-sample float)."""
  import tifffile  # pylint: disable=import-outside-toplevel
  out = []
  with tifffile.TiffFile(path) as tif:
    for page in tif.pages:
      a = page.asarray()
      if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
        a = np.moveaxis(a, 0, -1)  # planar (C, H, W) -> (H, W, C)
      if a.ndim == 3:
        a = a[..., :3] if a.shape[-1] >= 3 else a[..., 0]
      if a.ndim != 2 and not (a.ndim == 3 and a.shape[-1] == 3):
        raise ReaderError(f"{path}: unsupported TIFF page shape {a.shape}")
      if a.dtype == np.uint8:
        out.append((squeeze_gray(a), "none (tifffile)"))
      else:
        lo, hi = percentile_window(a, low_pct, high_pct)
        out.append((squeeze_gray(apply_window(a, lo, hi)),
                    f"{a.dtype} percentile {low_pct}-{high_pct} window "
                    f"[{lo:g}, {hi:g}] -> uint8 (tifffile)"))
  return out


def load_image(path: str | os.PathLike | io.BytesIO, low_pct: float = 0.5,
               high_pct: float = 99.5) -> list[tuple[np.ndarray, str]]:
  """Every frame (page) of an image file as `(uint8 pixels, transform text)`.

  8-bit images keep their values; 16/32-bit and float images are scaled by the
  `low_pct`..`high_pct` percentiles (0, 100 gives min-max). EXIF orientation is
  applied. Colour images whose channels are equal come back as (H, W).
  """
  path = path if hasattr(path, "read") else os.fspath(path)  # a file, or bytes in memory
  try:
    with Image.open(path) as im:
      frames = []
      for frame in ImageSequence.Iterator(im):
        if _pil_drops_bits(frame):
          raise ValueError(f"PIL reads {frame.mode} with >8 bits per sample as 8-bit")
        frame = ImageOps.exif_transpose(frame) if frame.getexif() else frame
        frames.append(_pil_to_uint8(frame, low_pct, high_pct))
      return frames
  except (OSError, ValueError, SyntaxError) as e:
    if isinstance(path, str) and path.lower().endswith((".tif", ".tiff")):
      try:
        return _tifffile_pages(path, low_pct, high_pct)
      except ImportError:
        pass
      except Exception as e2:  # tifffile raises many types for bad files
        raise ReaderError(f"{path}: cannot read image: {e}; tifffile: {e2}") from e2
    raise ReaderError(f"{path}: cannot read image: {e}") from e


def _pil_drops_bits(im: Image.Image) -> bool:
  """PIL opens 16-bit colour TIFFs as 8-bit RGB, keeping only the high byte."""
  tags = getattr(im, "tag_v2", None)
  if tags is None or im.mode not in ("RGB", "RGBA", "RGBX", "CMYK"):
    return False
  bits = tags.get(258, 8)
  return max(bits if isinstance(bits, tuple) else (bits,)) > 8


def list_files(root: str | os.PathLike, extensions: Sequence[str] | None = None,
               recursive: bool = True) -> list[str]:
  """Sorted files under `root` (a file is returned as itself); `extensions`
  filters by lower-case suffix. Hidden files and folders are skipped."""
  root = os.fspath(root)
  if os.path.isfile(root):
    return [root]
  if not os.path.isdir(root):
    raise FileNotFoundError(f"no such file or folder: {root}")
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in sorted(filenames):
      if name.startswith("."):
        continue
      if extensions is None or name.lower().endswith(tuple(extensions)):
        found.append(os.path.join(dirpath, name))
    if not recursive:
      break
  return sorted(found)


OPTIONS = {**common.PERCENTILES, "frames": common.FRAMES}


def read(path: str, options: dict[str, Any] | None = None) -> Iterator[Item]:
  """Every page (frame) of a PNG/JPEG/TIFF/BMP file; index = page number."""
  path = os.fspath(path)
  opts = common.validate(OPTIONS, "image", options, path)
  common.check_file(path)
  try:
    frames = load_image(path, opts["low_pct"], opts["high_pct"])
  except ReaderError as e:
    raise ReaderError(_image_reason(path, common.detail(e, path))) from e
  except Image.DecompressionBombError as e:
    raise ReaderError(f"{path}: image too large: {e} (raise PIL.Image.MAX_IMAGE_PIXELS "
                      "to read it)") from e
  except Exception as e:  # memory, and what else a decoder may raise
    raise ReaderError(f"{path}: cannot read image: {type(e).__name__}: {e}") from e
  if not frames:
    raise ReaderError(f"{path}: image has no frames")
  if opts["frames"] == "first":
    frames = frames[:1]
  for i, (pixels, transform) in enumerate(frames):
    yield pixels, common.meta(path, i, pixels, transform)


def _image_reason(path: str, detail: str) -> str:
  """Say what a file that failed to load as an image actually is."""
  detail = detail.removeprefix("cannot read image: ")
  kind = common.sniff(path)
  if kind in common.IMAGE_KINDS:
    state = "truncated" if "truncated" in detail.lower() else "damaged"
    return f"{path}: {state} {kind}: {detail}"
  if kind is not None:
    return (f"{path}: not an image: the content is {kind} "
            f"(the name ends in {common.suffix(path) or 'no suffix'!r})")
  return f"{path}: not a readable image: {detail}"
