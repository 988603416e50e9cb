"""The corpus spec: which sources to ingest and how to store them.

A TOML (or JSON) file; see README "Bring your own data" for a full example:

    [output]
    shard_mb = 256            # shards close at this size
    format = "png"            # png (lossless) | jpeg
    jpeg_quality = 95
    resize_shorter = 512      # shorter side down to this many pixels; 0 keeps sizes

    [dedup]
    exact = true              # drop images whose pixels equal an earlier one
    near_threshold = 6        # drop images within this pHash Hamming distance; omit: off

    [[sources]]
    name = "lidc_ct"
    path = "/data/LIDC/**/*.dcm"   # a folder, a file or a glob
    reader = "dicom"               # image | dicom | nifti | medmnist | video | auto
    modality = "CT"
    anatomy = "chest"
    options = { window = "tags" }
    dedup = "all"                  # all | exact (no near check) | none; default: exact for
                                   # dicom, nifti and video (neighbouring slices and frames
                                   # are near copies by nature), all for the others

Every mistake is reported with its key (`sources[2].reader`) before any file
is read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tomllib
from typing import Any

from data_pipeline.readers import registry as readers

_OUTPUT = {"shard_mb": 256.0, "format": "png", "jpeg_quality": 95, "resize_shorter": 0}
_DEDUP = {"exact": True, "near_threshold": None}
_SOURCE_KEYS = ("name", "path", "reader", "modality", "anatomy", "options", "dedup")
_SOURCE_DEDUP = ("all", "exact", "none")
# Volumes and videos: near-duplicate dedup would drop most of their slices and
# frames (25 of 48 MNI brain slices at near_threshold = 6), so it is opt-in.
EXACT_ONLY_READERS = ("dicom", "nifti", "video")


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  path: str
  reader: str
  modality: str | None
  anatomy: str | None
  options: dict
  dedup: str | None = None   # all | exact | none; None: by reader, see `dedup_mode`

  def dedup_mode(self, path: str) -> tuple[str, str]:
    """(mode, why) for one input file: the spec's setting, or the reader's default."""
    if self.dedup is not None:
      return self.dedup, "set in the spec"
    reader = readers.detect_reader(path) if self.reader == "auto" else self.reader
    if reader in EXACT_ONLY_READERS:
      return "exact", f"default for {reader}: neighbouring slices/frames are near copies"
    return "all", f"default for {reader}"


@dataclasses.dataclass(frozen=True)
class Spec:
  sources: tuple[Source, ...]
  output: dict
  dedup: dict
  path: str = ""

  def fingerprint(self) -> str:
    """Changes whenever anything that shapes the output changes (checked on resume)."""
    doc = {"sources": [dataclasses.asdict(s) for s in self.sources],
           "output": self.output, "dedup": self.dedup}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _section(doc: dict, name: str, defaults: dict, where: str) -> dict:
  given = doc.get(name, {}) or {}
  if not isinstance(given, dict):
    raise ValueError(f"{where}: [{name}] must be a table")
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"{where}: unknown key(s) {unknown} in [{name}]; known: {sorted(defaults)}")
  return {**defaults, **given}


def parse_spec(doc: dict, where: str = "spec") -> Spec:
  unknown = sorted(set(doc) - {"output", "dedup", "sources"})
  if unknown:
    raise ValueError(f"{where}: unknown top-level key(s) {unknown}; known: output, dedup, sources")
  output = _section(doc, "output", _OUTPUT, where)
  if output["format"] not in ("png", "jpeg"):
    raise ValueError(f"{where}: output.format={output['format']!r} must be 'png' or 'jpeg'")
  if not 1 <= int(output["jpeg_quality"]) <= 100:
    raise ValueError(f"{where}: output.jpeg_quality must be in [1, 100]")
  if float(output["shard_mb"]) <= 0:
    raise ValueError(f"{where}: output.shard_mb must be > 0")
  if int(output["resize_shorter"]) < 0:
    raise ValueError(f"{where}: output.resize_shorter must be >= 0 (0 keeps sizes)")
  dedup = _section(doc, "dedup", _DEDUP, where)
  t = dedup["near_threshold"]
  if t is not None and (not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= 32):
    raise ValueError(f"{where}: dedup.near_threshold={t!r} must be an integer in [0, 32] "
                     "(bits of a 64-bit pHash) or absent")
  sources = doc.get("sources")
  if not sources or not isinstance(sources, list):
    raise ValueError(f"{where}: no [[sources]]")
  out, names = [], set()
  for i, s in enumerate(sources):
    key = f"{where}: sources[{i}]"
    unknown = sorted(set(s) - set(_SOURCE_KEYS))
    if unknown:
      raise ValueError(f"{key}: unknown key(s) {unknown}; known: {list(_SOURCE_KEYS)}")
    for required in ("name", "path"):
      if not s.get(required):
        raise ValueError(f"{key}.{required} is required")
    name = str(s["name"])
    if not re.fullmatch(r"[\w.\-]+", name):
      raise ValueError(f"{key}.name={name!r}: use letters, digits, '.', '-' or '_'")
    if name in names:
      raise ValueError(f"{key}.name={name!r} is used twice")
    names.add(name)
    reader = str(s.get("reader", "auto"))
    if reader not in readers.READERS:
      raise ValueError(f"{key}.reader={reader!r}; known: {sorted(readers.READERS)}")
    options = readers.validate_options(reader, dict(s.get("options") or {}),
                                       f"{key}.options")
    mode = s.get("dedup")
    if mode is not None and mode not in _SOURCE_DEDUP:
      raise ValueError(f"{key}.dedup={mode!r} must be one of {_SOURCE_DEDUP}")
    out.append(Source(name, os.path.expanduser(str(s["path"])), reader,
                      s.get("modality"), s.get("anatomy"), options, mode))
  return Spec(tuple(out), output, dedup, where)


def load_spec(path: str) -> Spec:
  """Reads a .toml or .json spec; errors name the file and the key."""
  path = os.path.expanduser(path)
  try:
    with open(path, "rb") as f:
      doc = json.load(f) if path.endswith(".json") else tomllib.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"no spec file {path}") from None
  except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'TOML'}: "
                     f"{e}") from e
  return parse_spec(doc, path)


def as_dict(spec: Spec) -> dict[str, Any]:
  return {"sources": [dataclasses.asdict(s) for s in spec.sources], "output": spec.output,
          "dedup": spec.dedup}
