"""The built-in corpus "mini": a few thousand real biomedical 2D images, offline.

Everything comes from files that installed packages ship: brain MR volumes
(nilearn's MNI152 template, nibabel's test volumes) sliced along all three axes,
pydicom's CT/MR/NM/ultrasound test files (every frame, large ones also tiled),
and scikit-image's microscopy, histology and fundus photographs tiled at a few
scales. Images are stored as PNG, longer side at most 256 px; near-blank crops
and exact duplicates are dropped (duplicates make KoLeo infinite).

Built on first use into `<cache>/mini_v1/`, where `<cache>` is the `cache_dir`
argument, else $BIOVFM_CACHE, else ~/.cache/biovfm_jax. The build writes into a
temporary folder that is renamed into place, under a file lock, so concurrent or
interrupted builds never leave half a corpus.

    python -m data_pipeline.mini [--cache_dir DIR] [--force]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from data_pipeline import records, shards
from data_pipeline.ingest import dedup
from data_pipeline.readers import dicom, nifti
from data_pipeline.readers.images import is_near_constant, resize_max, resize_scale, tile

VERSION = "mini_v1"
MAX_SIDE = 256
RECORDS_PER_SHARD = 256
MIN_SIDE = 24  # slices thinner than this (tiny 4D test volumes) carry little

Example = tuple[np.ndarray, dict[str, Any]]
# A tiling plan: (scale, tile size, stride) in pixels of the rescaled image.
Plan = Sequence[tuple[float, int, int]]


def cache_root(cache_dir: str | os.PathLike | None = None) -> str:
  root = cache_dir or os.environ.get("BIOVFM_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "biovfm_jax")
  return os.path.abspath(os.path.expanduser(os.fspath(root)))


def corpus_dir(cache_dir: str | os.PathLike | None = None) -> str:
  return os.path.join(cache_root(cache_dir), VERSION)


def _tiles(pixels: np.ndarray, meta: dict[str, Any], plan: Plan) -> Iterator[Example]:
  """The whole image, then the crops of each (scale, size, stride) in `plan`.

  A crop's `index` becomes its box [top, left, height, width] in the pixels of
  the original image, so it can be traced back.
  """
  h, w = pixels.shape[:2]
  yield pixels, dict(meta, index=[meta.get("index"), [0, 0, h, w]])
  for scale, size, stride in plan:
    scaled = resize_scale(pixels, scale)
    if max(scaled.shape[:2]) <= size:
      continue  # one crop would be the whole image again
    for (y, x), crop in tile(scaled, size, stride):
      box = [round(y / scale), round(x / scale), round(crop.shape[0] / scale),
             round(crop.shape[1] / scale)]
      yield crop, dict(meta, index=[meta.get("index"), box], transform="; ".join(
          [meta["transform"], f"resize x{scale:g}, crop {size}px at y={y} x={x}"]))


def _volumes() -> Iterator[Example]:
  """Brain MR volumes sliced along all three canonical axes."""
  import nibabel  # pylint: disable=import-outside-toplevel
  from nibabel.testing import data_path  # pylint: disable=import-outside-toplevel
  from nilearn import datasets  # pylint: disable=import-outside-toplevel

  # The reader reads files; nilearn returns an in-memory image, so save it.
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "mni152_template.nii.gz")
    nibabel.save(datasets.load_mni152_template(), path)
    for pixels, meta in nifti.read(path):
      meta = dict(meta, path="nilearn.datasets.load_mni152_template()")
      yield pixels, records.header("nilearn_mni152", meta, pixels, modality="MR",
                                   anatomy="brain")
  # anatomical.nii is a T1 head, example4d.nii.gz an EPI (fMRI) series: real
  # anatomy. The other test volumes there are phantoms or a few voxels wide.
  for name in ("anatomical.nii", "example4d.nii.gz"):
    for pixels, meta in nifti.read(os.path.join(str(data_path), name)):
      yield pixels, records.header("nibabel_testdata", meta, pixels, modality="MR",
                                   anatomy="brain")


# pydicom test files that are real images and decode without extra packages,
# with a tiling plan for the large ones. MR_small has variants in other
# transfer syntaxes (same pixels) and the 16x16 dicomdir files are thumbnails,
# so they are left out.
_DICOM_FILES = {
    "CT_small.dcm": (),
    "693_J2KI.dcm": ((1.0, 128, 64), (0.75, 128, 48), (0.5, 128, 64)),
    "J2K_pixelrep_mismatch.dcm": ((1.0, 128, 64), (0.75, 128, 48), (0.5, 128, 64)),
    "MR_small.dcm": (),
    "examples_overlay.dcm": ((1.0, 128, 48),),
    "JPEG2000.dcm": ((1.0, 256, 64), (0.5, 128, 32)),
    "examples_jpeg2k.dcm": ((1.0, 128, 64), (0.5, 128, 48)),
    "examples_palette.dcm": ((1.0, 128, 64),),
    "examples_rgb_color.dcm": ((1.0, 128, 48),),
    "examples_ybr_color.dcm": (),  # 30 frames of an echo cine loop
}


def _dicoms() -> Iterator[Example]:
  from pydicom.data import get_testdata_file  # pylint: disable=import-outside-toplevel
  for name, plan in _DICOM_FILES.items():
    for pixels, meta in dicom.read(get_testdata_file(name)):
      yield from _tiles(pixels, records.header("pydicom_testdata", meta, pixels), plan)


# scikit-image sample photographs: (loader name, source, modality, anatomy, plan).
_PHOTOS = (
    # One cell in a wide field of saline: large crops, so most show the cell.
    ("cell", "skimage_cell", "microscopy", None, ((1.0, 256, 48), (0.5, 128, 24))),
    ("immunohistochemistry", "skimage_ihc", "pathology", "colon",
     ((1.0, 96, 32), (1.0, 128, 48), (1.0, 256, 64), (0.5, 128, 32))),
    ("retina", "skimage_retina", "fundus", "retina",
     ((0.25, 128, 32), (0.5, 128, 64), (0.5, 256, 64), (1.0, 256, 128))),
    ("microaneurysms", "skimage_microaneurysms", "fundus", "retina",
     ((1.0, 64, 16), (2.0, 128, 32))),
)


def _photos() -> Iterator[Example]:
  from skimage import data  # pylint: disable=import-outside-toplevel
  for loader, source, modality, anatomy, plan in _PHOTOS:
    pixels = np.ascontiguousarray(getattr(data, loader)())
    meta = {"path": f"skimage.data.{loader}()", "index": 0, "transform": "none"}
    yield from _tiles(pixels, records.header(source, meta, pixels, modality=modality,
                                             anatomy=anatomy), plan)


def iter_mini_examples() -> Iterator[Example]:
  """Every example of the corpus, in a fixed order, already capped to MAX_SIDE."""
  seen = set()
  for pixels, meta in _iter_all():
    if min(pixels.shape[:2]) < MIN_SIDE or is_near_constant(pixels):
      continue
    capped = resize_max(pixels, MAX_SIDE)
    if capped.shape != pixels.shape:
      meta = dict(meta, transform=f"{meta['transform']}; longer side capped at {MAX_SIDE}")
    pixels = capped
    digest = dedup.pixel_hash(pixels)
    if digest in seen:
      continue
    seen.add(digest)
    yield pixels, meta


def _iter_all() -> Iterator[Example]:
  yield from _volumes()
  yield from _dicoms()
  yield from _photos()


def _complete_shards(path: str) -> list[str] | None:
  """The shard paths of a finished corpus at `path`, or None."""
  try:
    manifest = shards.read_manifest(path)
    files = [os.path.join(path, s["file"]) for s in manifest["shards"]]
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return files if files and all(os.path.isfile(f) for f in files) else None


def build_mini_corpus(cache_dir: str | os.PathLike | None = None,
                      force: bool = False) -> list[str]:
  """Build (first call) or load the "mini" corpus; returns its shard paths."""
  final = corpus_dir(cache_dir)
  if not force and (found := _complete_shards(final)):
    return found
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  with shards.file_lock(os.path.join(parent, f".{VERSION}.lock")):
    if not force and (found := _complete_shards(final)):
      return found  # another process built it while we waited
    tmp = tempfile.mkdtemp(prefix=f".{VERSION}.tmp-", dir=parent)
    try:
      start = time.time()
      examples = (records.make_record(p, m) for p, m in iter_mini_examples())
      shards.write_shards(examples, tmp, "mini", RECORDS_PER_SHARD)
      manifest = shards.read_manifest(tmp)
      manifest.update(version=VERSION, max_side=MAX_SIDE,
                      build_seconds=round(time.time() - start, 1))
      shards.write_json_atomic(os.path.join(tmp, shards.MANIFEST), manifest)
      _swap_in(tmp, final)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  found = _complete_shards(final)
  if not found:
    raise RuntimeError(f"building the mini corpus in {final} failed")
  return found


def _swap_in(tmp: str, final: str) -> None:
  """Rename the finished `tmp` to `final`; an old `final` is moved aside first."""
  old = None
  if os.path.exists(final):
    old = tempfile.mkdtemp(prefix=f".{VERSION}.old-", dir=os.path.dirname(final))
    os.rename(final, os.path.join(old, VERSION))
  try:
    os.rename(tmp, final)
  except OSError:
    # Someone else's rename won the race: keep theirs if it is whole.
    if not _complete_shards(final):
      raise
  finally:
    if old:
      shutil.rmtree(old, ignore_errors=True)


def summary(cache_dir: str | os.PathLike | None = None) -> str:
  path = corpus_dir(cache_dir)
  m = shards.read_manifest(path)
  lines = [f"{VERSION} at {path}: {m['num_records']} images in {m['num_shards']} shards"
           f" (built in {m.get('build_seconds', '?')} s)"]
  for title, key in (("source", "sources"), ("modality", "modalities")):
    lines.append(f"  per {title}:")
    lines += [f"    {k:<24} {v:>6}" for k, v in m[key].items()]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cache_dir", default=None)
  parser.add_argument("--force", action="store_true", help="rebuild even if cached")
  args = parser.parse_args(argv)
  build_mini_corpus(args.cache_dir, force=args.force)
  print(summary(args.cache_dir))


if __name__ == "__main__":
  main()
