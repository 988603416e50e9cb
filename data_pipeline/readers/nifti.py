"""NIfTI (and other nibabel volume) reader: 3D/4D volumes -> 2D uint8 slices.

The volume is first put in the closest canonical (RAS+) orientation so that
axis 0 is sagittal, 1 coronal and 2 axial for every file. One percentile window
per volume keeps a volume's slices comparable. Each slice is rotated so the
second in-plane axis points up (superior, or anterior for axial slices), and
stretched to square pixels when the voxel spacing differs in-plane.
"""
from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from data_pipeline.readers import common
from data_pipeline.readers.common import Item, ReaderError
from data_pipeline.readers.images import apply_window, is_near_constant, percentile_window

EXTENSIONS = (".nii", ".nii.gz")

AXIS_NAMES = ("sagittal", "coronal", "axial")


def canonical_slice(volume: np.ndarray, axis: int, k: int) -> np.ndarray:
  """Slice `k` along `axis` of a RAS+ volume, rotated for display (top = up)."""
  # Basic indexing is a view; np.take copies and is slow on F-ordered volumes.
  return np.rot90(volume[(slice(None),) * axis + (k,)])


def resample_square(pixels: np.ndarray, row_mm: float, col_mm: float,
                  resample=Image.Resampling.BILINEAR) -> np.ndarray:
  """Resample so a pixel is as tall as it is wide (bilinear on uint8; nearest
  for label masks)."""
  if col_mm <= 0 or row_mm <= 0 or abs(row_mm / col_mm - 1.0) < 0.01:
    return pixels
  fine = min(row_mm, col_mm)
  h, w = pixels.shape
  size = (max(1, round(w * col_mm / fine)), max(1, round(h * row_mm / fine)))
  return np.asarray(Image.fromarray(pixels).resize(size, resample))


def load_volumes(path: str | os.PathLike, volumes: str = "first"):
  """(volume indices, read(v) -> float32 volume as stored, canonical(volume) -> its RAS+
  view, voxel sizes in mm of the RAS+ axes).

  4D files give their first volume, or each with `volumes="all"`; dimensions
  past the fourth are folded into the fourth. Volumes are read one at a time
  through nibabel's proxy and reoriented one at a time (nibabel's
  as_closest_canonical would load every volume of a 4D file at once), so
  memory holds one volume.
  """
  import nibabel  # pylint: disable=import-outside-toplevel
  from nibabel import orientations  # pylint: disable=import-outside-toplevel
  from nibabel.affines import voxel_sizes  # pylint: disable=import-outside-toplevel
  if volumes not in ("first", "all"):
    raise ValueError(f"volumes must be 'first' or 'all', got {volumes!r}")
  path = os.fspath(path)
  try:
    img = nibabel.load(path)
  except Exception as e:  # nibabel raises many types for unknown or bad files
    raise ReaderError(f"{path}: cannot load volume: {e}") from e
  if not hasattr(img, "affine") or img.affine is None or len(img.shape) < 2:
    raise ReaderError(f"{path}: not a spatial image (shape {getattr(img, 'shape', None)})")
  if img.get_data_dtype().fields is not None:
    raise ReaderError(f"{path}: structured (RGB) voxels are not supported")
  shape = tuple(img.shape)
  shape3 = shape[:3] + (1,) * (3 - len(shape))
  try:  # the reorientation as_closest_canonical would apply, done per volume below
    ornt = orientations.io_orientation(img.affine) if len(shape) >= 3 else None
    affine = (img.affine if ornt is None
              else img.affine @ orientations.inv_ornt_aff(ornt, shape3))
  except Exception as e:  # e.g. an affine that cannot be inverted
    raise ReaderError(f"{path}: cannot reorient to canonical: {e}") from e
  n = int(np.prod(shape[3:])) if len(shape) > 3 else 1
  wanted = list(range(n)) if volumes == "all" else list(range(min(n, 1)))
  spacing = tuple(float(s) for s in voxel_sizes(affine)[:3])

  def read(v: int) -> np.ndarray:
    """Volume `v` as float32 in the file's own axis order (F-contiguous, as stored)."""
    try:
      if len(shape) <= 3:
        return np.asarray(img.dataobj, dtype=np.float32).reshape(shape3, order="A")
      idx = np.unravel_index(v, shape[3:])  # index the proxy: only this volume is read
      return np.asarray(img.dataobj[(slice(None),) * 3 + tuple(idx)], dtype=np.float32)
    except Exception as e:  # truncated files, bad scaling
      raise ReaderError(f"{path}: cannot read voxel data: {e or type(e).__name__}") from e

  def canonical(volume: np.ndarray) -> np.ndarray:
    return volume if ornt is None else orientations.apply_orientation(volume, ornt)
  return wanted, read, canonical, spacing


def _window_volume(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """apply_window over a volume one slab at a time: float temporaries stay small."""
  out = np.empty_like(data, dtype=np.uint8)  # same memory order: slabs are contiguous
  step = max(1, (1 << 22) // max(1, data[..., 0].size))
  for k in range(0, data.shape[2], step):
    out[..., k:k + step] = apply_window(data[..., k:k + step], lo, hi)
  return out


def iter_nifti(path: str | os.PathLike, *, axes: Sequence[int] = (0, 1, 2), stride: int = 1,
               low_pct: float = 0.5, high_pct: float = 99.5, volumes: str = "first",
               skip_empty: bool = True, empty_tol: int = 8,
               empty_fraction: float = 0.02,
               square_pixels: bool = True) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
  """Yield `(uint8 (H, W) slice, meta)` for slices of a volume.

  axes: canonical axes to slice along (0 sagittal, 1 coronal, 2 axial).
  stride: take every `stride`-th slice.
  low_pct, high_pct: percentile window computed over each whole volume.
  volumes: "first" or "all" volumes of a 4D file.
  skip_empty: drop slices where fewer than `empty_fraction` of the pixels
    differ from the slice median by more than `empty_tol` grey levels.
  square_pixels: resample anisotropic slices to square pixels.
  `index` is `[volume, axis, slice]`; `orig_size` is the slice size before
  resampling.
  """
  if stride < 1:
    raise ValueError(f"stride must be >= 1, got {stride}")
  if any(a not in (0, 1, 2) for a in axes):
    raise ValueError(f"axes must be among 0, 1, 2, got {tuple(axes)}")
  path = os.fspath(path)
  wanted, read, canonical, spacing = load_volumes(path, volumes)
  for v in wanted:
    # Window as stored (a percentile ignores order), then free the float copy:
    # a volume costs 4 bytes a voxel at peak, 1 while its slices are cut.
    data = read(v)
    lo, hi = percentile_window(data, low_pct, high_pct)
    if skip_empty and hi <= lo:
      continue  # the window maps every voxel to 0: every slice would be skipped
    scaled = _window_volume(data, lo, hi)
    del data
    scaled = canonical(scaled)
    for axis in axes:
      # In-plane axes in array order; after rot90 rows run along the later one.
      col_axis, row_axis = [a for a in (0, 1, 2) if a != axis]
      for k in range(0, scaled.shape[axis], stride):
        pixels = canonical_slice(scaled, axis, k)
        if skip_empty and is_near_constant(pixels, empty_tol, empty_fraction):
          continue
        orig_size = list(pixels.shape)
        steps = [f"canonical RAS {AXIS_NAMES[axis]} slice {k}/{scaled.shape[axis]}",
                 f"volume percentile {low_pct}-{high_pct} window [{lo:g}, {hi:g}]"]
        if square_pixels:
          resized = resample_square(pixels, spacing[row_axis], spacing[col_axis])
          if resized.shape != pixels.shape:
            steps.append(f"resampled to square pixels {spacing[row_axis]:g}x"
                         f"{spacing[col_axis]:g} mm")
          pixels = resized
        yield np.ascontiguousarray(pixels), {
            "path": path, "index": [v, axis, k], "orig_size": orig_size,
            "transform": "; ".join(steps)}


OPTIONS = {"axes": common.Option([0, 1, 2], common.subset((0, 1, 2), "axes"),
                                 "canonical axes to slice: 0 sagittal, 1 coronal, 2 axial"),
           "stride": common.Option(1, common.positive_int, "every n-th slice"),
           "skip_empty": common.Option(True, common.boolean, "drop near-constant slices"),
           "empty_fraction": common.Option(0.02, common.fraction,
                                           "a slice with fewer differing pixels is empty"),
           **common.PERCENTILES,
           "volumes": common.Option("first", common.choice("first", "all"),
                                    "volumes of a 4D file"),
           "square_pixels": common.Option(True, common.boolean, "resample to square pixels"),
           "max_pixels": common.MAX_PIXELS_OPTION}


def _gzip_problem(path: str) -> str | None:
  """Why a .gz file does not decompress, if it does not (only run on failure)."""
  try:
    with gzip.open(path) as f:
      while f.read(1 << 20):
        pass
  except gzip.BadGzipFile as e:
    return f"not gzip-compressed although named .gz ({e})"
  except EOFError as e:
    return f"truncated gzip stream ({e})"
  except (OSError, zlib.error) as e:
    return f"damaged gzip stream ({e})"
  return None


def _check_nifti_header(path: str, max_pixels: int) -> None:
  """Header problems, and claims above the cap, get a reason of their own
  before any voxel is read."""
  import nibabel  # pylint: disable=import-outside-toplevel
  try:
    img = nibabel.load(path)
    shape = tuple(int(s) for s in img.shape)
    dtype = img.get_data_dtype()
  except Exception as e:  # nibabel raises many types for a bad header
    why = _gzip_problem(path) if path.lower().endswith(".gz") else None
    raise ReaderError(f"{path}: {why or f'NIfTI header unreadable or invalid: {e}'}") from e
  if len(shape) < 2 or any(s <= 0 for s in shape):
    raise ReaderError(f"{path}: NIfTI header gives an invalid shape {shape}")
  voxels = int(np.prod(shape[:3], dtype=np.int64))  # one volume is read at a time
  if voxels > max_pixels:
    raise ReaderError(f"{path}: NIfTI header claims a {'x'.join(map(str, shape[:3]))} volume "
                      f"({voxels:,} voxels, {dtype}), above the cap of {max_pixels:,} "
                      "(reader option max_pixels); not read")
  offset = getattr(img.dataobj, "offset", None)  # where the voxels start in the file
  if path.lower().endswith(".nii") and isinstance(offset, int):
    need = offset + int(np.prod(shape)) * dtype.itemsize
    have = os.path.getsize(path)
    if have < need:
      raise ReaderError(f"{path}: truncated NIfTI: the header promises {need} bytes "
                        f"(shape {shape}, {dtype}), the file has {have}")


def read(path: str, options: dict[str, Any] | None = None) -> Iterator[Item]:
  """Slices of a volume in canonical (RAS+) orientation, percentile-scaled per
  volume (see iter_nifti); index = [volume, axis, slice]."""
  path = os.fspath(path)
  opts = common.validate(OPTIONS, "nifti", options, path)
  common.check_file(path)
  _check_nifti_header(path, opts["max_pixels"])
  kept = 0
  try:
    for pixels, meta in iter_nifti(
        path, axes=opts["axes"], stride=opts["stride"], low_pct=opts["low_pct"],
        high_pct=opts["high_pct"], volumes=opts["volumes"], skip_empty=opts["skip_empty"],
        empty_fraction=opts["empty_fraction"], square_pixels=opts["square_pixels"]):
      kept += 1
      yield pixels, meta
  except ReaderError:
    raise
  except Exception as e:  # bad scaling values, a gzip stream cut short
    raise ReaderError(f"{path}: cannot read NIfTI voxel data: {type(e).__name__}: {e}") from e
  if not kept:  # a file that gives nothing is still an input: it must be counted
    raise ReaderError(f"{path}: no slice kept: every slice is near-constant after the "
                      "volume's intensity window (skip_empty; set it false to keep them)")
