"""The one record schema of the project.

A record is `MAGIC | uint32 big-endian header length | UTF-8 JSON header |
encoded image bytes (PNG or JPEG)`. JSON cannot execute code on load (unlike
pickle), and the image stays in a standard format any tool can open.

Header keys (all optional except `format`): `format` ("png"|"jpeg"), `source`,
`modality`, `anatomy`, `path` (original file), `index` (slice/frame/tile),
`orig_size` ([h, w]), `transform` (intensity transform applied, as text),
`label` (int or list of ints, for benchmarks).
"""
from __future__ import annotations

import io
import json
import struct
from typing import Any

import numpy as np
from PIL import Image

MAGIC = b"BVR1"
_LEN = struct.Struct(">I")


class CorruptRecordError(ValueError):
  """A record that cannot be parsed or whose image cannot be decoded."""


def encode_image(pixels: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
  """uint8 (H, W) or (H, W, 3) array -> PNG/JPEG bytes."""
  pixels = np.asarray(pixels)
  if pixels.dtype != np.uint8:
    raise ValueError(f"encode_image wants uint8 pixels, got {pixels.dtype}")
  if pixels.ndim == 3 and pixels.shape[-1] == 1:
    pixels = pixels[..., 0]
  if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] != 3):
    raise ValueError(f"encode_image wants (H, W) or (H, W, 3), got {pixels.shape}")
  buf = io.BytesIO()
  if fmt == "png":
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
  elif fmt in ("jpeg", "jpg"):
    Image.fromarray(pixels).save(buf, format="JPEG", quality=int(quality))
  else:
    raise ValueError(f"unknown image format {fmt!r} (png or jpeg)")
  return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
  """PNG/JPEG bytes -> uint8 array, (H, W) for grayscale or (H, W, 3)."""
  return np.asarray(decode_rows(open_image(data)))


def open_image(data: bytes) -> Image.Image:
  """PNG/JPEG bytes -> a PIL image with its size known and its pixels not yet
  decoded (decode_rows does that). Raises CorruptRecordError."""
  try:
    return Image.open(io.BytesIO(data))
  except Exception as e:  # PIL raises many types for bad data
    raise CorruptRecordError(f"undecodable image: {e}") from e


def decode_rows(im: Image.Image, rows: int | None = None) -> Image.Image:
  """The pixels of an `open_image`, as an "L" or "RGB" image: all rows, or
  the top `rows` where the format allows (non-interlaced PNG: its rows are
  compressed in order, so decoding stops there), the rows below left black.
  The image keeps its size: PIL's resize depends on it (the order of its two
  passes), not on the rows it does not read. Raises CorruptRecordError."""
  try:
    if rows is not None and rows < im.height and _stops_early(im):
      im.tile = [im.tile[0]._replace(extents=(0, 0, im.width, int(rows)))]
    im.load()
    if im.mode not in ("L", "RGB"):
      im = im.convert("RGB" if im.mode in ("RGBA", "P", "CMYK") else "L")
    return im
  except Exception as e:  # PIL raises many types for bad data
    raise CorruptRecordError(f"undecodable image: {e}") from e


def _stops_early(im: Image.Image) -> bool:
  # One zip tile over the whole image is PIL's plain PNG layout; Adam7
  # interlacing spreads every row over the whole stream.
  tile = im.tile
  return (im.format == "PNG" and not im.info.get("interlace") and len(tile) == 1
          and tile[0][0] == "zip" and tuple(tile[0][1]) == (0, 0, im.width, im.height)
          and hasattr(tile[0], "_replace"))


UNKNOWN = "unknown"  # the modality (and source) of a record that names none


def header(source: str, meta: dict[str, Any], pixels: np.ndarray, *,
           modality: str | None = None, anatomy: str | None = None,
           note: str | None = None) -> dict[str, Any]:
  """The record header of one image a reader gave as `(pixels, meta)`.

  `source` names the corpus entry. `modality` and `anatomy` given here (the
  spec's) win over the reader's suggestion in `meta`; the modality is
  UNKNOWN when neither names one. `note` is appended to the transform text
  (a resize after reading).
  """
  return {"source": source,
          "modality": modality or meta.get("modality") or UNKNOWN,
          "anatomy": anatomy or meta.get("anatomy"),
          "path": meta.get("path"), "index": meta.get("index"),
          "orig_size": meta.get("orig_size", [int(s) for s in pixels.shape[:2]]),
          "transform": "; ".join(t for t in (meta.get("transform"), note) if t)}


def encode_record(image: bytes, meta: dict[str, Any] | None = None,
                  fmt: str = "png") -> bytes:
  header = dict(meta or {})
  header.setdefault("format", fmt)
  head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
  return MAGIC + _LEN.pack(len(head)) + head + image


def decode_record(raw: bytes) -> tuple[bytes, dict[str, Any]]:
  """Raw record -> (image bytes, header). Raises CorruptRecordError."""
  if len(raw) < len(MAGIC) + _LEN.size or raw[:4] != MAGIC:
    raise CorruptRecordError("not a biovfm record (bad magic)")
  (n,) = _LEN.unpack_from(raw, 4)
  start = 4 + _LEN.size
  if start + n > len(raw):
    raise CorruptRecordError("record header runs past the record end")
  try:
    header = json.loads(raw[start:start + n].decode())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CorruptRecordError(f"bad record header: {e}") from e
  return raw[start + n:], header


def make_record(pixels: np.ndarray, meta: dict[str, Any] | None = None,
                fmt: str = "png", quality: int = 95) -> bytes:
  """uint8 pixels + metadata -> record bytes."""
  return encode_record(encode_image(pixels, fmt, quality), meta, fmt)


def read_record(raw: bytes) -> tuple[np.ndarray, dict[str, Any]]:
  """Record bytes -> (uint8 pixels, header)."""
  image, header = decode_record(raw)
  return decode_image(image), header
