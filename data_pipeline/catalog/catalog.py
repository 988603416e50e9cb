"""A corpus catalog: one entry per public source, with what it is and how to read it.

The catalog is a TOML file (`biovfm21m.toml` here: the 61 sources of the
BioVFM-21M study). Each `[[source]]` records what was published (name,
modalities, anatomy, year, image count, address, access terms) and a preset:
the reader, the file patterns of the source's released layout (relative to
its folder under the root, `folder`, by default the name), files to leave out,
the modality of each file where the layout says it, and the reader options
that set the slicing policy of volumes (axes, stride, empty slices), the frame
stride of videos and the intensity policy (DICOM window, percentiles).
`preset = "documented"` means the layout was taken from the source's own
documentation; `"guess"` means it was not, and says why in `notes`.

`load("biovfm21m")` (or a path to a catalog of one's own) checks every entry:
a known reader, options that reader takes, patterns that parse, known
modalities and access terms. Errors name the file and the entry.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import tomllib
from typing import Any

from data_pipeline.readers import registry as readers

HERE = os.path.dirname(os.path.abspath(__file__))
MODALITIES = ("CT", "MR", "X-ray", "ultrasound", "NM", "microscopy", "dermoscopy",
              "endoscopy", "fundus", "OCTA")
ACCESS = {
    "open": "open download",
    "registration": "free, after registration or accepting terms",
    "credentialed": "credentialed access and a data use agreement",
}
PRESETS = ("documented", "guess")
_KEYS = {"name", "modality", "anatomy", "year", "images", "url", "access", "reader",
         "patterns", "folder", "exclude", "modality_by_path", "options", "preset", "notes"}
_REQUIRED = ("name", "modality", "year", "images", "url", "access", "reader", "patterns",
             "preset")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One source of a catalog."""
  name: str
  modality: tuple[str, ...]
  anatomy: str
  year: int
  images: int                       # as published
  url: str
  access: str                       # a key of ACCESS
  reader: str
  patterns: tuple[str, ...]         # globs relative to the source's folder
  folder: str                       # under the root
  exclude: tuple[str, ...]          # fnmatch patterns relative to the folder
  modality_by_path: tuple[tuple[str, str], ...]
  options: dict
  preset: str                       # documented | guess
  notes: str

  @property
  def key(self) -> str:
    """The name as a spec and the shards' records spell it (no spaces)."""
    return re.sub(r"[^\w.\-]+", "_", self.name)

  def policy(self) -> str:
    """The reading policy in words: slicing, frames, intensity."""
    o, r = self.options, self.reader
    if r == "dicom":
      return ("VOI window from tags" if o.get("window", "tags") == "tags"
              else "percentile window") + _pct(o)
    if r == "nifti":
      axes = ",".join(("sag", "cor", "ax")[a] for a in o.get("axes", [0, 1, 2]))
      return (f"slices {axes}, stride {o.get('stride', 1)}, "
              f"{'skip' if o.get('skip_empty', True) else 'keep'} empty; "
              f"volume percentiles{_pct(o)}")
    if r == "video":
      return f"every {o.get('stride', 1)}th frame"
    if r in ("hdf5", "npy"):
      what = f"datasets {'/'.join(o['datasets'])}; " if o.get("datasets") else ""
      return (f"{what}stride {o.get('stride', 1)}; {o.get('window_scope', 'file')} "
              f"percentiles{_pct(o)} unless uint8")
    if r == "image":
      return "8-bit as is; 16-bit by percentiles" + _pct(o)
    return "reader defaults"


def _pct(o: dict) -> str:
  if "low_pct" in o or "high_pct" in o:
    return f" {o.get('low_pct', 0.5):g}-{o.get('high_pct', 99.5):g}%"
  return ""


@dataclasses.dataclass(frozen=True)
class Catalog:
  name: str
  path: str
  entries: tuple[Entry, ...]
  subsets: dict[str, dict]

  @property
  def total_images(self) -> int:
    return sum(e.images for e in self.entries)

  def entry(self, name: str) -> Entry:
    for e in self.entries:
      if name in (e.name, e.key):
        return e
    raise KeyError(name)

  def select(self, names: list[str] | None) -> list[Entry]:
    """Entries by name (case-insensitive, either spelling), all when `names` is None."""
    if not names:
      return list(self.entries)
    table = {n.lower(): e for e in self.entries for n in (e.name, e.key)}
    unknown = [n for n in names if n.lower() not in table]
    if unknown:
      raise ValueError(f"--sources: {', '.join(map(repr, unknown))} not in catalog "
                       f"{self.name} (see --list)")
    return [table[n.lower()] for n in dict.fromkeys(names)]


def catalog_path(name_or_path: str) -> str:
  """A catalog shipped here by name ("biovfm21m"), or a TOML file of one's own."""
  if os.sep not in name_or_path and not name_or_path.endswith(".toml"):
    path = os.path.join(HERE, f"{name_or_path}.toml")
    if not os.path.isfile(path):
      shipped = sorted(f[:-5] for f in os.listdir(HERE) if f.endswith(".toml"))
      raise FileNotFoundError(f"no catalog named {name_or_path!r}; shipped: {shipped}, "
                              "or give the path of a .toml catalog")
    return path
  path = os.path.abspath(os.path.expanduser(name_or_path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no catalog file {path}")
  return path


def _check_pattern(p: Any, key: str) -> str:
  if not isinstance(p, str) or not p or os.path.isabs(p) or ".." in p.split("/"):
    raise ValueError(f"{key}: {p!r} must be a relative glob inside the source's folder")
  try:
    re.compile(fnmatch.translate(p))
  except re.error as e:
    raise ValueError(f"{key}: {p!r} is not a valid glob: {e}") from e
  return p


def _entry(doc: dict, where: str) -> Entry:
  unknown = sorted(set(doc) - _KEYS)
  if unknown:
    raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(_KEYS)}")
  missing = [k for k in _REQUIRED if k not in doc]
  if missing:
    raise ValueError(f"{where}: missing {missing}")
  mods = doc["modality"] if isinstance(doc["modality"], list) else [doc["modality"]]
  bad = [m for m in mods if m not in MODALITIES]
  if bad or not mods:
    raise ValueError(f"{where}.modality: {bad or mods} not among {list(MODALITIES)}")
  for key in ("year", "images"):
    if isinstance(doc[key], bool) or not isinstance(doc[key], int) or doc[key] < 1:
      raise ValueError(f"{where}.{key}={doc[key]!r} must be a positive integer")
  if doc["access"] not in ACCESS:
    raise ValueError(f"{where}.access={doc['access']!r}; one of {list(ACCESS)}")
  if doc["preset"] not in PRESETS:
    raise ValueError(f"{where}.preset={doc['preset']!r}; one of {list(PRESETS)}")
  if doc["preset"] == "guess" and not doc.get("notes"):
    raise ValueError(f"{where}: a guessed preset needs notes saying what is guessed")
  if doc["reader"] not in readers.READERS:
    raise ValueError(f"{where}.reader={doc['reader']!r}; known: {sorted(readers.READERS)}")
  options = dict(doc.get("options") or {})
  readers.validate_options(doc["reader"], options, f"{where}.options")  # raises on bad ones
  patterns = doc["patterns"] if isinstance(doc["patterns"], list) else [doc["patterns"]]
  if not patterns:
    raise ValueError(f"{where}.patterns is empty")
  patterns = [_check_pattern(p, f"{where}.patterns") for p in patterns]
  exclude = [_check_pattern(p, f"{where}.exclude") for p in doc.get("exclude", [])]
  rules = doc.get("modality_by_path", {})
  for pattern, m in rules.items():
    _check_pattern(pattern, f"{where}.modality_by_path")
    if m not in mods:
      raise ValueError(f"{where}.modality_by_path[{pattern!r}]={m!r} is not one of the "
                       f"entry's modalities {mods}")
  folder = str(doc.get("folder", doc["name"]))
  _check_pattern(folder, f"{where}.folder")
  return Entry(str(doc["name"]), tuple(mods), str(doc.get("anatomy", "")), doc["year"],
               doc["images"], str(doc["url"]), doc["access"], doc["reader"], tuple(patterns),
               folder, tuple(exclude), tuple(rules.items()), options, doc["preset"],
               str(doc.get("notes", "")))


def _subsets(doc: dict, entries: list[Entry], where: str) -> dict[str, dict]:
  """[subsets.NAME] tables: modality / sources filters, a count, `stratify`, a seed."""
  known = {"description", "modality", "sources", "count", "stratify", "seed"}
  names = {e.name: e.key for e in entries} | {e.key: e.key for e in entries}
  out = {}
  for name, s in (doc or {}).items():
    key = f"{where}: subsets.{name}"
    if not re.fullmatch(r"[\w.\-]+", name):
      raise ValueError(f"{key}: use letters, digits, '.', '-' or '_' in the name")
    unknown = sorted(set(s) - known)
    if unknown:
      raise ValueError(f"{key}: unknown key(s) {unknown}; known: {sorted(known)}")
    if not s.get("description"):
      raise ValueError(f"{key}: needs a description (its rule, in words)")
    bad = [m for m in s.get("modality", []) if m not in MODALITIES]
    bad += [n for n in s.get("sources", []) if n not in names]
    if bad:
      raise ValueError(f"{key}: unknown modality or source {bad}")
    if s.get("stratify") not in (None, "source"):
      raise ValueError(f"{key}.stratify={s['stratify']!r}: only 'source'")
    out[name] = {**s, "sources": [names[n] for n in s.get("sources", [])] or None,
                 "modality": s.get("modality") or None}  # as the records spell them
  return out


def load(name_or_path: str = "biovfm21m") -> Catalog:
  """The checked catalog (see the module doc)."""
  path = catalog_path(name_or_path)
  try:
    with open(path, "rb") as f:
      doc = tomllib.load(f)
  except tomllib.TOMLDecodeError as e:
    raise ValueError(f"{path}: not valid TOML: {e}") from e
  entries, seen = [], set()
  for i, d in enumerate(doc.get("source", [])):
    where = f"{path}: source[{i}] ({d.get('name', '?')})"
    e = _entry(d, where)
    if e.key in seen:
      raise ValueError(f"{where}: the name {e.name!r} is used twice")
    seen.add(e.key)
    entries.append(e)
  if not entries:
    raise ValueError(f"{path}: no [[source]] entries")
  name = os.path.basename(path)[:-5]
  return Catalog(name, path, tuple(entries), _subsets(doc.get("subsets"), entries, path))
