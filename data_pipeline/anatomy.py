"""The built-in "mni_anatomy" benchmark: where in the brain is this slice?

nilearn's MNI152 T1 template (1 mm, cropped to the head) sliced in its three
planes; each slice is labelled with its plane and its level in that plane, in
three bins (9 classes):

  sagittal  medial, intermediate, lateral   (distance from the midline)
  coronal   posterior, middle, anterior
  axial     inferior, middle, superior

Telling the plane apart is easy; the level takes anatomy: the ventricles, the
basal ganglia, the cerebellum, the shape of the cortex. Each slice is shown as
two random crops of 80-100% of its height and width (seeded by the slice, so
every build agrees): whole slices let a random-weight encoder's kNN match
neighbouring slices pixel for pixel (61% ACC, above the trained MAE's 59%).
With the crops, the quickstarts' kNN ACC goes from 41.4 (random, step 0) to
55.2 (MAE, 300 steps), and from 34.5 to 45.4 (DINOv2); random weights at 4
seeds: 42.7 +- 0.9. The slices are the mini corpus's own MNI152 slices
(pretraining sees them, unlabelled): the benchmark asks what pretraining made
of its data.

Only slices with some brain are kept (at least 8% of the cropped field
brighter than a fifth of the window). Splits take blocks of 4 consecutive
slices per plane in turn, test, train, val, train, train, so each split spans
every level and a slice's neighbours share its split: 444 slices, 888 views,
536 train, 178 val, 174 test.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

PLANES = ("sagittal", "coronal", "axial")
LEVELS = {"sagittal": ("medial", "intermediate", "lateral"),
          "coronal": ("posterior", "middle", "anterior"),
          "axial": ("inferior", "middle", "superior")}
CLASSES = tuple(f"{plane} {level}" for plane in PLANES for level in LEVELS[plane])
BLOCK = 4
SPLIT_CYCLE = ("test", "train", "val", "train", "train")
MIN_TISSUE = 0.08  # fraction of the field that must be brain for a slice to count
# Each slice is shown as a crop of 80-100% of its height and width: without
# it, neighbouring slices match pixel for pixel and random weights pass.
CROP = (0.8, 1.0)
VIEWS = 2  # crops per slice: twice the test examples, so a score moves less by chance


def _volume() -> np.ndarray:
  """The template in RAS+ order, cropped to the head, windowed to uint8."""
  import nibabel  # pylint: disable=import-outside-toplevel
  from nilearn import datasets  # pylint: disable=import-outside-toplevel
  from data_pipeline.readers.images import apply_window  # pylint: disable=import-outside-toplevel
  t1 = nibabel.as_closest_canonical(datasets.load_mni152_template(resolution=1))
  volume = np.asarray(t1.get_fdata(), np.float32)
  box = tuple(slice(max(0, int(i.min()) - 2), int(i.max()) + 3)
              for i in np.nonzero(volume > 0.05 * volume.max()))
  volume = volume[box]
  low, high = np.percentile(volume, (0.5, 99.5))
  return apply_window(volume, float(low), float(high))


def _bins(position: np.ndarray) -> np.ndarray:
  """Three equal-width bins of `position` over its range."""
  span = position.max() - position.min()
  return np.minimum((3 * (position - position.min()) / max(span, 1e-9)).astype(int), 2)


def split_of(k: int) -> str:
  return SPLIT_CYCLE[k // BLOCK % len(SPLIT_CYCLE)]


def view(pixels: np.ndarray, rng: np.random.Generator, size: int,
         crop: tuple[float, float] = CROP) -> np.ndarray:
  """The slice padded to a centred square, a crop of a random `crop` fraction
  of each side at a random place, resized to size x size, RGB uint8."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  h, w = pixels.shape
  side = max(h, w)
  square = np.zeros((side, side), np.uint8)
  square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = pixels
  ch, cw = (max(1, round(side * rng.uniform(*crop))) for _ in range(2))
  top, left = int(rng.integers(0, side - ch + 1)), int(rng.integers(0, side - cw + 1))
  out = Image.fromarray(square[top:top + ch, left:left + cw]).resize(
      (size, size), Image.Resampling.BILINEAR)
  return np.repeat(np.asarray(out)[..., None], 3, axis=-1)


def slices() -> Iterator[tuple[str, int, str, np.ndarray]]:
  """(split, label, id, uint8 (H, W) slice, top up) for every kept slice."""
  from data_pipeline.readers.nifti import canonical_slice  # pylint: disable=import-outside-toplevel
  volume = _volume()
  for axis, plane in enumerate(PLANES):
    kept = np.array([k for k in range(volume.shape[axis])
                     if (canonical_slice(volume, axis, k) > 51).mean() >= MIN_TISSUE])
    # Sagittal levels go by distance from the midline: the hemispheres mirror.
    position = np.abs(kept - (kept.min() + kept.max()) / 2) if axis == 0 else kept
    for k, level in zip(kept, _bins(position.astype(np.float64))):
      yield (split_of(int(k)), axis * 3 + int(level), f"{plane[0]}{k:03d}",
             np.ascontiguousarray(canonical_slice(volume, axis, int(k))))


def examples(size: int, crop: tuple[float, float] = CROP, views: int = VIEWS):
  """(split, label, RGB uint8 (size, size, 3)), `views` per kept slice; the
  crops of slice `id` draw from a generator seeded by its id, so every build
  agrees."""
  for split, label, ident, pixels in slices():
    rng = np.random.default_rng(list(ident.encode()))
    for _ in range(views):
      yield split, label, view(pixels, rng, size, crop)
