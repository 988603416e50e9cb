"""What every reader shares: the error type, option checking, file sniffing.

A reader is `read(path, options) -> Iterator[(uint8 pixels, meta)]` over one
input file. A file it cannot turn into pixels raises `ReaderError` naming the
file and saying why, never a bare library exception. meta holds `path`,
`index`, `orig_size` [H, W] and `transform` (the intensity transform as text);
a reader may also suggest `modality` and `anatomy` (`records.header` decides).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

Item = tuple[np.ndarray, dict[str, Any]]
ReadFn = Callable[[str, dict[str, Any] | None], Iterator[Item]]


class ReaderError(ValueError):
  """A file that a reader cannot turn into pixels; the message names the file."""


# --- options -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Option:
  """One reader option: its default and a check that returns the clean value
  or raises ValueError with what is wanted."""
  default: Any
  check: Callable[[Any], Any]
  help: str


def number(v: Any) -> float:
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    raise ValueError("must be a number")
  return float(v)


def percent(v: Any) -> float:
  v = number(v)
  if not 0.0 <= v <= 100.0:
    raise ValueError("must be a percentile in [0, 100]")
  return v


def fraction(v: Any) -> float:
  v = number(v)
  if not 0.0 <= v <= 1.0:
    raise ValueError("must be a fraction in [0, 1]")
  return v


def positive_int(v: Any) -> int:
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    raise ValueError("must be an integer >= 1")
  return v


def positive_int_or_none(v: Any) -> int | None:
  return None if v is None else positive_int(v)


def boolean(v: Any) -> bool:
  if not isinstance(v, bool):
    raise ValueError("must be true or false")
  return v


def choice(*allowed: str) -> Callable[[Any], str]:
  def check(v: Any) -> str:
    if v not in allowed:
      raise ValueError(f"must be one of {', '.join(map(repr, allowed))}")
    return v
  return check


def subset(allowed: tuple, what: str) -> Callable[[Any], list]:
  def check(v: Any) -> list:
    if not isinstance(v, (list, tuple)) or not v:
      raise ValueError(f"must be a non-empty list of {what} from {list(allowed)}")
    if (any(isinstance(x, bool) or not isinstance(x, type(allowed[0])) or x not in allowed
            for x in v) or len(set(v)) != len(v)):
      raise ValueError(f"must be distinct {what} from {list(allowed)}")
    return list(v)
  return check


PERCENTILES = {
    "low_pct": Option(0.5, percent, "lower percentile of the intensity window"),
    "high_pct": Option(99.5, percent, "upper percentile of the intensity window"),
}
FRAMES = Option("all", choice("all", "first"), "every page/frame of a file, or the first")
# Checked against the header before any pixel is decoded, so memory follows the
# cap, not the file's claims (a 676-byte RLE DICOM can claim 30000x30000 pixels).
# 2^27 is a 512^3 volume; decoding takes ~5-17 bytes per pixel at peak.
MAX_PIXELS = 2**27
MAX_PIXELS_OPTION = Option(MAX_PIXELS, positive_int,
                     "largest pixel count a file (DICOM: all frames) or volume (NIfTI: "
                     "one 3D volume) may claim; larger ones are rejected unread")


def validate(spec: dict[str, Option], reader: str, options: dict[str, Any] | None,
             where: str = "options") -> dict[str, Any]:
  """`options` checked against the keys `spec` of `reader`, defaults filled in.

  Raises ValueError naming `where` (e.g. "sources[2].options") and the key for
  unknown keys (listing the known ones) and bad values.
  """
  options = {} if options is None else options
  if not isinstance(options, dict):
    raise ValueError(f"{where}: must be a mapping of option names to values, "
                     f"got {type(options).__name__}")
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

IMAGE_KINDS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WebP")
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


def suffix(path: str) -> str:
  name = os.path.basename(path).lower()
  return ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]


def check_file(path: str) -> None:
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


def meta(path: str, index: Any, pixels: np.ndarray, transform: str,
          orig_size: list[int] | None = None, **suggested: str | None) -> dict[str, Any]:
  meta = {"path": path, "index": index,
          "orig_size": orig_size or [int(s) for s in pixels.shape[:2]],
          "transform": transform}
  meta.update({k: v for k, v in suggested.items() if v})
  return meta


def detail(err: Exception, path: str) -> str:
  """The reason part of an error message, without a leading "<path>: "."""
  text = str(err)
  return text[len(path) + 2:] if text.startswith(f"{path}: ") else text
