"""MedMNIST v2/+ 2D benchmarks: the table, npz files, verified download, synthetic stand-ins.

The table (tasks, channels, labels, split sizes, URLs and MD5s) is written out
here from MedMNIST 3.0.2's `medmnist/info.py`, so nothing imports medmnist at
run time. Files keep MedMNIST's names and layout: `{flag}.npz` (28 px) or
`{flag}_{size}.npz`, keys {train,val,test}_{images,labels}, images uint8
(N, S, S) for grey and (N, S, S, 3) for colour, labels (N, L) integers with
L = number of labels for multi-label tasks and 1 otherwise.

The 224 px files are large (tissuemnist_224 holds ~12 GB of pixels), so
`npz_header` reads shapes from the npy headers and `iter_npz_rows` streams
rows in chunks; neither loads a whole array.

    python -m data_pipeline.readers.medmnist --flags breastmnist --sizes 28 --root DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from data_pipeline.readers import common
from data_pipeline.readers.common import Item, ReaderError

SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
KEYS = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels"))
TASKS = ("multi-class", "binary-class", "multi-label, binary-class", "ordinal-regression")
_ZENODO = "https://zenodo.org/records/10519652/files"


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One MedMNIST 2D benchmark: what its files hold and where to get them."""
  flag: str
  task: str  # MedMNIST's own task string (TASKS)
  channels: int  # 1 (grey) or 3 (colour)
  num_classes: int  # classes, or labels for the multi-label task
  splits: dict[str, int]  # official number of examples per split
  md5: dict[int, str]  # image size -> MD5 of the official npz

  @property
  def label_width(self) -> int:
    """Columns of the label array: one per label for multi-label, else 1."""
    return self.num_classes if self.task == "multi-label, binary-class" else 1

  def url(self, size: int) -> str:
    return f"{_ZENODO}/{npz_name(self.flag, size)}?download=1"


def _b(flag, task, channels, classes, train, val, test, md5s):
  return Benchmark(flag, task, channels, classes, {"train": train, "val": val, "test": test},
                   dict(zip(SIZES, md5s)))


BENCHMARKS: dict[str, Benchmark] = {b.flag: b for b in (
    _b("pathmnist", "multi-class", 3, 9, 89996, 10004, 7180,
       ("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
        "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec")),
    _b("chestmnist", "multi-label, binary-class", 1, 14, 78468, 11219, 22433,
       ("02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16",
        "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa")),
    _b("dermamnist", "multi-class", 3, 7, 7007, 1003, 2005,
       ("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
        "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d")),
    _b("octmnist", "multi-class", 1, 4, 97477, 10832, 1000,
       ("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
        "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3")),
    _b("pneumoniamnist", "binary-class", 1, 2, 4708, 524, 624,
       ("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
        "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1")),
    _b("retinamnist", "ordinal-regression", 3, 5, 1080, 120, 400,
       ("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
        "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348")),
    _b("breastmnist", "binary-class", 1, 2, 546, 78, 156,
       ("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
        "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b")),
    _b("bloodmnist", "multi-class", 3, 8, 11959, 1712, 3421,
       ("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
        "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601")),
    _b("tissuemnist", "multi-class", 1, 8, 165466, 23640, 47280,
       ("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
        "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c")),
    _b("organamnist", "multi-class", 1, 11, 34561, 6491, 17778,
       ("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
        "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170")),
    _b("organcmnist", "multi-class", 1, 11, 12975, 2392, 8216,
       ("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
        "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1")),
    _b("organsmnist", "multi-class", 1, 11, 13932, 2452, 8827,
       ("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
        "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1")),
)}
FLAGS = tuple(BENCHMARKS)


class NpzFormatError(ValueError):
  """An npz file that does not hold a MedMNIST benchmark; the message names file and key."""


class DownloadError(OSError):
  """A transfer that failed or came back short; nothing is left behind."""


class ChecksumError(DownloadError):
  """A downloaded file whose MD5 is not the expected one; it is not kept."""


def benchmark(flag: str) -> Benchmark:
  try:
    return BENCHMARKS[flag]
  except KeyError:
    raise KeyError(f"unknown MedMNIST benchmark {flag!r}; known: {', '.join(FLAGS)}") from None


def check_size(size: int) -> int:
  if int(size) not in SIZES:
    raise ValueError(f"MedMNIST image size must be one of {SIZES}, got {size!r}")
  return int(size)


def npz_name(flag: str, size: int) -> str:
  """MedMNIST's file name: `{flag}.npz` for 28 px, `{flag}_{size}.npz` otherwise."""
  return f"{flag}.npz" if check_size(size) == 28 else f"{flag}_{size}.npz"


def npz_path(root: str | os.PathLike, flag: str, size: int) -> str:
  benchmark(flag)
  return os.path.join(os.fspath(root), npz_name(flag, size))


# --- reading npz files --------------------------------------------------------

def _member_header(zf: zipfile.ZipFile, key: str, path: str):
  """(zip stream positioned at the data, shape, dtype) of array `key`."""
  try:
    f = zf.open(f"{key}.npy")
  except KeyError:
    names = sorted(n[:-4] for n in zf.namelist())
    raise NpzFormatError(f"{path}: missing key {key!r} (has {names})") from None
  try:
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read(f)
  except ValueError as e:
    f.close()
    raise NpzFormatError(f"{path}: key {key!r} is not a valid npy array: {e}") from e
  if fortran or dtype.hasobject:
    f.close()
    raise NpzFormatError(f"{path}: key {key!r} must be a C-ordered numeric array")
  return f, shape, dtype


def npz_header(path: str | os.PathLike, flag: str,
               size: int | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Shapes and dtypes of the six arrays, checked against the table, without loading them.

  Images must be uint8 (N, S, S) for grey (or (N, S, S, 1)) and (N, S, S, 3) for
  colour, labels integer (N, L). Split sizes may differ from the official ones
  (generated and test files); the image side must equal `size` when given.
  Raises NpzFormatError naming the file and the key.
  """
  path, b = os.fspath(path), benchmark(flag)
  try:
    zf = zipfile.ZipFile(path)
  except (OSError, zipfile.BadZipFile) as e:
    raise NpzFormatError(f"{path}: not a readable npz file ({e})") from e
  out = {}
  with zf:
    for key in KEYS:
      f, shape, dtype = _member_header(zf, key, path)
      f.close()
      out[key] = (tuple(shape), dtype)
  for split in SPLITS:
    (ishape, idtype), (lshape, ldtype) = out[f"{split}_images"], out[f"{split}_labels"]
    key = f"{split}_images"
    want = "(N, S, S)" if b.channels == 1 else "(N, S, S, 3)"
    ok = (len(ishape) == 3 and b.channels == 1) or (
        len(ishape) == 4 and ishape[3] == b.channels)
    if idtype != np.uint8 or not ok or ishape[1] != ishape[2]:
      raise NpzFormatError(f"{path}: key {key!r} is {idtype} {ishape}; {flag} wants uint8 {want}")
    if size is not None and ishape[1] != size:
      raise NpzFormatError(f"{path}: key {key!r} holds {ishape[1]} px images, expected {size}")
    key = f"{split}_labels"
    if ldtype.kind not in "iu" or lshape != (ishape[0], b.label_width):
      raise NpzFormatError(f"{path}: key {key!r} is {ldtype} {lshape}; {flag} wants integer "
                           f"labels of shape ({ishape[0]}, {b.label_width})")
  return out


def _check_label_values(path: str, key: str, labels: np.ndarray, b: Benchmark) -> None:
  high = b.num_classes if b.label_width == 1 else 2
  if labels.size and (labels.min() < 0 or labels.max() >= high):
    raise NpzFormatError(f"{path}: key {key!r} has labels in [{labels.min()}, {labels.max()}]; "
                         f"{b.flag} ({b.task}) wants values in [0, {high})")


def load_npz(path: str | os.PathLike, flag: str, size: int | None = None,
             keys: Sequence[str] = KEYS) -> dict[str, np.ndarray]:
  """The arrays `keys` of a MedMNIST npz, validated (see npz_header) and loaded.

  Grey images come back (N, S, S); label values are checked against the task.
  """
  path = os.fspath(path)
  header = npz_header(path, flag, size)
  b = benchmark(flag)
  out = {}
  with np.load(path, allow_pickle=False) as data:
    for key in keys:
      if key not in header:
        raise KeyError(f"{key!r} is not a MedMNIST npz key ({', '.join(KEYS)})")
      array = data[key]
      if key.endswith("_images") and array.ndim == 4 and b.channels == 1:
        array = array[..., 0]
      if key.endswith("_labels"):
        _check_label_values(path, key, array, b)
      out[key] = array
  return out


def iter_npz_rows(path: str | os.PathLike, key: str, chunk: int = 1024) -> Iterator[np.ndarray]:
  """Stream array `key` of an npz in chunks of `chunk` rows (constant memory)."""
  path = os.fspath(path)
  with zipfile.ZipFile(path) as zf:
    f, shape, dtype = _member_header(zf, key, path)
    with f:
      row = tuple(shape[1:])
      row_bytes = int(np.prod(row, dtype=np.int64)) * dtype.itemsize
      for start in range(0, shape[0], chunk):
        n = min(chunk, shape[0] - start)
        buf = f.read(n * row_bytes)
        if len(buf) != n * row_bytes:
          raise NpzFormatError(f"{path}: key {key!r} ends after {start} + "
                               f"{len(buf) // max(row_bytes, 1)} of {shape[0]} rows")
        yield np.frombuffer(buf, dtype).reshape((n,) + row)


# --- download -----------------------------------------------------------------

def file_md5(path: str | os.PathLike) -> str:
  h = hashlib.md5()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _progress(name: str, done: int, total: int, start: float, end: str = "") -> None:
  rate = done / max(time.time() - start, 1e-6) / 1e6
  of = f"/{total / 1e6:.1f} MB ({100 * done / total:.0f}%)" if total > 0 else " MB"
  sys.stderr.write(f"\r{name}: {done / 1e6:.1f}{of} {rate:.2f} MB/s{end}")
  sys.stderr.flush()


def download(flag: str, size: int, root: str | os.PathLike, *, base_url: str | None = None,
             md5: str | None = None, progress: bool = True, timeout: float = 60.0) -> str:
  """Download `{flag}[_{size}].npz` into `root` and return its path.

  Skips the transfer when a file with the right MD5 is already there. Streams
  into `<file>.<pid>.part`, checks the byte count against Content-Length and
  the MD5, then renames into place, so the final name only ever holds a whole,
  verified file. `base_url` replaces Zenodo (the file name is appended) and
  `md5` the table's checksum: both are for mirrors and tests.
  """
  b = benchmark(flag)
  path = npz_path(root, flag, size)
  expected = (md5 or b.md5[size]).lower()
  if os.path.isfile(path) and file_md5(path) == expected:
    return path
  url = (f"{base_url.rstrip('/')}/{npz_name(flag, size)}" if base_url else b.url(size))
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  part = f"{path}.{os.getpid()}.part"
  name = os.path.basename(path)
  h, done, total, start = hashlib.md5(), 0, -1, time.time()
  try:
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as out:
      total = int(resp.headers.get("Content-Length") or -1)
      last = 0.0
      while True:
        try:
          block = resp.read(1 << 20)
        except http.client.IncompleteRead as e:
          done += len(e.partial)
          raise DownloadError(f"{url}: connection cut off after {done} of {total} bytes") from e
        if not block:
          break
        out.write(block)
        h.update(block)
        done += len(block)
        if progress and time.time() - last > 0.5:
          last = time.time()
          _progress(name, done, total, start)
    if progress:
      _progress(name, done, total, start, "\n")
    if total >= 0 and done != total:
      raise DownloadError(f"{url}: connection cut off after {done} of {total} bytes")
    actual = h.hexdigest()
    if actual != expected:
      raise ChecksumError(f"{path}: MD5 mismatch for {url}: expected {expected}, got {actual}; "
                          "the file was not kept")
    os.replace(part, path)
  except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
    if isinstance(e, DownloadError):
      raise
    raise DownloadError(f"{url}: download failed after {done} of {total} bytes: {e}") from e
  finally:
    if os.path.exists(part):
      os.remove(part)
  return path


# --- synthetic stand-ins ------------------------------------------------------

def _class_patterns(num: int, size: int, channels: int, seed: int) -> np.ndarray:
  """`num` distinct float patterns (num, S, S, C) in [-1, 1]: a blob at its own
  place, stripes at their own angle and frequency, a colour tint."""
  rng = np.random.default_rng([seed, 7, num, size, channels])
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  out = np.empty((num, size, size, channels), np.float32)
  for k in range(num):
    cy, cx = rng.uniform(0.2, 0.8, 2)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.12 ** 2))
    angle = np.pi * k / num
    freq = 2 + 2 * (k % 3)
    stripes = np.cos(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    tint = rng.uniform(0.5, 1.0, channels) if channels == 3 else np.ones(1)
    out[k] = (blob + 0.5 * stripes)[..., None] * tint.astype(np.float32)
  return out


def synthetic_split(flag: str, size: int, count: int, seed: int,
                    split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of one generated split, MedMNIST layout, learnable classes.

  Each class (each label, for multi-label) has its own pattern; an image is the
  patterns of its labels, shifted by up to a fifth of the side and scaled at
  random, on a mid-grey background plus strong noise. Ordinal grades also
  brighten the image with the grade. Linear on raw pixels is well above chance
  but not perfect, so better features still score higher.
  """
  b = benchmark(flag)
  rng = np.random.default_rng([seed, SPLITS.index(split), size])
  patterns = _class_patterns(b.num_classes, size, b.channels, seed)
  if b.label_width > 1:
    labels = (rng.random((count, b.label_width)) < 0.3).astype(np.uint8)
    signal = np.einsum("nk,khwc->nhwc", labels.astype(np.float32), patterns)
  else:
    labels = rng.integers(0, b.num_classes, (count, 1)).astype(np.uint8)
    signal = patterns[labels[:, 0]]
    if b.task == "ordinal-regression":
      signal = signal + 0.5 * (labels[:, 0, None, None, None] / b.num_classes - 0.5)
  # Per-image circular shift and gain: what a linear model on pixels handles badly.
  shift = size // 5
  dy, dx = rng.integers(-shift, shift + 1, (2, count))
  rows = (np.arange(size)[None, :] - dy[:, None]) % size
  cols = (np.arange(size)[None, :] - dx[:, None]) % size
  signal = signal[np.arange(count)[:, None, None], rows[:, :, None], cols[:, None, :]]
  gain = rng.uniform(0.5, 1.2, (count, 1, 1, 1)).astype(np.float32)
  noise = rng.normal(0.0, 0.6, (count, size, size, b.channels)).astype(np.float32)
  images = np.clip(128 + 50 * (gain * signal + noise), 0, 255).round().astype(np.uint8)
  return (images[..., 0] if b.channels == 1 else images), labels


def make_synthetic_npz(path: str | os.PathLike, flag: str, size: int,
                       counts: Sequence[int] = (128, 32, 32), seed: int = 0) -> str:
  """Write a MedMNIST-format npz of generated images (train, val, test counts)."""
  path = os.fspath(path)
  arrays = {}
  for split, count in zip(SPLITS, counts, strict=True):
    images, labels = synthetic_split(flag, int(size), int(count), seed, split)
    arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "wb") as f:
    np.savez_compressed(f, **arrays)
  os.replace(tmp, path)
  return path


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Download MedMNIST npz files (MD5-verified).")
  parser.add_argument("--flags", default=",".join(FLAGS), help="comma-separated benchmarks")
  parser.add_argument("--sizes", default="224", help="comma-separated sizes of 28,64,128,224")
  parser.add_argument("--root", required=True, help="directory for the npz files")
  args = parser.parse_args(argv)
  for flag in args.flags.split(","):
    for size in args.sizes.split(","):
      print(download(flag.strip(), int(size), args.root))



# --- the ingestion reader ------------------------------------------------------

EXTENSIONS = (".npz",)

# MedMNIST benchmark -> (modality, anatomy), suggested when the spec sets none.
KINDS = {
    "pathmnist": ("pathology", "colon"), "chestmnist": ("X-ray", "chest"),
    "dermamnist": ("dermoscopy", "skin"), "octmnist": ("OCT", "retina"),
    "pneumoniamnist": ("X-ray", "chest"), "retinamnist": ("fundus", "retina"),
    "breastmnist": ("ultrasound", "breast"), "bloodmnist": ("microscopy", "blood"),
    "tissuemnist": ("microscopy", "kidney"), "organamnist": ("CT", "abdomen"),
    "organcmnist": ("CT", "abdomen"), "organsmnist": ("CT", "abdomen"),
}


def _flag(v: Any) -> str | None:
  if v is not None and v not in FLAGS:
    raise ValueError(f"must be a MedMNIST benchmark ({', '.join(FLAGS)}) "
                     "or null to take it from the file name")
  return v


OPTIONS = {"splits": common.Option(list(SPLITS), common.subset(SPLITS, "splits"),
                                   "splits to read"),
           "flag": common.Option(None, _flag, "benchmark; default: from the file name")}


def _flag_from_name(path: str) -> tuple[str | None, int | None]:
  """MedMNIST's own file names: "{flag}.npz" (28 px) or "{flag}_{size}.npz"."""
  stem = os.path.basename(path).lower().removesuffix(".npz")
  m = re.fullmatch(r"(.+?)(?:_(\d+))?", stem)
  flag, size = m.group(1), m.group(2)
  if flag not in FLAGS:
    return None, None
  return flag, int(size) if size else 28


def read(path: str, options: dict[str, Any] | None = None) -> Iterator[Item]:
  """Every image of the chosen splits of a MedMNIST npz, streamed in chunks
  (bounded memory); index = [split, row]. Pixels are as stored."""
  path = os.fspath(path)
  opts = common.validate(OPTIONS, "medmnist", options, path)
  common.check_file(path)
  named, size = _flag_from_name(path)
  flag = opts["flag"] or named
  if flag is None:
    raise ReaderError(f"{path}: cannot tell the MedMNIST benchmark from the file name "
                      "(<flag>.npz or <flag>_<size>.npz); set the reader option 'flag'")
  try:
    npz_header(path, flag, size if flag == named else None)
  except (NpzFormatError, KeyError) as e:
    raise ReaderError(f"{path}: not a {flag} MedMNIST npz: {common.detail(e, path)}") from e
  modality, anatomy = KINDS.get(flag, (None, None))
  for split in opts["splits"]:
    row = 0
    try:
      for chunk in iter_npz_rows(path, f"{split}_images", chunk=256):
        for image in chunk:
          # A copy: a kept row must not pin its whole chunk in memory.
          pixels = np.array(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1
                            else image)
          yield pixels, common.meta(path, [split, row], pixels, "MedMNIST npz, as stored",
                              modality=modality, anatomy=anatomy)
          row += 1
    except NpzFormatError as e:
      raise ReaderError(f"{path}: damaged MedMNIST npz: {common.detail(e, path)}") from e
    except Exception as e:  # zip CRC errors, a deflate stream cut short
      raise ReaderError(f"{path}: damaged MedMNIST npz at {split} row {row}: "
                        f"{type(e).__name__}: {e}") from e


if __name__ == "__main__":
  main()
