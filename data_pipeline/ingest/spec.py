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
                                   # dicom, nifti, video, hdf5 and npy (neighbouring slices
                                   # and frames are near copies by nature), all for the others
    exclude = ["*/masks/*"]        # files whose path matches one of these are not read
    modality_by_path = { "*/US/*" = "ultrasound" }   # first match wins over `modality`

`path` may also be a list of folders, files and globs (their union).

Every mistake is reported with its key (`sources[2].reader`) before any file
is read.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import tomllib
from typing import Any

from data_pipeline.readers import registry as readers

_OUTPUT = {"shard_mb": 256.0, "format": "png", "jpeg_quality": 95, "resize_shorter": 0}
_DEDUP = {"exact": True, "near_threshold": None}
_SOURCE_KEYS = ("name", "path", "reader", "modality", "anatomy", "options", "dedup", "exclude",
                "modality_by_path")
_SOURCE_DEDUP = ("all", "exact", "none")
# Volumes and videos: near-duplicate dedup would drop most of their slices and
# frames (25 of 48 MNI brain slices at near_threshold = 6), so it is opt-in.
EXACT_ONLY_READERS = ("dicom", "nifti", "video", "hdf5", "npy")


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  path: str | tuple[str, ...]   # a folder, file or glob, or several (their union)
  reader: str
  modality: str | None
  anatomy: str | None
  options: dict
  dedup: str | None = None   # all | exact | none; None: by reader, see `dedup_mode`
  exclude: tuple[str, ...] = ()                     # fnmatch patterns on the file path
  modality_by_path: tuple[tuple[str, str], ...] = ()  # (pattern, modality), first match

  @property
  def paths(self) -> tuple[str, ...]:
    return (self.path,) if isinstance(self.path, str) else self.path

  def excluded(self, path: str) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in self.exclude)

  def modality_of(self, path: str) -> str | None:
    """The modality a file's records get: its path's rule, else the source's."""
    for pattern, modality in self.modality_by_path:
      if fnmatch.fnmatchcase(path, pattern):
        return modality
    return self.modality

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
    return hashlib.sha256(json.dumps(as_dict(self), sort_keys=True).encode()).hexdigest()[:16]


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
    out.append(Source(name, _paths(s["path"], f"{key}.path"), reader, s.get("modality"),
                      s.get("anatomy"), options, mode,
                      tuple(_strings(s.get("exclude", []), f"{key}.exclude")),
                      _rules(s.get("modality_by_path", {}), f"{key}.modality_by_path")))
  return Spec(tuple(out), output, dedup, where)


def _strings(v: Any, key: str) -> list[str]:
  if isinstance(v, str):
    v = [v]
  if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x for x in v):
    raise ValueError(f"{key} must be a string or a list of strings, got {v!r}")
  return list(v)


def _paths(v: Any, key: str) -> str | tuple[str, ...]:
  """One path (a string, as written) or several (a tuple), with ~ expanded."""
  if isinstance(v, str):
    return os.path.expanduser(v)
  paths = _strings(v, key)
  if not paths:
    raise ValueError(f"{key} is an empty list")
  return tuple(os.path.expanduser(p) for p in paths)


def _rules(v: Any, key: str) -> tuple[tuple[str, str], ...]:
  if not isinstance(v, dict) or not all(isinstance(m, str) and m for m in v.values()):
    raise ValueError(f"{key} must be a table of path pattern = modality, got {v!r}")
  return tuple((str(p), m) for p, m in v.items())


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
  """The spec as the manifest stores it (JSON types: lists, not tuples)."""
  def source(s: Source) -> dict:
    d = dataclasses.asdict(s)
    for key in ("exclude", "modality_by_path"):  # unset: as specs without them always were
      if not d[key]:
        del d[key]
    return d
  return json.loads(json.dumps({"sources": [source(s) for s in spec.sources],
                                "output": spec.output, "dedup": spec.dedup}))
