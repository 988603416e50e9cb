"""Readers the ingestion spec can name, with validated options and reasons for rejects.

Each reader is `read(path, options) -> Iterator[(uint8 pixels, meta)]` over one
input file; it wraps the format code of `data_pipeline.sources`. The driver
counts a file whose reading raises `ReaderError` as rejected and writes the
message ("<path>: <reason>") to the rejects file, so every failure here names
the file and says why, never a bare library exception. A reader may raise
after yielding some items (a stream cut off mid-file, a video frame that will
not decode); the driver decides what to keep of such a file.

meta holds `path`, `index` (JSON: page, frame, [volume, axis, slice] or
[split, row]), `orig_size` [H, W] and `transform` (the intensity transform as
text); DICOM and MedMNIST also suggest `modality` and `anatomy`, which the
driver uses only when the spec leaves them unset.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import os
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from PIL import Image

from data_pipeline.sources import dicom as dicom_source
from data_pipeline.sources import medmnist
from data_pipeline.sources.images import (IMAGE_EXTENSIONS, ReaderError, list_files,
                                          load_image, squeeze_gray)
from data_pipeline.sources.nifti import iter_nifti

Item = tuple[np.ndarray, dict[str, Any]]
ReadFn = Callable[[str, dict[str, Any] | None], Iterator[Item]]

DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
NPZ_EXTENSIONS = (".npz",)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
VIDEO_INSTALL_HINT = 'pip install "biovfm-jax[video]"'

# MedMNIST benchmark -> (modality, anatomy), suggested when the spec sets none.
MEDMNIST_KINDS = {
    "pathmnist": ("pathology", "colon"), "chestmnist": ("X-ray", "chest"),
    "dermamnist": ("dermoscopy", "skin"), "octmnist": ("OCT", "retina"),
    "pneumoniamnist": ("X-ray", "chest"), "retinamnist": ("fundus", "retina"),
    "breastmnist": ("ultrasound", "breast"), "bloodmnist": ("microscopy", "blood"),
    "tissuemnist": ("microscopy", "kidney"), "organamnist": ("CT", "abdomen"),
    "organcmnist": ("CT", "abdomen"), "organsmnist": ("CT", "abdomen"),
}


# --- options -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Option:
  """One reader option: its default and a check that returns the clean value
  or raises ValueError with what is wanted."""
  default: Any
  check: Callable[[Any], Any]
  help: str


def _number(v: Any) -> float:
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    raise ValueError("must be a number")
  return float(v)


def _percent(v: Any) -> float:
  v = _number(v)
  if not 0.0 <= v <= 100.0:
    raise ValueError("must be a percentile in [0, 100]")
  return v


def _fraction(v: Any) -> float:
  v = _number(v)
  if not 0.0 <= v <= 1.0:
    raise ValueError("must be a fraction in [0, 1]")
  return v


def _positive_int(v: Any) -> int:
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    raise ValueError("must be an integer >= 1")
  return v


def _positive_int_or_none(v: Any) -> int | None:
  return None if v is None else _positive_int(v)


def _boolean(v: Any) -> bool:
  if not isinstance(v, bool):
    raise ValueError("must be true or false")
  return v


def _choice(*allowed: str) -> Callable[[Any], str]:
  def check(v: Any) -> str:
    if v not in allowed:
      raise ValueError(f"must be one of {', '.join(map(repr, allowed))}")
    return v
  return check


def _subset(allowed: tuple, what: str) -> Callable[[Any], list]:
  def check(v: Any) -> list:
    if not isinstance(v, (list, tuple)) or not v:
      raise ValueError(f"must be a non-empty list of {what} from {list(allowed)}")
    if (any(isinstance(x, bool) or not isinstance(x, type(allowed[0])) or x not in allowed
            for x in v) or len(set(v)) != len(v)):
      raise ValueError(f"must be distinct {what} from {list(allowed)}")
    return list(v)
  return check


def _flag(v: Any) -> str | None:
  if v is not None and v not in medmnist.FLAGS:
    raise ValueError(f"must be a MedMNIST benchmark ({', '.join(medmnist.FLAGS)}) "
                     "or null to take it from the file name")
  return v


_PCT = {
    "low_pct": Option(0.5, _percent, "lower percentile of the intensity window"),
    "high_pct": Option(99.5, _percent, "upper percentile of the intensity window"),
}
_FRAMES = Option("all", _choice("all", "first"), "every page/frame of a file, or the first")
# Checked against the header before any pixel is decoded, so memory follows the
# cap, not the file's claims (a 676-byte RLE DICOM can claim 30000x30000 pixels).
# 2^27 is a 512^3 volume; decoding takes ~5-17 bytes per pixel at peak.
MAX_PIXELS = 2**27
_MAX_PIXELS = Option(MAX_PIXELS, _positive_int,
                     "largest pixel count a file (DICOM: all frames) or volume (NIfTI: "
                     "one 3D volume) may claim; larger ones are rejected unread")

OPTIONS: dict[str, dict[str, Option]] = {
    "image": {**_PCT, "frames": _FRAMES},
    "dicom": {"window": Option("tags", _choice("tags", "percentile"),
                               "VOI window from the file's tags (else percentile), "
                               "or always the percentile window"),
              **_PCT, "frames": _FRAMES, "max_pixels": _MAX_PIXELS},
    "nifti": {"axes": Option([0, 1, 2], _subset((0, 1, 2), "axes"),
                             "canonical axes to slice: 0 sagittal, 1 coronal, 2 axial"),
              "stride": Option(1, _positive_int, "every n-th slice"),
              "skip_empty": Option(True, _boolean, "drop near-constant slices"),
              "empty_fraction": Option(0.02, _fraction,
                                       "a slice with fewer differing pixels is empty"),
              **_PCT,
              "volumes": Option("first", _choice("first", "all"), "volumes of a 4D file"),
              "square_pixels": Option(True, _boolean, "resample to square pixels"),
              "max_pixels": _MAX_PIXELS},
    "medmnist": {"splits": Option(list(medmnist.SPLITS), _subset(medmnist.SPLITS, "splits"),
                                  "splits to read"),
                 "flag": Option(None, _flag, "benchmark; default: from the file name")},
    "video": {"stride": Option(1, _positive_int, "every n-th frame"),
              "max_frames": Option(None, _positive_int_or_none,
                                   "at most this many frames per file (null: all)")},
}


def _union_options() -> dict[str, Option]:
  """"auto" takes any reader's option; a key's default must agree across readers."""
  union: dict[str, Option] = {}
  for name, spec in OPTIONS.items():
    for key, opt in spec.items():
      if key in union and union[key].default != opt.default:
        raise AssertionError(f"option {key!r} of reader {name!r} has another default")
      union.setdefault(key, opt)
  return union


OPTIONS["auto"] = _union_options()


def _check_reader(reader: str) -> None:
  if reader not in OPTIONS:
    raise ValueError(f"unknown reader {reader!r}; known: {', '.join(OPTIONS)}")


def validate_options(reader: str, options: dict[str, Any] | None,
                     where: str = "options") -> dict[str, Any]:
  """`options` checked against `reader`'s keys, defaults filled in.

  Raises ValueError naming `where` (e.g. "sources[2].options") and the key for
  unknown keys (listing the known ones) and bad values.
  """
  _check_reader(reader)
  options = {} if options is None else options
  if not isinstance(options, dict):
    raise ValueError(f"{where}: must be a mapping of option names to values, "
                     f"got {type(options).__name__}")
  spec = OPTIONS[reader]
  unknown = sorted(set(options) - set(spec), key=str)
  if unknown:
    raise ValueError(f"{where}: unknown option {unknown[0]!r} for reader {reader!r}; "
                     f"known options: {', '.join(spec)}")
  out = {}
  for key, opt in spec.items():
    if key not in options:
      out[key] = list(opt.default) if isinstance(opt.default, list) else opt.default
      continue
    try:
      out[key] = opt.check(options[key])
    except ValueError as e:
      raise ValueError(f"{where}.{key}: {e} ({opt.help}), got {options[key]!r}") from None
  if "low_pct" in out and out["low_pct"] >= out["high_pct"]:
    raise ValueError(f"{where}.low_pct: must be below high_pct, got low_pct="
                     f"{out['low_pct']:g}, high_pct={out['high_pct']:g}")
  return out


# --- what a file is ------------------------------------------------------------

_IMAGE_KINDS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WebP")
_MAGICS = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"),
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"\x1f\x8b", "gzip data"),
    (b"PK\x03\x04", "a zip archive"), (b"\x1a\x45\xdf\xa3", "Matroska/WebM video"),
    (b"%PDF", "PDF"),
)


def _head(path: str, n: int = 512) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read(n)
  except OSError:
    return b""


def has_dicm_magic(path: str) -> bool:
  """True when bytes 128..131 read "DICM" (the DICOM Part 10 file preamble)."""
  return _head(path, 132)[128:132] == b"DICM"


def sniff(path: str) -> str | None:
  """What the content of `path` looks like, from its first bytes; None if unknown."""
  head = _head(path)
  if head[128:132] == b"DICM":  # first: some DICOM preambles hold a TIFF header
    return "DICOM"
  for magic, kind in _MAGICS:
    if head.startswith(magic):
      return kind
  if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in (
      12, 40, 52, 56, 64, 108, 124):  # the DIB header sizes BMP uses
    return "BMP"
  if head[:4] == b"RIFF":
    return {b"WEBP": "WebP", b"AVI ": "AVI video"}.get(head[8:12], "RIFF data")
  if head[4:8] == b"ftyp":
    return "MP4/QuickTime video"
  if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00"):
    return "NIfTI"
  if head and b"\x00" not in head:
    text = head.decode("utf-8", errors="replace")
    ok = sum((c.isprintable() and c != "\ufffd") or c in "\r\n\t" for c in text)
    if ok >= 0.95 * len(text):
      return "text"
  return None


def _suffix(path: str) -> str:
  name = os.path.basename(path).lower()
  return ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]


def detect_reader(path: str) -> str | None:
  """The reader "auto" uses for `path`: by suffix, else DICOM by its "DICM"
  magic or an image by its signature; None when nothing fits."""
  suffix = _suffix(path)
  for name, exts in (("image", IMAGE_EXTENSIONS), ("dicom", DICOM_EXTENSIONS),
                     ("nifti", NIFTI_EXTENSIONS), ("medmnist", NPZ_EXTENSIONS),
                     ("video", VIDEO_EXTENSIONS)):
    if suffix in exts:
      return name
  kind = sniff(path)
  if kind == "DICOM":
    return "dicom"
  return "image" if kind in _IMAGE_KINDS else None


_ACCEPTS: dict[str, Callable[[str], bool]] = {
    "image": lambda p: _suffix(p) in IMAGE_EXTENSIONS,
    "dicom": lambda p: _suffix(p) in DICOM_EXTENSIONS or has_dicm_magic(p),
    "nifti": lambda p: _suffix(p) in NIFTI_EXTENSIONS,
    "medmnist": lambda p: _suffix(p) in NPZ_EXTENSIONS,
    "video": lambda p: _suffix(p) in VIDEO_EXTENSIONS,
    "auto": lambda p: detect_reader(p) is not None,
}
_KINDS = {
    "image": "image (" + " ".join(IMAGE_EXTENSIONS) + ")",
    "dicom": "DICOM (" + " ".join(DICOM_EXTENSIONS) + ", or the DICM magic)",
    "nifti": "NIfTI (.nii .nii.gz)", "medmnist": "MedMNIST (.npz)",
    "video": "video (" + " ".join(VIDEO_EXTENSIONS) + ")", "auto": "readable",
}


def files_for(path_or_glob: str, reader: str,
              options: dict[str, Any] | None = None) -> list[str]:
  """The sorted input files of one source.

  A file is taken as it is; a folder is walked recursively (hidden files and
  folders skipped) and a glob expanded, keeping the files `reader` takes.
  Raises FileNotFoundError naming the path or pattern when nothing is found.
  `options` is accepted for symmetry with the readers; no option filters files.
  """
  del options
  _check_reader(reader)
  pattern = os.path.expanduser(os.fspath(path_or_glob))
  if any(c in pattern for c in "*?[") and not os.path.exists(pattern):
    roots = glob.glob(pattern, recursive=True)
    if not roots:
      raise FileNotFoundError(f"{path_or_glob}: no file or folder matches this pattern")
  elif os.path.isfile(pattern):
    return [pattern]
  elif os.path.isdir(pattern):
    roots = [pattern]
  else:
    raise FileNotFoundError(f"{path_or_glob}: no such file or folder")
  accept = _ACCEPTS[reader]
  found = set()
  for root in roots:
    candidates = list_files(root) if os.path.isdir(root) else [root]
    found.update(p for p in candidates if os.path.isfile(p) and accept(p))
  if not found:
    raise FileNotFoundError(f"{path_or_glob}: no {_KINDS[reader]} files found there")
  return sorted(found)


# --- readers -------------------------------------------------------------------

def _check_file(path: str) -> None:
  """Reject what is not a non-empty regular file before any library sees it."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    raise ReaderError(f"{path}: no such file") from None
  except OSError as e:
    raise ReaderError(f"{path}: cannot open: {e.strerror or e}") from e
  if os.path.isdir(path):
    raise ReaderError(f"{path}: is a folder, not a file")
  if st.st_size == 0:
    raise ReaderError(f"{path}: empty file (0 bytes)")


def _meta(path: str, index: Any, pixels: np.ndarray, transform: str,
          orig_size: list[int] | None = None, **suggested: str | None) -> dict[str, Any]:
  meta = {"path": path, "index": index,
          "orig_size": orig_size or [int(s) for s in pixels.shape[:2]],
          "transform": transform}
  meta.update({k: v for k, v in suggested.items() if v})
  return meta


def _detail(err: Exception, path: str) -> str:
  """The reason part of an error message, without a leading "<path>: "."""
  text = str(err)
  return text[len(path) + 2:] if text.startswith(f"{path}: ") else text


def read_image(path: str, options: dict[str, Any] | None = None) -> Iterator[Item]:
  """Every page (frame) of a PNG/JPEG/TIFF/BMP file; index = page number."""
  path = os.fspath(path)
  opts = validate_options("image", options, path)
  _check_file(path)
  try:
    frames = load_image(path, opts["low_pct"], opts["high_pct"])
  except ReaderError as e:
    raise ReaderError(_image_reason(path, _detail(e, path))) from e
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
    yield pixels, _meta(path, i, pixels, transform)


def _image_reason(path: str, detail: str) -> str:
  """Say what a file that failed to load as an image actually is."""
  detail = detail.removeprefix("cannot read image: ")
  kind = sniff(path)
  if kind in _IMAGE_KINDS:
    state = "truncated" if "truncated" in detail.lower() else "damaged"
    return f"{path}: {state} {kind}: {detail}"
  if kind is not None:
    return (f"{path}: not an image: the content is {kind} "
            f"(the name ends in {_suffix(path) or 'no suffix'!r})")
  return f"{path}: not a readable image: {detail}"


def read_dicom(path: str, options: dict[str, Any] | None = None) -> Iterator[Item]:
  """Every frame of a DICOM file (rescale, VOI window, MONOCHROME1 inversion, see
  sources/dicom.py); index = frame number. Suggests modality and anatomy from
  the Modality and Body Part Examined tags."""
  path = os.fspath(path)
  opts = validate_options("dicom", options, path)
  _check_file(path)
  try:
    ds, frames = dicom_source.read_dicom(
        path, low_pct=opts["low_pct"], high_pct=opts["high_pct"],
        use_window=opts["window"] == "tags", max_pixels=opts["max_pixels"])
  except ReaderError:
    raise
  except Exception as e:  # odd tag values that pydicom or numpy trip over
    raise ReaderError(f"{path}: cannot read DICOM: {type(e).__name__}: {e}") from e
  code = str(ds.get("Modality", "") or "").upper()
  modality = dicom_source.MODALITY_NAMES.get(code, code) or None
  anatomy = str(ds.get("BodyPartExamined", "") or "").lower() or None
  if opts["frames"] == "first":
    frames = frames[:1]
  for i, (pixels, transform) in enumerate(frames):
    yield pixels, _meta(path, i, pixels, transform, modality=modality, anatomy=anatomy)


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


def read_nifti(path: str, options: dict[str, Any] | None = None) -> Iterator[Item]:
  """Slices of a volume in canonical (RAS+) orientation, percentile-scaled per
  volume (see sources/nifti.py); index = [volume, axis, slice]."""
  path = os.fspath(path)
  opts = validate_options("nifti", options, path)
  _check_file(path)
  _check_nifti_header(path, opts["max_pixels"])
  kept = 0
  try:
    for pixels, meta in iter_nifti(
        path, axes=opts["axes"], stride=opts["stride"], low_pct=opts["low_pct"],
        high_pct=opts["high_pct"], volumes=opts["volumes"], skip_empty=opts["skip_empty"],
        empty_fraction=opts["empty_fraction"], square_pixels=opts["square_pixels"]):
      kept += 1
      yield pixels, _meta(path, meta["index"], pixels, meta["transform"], meta["orig_size"])
  except ReaderError:
    raise
  except Exception as e:  # bad scaling values, a gzip stream cut short
    raise ReaderError(f"{path}: cannot read NIfTI voxel data: {type(e).__name__}: {e}") from e
  if not kept:  # a file that gives nothing is still an input: it must be counted
    raise ReaderError(f"{path}: no slice kept: every slice is near-constant after the "
                      "volume's intensity window (skip_empty; set it false to keep them)")


def _flag_from_name(path: str) -> tuple[str | None, int | None]:
  """MedMNIST's own file names: "{flag}.npz" (28 px) or "{flag}_{size}.npz"."""
  stem = os.path.basename(path).lower().removesuffix(".npz")
  m = re.fullmatch(r"(.+?)(?:_(\d+))?", stem)
  flag, size = m.group(1), m.group(2)
  if flag not in medmnist.FLAGS:
    return None, None
  return flag, int(size) if size else 28


def read_medmnist(path: str, options: dict[str, Any] | None = None) -> Iterator[Item]:
  """Every image of the chosen splits of a MedMNIST npz, streamed in chunks
  (bounded memory); index = [split, row]. Pixels are as stored."""
  path = os.fspath(path)
  opts = validate_options("medmnist", options, path)
  _check_file(path)
  named, size = _flag_from_name(path)
  flag = opts["flag"] or named
  if flag is None:
    raise ReaderError(f"{path}: cannot tell the MedMNIST benchmark from the file name "
                      "(<flag>.npz or <flag>_<size>.npz); set the reader option 'flag'")
  try:
    medmnist.npz_header(path, flag, size if flag == named else None)
  except (medmnist.NpzFormatError, KeyError) as e:
    raise ReaderError(f"{path}: not a {flag} MedMNIST npz: {_detail(e, path)}") from e
  modality, anatomy = MEDMNIST_KINDS.get(flag, (None, None))
  for split in opts["splits"]:
    row = 0
    try:
      for chunk in medmnist.iter_npz_rows(path, f"{split}_images", chunk=256):
        for image in chunk:
          # A copy: a kept row must not pin its whole chunk in memory.
          pixels = np.array(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1
                            else image)
          yield pixels, _meta(path, [split, row], pixels, "MedMNIST npz, as stored",
                              modality=modality, anatomy=anatomy)
          row += 1
    except medmnist.NpzFormatError as e:
      raise ReaderError(f"{path}: damaged MedMNIST npz: {_detail(e, path)}") from e
    except Exception as e:  # zip CRC errors, a deflate stream cut short
      raise ReaderError(f"{path}: damaged MedMNIST npz at {split} row {row}: "
                        f"{type(e).__name__}: {e}") from e


def _is_grey(pix_fmt: str | None) -> bool:
  return bool(pix_fmt) and pix_fmt.startswith(("gray", "ya", "mono", "y400"))


def read_video(path: str, options: dict[str, Any] | None = None) -> Iterator[Item]:
  """Every `stride`-th frame of the first video stream (PyAV), as RGB, or grey
  when the stream is grey or its colour frames have equal channels; index =
  frame number (0-based, decoding order), at most `max_frames` frames."""
  path = os.fspath(path)
  opts = validate_options("video", options, path)
  _check_file(path)
  try:
    import av  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ReaderError(f'{path}: reading video needs the package "av" (PyAV), which is not '
                      f"installed: {VIDEO_INSTALL_HINT}") from e
  try:
    container = av.open(path)
  except Exception as e:  # av.error.* for unknown containers and damaged headers
    raise ReaderError(f"{path}: cannot open video: {e}") from e
  stride, limit = opts["stride"], opts["max_frames"]
  with container:
    if not container.streams.video:
      raise ReaderError(f"{path}: no video stream in the file")
    stream = container.streams.video[0]
    codec = stream.codec_context.name
    n, taken = -1, 0
    try:
      for frame in container.decode(stream):
        n += 1
        if n % stride:
          continue
        pix_fmt = frame.format.name
        if _is_grey(pix_fmt):
          pixels, text = frame.to_ndarray(format="gray"), f"video {codec} {pix_fmt} -> grey"
        else:
          pixels = squeeze_gray(frame.to_ndarray(format="rgb24"))
          text = f"video {codec} {pix_fmt} -> RGB" + (
              " (equal channels -> grey)" if pixels.ndim == 2 else "")
        yield np.ascontiguousarray(pixels), _meta(path, n, pixels, text)
        taken += 1
        if limit is not None and taken >= limit:
          return
    except Exception as e:  # av.error.* for damaged packets
      raise ReaderError(f"{path}: cannot decode video frame {n}: {e}") from e
  if n < 0:
    raise ReaderError(f"{path}: the video stream has no decodable frames")


def read_auto(path: str, options: dict[str, Any] | None = None) -> Iterator[Item]:
  """The reader `detect_reader` picks, given the options it knows."""
  path = os.fspath(path)
  opts = validate_options("auto", options, path)
  _check_file(path)
  name = detect_reader(path)
  if name is None:
    kind = sniff(path) or "unknown"
    raise ReaderError(f"{path}: unrecognised file type (suffix {_suffix(path) or 'none'!r}, "
                      f"content {kind}); name a reader for this source in the spec")
  yield from READERS[name](path, {k: v for k, v in opts.items() if k in OPTIONS[name]})


READERS: dict[str, ReadFn] = {
    "image": read_image, "dicom": read_dicom, "nifti": read_nifti,
    "medmnist": read_medmnist, "video": read_video, "auto": read_auto,
}


def get_reader(name: str) -> ReadFn:
  _check_reader(name)
  return READERS[name]
