"""Segmentation benchmarks: 2D slices (or images) with integer label masks.

  mni_tissue       built in, offline: nilearn's MNI152 T1 template sliced in
                   its three planes, labelled from nilearn's grey- and
                   white-matter maps: 0 background/CSF, 1 grey, 2 white matter
  msd:<folder>     a Medical Segmentation Decathlon task folder: dataset.json,
                   imagesTr/, labelsTr/ (NIfTI), sliced along one axis
  folder:<folder>  paired images/ and masks/ folders (PNG or TIFF) matched by
                   file name; train/ val/ test/ sub-folders give the splits

Volumes are read through the NIfTI ingestion reader (RAS+ orientation, one
percentile window per volume, square pixels). Splits are made per case (MSD
volume, image file) from a seeded permutation, 70/15/15, unless the folder has
its own; mni_tissue, a single volume, splits each plane's slices in blocks of
consecutive slices. A split is prepared once into <data_dir>/segmentation/ as
npz (atomic writes), keyed by the source, its files' sizes and times, and the
options, so a changed folder is prepared again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from data_pipeline.errors import ConfigError
from data_pipeline.readers import images as image_reader
from data_pipeline.readers import nifti

MNI_TISSUE = "mni_tissue"
MNI_CLASSES = ("background/CSF", "grey matter", "white matter")
SPLITS = ("train", "val", "test")
FRACTIONS = (0.70, 0.15)  # train, val; test takes the rest
_VERSION = 3  # bump when the preparation changes what it writes
_IMAGE_EXT = (".png", ".tif", ".tiff")
# Defaults of the options (an eval config's `segmentation` block).
DEFAULTS = {"axis": 2, "stride": 1, "keep": "foreground", "seed": 0, "channel": 0,
            "classes": "", "label_values": ""}


@dataclasses.dataclass
class SegSplit:
  """One split: images (N, S, S, 3) uint8, masks (N, S, S) uint8 in 0..C-1."""
  name: str
  images: np.ndarray
  masks: np.ndarray
  ids: list[str]
  classes: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.ids)


def benchmark_names(spec) -> list[str]:
  """'mni_tissue,msd:/data/Task04,folder:~/polyps' -> the list (paths expanded)."""
  items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
  names = []
  for item in (s.strip() for s in items if s.strip()):
    kind, _, path = item.partition(":")
    if item == MNI_TISSUE:
      names.append(item)
    elif kind in ("msd", "folder") and path:
      names.append(f"{kind}:{os.path.abspath(os.path.expanduser(path))}")
    else:
      raise ConfigError(f"config.benchmarks: {item!r} is not a segmentation benchmark; "
                        f"use {MNI_TISSUE!r}, 'msd:<folder>' or 'folder:<folder>'")
  if not names:
    raise ConfigError("config.benchmarks is empty")
  return list(dict.fromkeys(names))


def display_name(benchmark: str) -> str:
  """'msd:/data/Task04_Hippocampus' -> 'Task04_Hippocampus'."""
  return os.path.basename(benchmark.partition(":")[2].rstrip("/")) or benchmark


def load_split(benchmark: str, split: str, *, size: int, data_dir: str,
               options: Mapping[str, Any] | None = None) -> SegSplit:
  """One split of a benchmark at size x size, prepared on first use."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  opts = {**DEFAULTS, **(options or {})}
  unknown = sorted(set(opts) - set(DEFAULTS))
  if unknown:
    raise ConfigError(f"config.segmentation: unknown keys {unknown}; known: {sorted(DEFAULTS)}")
  if opts["keep"] not in ("foreground", "all"):
    raise ConfigError(f"config.segmentation.keep={opts['keep']!r}: 'foreground' or 'all'")
  folder = os.path.join(os.path.expanduser(data_dir), "segmentation",
                        _cache_key(benchmark, size, opts))
  path = os.path.join(folder, f"{split}.npz")
  if not os.path.isfile(path):
    _prepare(benchmark, size, opts, folder)
  with np.load(path) as z:
    return SegSplit(name=benchmark, images=z["images"], masks=z["masks"],
                    ids=[str(i) for i in z["ids"]],
                    classes=tuple(str(c) for c in z["classes"]))


# --- preparation -----------------------------------------------------------------

def _cache_key(benchmark: str, size: int, opts: Mapping[str, Any]) -> str:
  kind, _, root = benchmark.partition(":")
  stamp = []
  if root:
    if not os.path.isdir(root):
      raise FileNotFoundError(f"{benchmark}: no such folder {root}")
    for f in image_reader.list_files(root):
      st = os.stat(f)
      stamp.append((os.path.relpath(f, root), st.st_size, st.st_mtime_ns))
  ident = json.dumps([_VERSION, benchmark, int(size), dict(opts), stamp], sort_keys=True)
  digest = hashlib.sha1(ident.encode()).hexdigest()[:12]
  return f"{display_name(benchmark) if root else kind}_{int(size)}px_{digest}"


def _prepare(benchmark: str, size: int, opts: dict, folder: str) -> None:
  kind, _, root = benchmark.partition(":")
  if benchmark == MNI_TISSUE:
    cases, classes = _mni_tissue_cases(), MNI_CLASSES
    split_of = _mni_split
  elif kind == "msd":
    cases, classes = _msd_cases(root, opts)
    split_of = None
  else:
    cases, classes, split_of = _folder_cases(root, opts)
  logging.info("Preparing segmentation benchmark %s at %d px into %s", benchmark, size,
               folder)
  by_split: dict[str, list] = {s: [] for s in SPLITS}
  names = sorted(cases)
  assigned = split_of(names) if split_of else _seeded_split(names, opts["seed"])
  for name in names:
    for slice_id, image, mask in cases[name]():
      if mask.max(initial=0) >= len(classes):
        raise ValueError(f"{name}: label value {int(mask.max())} is not one of the "
                         f"{len(classes)} classes {list(classes)}")
      if opts["keep"] == "foreground" and not mask.any():
        continue
      split = assigned[name] if isinstance(assigned[name], str) else assigned[name](slice_id)
      by_split[split].append((f"{name}/{slice_id}", _square(image, size, Image.Resampling.BILINEAR),
                              _square(mask, size, Image.Resampling.NEAREST)))
  os.makedirs(folder, exist_ok=True)
  for split, items in by_split.items():
    if not items:
      raise ValueError(f"{benchmark}: no {split} slices (too few cases or slices with "
                       "a foreground label; see config.segmentation)")
    ids, ims, ms = zip(*items)
    tmp = os.path.join(folder, f".{split}.tmp.npz")
    np.savez(tmp, images=np.stack(ims), masks=np.stack(ms), ids=np.array(ids),
             classes=np.array(classes))
    os.replace(tmp, os.path.join(folder, f"{split}.npz"))
  logging.info("Prepared %s: %s", benchmark,
               ", ".join(f"{s} {len(v)}" for s, v in by_split.items()))


def _square(pixels: np.ndarray, size: int, resample) -> np.ndarray:
  """Zero-pad to a centred square, resize to size x size (RGB for images)."""
  h, w = pixels.shape[:2]
  side = max(h, w)
  square = np.zeros((side, side) + pixels.shape[2:], pixels.dtype)
  top, left = (side - h) // 2, (side - w) // 2
  square[top:top + h, left:left + w] = pixels
  out = np.asarray(Image.fromarray(square).resize((size, size), resample))
  if resample == Image.Resampling.BILINEAR and out.ndim == 2:
    out = np.repeat(out[..., None], 3, axis=-1)
  return out


def _seeded_split(names: list[str], seed: int) -> dict[str, str]:
  """70/15/15 of the cases by a seeded permutation, at least one case per
  split when there are three or more."""
  n = len(names)
  if n < 3:
    raise ValueError(f"{n} case(s): a split needs at least 3 (train, val, test)")
  order = np.random.default_rng(seed).permutation(n)
  n_train = max(1, min(n - 2, round(FRACTIONS[0] * n)))
  n_val = max(1, min(n - n_train - 1, round(FRACTIONS[1] * n)))
  out = {}
  for rank, i in enumerate(order):
    out[names[i]] = ("train" if rank < n_train else "val" if rank < n_train + n_val
                     else "test")
  return out


def _slices(volume: np.ndarray, mask: np.ndarray, spacing, axes, stride: int):
  """(slice id, uint8 image, uint8 mask) along each axis of RAS+ volumes,
  displayed as the ingestion reader shows them, with square pixels."""
  lo, hi = image_reader.percentile_window(volume)
  for axis in axes:
    rows_mm, cols_mm = [s for a, s in enumerate(spacing) if a != axis][::-1]
    for k in range(0, volume.shape[axis], stride):
      image = image_reader.apply_window(nifti.canonical_slice(volume, axis, k), lo, hi)
      m = np.ascontiguousarray(nifti.canonical_slice(mask, axis, k))
      yield (f"{nifti.AXIS_NAMES[axis][0]}{k:03d}",
             nifti.resample_square(image, rows_mm, cols_mm),
             nifti.resample_square(m, rows_mm, cols_mm, Image.Resampling.NEAREST))


def _mni_tissue_cases() -> dict:
  """One case: the MNI152 template (2 mm), cropped to the head, sliced in its
  three planes."""
  import nibabel  # pylint: disable=import-outside-toplevel
  from nilearn import datasets  # pylint: disable=import-outside-toplevel

  def slices():
    t1 = nibabel.as_closest_canonical(datasets.load_mni152_template(resolution=2))
    gm = nibabel.as_closest_canonical(datasets.load_mni152_gm_template(resolution=2))
    wm = nibabel.as_closest_canonical(datasets.load_mni152_wm_template(resolution=2))
    g, w = (np.asarray(x.get_fdata(), np.float32) for x in (gm, wm))
    label = np.where(np.maximum(g, w) >= 0.5, np.where(g >= w, 1, 2), 0).astype(np.uint8)
    volume = np.asarray(t1.get_fdata(), np.float32)
    # The template's field of view is mostly empty: crop to the head (2 voxels
    # of margin), so the brain fills the slices and a patch grid covers it.
    box = tuple(slice(max(0, int(i.min()) - 2), int(i.max()) + 3)
                for i in np.nonzero(volume > 0.05 * volume.max()))
    spacing = tuple(float(s) for s in t1.header.get_zooms()[:3])
    yield from _slices(volume[box], label[box], spacing, (0, 1, 2), 1)
  return {"mni152": slices}


def _mni_split(names):
  """Blocks of 6 consecutive slices per plane go test, train, val, train,
  train in turn: neighbours share a split, each split spans the brain (the
  test split the first edge of each plane, where a tissue can be absent)."""
  def of(slice_id: str) -> str:
    return ("test", "train", "val", "train", "train")[int(slice_id[1:]) // 6 % 5]
  return {name: of for name in names}


def _msd_cases(root: str, opts: dict) -> tuple[dict, tuple[str, ...]]:
  path = os.path.join(root, "dataset.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{root}: no dataset.json (expected a Medical Segmentation "
                            "Decathlon task folder: dataset.json, imagesTr/, labelsTr/)")
  with open(path) as f:
    meta = json.load(f)
  try:
    labels = {int(k): str(v) for k, v in meta["labels"].items()}
    pairs = [(os.path.normpath(os.path.join(root, p["image"])),
              os.path.normpath(os.path.join(root, p["label"]))) for p in meta["training"]]
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: needs 'labels' {{'0': 'background', ...}} and 'training' "
                     f"[{{'image': ..., 'label': ...}}]: {e}") from e
  if sorted(labels) != list(range(len(labels))):
    raise ValueError(f"{path}: labels must be numbered 0..{len(labels) - 1}, got {sorted(labels)}")
  classes = tuple(labels[i] for i in range(len(labels)))
  axis, stride, channel = int(opts["axis"]), int(opts["stride"]), int(opts["channel"])
  if axis not in (0, 1, 2):
    raise ConfigError(f"config.segmentation.axis={axis}: 0 (sagittal), 1 (coronal) or 2 (axial)")
  cases = {}
  for image_path, label_path in pairs:
    for p, what in ((image_path, "image"), (label_path, "mask")):
      if not os.path.isfile(p):
        raise FileNotFoundError(f"{p}: {what} listed in {path} is missing")

    def slices(image_path=image_path, label_path=label_path):
      wanted, read, canonical, spacing = nifti.load_volumes(image_path, volumes="all")
      if channel >= len(wanted):
        raise ConfigError(f"config.segmentation.channel={channel}: {image_path} has "
                          f"{len(wanted)} channel(s)")
      volume = canonical(read(wanted[channel]))
      _, read_m, canonical_m, _ = nifti.load_volumes(label_path)
      mask = canonical_m(read_m(0))
      if mask.shape != volume.shape:
        raise ValueError(f"{label_path}: mask shape {mask.shape} differs from the image's "
                         f"{volume.shape} ({image_path})")
      values = np.unique(mask)
      bad = [int(v) if v == int(v) else v for v in values.tolist()
             if v != int(v) or int(v) not in labels]
      if bad:
        raise ValueError(f"{label_path}: label values {bad} are not in {path}'s labels "
                         f"{sorted(labels)}")
      yield from _slices(volume, mask.astype(np.uint8), spacing, (axis,), stride)
    name = os.path.basename(image_path).split(".")[0]
    cases[name] = slices
  return cases, classes


def _folder_cases(root: str, opts: dict):
  """images/ and masks/ with the same relative names (any of PNG/TIFF)."""
  images_dir, masks_dir = os.path.join(root, "images"), os.path.join(root, "masks")
  for d in (images_dir, masks_dir):
    if not os.path.isdir(d):
      raise FileNotFoundError(f"{root}: no {os.path.basename(d)}/ folder (expected "
                              "images/ and masks/ with matching file names)")
  if not opts["classes"]:
    raise ConfigError("config.segmentation.classes is empty: name the classes of a "
                      "folder benchmark, background first (e.g. 'background,polyp')")
  classes = tuple(c.strip() for c in str(opts["classes"]).split(","))
  values = ([int(v) for v in str(opts["label_values"]).split(",")]
            if opts["label_values"] else list(range(len(classes))))
  if len(values) != len(classes):
    raise ConfigError(f"config.segmentation.label_values={opts['label_values']!r} has "
                      f"{len(values)} values for {len(classes)} classes")
  lut = np.full(256, 255, np.uint8)
  lut[values] = np.arange(len(values))
  stem = lambda p: os.path.splitext(os.path.relpath(p, images_dir))[0]
  masks = {os.path.splitext(os.path.relpath(p, masks_dir))[0]: p
           for p in image_reader.list_files(masks_dir, _IMAGE_EXT)}
  cases = {}
  for image_path in image_reader.list_files(images_dir, _IMAGE_EXT):
    name = stem(image_path)
    if name not in masks:
      raise FileNotFoundError(f"{image_path}: no mask named {name}.* in {masks_dir}")

    def one(image_path=image_path, mask_path=masks[name]):
      image = image_reader.load_image(image_path)[0][0]
      mask = np.asarray(Image.open(mask_path))
      if mask.ndim == 3:
        mask = mask[..., 0]
      if mask.shape != image.shape[:2]:
        raise ValueError(f"{mask_path}: mask size {mask.shape} differs from the image's "
                         f"{image.shape[:2]} ({image_path})")
      mapped = lut[mask.astype(np.int64).clip(0, 255)]
      if (mapped == 255).any() or mask.max(initial=0) > 255:
        bad = sorted(set(np.unique(mask).tolist()) - set(values))
        raise ValueError(f"{mask_path}: mask values {bad} are not among "
                         f"config.segmentation.label_values {values}")
      yield "0", image, mapped
    cases[name] = one
  parts = {n.split(os.sep)[0] for n in cases}
  if parts <= set(SPLITS) and len(parts) == 3:  # the folder's own splits
    return cases, classes, lambda names: {n: n.split(os.sep)[0] for n in names}
  return cases, classes, None
