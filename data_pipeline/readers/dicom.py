"""DICOM reader: stored values -> modality values -> display window -> uint8.

Per frame, in the order PS3.3 C.11 defines: Rescale Slope/Intercept (or a
Modality LUT), then the VOI window from Window Center/Width when the file has
one (LINEAR, LINEAR_EXACT or SIGMOID), otherwise a percentile window over all
frames of the file, then MONOCHROME1 inversion (so bright is always dense).
Colour images (RGB, YBR converted by pydicom, PALETTE COLOR) are scaled by their
bit depth. Enhanced multi-frame files keep rescale and window per frame in
functional groups; those are honoured.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from data_pipeline.readers import common
from data_pipeline.readers.common import Item, ReaderError
from data_pipeline.readers.images import apply_window, percentile_window

EXTENSIONS = (".dcm", ".dicom", ".dic")

# DICOM Modality codes -> the modality names the corpus uses.
MODALITY_NAMES = {
    "CT": "CT", "MR": "MR", "US": "ultrasound", "CR": "X-ray", "DX": "X-ray",
    "DR": "X-ray", "RG": "X-ray", "MG": "mammography", "XA": "angiography",
    "RF": "fluoroscopy", "NM": "NM", "PT": "PET", "OT": "other",
    "SM": "pathology", "XC": "photo", "ES": "endoscopy", "OP": "fundus",
    "OPT": "OCT", "IVOCT": "OCT",
}


class NotDicomError(ReaderError):
  """The file is not DICOM at all (folder walks skip these quietly)."""


def _first(value: Any) -> float:
  """Multi-valued DICOM numbers (several windows): the first one."""
  if isinstance(value, (list, tuple, MultiValue)):
    value = value[0]
  return float(value)


def _frame_attr(ds: pydicom.Dataset, frame: int, sequence: str, name: str) -> Any:
  """`name` for `frame`: per-frame functional group, then shared group, then
  the top-level dataset (classic single-frame files keep it there)."""
  for groups, idx in (("PerFrameFunctionalGroupsSequence", frame),
                      ("SharedFunctionalGroupsSequence", 0)):
    seq = ds.get(groups)
    if seq is not None and len(seq) > idx:
      inner = seq[idx].get(sequence)
      if inner and name in inner[0]:
        return inner[0].get(name)
  return ds.get(name)


def _decode(ds: pydicom.Dataset, path: str) -> np.ndarray:
  """The stored pixel values, with a clear error when they cannot be had."""
  if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
    raise ReaderError(f"{path}: DICOM file has no pixel data "
                      "(no (7FE0,0010) Pixel Data element)")
  tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
  hint = ""
  if tsyntax is not None and tsyntax.is_compressed:
    try:
      from pydicom.pixels import get_decoder  # pylint: disable=import-outside-toplevel
      decoder = get_decoder(tsyntax)
    except NotImplementedError as e:
      raise ReaderError(f"{path}: pydicom has no decoder for transfer syntax "
                        f"{tsyntax.name} ({tsyntax})") from e
    missing = "; ".join(decoder.missing_dependencies)
    if not decoder.is_available:
      raise ReaderError(
          f"{path}: pixel data is compressed as {tsyntax.name} ({tsyntax}) and no "
          f"decoder package for it is installed; install one of: {missing}")
    hint = f" (other decoders for {tsyntax.name}: {missing})" if missing else ""
  try:
    return ds.pixel_array
  except Exception as e:  # pydicom raises several types for undecodable data
    compressed = tsyntax is not None and tsyntax.is_compressed
    syntax = f" compressed as {tsyntax.name}" if compressed else ""
    raise ReaderError(f"{path}: cannot decode pixel data{syntax}: {e}{hint}") from e


def _window(values: np.ndarray, center: float, width: float,
            function: str) -> np.ndarray | None:
  """VOI window to uint8 per PS3.3 C.11.2.1.2; None if the window is invalid."""
  x = values.astype(np.float64)
  if function == "SIGMOID":
    if width <= 0:
      return None
    y = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
  elif function == "LINEAR_EXACT":
    if width <= 0:
      return None
    y = (x - center) / width + 0.5
  else:  # LINEAR, the default
    if width < 1:
      return None
    if width == 1:  # a threshold at the centre
      y = (x > center - 0.5).astype(np.float64)
    else:
      y = (x - (center - 0.5)) / (width - 1) + 0.5
  return np.rint(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8)


def _frames_gray(ds: pydicom.Dataset, arr: np.ndarray, low_pct: float,
                 high_pct: float, use_window: bool) -> list[tuple[np.ndarray, str]]:
  """(frames, H, W) stored values -> [(uint8 frame, transform text)]."""
  steps = []
  if ds.get("ModalityLUTSequence"):
    from pydicom.pixels import apply_modality_lut  # pylint: disable=import-outside-toplevel
    values = [np.asarray(apply_modality_lut(f, ds), np.float64) for f in arr]
    steps.append(["modality LUT"] * len(arr))
  else:
    values, texts = [], []
    for i, f in enumerate(arr):
      slope = _frame_attr(ds, i, "PixelValueTransformationSequence", "RescaleSlope")
      icept = _frame_attr(ds, i, "PixelValueTransformationSequence", "RescaleIntercept")
      slope = 1.0 if slope is None else _first(slope)
      icept = 0.0 if icept is None else _first(icept)
      values.append(f.astype(np.float64) * slope + icept)
      texts.append(f"rescale slope={slope:g} intercept={icept:g}")
    steps.append(texts)

  function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
  out, win_texts = [None] * len(values), [None] * len(values)
  if use_window:
    for i, v in enumerate(values):
      center = _frame_attr(ds, i, "FrameVOILUTSequence", "WindowCenter")
      width = _frame_attr(ds, i, "FrameVOILUTSequence", "WindowWidth")
      if center is None or width is None:
        continue
      try:
        c, w = _first(center), _first(width)
      except (TypeError, ValueError, IndexError):
        continue
      if not (math.isfinite(c) and math.isfinite(w)):
        continue
      out[i] = _window(v, c, w, function)
      if out[i] is not None:
        win_texts[i] = f"window center={c:g} width={w:g} ({function})"
  todo = [i for i, o in enumerate(out) if o is None]
  if todo:
    # One window for all frames of the file keeps a series' slices comparable.
    lo, hi = percentile_window(np.stack([values[i] for i in todo]), low_pct, high_pct)
    for i in todo:
      out[i] = apply_window(values[i], lo, hi)
      win_texts[i] = f"percentile {low_pct}-{high_pct} window [{lo:g}, {hi:g}]"
  steps.append(win_texts)

  if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
    out = [255 - o for o in out]
    steps.append(["MONOCHROME1 inverted"] * len(out))
  return [(o, "; ".join(s[i] for s in steps)) for i, o in enumerate(out)]


def _frames_color(ds: pydicom.Dataset, arr: np.ndarray) -> list[tuple[np.ndarray, str]]:
  """(frames, H, W, 3) colour values -> [(uint8 frame, transform text)]."""
  photometric = str(ds.get("PhotometricInterpretation", "RGB")).upper()
  text = f"{photometric}->RGB" if photometric != "RGB" else "RGB"
  if arr.dtype == np.uint8:
    return [(np.ascontiguousarray(f), text) for f in arr]
  # Wider colour: the range is the stored bit depth (or the LUT's, for palettes).
  bits = int(ds.get("BitsStored", 16) or 16)
  if photometric == "PALETTE COLOR":
    descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
    bits = int(descriptor[2]) if descriptor else 8 * arr.dtype.itemsize
  top = float(2 ** bits - 1)
  return [(apply_window(f, 0.0, top), f"{text}; {bits}-bit -> uint8") for f in arr]


def check_claimed_size(ds: pydicom.Dataset, path: str, max_pixels: int) -> None:
  """Refuse, before decoding, a file whose header claims more pixels than the cap:
  a decoder allocates what the header says (8 GiB for a 676-byte RLE file
  claiming 65535x65535), not what the file holds."""
  rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  samples = int(ds.get("SamplesPerPixel", 1) or 1)
  bits = int(ds.get("BitsAllocated", 8) or 8)
  pixels = rows * cols * frames * samples
  if pixels > max_pixels:
    raise ReaderError(
        f"{path}: DICOM header claims {frames} frame(s) of {rows}x{cols} pixels x {samples} "
        f"sample(s) at {bits} bits ({pixels:,} pixels, {pixels * bits / 8 / 2**30:.1f} GiB "
        f"decoded), above the cap of {max_pixels:,} pixels (reader option max_pixels); "
        "not decoded")


def load_dicom(path: str | os.PathLike, *, low_pct: float = 0.5, high_pct: float = 99.5,
               use_window: bool = True, max_pixels: int | None = None
               ) -> tuple[pydicom.Dataset, list[tuple[np.ndarray, str]]]:
  """Read one DICOM file -> (its dataset, [(uint8 frame, transform text), ...]).

  Grayscale frames are (H, W), colour frames (H, W, 3). Raises ReaderError
  naming the file when it is not DICOM, has no pixel data, or needs a decoder
  package that is not installed, or (with `max_pixels`) claims more pixels.
  """
  path = os.fspath(path)
  try:
    ds = pydicom.dcmread(path)
  except InvalidDicomError as e:
    raise NotDicomError(f"{path}: not a DICOM file: {e}") from e
  except Exception as e:  # truncated or malformed headers raise many types
    raise ReaderError(f"{path}: unreadable DICOM header: {e}") from e
  if max_pixels is not None:
    check_claimed_size(ds, path, max_pixels)
  arr = _decode(ds, path)

  photometric = str(ds.get("PhotometricInterpretation", "")).upper()
  samples = int(ds.get("SamplesPerPixel", 1) or 1)
  nframes = int(ds.get("NumberOfFrames", 1) or 1)
  if photometric == "PALETTE COLOR":
    from pydicom.pixels import apply_color_lut  # pylint: disable=import-outside-toplevel
    arr = apply_color_lut(arr, ds)
    samples = 3
  frame_ndim = 3 if samples > 1 else 2
  if arr.ndim == frame_ndim:
    arr = arr[None]
  if arr.ndim != frame_ndim + 1 or (samples > 1 and arr.shape[-1] != 3):
    raise ReaderError(f"{path}: unexpected pixel array shape {arr.shape} "
                      f"for {nframes} frame(s) of {samples} sample(s)")
  if arr.dtype.byteorder not in ("=", "|"):
    arr = arr.astype(arr.dtype.newbyteorder("="))
  if samples > 1:
    return ds, _frames_color(ds, arr)
  return ds, _frames_gray(ds, arr, low_pct, high_pct, use_window)


OPTIONS = {"window": common.Option("tags", common.choice("tags", "percentile"),
                                   "VOI window from the file's tags (else percentile), "
                                   "or always the percentile window"),
           **common.PERCENTILES, "frames": common.FRAMES, "max_pixels": common.MAX_PIXELS_OPTION}


def read(path: str, options: dict[str, Any] | None = None) -> Iterator[Item]:
  """Every frame of a DICOM file (rescale, VOI window, MONOCHROME1 inversion, see
  load_dicom); index = frame number. Suggests modality and anatomy from
  the Modality and Body Part Examined tags."""
  path = os.fspath(path)
  opts = common.validate(OPTIONS, "dicom", options, path)
  common.check_file(path)
  try:
    ds, frames = load_dicom(
        path, low_pct=opts["low_pct"], high_pct=opts["high_pct"],
        use_window=opts["window"] == "tags", max_pixels=opts["max_pixels"])
  except ReaderError:
    raise
  except Exception as e:  # odd tag values that pydicom or numpy trip over
    raise ReaderError(f"{path}: cannot read DICOM: {type(e).__name__}: {e}") from e
  code = str(ds.get("Modality", "") or "").upper()
  modality = MODALITY_NAMES.get(code, code) or None
  anatomy = str(ds.get("BodyPartExamined", "") or "").lower() or None
  if opts["frames"] == "first":
    frames = frames[:1]
  for i, (pixels, transform) in enumerate(frames):
    yield pixels, common.meta(path, i, pixels, transform, modality=modality, anatomy=anatomy)
