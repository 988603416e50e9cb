"""HDF5 reader (h5py): image stacks stored as datasets, read one image at a time.

FastMRI's files hold `reconstruction_rss` (multi-coil) or `reconstruction_esc`
(single-coil), float32 (slices, H, W), beside the complex `kspace`;
PatchCamelyon's `*_x.h5` hold `x`, uint8 (N, 96, 96, 3). `datasets` lists the
names to look for, in order: the first the file holds is read (FastMRI's test
files, which lack reconstructions, are rejected with that reason). With
`datasets` unset, a file must hold exactly one real-valued dataset of 2-4
dimensions, found by walking its groups.

Datasets of encoded images (a scalar of PNG/JPEG bytes per key, as in
ISIC-2024's `train-image.hdf5`) are decoded with PIL, one key at a time.
Stacks are split into parts like `.npy` stacks (see `arrays`).
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from data_pipeline.readers import arrays, common, images
from data_pipeline.readers.common import Item, ReaderError

EXTENSIONS = (".h5", ".hdf5")
INSTALL_HINT = "pip install h5py"


def _names(v: Any) -> list[str] | None:
  if v is None:
    return None
  if isinstance(v, str):
    v = [v]
  if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, str) and x for x in v):
    raise ValueError("must be a dataset name or a non-empty list of them")
  return list(v)


OPTIONS = {**arrays.STACK_OPTIONS,
           "datasets": common.Option(None, _names, "dataset names to read, first present "
                                     "wins; null: the file's one image dataset")}


def _h5py(path: str):
  try:
    import h5py  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ReaderError(f"{path}: reading HDF5 needs h5py: {INSTALL_HINT}") from e
  return h5py


def _open(path: str):
  h5py = _h5py(path)
  try:
    return h5py.File(path, "r")
  except OSError as e:
    raise ReaderError(f"{path}: not a readable HDF5 file: {e}") from e


def _is_encoded(ds) -> bool:
  return ds.shape == () and ds.dtype.kind in "OSV"


def _pick(f, path: str, opts: dict[str, Any]) -> tuple[str, list]:
  """("stack", [dataset]) or ("encoded", [scalar datasets]) to read from file `f`."""
  h5py = _h5py(path)
  if opts["datasets"]:
    for name in opts["datasets"]:
      if name in f and isinstance(f[name], h5py.Dataset):
        return "stack", [f[name]]
    raise ReaderError(f"{path}: holds none of the datasets {opts['datasets']} (it has: "
                      f"{', '.join(sorted(f.keys())[:8]) or 'nothing'})")
  stacks, encoded = [], []

  def visit(_name, obj):
    if isinstance(obj, h5py.Dataset):
      if _is_encoded(obj):
        encoded.append(obj)
      elif 2 <= obj.ndim <= 4 and obj.dtype.kind in "iufb":
        stacks.append(obj)
  f.visititems(visit)
  if len(stacks) == 1 and not encoded:
    return "stack", stacks
  if encoded and not stacks:
    return "encoded", sorted(encoded, key=lambda d: d.name)
  found = ", ".join(d.name for d in stacks[:8]) or "none"
  raise ReaderError(f"{path}: {len(stacks)} image datasets ({found}); name the one to read "
                    "with the reader option datasets")


def count(path: str, options: dict[str, Any] | None = None) -> int:
  """Images in the file, from its metadata alone."""
  opts = common.validate(OPTIONS, "hdf5", options, path)
  with _open(path) as f:
    kind, found = _pick(f, path, opts)
    return len(found) if kind == "encoded" else arrays.stack_shape(found[0].shape, path)[0]


def read(path: str, options: dict[str, Any] | None = None) -> Iterator[Item]:
  """Images of one HDF5 file (or of a part `<file>::<start>-<stop>`); index =
  [dataset name, image number]."""
  path = os.fspath(path)
  file, start, stop = arrays.split_part(path)
  opts = common.validate(OPTIONS, "hdf5", options, file)
  common.check_file(file)
  kept = 0
  with _open(file) as f:
    kind, found = _pick(f, file, opts)
    if kind == "stack":
      items = arrays.read_stack(file, found[0], opts, found[0].name.lstrip("/"), start, stop)
    else:
      items = _encoded(file, found, opts, start, stop)
    for item in items:
      kept += 1
      yield item
  if not kept:
    raise ReaderError(f"{path}: no image kept: every image is near-constant (skip_empty)")


def _encoded(path: str, datasets: list, opts: dict[str, Any], start: int | None,
             stop: int | None) -> Iterator[Item]:
  """Each scalar dataset's bytes decoded as an image file (PNG, JPEG, ...)."""
  first = 0 if start is None else start + -start % opts["stride"]
  for ds in datasets[first:stop:opts["stride"]]:
    raw = ds[()]
    data = raw.tobytes() if isinstance(raw, np.ndarray) else bytes(raw)
    try:
      frames = images.load_image(io.BytesIO(data), opts["low_pct"], opts["high_pct"])
    except ReaderError as e:
      kind = "; ".join(str(e).split(": ")[2:3]) or "undecodable"  # PIL's reason, no repr
      raise ReaderError(f"{path}: dataset {ds.name}: its bytes are not an image PIL can "
                        f"decode ({kind.split(' <')[0]})") from e
    pixels, text = frames[0]
    if opts["skip_empty"] and images.is_near_constant(pixels,
                                                      min_fraction=opts["empty_fraction"]):
      continue
    yield pixels, common.meta(path, [ds.name.lstrip("/"), 0], pixels, text)
