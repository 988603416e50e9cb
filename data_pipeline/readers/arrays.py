"""Array stacks: NumPy `.npy` files (memory-mapped) and what the HDF5 reader shares.

A stack is an array whose first axis (after `axis` is moved there) counts
images: (N, H, W) grey slices such as FastMRI's reconstructions, or
(N, H, W, C) colour images such as PatchCamelyon's patches; a 2D array is one
image. Images are read one at a time from the file, never the whole array.

Big stacks are split into parts of `PART_IMAGES` images, each an input of its
own (`<file>::<start>-<stop>`), so an ingestion worker holds one part's records
at a time: PatchCamelyon's 262,144 patches are one file.

Intensity: uint8 stays as it is; other types get one percentile window per
file (from an evenly spaced sample of its images, so every part of a file
gets the same window) or, with `window_scope = "slice"`, one per image.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from data_pipeline.readers import common
from data_pipeline.readers.common import Item, ReaderError
from data_pipeline.readers.images import apply_window, is_near_constant, percentile_window

EXTENSIONS = (".npy",)
PART_IMAGES = 1024          # images per input part of a big stack
_WINDOW_SAMPLE = 16         # images sampled for a file's percentile window

STACK_OPTIONS = {
    "stride": common.Option(1, common.positive_int, "every n-th image of the stack"),
    "skip_empty": common.Option(True, common.boolean, "drop near-constant images"),
    "empty_fraction": common.Option(0.02, common.fraction,
                                    "an image with fewer differing pixels is empty"),
    **common.PERCENTILES,
    "window_scope": common.Option("file", common.choice("file", "slice"),
                                  "one percentile window per file, or one per image"),
    "max_pixels": common.MAX_PIXELS_OPTION,
}
OPTIONS = {**STACK_OPTIONS,
           "axis": common.Option(0, common.choice(0, 1, 2),
                                 "axis of a 3D array that counts its slices")}

_PART = re.compile(r"^(?P<file>.+)::(?P<start>\d+)-(?P<stop>\d+)$")


def split_part(path: str) -> tuple[str, int | None, int | None]:
  """'<file>::<start>-<stop>' -> (file, start, stop); a plain file -> (file, None, None)."""
  m = _PART.match(path)
  if m and not os.path.exists(path):
    return m["file"], int(m["start"]), int(m["stop"])
  return path, None, None


def part_names(path: str, count: int) -> list[str]:
  """The inputs one file of `count` images becomes: itself, or its parts."""
  if count <= PART_IMAGES:
    return [path]
  return [f"{path}::{a}-{min(a + PART_IMAGES, count)}" for a in range(0, count, PART_IMAGES)]


def stack_shape(shape: tuple[int, ...], path: str) -> tuple[int, tuple[int, ...]]:
  """(images, shape of one image) of an array laid out as a stack."""
  if len(shape) == 2 or (len(shape) == 3 and shape[-1] in (3, 4)):
    return 1, shape  # one image (a stack of 3-pixel-wide images would make no sense)
  if len(shape) == 3:
    return shape[0], shape[1:]
  if len(shape) == 4 and shape[-1] in (1, 3, 4):
    return shape[0], shape[1:]
  raise ReaderError(f"{path}: array of shape {shape} is not an image stack "
                    "((H, W), (N, H, W) or (N, H, W, C) with C in 1, 3, 4, or (H, W, C))")


def _to_pixels(a: np.ndarray, window: tuple[float, float] | None, path: str) -> tuple:
  """One image -> (uint8 (H, W) or (H, W, 3), transform text)."""
  if a.ndim == 3:
    a = a[..., 0] if a.shape[-1] == 1 else a[..., :3]
  if a.dtype == np.uint8:
    return np.ascontiguousarray(a), "none"
  if a.dtype == np.bool_:
    return a.astype(np.uint8) * 255, "bool -> 0/255"
  lo, hi = window if window is not None else percentile_window(a)
  return apply_window(a, lo, hi), f"{a.dtype} window [{lo:g}, {hi:g}] -> uint8"


def read_stack(path: str, array: Any, opts: dict[str, Any], label: Any = None,
               start: int | None = None, stop: int | None = None) -> Iterator[Item]:
  """The images `start..stop` (every `stride`-th of the whole stack) of `array`,
  which indexes like a NumPy array (np.memmap, h5py.Dataset) and is read one
  image at a time; index = [label, image] (or the image number alone)."""
  n, one = stack_shape(tuple(int(s) for s in array.shape), path)
  if int(np.prod(one)) > opts["max_pixels"]:
    raise ReaderError(f"{path}: one image of shape {one} exceeds max_pixels "
                      f"{opts['max_pixels']:,}; not read")
  single = len(one) == len(array.shape)
  get: Callable[[int], np.ndarray] = (lambda i: np.asarray(array)) if single else (
      lambda i: np.asarray(array[i]))
  if np.dtype(array.dtype).kind not in "iufb":
    raise ReaderError(f"{path}: {array.dtype} data is not an image (complex k-space? read a "
                      "reconstruction instead)")
  window = None
  if np.dtype(array.dtype) not in (np.uint8, np.bool_) and opts["window_scope"] == "file":
    picks = np.unique(np.linspace(0, n - 1, min(n, _WINDOW_SAMPLE)).astype(int))
    sample = np.stack([get(int(i)) for i in picks])
    window = percentile_window(sample, opts["low_pct"], opts["high_pct"])
  first = 0 if start is None else start
  first += -first % opts["stride"]  # parts keep the whole stack's stride
  for i in range(first, n if stop is None else min(stop, n), opts["stride"]):
    try:
      raw = get(i)
    except Exception as e:  # h5py/np raise several types for damaged data
      raise ReaderError(f"{path}: cannot read image {i}: {type(e).__name__}: {e}") from e
    if window is None and raw.dtype not in (np.uint8, np.bool_):
      lo_hi = percentile_window(raw, opts["low_pct"], opts["high_pct"])
    else:
      lo_hi = window
    pixels, text = _to_pixels(raw, lo_hi, path)
    if opts["skip_empty"] and is_near_constant(pixels, min_fraction=opts["empty_fraction"]):
      continue
    yield pixels, common.meta(path, i if label is None else [label, i], pixels, text)


def count(path: str, options: dict[str, Any] | None = None) -> int:
  """Images in a .npy file (from its header; nothing else is read)."""
  opts = common.validate(OPTIONS, "npy", options, path)
  return stack_shape(_open(path, opts["axis"]).shape, path)[0]


def _open(path: str, axis: int) -> np.ndarray:
  try:
    a = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise ReaderError(f"{path}: not a readable .npy array: {e}") from e
  if not isinstance(a, np.ndarray):
    raise ReaderError(f"{path}: holds no array")
  if a.ndim == 3 and axis:
    a = np.moveaxis(a, axis, 0)  # a view of the memory map: still nothing read
  return a


def read(path: str, options: dict[str, Any] | None = None) -> Iterator[Item]:
  """Images of a memory-mapped .npy stack (see the module doc); a part name
  `<file>::<start>-<stop>` reads those images only."""
  path = os.fspath(path)
  file, start, stop = split_part(path)
  opts = common.validate(OPTIONS, "npy", options, file)
  common.check_file(file)
  kept = 0
  for item in read_stack(file, _open(file, opts["axis"]), opts, None, start, stop):
    kept += 1
    yield item
  if not kept:
    raise ReaderError(f"{path}: no image kept: every image is near-constant (skip_empty)")
