"""Exact and near-duplicate detection for ingestion, in stream order, in bounded memory.

Duplicates make DINOv2's KoLeo term infinite and bias a corpus towards whatever
was copied most, so the ingestion drops them, deterministically: an image is
compared only with the images kept before it, and the first copy wins.

* Exact duplicates: `pixel_hash`, a SHA-1 digest of shape, dtype and pixel
  bytes (twice BLAKE2b's speed where CPUs have SHA instructions), of which the
  first 128 bits are kept.
* Near duplicates: `perceptual_hash`, a 64-bit DCT hash (pHash, see its
  docstring), compared by Hamming distance. On 27 scikit-image photographs and
  crops, rescaling by 0.25-0.9, JPEG at quality 30-70, Gaussian noise up to
  sigma 8 or brightness shifts of 10 grey levels move it by at most 4 bits (6
  for nearest-neighbour resizing, 8 for a 2-pixel border crop); different
  images, or different crops of one image, lie 22 bits apart or more. So a
  threshold of 8-10 bits separates them with margin. Bigger crops are not near
  duplicates to a pHash (5% off one corner moves it 16-18 bits).

`Deduplicator` keeps the hashes of kept images in numpy arrays: 16 bytes for
the exact digest plus, with near dedup on, 8 bytes for the pHash and 4 bytes per
searched band (1-3 bands for thresholds 0-14, 4 for 15-16). At threshold 10
that is 36 bytes per kept image, about 0.8 GB for 21M images, plus a fixed
34 MB bucket table and slack while arrays grow. Finding near duplicates is not
a scan: see `_NearIndex`. `state()` / `from_state()` (or
`save()` / `load()`) let an interrupted ingestion resume with exactly the same
decisions.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Mapping

import numpy as np
from PIL import Image
from scipy import fft

from data_pipeline import storage

EXACT_BYTES = 16  # exact keys: 128 bits of the digest (collision odds ~N^2 / 2^129)
HASH_SIZE = 32  # the pHash works on a 32x32 grey thumbnail
MAX_NEAR_THRESHOLD = 32

EXACT = "exact duplicate"


def _near_reason(distance: int) -> str:
  return f"near duplicate (distance {distance})"


def pixel_hash(pixels: np.ndarray) -> str:
  """Exact-duplicate key: SHA-1 hex digest of shape, dtype and pixel bytes.

  Identical pixels in different shapes (a 64x32 and a 32x64 image) or dtypes
  get different keys.
  """
  a = np.ascontiguousarray(pixels)
  if a.dtype.hasobject:
    raise ValueError(f"pixel_hash needs a numeric array, got dtype {a.dtype}")
  h = hashlib.sha1(usedforsecurity=False)
  h.update(f"{a.shape}|{a.dtype.str}|".encode())
  if a.size:
    h.update(memoryview(a).cast("B"))
  return h.hexdigest()


# The 64 lowest-frequency AC coefficients of the 32x32 DCT, by frequency u + v
# and then vertical frequency u: all of u + v <= 9 (54) and the first 10 with
# u + v = 10. The DC term is left out: it is only the mean brightness (so the
# hash ignores brightness offsets) and, being far above the median, it would be
# a bit that is always set.
_ORDER = sorted(((u, v) for u in range(11) for v in range(11) if 0 < u + v <= 10),
                key=lambda uv: (uv[0] + uv[1], uv[0]))[:64]
_ROWS = np.array([u for u, _ in _ORDER])
_COLS = np.array([v for _, v in _ORDER])


def _grey(pixels: np.ndarray) -> Image.Image:
  a = np.asarray(pixels)
  if a.ndim == 3 and a.shape[2] == 1:
    a = a[..., 0]
  if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
    raise ValueError("perceptual_hash needs uint8 pixels, (H, W) grey or (H, W, 3) RGB; "
                     f"got {a.dtype} {a.shape}")
  if a.shape[0] == 0 or a.shape[1] == 0:
    raise ValueError(f"perceptual_hash got an empty image {a.shape}")
  img = Image.fromarray(np.ascontiguousarray(a))
  if a.ndim == 3:
    img = img.convert("L")  # ITU-R 601 luma
  return img.convert("F")


def perceptual_hash(pixels: np.ndarray) -> int:
  """64-bit DCT perceptual hash of uint8 (H, W) or (H, W, 3) pixels.

  Grey (luma for RGB), resized to 32x32 ignoring aspect (bilinear with
  antialiasing, in float), 2D DCT-II (scipy.fft.dctn, orthonormal), the 64
  lowest AC frequencies (see `_ORDER`: DC excluded), one bit each: set when the
  coefficient is above their median. The first coefficient is the most
  significant bit. Flat images all hash to 0.
  """
  img = _grey(pixels).resize((HASH_SIZE, HASH_SIZE), Image.Resampling.BILINEAR,
                             reducing_gap=2.0)
  coeffs = fft.dctn(np.asarray(img, np.float64), type=2, norm="ortho")[_ROWS, _COLS]
  coeffs[np.abs(coeffs) < 1e-6] = 0.0  # float dust of a flat image is not structure
  bits = coeffs > np.median(coeffs)
  return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
  """Number of differing bits of two hashes."""
  return (int(a) ^ int(b)).bit_count()


# --- The near-duplicate index ------------------------------------------------

_MAX_BAND_BITS = 22  # bucket tables index bands directly: 2^22 int32 = 16 MB
_NOMINAL_SIZE = 1 << 20  # kept images the band plan is tuned for


def _masks(bits: int, radius: int) -> np.ndarray:
  """All `bits`-bit masks with at most `radius` bits set, fewest bits first."""
  out = [0]
  level = [0]
  for _ in range(radius):
    # Extend each mask by one bit above its highest set bit: every set once.
    level = [m | (1 << i) for m in level for i in range(m.bit_length(), bits)]
    out.extend(level)
  return np.array(out, np.uint64)


def band_plan(threshold: int, bands: int | None = None) -> list[tuple[int, int, int]]:
  """How `_NearIndex` splits the 64 bits: [(start bit, width, search radius)].

  With the bits split into m bands and threshold t = r*m + a (0 <= a < m), two
  hashes within t bits differ by at most r bits in one of the first a + 1 bands
  or by at most r - 1 in one of the others: otherwise the total would be at
  least (a+1)(r+1) + (m-a-1)r = t + 1. m = t + 1 is the plain pigeonhole
  (some band identical), but bands of 64 / 11 bits make huge buckets; by
  default m (>= 3, so bands fit a direct table) minimises the expected work per
  lookup, probes plus twice the candidates, at 2^20 uniformly spread hashes.
  Bands searched with radius < 0 are skipped.
  """
  def plan(m):
    widths = [64 // m + (1 if j < 64 % m else 0) for j in range(m)]
    r, a = divmod(threshold, m)
    starts = np.cumsum([0] + widths[:-1])
    return [(int(s), w, r if j <= a else r - 1) for j, (s, w) in enumerate(zip(starts, widths))]

  def cost(p):
    return sum(sum(math.comb(w, k) for k in range(rad + 1)) * (1 + 2 * _NOMINAL_SIZE / 2**w)
               for _, w, rad in p if rad >= 0)

  if bands is not None:
    if not 64 / _MAX_BAND_BITS <= bands <= 64:
      raise ValueError(f"bands must be in [3, 64], got {bands}")
    return plan(bands)
  return min((plan(m) for m in range(3, max(3, threshold + 1) + 1)), key=cost)


class _NearIndex:
  """Multi-index hashing over the kept pHashes: find any within t bits, exactly.

  Each searched band of each kept hash sits in a bucket of one direct table
  (CSR: `_offsets` into `_ids`, bands side by side). A lookup probes, per band,
  every bucket within the band's radius of the query (`band_plan`) and checks
  the full Hamming distance of the candidates found; hashes added since the
  last merge (at most ~8 sqrt(N)) are compared by brute force, and merged into
  the table once that many have gathered. Results never depend on the merge
  schedule: both paths are exact.
  """

  def __init__(self, threshold: int, *, bands: int | None = None, buffer: int = 4096):
    self.threshold = threshold
    self._min_buffer = max(1, buffer)
    plan = [p for p in band_plan(threshold, bands) if p[2] >= 0]
    self._bases = np.cumsum([0] + [1 << w for _, w, _ in plan])
    self._table_size = int(self._bases[-1])
    self._shifts = np.array([s for s, _, _ in plan], np.uint64)
    self._widths = np.array([(1 << w) - 1 for _, w, _ in plan], np.uint64)
    probe = [(j, m) for j, (_, w, rad) in enumerate(plan) for m in _masks(w, rad)]
    band = np.array([j for j, _ in probe])
    self._probe_mask = np.array([m for _, m in probe], np.uint64)
    self._probe_shift = self._shifts[band]
    self._probe_width = self._widths[band]
    self._probe_base = self._bases[:-1][band].astype(np.int64)
    self._hashes = np.zeros(1024, np.uint64)  # kept pHashes, in order: id = position
    self._n = 0
    self._indexed = 0  # ids below this are in the table
    self._ids = np.zeros(0, np.int32)
    self._offsets = None  # allocated at the first merge

  def __len__(self) -> int:
    return self._n

  @property
  def hashes(self) -> np.ndarray:
    return self._hashes[:self._n]

  def nearest(self, h: int) -> int | None:
    """The smallest distance to a kept hash, if one is within the threshold."""
    q = np.uint64(h)
    best = None
    if self._n > self._indexed:
      d = np.bitwise_count(self._hashes[self._indexed:self._n] ^ q)
      best = int(d.min())
    if self._indexed:
      probes = (((q >> self._probe_shift) & self._probe_width) ^ self._probe_mask).astype(
          np.int64) + self._probe_base
      lo = self._offsets[probes]
      counts = self._offsets[probes + 1] - lo
      total = int(counts.sum())
      if total:
        starts = np.cumsum(counts) - counts
        where = np.repeat(lo - starts, counts) + np.arange(total)
        d = int(np.bitwise_count(self._hashes[self._ids[where]] ^ q).min())
        best = d if best is None else min(best, d)
    return best if best is not None and best <= self.threshold else None

  def _keys(self, hashes: np.ndarray) -> np.ndarray:
    """(bands, n) combined table keys of `hashes`."""
    return (((hashes[None, :] >> self._shifts[:, None]) & self._widths[:, None]).astype(np.int64)
            + self._bases[:-1, None])

  def add(self, h: int) -> None:
    if self._n == len(self._hashes):
      self._hashes = np.concatenate([self._hashes, np.zeros_like(self._hashes)])
    self._hashes[self._n] = h
    self._n += 1
    if self._n - self._indexed >= max(self._min_buffer, 8 * math.isqrt(self._n)):
      self._merge()

  def _merge(self) -> None:
    new = np.arange(self._indexed, self._n)
    if len(self._ids) + len(new) * len(self._shifts) >= 2**31:
      raise OverflowError("near-duplicate index is full: 2^31 band entries "
                          "(~700M kept images at 3 bands)")
    keys = self._keys(self._hashes[new]).reshape(-1)
    ids = np.broadcast_to(new.astype(np.int32), (len(self._shifts), len(new))).reshape(-1)
    if self._offsets is None:
      self._offsets = np.zeros(self._table_size + 1, np.int32)
    order = np.argsort(keys, kind="stable")
    keys, ids = keys[order], ids[order]
    # At the end of each bucket: within a bucket, ids stay in increasing order.
    self._ids = np.insert(self._ids, self._offsets[keys + 1], ids)
    self._offsets[1:] += np.cumsum(np.bincount(keys, minlength=self._table_size),
                                   dtype=np.int32)
    self._indexed = self._n


class _ExactIndex:
  """The 128-bit digests of kept images: a small recent set, merged now and then
  into (hi, lo) uint64 arrays in lexicographic order, searched by bisection."""

  def __init__(self, buffer: int = 4096):
    self._min_buffer = max(1, buffer)
    self._hi = np.zeros(0, np.uint64)
    self._lo = np.zeros(0, np.uint64)
    self._recent: set[bytes] = set()

  def __len__(self) -> int:
    return len(self._hi) + len(self._recent)

  def __contains__(self, key: bytes) -> bool:
    if key in self._recent:
      return True
    hi, lo = np.frombuffer(key, ">u8").astype(np.uint64)
    i, j = int(np.searchsorted(self._hi, hi, "left")), int(np.searchsorted(self._hi, hi, "right"))
    k = i + int(np.searchsorted(self._lo[i:j], lo))
    return bool(k < j and self._lo[k] == lo)

  def add(self, key: bytes) -> None:
    self._recent.add(key)
    if len(self._recent) >= max(self._min_buffer, 8 * math.isqrt(len(self))):
      self._merge()

  def _merge(self) -> None:
    # Sorted bytes are sorted (hi, lo) pairs; insert each where it keeps that order.
    new = np.frombuffer(b"".join(sorted(self._recent)), ">u8").astype(np.uint64).reshape(-1, 2)
    where = np.searchsorted(self._hi, new[:, 0], "left")
    end = np.searchsorted(self._hi, new[:, 0], "right")
    for k in np.flatnonzero(end > where):  # same hi: rare, unless keys are not digests
      where[k] += np.searchsorted(self._lo[where[k]:end[k]], new[k, 1])
    self._hi = np.insert(self._hi, where, new[:, 0])
    self._lo = np.insert(self._lo, where, new[:, 1])
    self._recent.clear()

  def digests(self) -> np.ndarray:
    """(N, 2) uint64 (hi, lo) of every key, in a canonical (sorted) order."""
    self._merge()
    return np.stack([self._hi, self._lo], axis=1)


def _exact_key(exact: str) -> bytes:
  try:
    key = bytes.fromhex(exact[:2 * EXACT_BYTES])
  except (TypeError, ValueError):
    key = b""
  if len(key) != EXACT_BYTES:
    raise ValueError(f"exact hash must be a hex digest of >= {EXACT_BYTES} bytes "
                     f"(pixel_hash), got {exact!r}")
  return key


def _check_threshold(near_threshold: int | None) -> int | None:
  if near_threshold is None:
    return None
  if isinstance(near_threshold, bool) or not isinstance(near_threshold, (int, np.integer)):
    raise ValueError(f"near_threshold must be an int or None, got {near_threshold!r}")
  if not 0 <= near_threshold <= MAX_NEAR_THRESHOLD:
    raise ValueError(f"near_threshold must be in [0, {MAX_NEAR_THRESHOLD}] bits of 64 "
                     f"(or None to disable near dedup), got {near_threshold}")
  return int(near_threshold)


class Deduplicator:
  """Decides, in stream order, whether each image duplicates one kept before it.

  `near_threshold`: the largest pHash Hamming distance that counts as a near
  duplicate (0: identical pHash); None checks exact duplicates only. An image
  that is not a duplicate is kept and remembered; duplicates are not, so a
  chain of small edits is measured against the first kept image, not the last.
  Exact duplicates are reported as such even though they are also near ones.

  `bands` and `buffer` tune the index (see `band_plan`, `_NearIndex`); they
  never change decisions.
  """

  def __init__(self, near_threshold: int | None, *, bands: int | None = None,
               buffer: int = 4096):
    self.near_threshold = _check_threshold(near_threshold)
    self._exact = _ExactIndex(buffer)
    self._near = (None if self.near_threshold is None
                  else _NearIndex(self.near_threshold, bands=bands, buffer=buffer))

  def __len__(self) -> int:
    """Images kept so far."""
    return len(self._exact)

  def check(self, pixels: np.ndarray) -> tuple[str | None, int]:
    """(reason, pHash): reason None means keep (and remember) the image."""
    exact, phash = pixel_hash(pixels), perceptual_hash(pixels)
    return self.check_hashes(exact, phash), phash

  def check_hashes(self, exact: str, phash: int, *, near: bool = True) -> str | None:
    """As `check`, from hashes computed elsewhere (a worker process).

    `exact` is `pixel_hash(...)` (only its first 16 bytes are used), `phash`
    is `perceptual_hash(...)`. near=False checks exact duplicates only (for a
    source whose images are alike by nature, such as the slices of a volume)
    but still remembers the pHash of a kept image, so later sources' near
    copies of it are found.
    """
    key = _exact_key(exact)
    if not 0 <= phash < 1 << 64:
      raise ValueError(f"phash must be a 64-bit unsigned int, got {phash!r}")
    if key in self._exact:
      return EXACT
    if self._near is not None:
      d = self._near.nearest(phash) if near else None
      if d is not None:
        return _near_reason(d)
      self._near.add(phash)
    self._exact.add(key)
    return None

  # --- Resuming ---

  def state(self) -> dict[str, np.ndarray]:
    """Everything needed to resume: numpy arrays (npz-friendly).

    "exact": (N, 2) uint64 kept digests (sorted); "phash": (N,) uint64 kept
    pHashes in keep order (empty when near dedup is off); "near_threshold":
    int64 scalar, -1 for None.
    """
    return {
        "exact": self._exact.digests(),
        "phash": (np.zeros(0, np.uint64) if self._near is None else self._near.hashes.copy()),
        "near_threshold": np.array(-1 if self.near_threshold is None else self.near_threshold,
                                   np.int64),
    }

  @classmethod
  def from_state(cls, state: Mapping[str, np.ndarray], near_threshold: int | None, *,
                 bands: int | None = None, buffer: int = 4096) -> Deduplicator:
    """The Deduplicator that produced `state`; later decisions are identical.

    `near_threshold` must be the one the state was made with (a different one
    would make decisions an uninterrupted run would not): ValueError otherwise.
    """
    near_threshold = _check_threshold(near_threshold)
    saved = int(np.asarray(state["near_threshold"]))
    saved = None if saved < 0 else saved
    if saved != near_threshold:
      raise ValueError(f"dedup state was made with near_threshold={saved}, not "
                       f"{near_threshold}: resuming with another would change decisions")
    exact = np.asarray(state["exact"], np.uint64).reshape(-1, 2)
    phash = np.asarray(state["phash"], np.uint64).reshape(-1)
    if near_threshold is not None and len(phash) != len(exact):
      raise ValueError(f"dedup state is inconsistent: {len(exact)} exact digests, "
                       f"{len(phash)} pHashes")
    d = cls(near_threshold, bands=bands, buffer=buffer)
    order = np.lexsort((exact[:, 1], exact[:, 0]))
    d._exact._hi, d._exact._lo = exact[order, 0].copy(), exact[order, 1].copy()
    if d._near is not None and len(phash):
      d._near._hashes = phash.copy()
      d._near._n = len(phash)
      d._near._merge()
    return d

  def save(self, path: str | os.PathLike) -> None:
    """`state()` to an .npz file, written beside it and renamed into place."""
    path = os.fspath(path)
    buf = io.BytesIO()
    np.savez(buf, **self.state())
    storage.write_bytes_atomic(path, buf.getvalue())

  @classmethod
  def load(cls, path: str | os.PathLike, near_threshold: int | None, **kwargs) -> Deduplicator:
    """`from_state` of a file written by `save`."""
    with np.load(os.fspath(path), allow_pickle=False) as z:
      return cls.from_state({k: z[k] for k in z.files}, near_threshold, **kwargs)
