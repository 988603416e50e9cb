"""What picks and configures the readers (one module per format) for ingestion.

Each reader is `read(path, options) -> Iterator[(uint8 pixels, meta)]` over one
input file (see `common`). The ingestion driver counts a file whose reading
raises `ReaderError` as rejected and writes the message ("<path>: <reason>") to
the rejects file. A reader may raise after yielding some items (a stream cut
off mid-file, a video frame that will not decode); the driver decides what to
keep of such a file.

meta holds `path`, `index` (JSON: page, frame, [volume, axis, slice] or
[split, row]), `orig_size` [H, W] and `transform` (the intensity transform as
text); DICOM and MedMNIST also suggest `modality` and `anatomy`, which
`records.header` uses only when the spec leaves them unset.
"""
from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from typing import Any

from data_pipeline.readers import arrays, common, dicom, hdf5, images, medmnist, nifti, video
from data_pipeline.readers.common import MAX_PIXELS, Item, ReaderError, ReadFn

__all__ = ["MAX_PIXELS", "OPTIONS", "READERS", "ReaderError", "detect_reader", "files_for",
           "inputs_for", "validate_options"]

_FORMATS = {"image": images, "dicom": dicom, "nifti": nifti, "medmnist": medmnist,
            "video": video, "hdf5": hdf5, "npy": arrays}
OPTIONS: dict[str, dict[str, common.Option]] = {n: m.OPTIONS for n, m in _FORMATS.items()}


def _union_options() -> dict[str, common.Option]:
  """"auto" takes any reader's option; a key's default must agree across readers."""
  union: dict[str, common.Option] = {}
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
  """`options` checked against `reader`'s keys, defaults filled in (see common.validate)."""
  _check_reader(reader)
  return common.validate(OPTIONS[reader], reader, options, where)


def detect_reader(path: str) -> str | None:
  """The reader "auto" uses for `path`: by suffix, else DICOM by its "DICM"
  magic or an image by its signature; None when nothing fits."""
  suffix = common.suffix(arrays.split_part(path)[0])
  for name, module in _FORMATS.items():
    if suffix in module.EXTENSIONS:
      return name
  kind = common.sniff(path)
  if kind == "DICOM":
    return "dicom"
  return "image" if kind in common.IMAGE_KINDS else None


def _accepts(reader: str, path: str) -> bool:
  if reader == "auto":
    return detect_reader(path) is not None
  return (common.suffix(path) in _FORMATS[reader].EXTENSIONS
          or (reader == "dicom" and common.has_dicm_magic(path)))


_KINDS = {
    "image": "image (" + " ".join(images.EXTENSIONS) + ")",
    "dicom": "DICOM (" + " ".join(dicom.EXTENSIONS) + ", or the DICM magic)",
    "nifti": "NIfTI (.nii .nii.gz)", "medmnist": "MedMNIST (.npz)",
    "video": "video (" + " ".join(video.EXTENSIONS) + ")",
    "hdf5": "HDF5 (" + " ".join(hdf5.EXTENSIONS) + ")", "npy": "NumPy (.npy)",
    "auto": "readable",
}


def files_for(path_or_glob: str | Sequence[str], reader: str,
              options: dict[str, Any] | None = None) -> list[str]:
  """The sorted input files of one source.

  A file is taken as it is; a folder is walked recursively (hidden files and
  folders skipped) and a glob expanded, keeping the files `reader` takes; a
  list of them gives the union. Raises FileNotFoundError naming the path or
  pattern when nothing is found (for a list: when none of them finds a file).
  `options` is accepted for symmetry with the readers; no option filters files.
  """
  del options
  _check_reader(reader)
  if not isinstance(path_or_glob, (str, os.PathLike)):
    found, errors = set(), []
    for p in path_or_glob:
      try:
        found.update(files_for(p, reader))
      except FileNotFoundError as e:
        errors.append(str(e))
    if not found:
      raise FileNotFoundError("; ".join(errors) or "no path given")
    return sorted(found)
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
  found = set()
  for root in roots:
    candidates = images.list_files(root) if os.path.isdir(root) else [root]
    found.update(p for p in candidates if os.path.isfile(p) and _accepts(reader, p))
  if not found:
    raise FileNotFoundError(f"{path_or_glob}: no {_KINDS[reader]} files found there")
  return sorted(found)


def inputs_for(path_or_glob: str | Sequence[str], reader: str,
               options: dict[str, Any] | None = None) -> list[str]:
  """`files_for`, with each big array stack (HDF5, .npy) split into parts of
  `arrays.PART_IMAGES` images (`<file>::<start>-<stop>`), each one input, so
  that one ingestion worker never holds a whole PatchCamelyon file's records."""
  out = []
  for path in files_for(path_or_glob, reader):
    name = detect_reader(path) if reader == "auto" else reader
    module = _FORMATS.get(name or "")
    if not hasattr(module, "count"):
      out.append(path)
      continue
    opts = {k: v for k, v in validate_options(reader, options).items()
            if k in module.OPTIONS}
    try:
      out.extend(arrays.part_names(path, module.count(path, opts)))
    except (ReaderError, OSError):  # reading it will reject it, with the reason
      out.append(path)
  return out


def read_auto(path: str, options: dict[str, Any] | None = None) -> Iterator[Item]:
  """The reader `detect_reader` picks, given the options it knows."""
  path = os.fspath(path)
  opts = validate_options("auto", options, path)
  common.check_file(arrays.split_part(path)[0])
  name = detect_reader(path)
  if name is None:
    kind = common.sniff(path) or "unknown"
    raise ReaderError(f"{path}: unrecognised file type (suffix "
                      f"{common.suffix(path) or 'none'!r}, content {kind}); "
                      "name a reader for this source in the spec")
  yield from READERS[name](path, {k: v for k, v in opts.items() if k in OPTIONS[name]})


READERS: dict[str, ReadFn] = {**{n: m.read for n, m in _FORMATS.items()}, "auto": read_auto}
