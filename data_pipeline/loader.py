"""The pretraining input pipeline on grain.

The input position is a pure function of (seed, global step): global example
e = step * G + process_index * L + j (G global batch, L = G / process_count,
j < L) reads record perm_epoch(e % N), where perm_epoch is a permutation of the
N records seeded by (seed, epoch = e // N), and its augmentation draws from
np.random.default_rng([seed, e]). So a restart at step k gives exactly what an
uninterrupted run gives at step k, and the processes' batches of a step, put
side by side in process order, are the one-process batch of that step, for any
process count that divides G.

A record that does not read (a chunk whose hash no longer matches: bit rot)
or does not decode is replaced by the next record index (up to MAX_SKIP
tries); the example's `skipped` counts the replacements so the trainer can log
them. The loader's iterator names each bad record once (shard file and its
position there) in a warning, and stops with CorruptDataError when the bad
records found exceed `max_skipped_fraction` of the records in play.

`data_cfg.crops` picks the per-example transform; the positions, skipping and
batching above are the same for both:
  "single"    (MAE) one random resized crop: {"image", "skipped"}
  "multicrop" (DINOv2) two global and n local crops and the iBOT masks of the
              global crops (see data_pipeline/multicrop.py):
              {"global_crops", "local_crops", "masks", "skipped"}
Pixels leave the host as uint8 (a quarter of float32's bytes); the train step
normalises them on the device with config.data.mean/std
(biovfm_jax/train/device_input.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import collections
import logging
import os
import re

import grain
import numpy as np

from data_pipeline import masking, multicrop, transforms
from data_pipeline import records as records_lib
from data_pipeline import selection as selection_lib
from data_pipeline import shards as shards_lib
from data_pipeline.errors import ConfigError
from data_pipeline.records import CorruptRecordError

MAX_SKIP = 16
# The example stream is "endless": 2**40 batches is more than any run takes
# and keeps grain's index arithmetic within int64.
_ENDLESS_STEPS = 1 << 40

# The record numbers an example had to skip travel under this key from the
# (possibly worker-process) example to the iterator, which logs them.
_BAD_KEY = "_bad_records"
# Warnings name at most this many bad records; the rest are counted.
_MAX_BAD_LOGGED = 50


class CorruptDataError(shards_lib.InputDataError):
  """Too many records of the shards are unreadable (one line names them)."""




class _Example:
  """Global example position -> dict of arrays plus "skipped": int32.

  Holds what every crop mode shares: the records, which record a position
  reads, corrupt-record skipping and the example's generator; subclasses only
  say how the pixels become arrays (`transform`). Picklable (grain ships it to
  worker processes); the ArrayRecord readers are opened lazily in each process.
  """

  def __init__(self, data: selection_lib.Resolved, seed: int):
    self.records, self.spec, self.seed = data.records, data.spec, seed
    self.num_records = len(self.records)
    # Which record a position reads: all of them, a subset, or a mixture.
    self.chosen = data.chosen
    # Record number -> (shard file, position in it), for messages.
    # pylint: disable-next=protected-access
    parts = self.records._read_instructions
    self._shard_files = [str(p.filename) for p in parts]
    self._shard_starts = np.cumsum([0] + [p.num_records for p in parts])

  def locate(self, index: int) -> tuple[str, int]:
    """(shard file, position in it) of global record number `index`."""
    k = int(np.searchsorted(self._shard_starts, index, side="right")) - 1
    return self._shard_files[k], int(index - self._shard_starts[k])

  def where(self, index: int) -> str:
    """'record 13 of /data/t-00001.array_record' for global record number `index`."""
    shard, pos = self.locate(index)
    return f"record {pos} of {shard}"

  def raw(self, index: int) -> bytes:
    """Bytes of record `index`; CorruptRecordError when it does not read."""
    try:
      return self.records[index]
    except RuntimeError as err:  # array_record: "Corrupted Riegeli/records file: ..."
      raise CorruptRecordError(f"unreadable: {err}") from err

  def load(self, index: int) -> np.ndarray:
    """Pixels of record `index`; CorruptRecordError when it does not read or decode."""
    return transforms.decode(self.raw(index))[0]

  def read_all(self, e: int, fn=None) -> tuple[Any, list[int]]:
    """fn(record number) (default: its pixels) of example `e`'s record, and the
    record numbers skipped on the way (fn raised CorruptRecordError)."""
    fn = fn or self.load
    tries = min(MAX_SKIP, self.chosen.size)
    bad, errors = [], []
    for skipped in range(tries):
      index = self.chosen.record(e, skipped, self.seed)
      try:
        return fn(index), bad
      except CorruptRecordError as err:
        bad.append(index)
        errors.append(f"{self.where(index)}: {err}")
    raise RuntimeError(
        f"shard spec {self.spec!r}: none of {tries} consecutive records for example {e} "
        f"decodes (last error: {errors[-1]})")

  def read(self, e: int) -> tuple[np.ndarray, int]:
    """Pixels of example `e`, and how many corrupt records were skipped."""
    pixels, bad = self.read_all(e)
    return pixels, len(bad)

  def source(self, index: int) -> Any:
    """What `transform` takes of record `index`: its pixels, unless a crop mode
    decodes them itself."""
    return self.load(index)

  def transform(self, source: Any, rng: np.random.Generator,
                e: int) -> dict[str, np.ndarray]:
    """Example `e`'s arrays from its record's `source`, drawing from `rng`."""
    raise NotImplementedError

  def __call__(self, e: int) -> dict[str, np.ndarray]:
    e = int(e)
    # Each try starts the example's generator afresh: what a record gives does
    # not depend on the records skipped before it.
    out, bad = self.read_all(e, lambda index: self.transform(
        self.source(index), np.random.default_rng([self.seed, e]), e))
    out["skipped"] = np.int32(len(bad))
    out[_BAD_KEY] = np.full(MAX_SKIP, -1, np.int64)
    out[_BAD_KEY][:len(bad)] = bad
    return out


class PretrainExample(_Example):
  """One random resized crop (MAE): {"image": uint8 (S, S, 3), "skipped"}."""

  def __init__(self, data: selection_lib.Resolved, seed: int, *, image_size: int,
               crop_scale, crop_ratio, hflip: bool):
    super().__init__(data, seed)
    self.image_size = int(image_size)
    self.crop_scale = tuple(float(x) for x in crop_scale)
    self.crop_ratio = tuple(float(x) for x in crop_ratio)
    self.hflip = bool(hflip)

  def source(self, index):
    """The record's image, opened but not decoded: the crop box comes first."""
    return records_lib.open_image(records_lib.decode_record(self.raw(index))[0])

  def transform(self, im, rng, e):
    del e  # every example alike
    box = transforms.sample_crop_box(im.height, im.width, self.crop_scale, self.crop_ratio, rng)
    # Decode only the rows the crop reads (PNG), and keep a grey image in one
    # channel until the end: the same bytes as decoding all and cropping RGB.
    im = records_lib.decode_rows(im, transforms.rows_read(box, self.image_size, im.height))
    img = transforms.resized_crop(im, box, self.image_size)
    if self.hflip:
      img = transforms.random_hflip(img, rng)
    return {"image": transforms.to_rgb(img)}


class MultiCropExample(_Example):
  """DINOv2 views (see multicrop.MultiCrop, which takes the keyword arguments):
  {"global_crops": uint8 (2, G, G, 3), "local_crops": uint8 (n, l, l, 3),
   "masks": bool (2, (G // patch)**2), "skipped"} (+ "gram_crops": uint8
  (2, R, R, 3) with config.data.gram_crop_size R).

  With `size_groups` (one MultiCrop kwargs override per group, see
  crop_size_groups) every step draws one group for all its examples:
  crop_size_group(seed, step, ratios), a function of the step alone, so a
  resumed run sees the sizes an uninterrupted one would. mask_sampling
  "shard" stratifies the iBOT masks over each of the `batch_shards` equal
  shares of a step's global batch (masking.shard_strata); "example" draws
  them per crop (see data_pipeline/masking.py)."""

  def __init__(self, data: selection_lib.Resolved, seed: int, *,
               size_groups: Sequence[dict] = (), ratios: Sequence[float] = (),
               global_batch: int | None = None, mask_sampling: str = "example",
               batch_shards: int = 1, **crop_kwargs):
    super().__init__(data, seed)
    self.views = [multicrop.MultiCrop(**{**crop_kwargs, **g}) for g in size_groups or [{}]]
    self.ratios = tuple(float(r) for r in ratios) or (1.0,)
    if len(self.views) > 1 and not global_batch:
      raise ValueError("several crop sizes need the global batch size (one size per step)")
    self.global_batch = global_batch
    self.mask_sampling, self.batch_shards = mask_sampling, int(batch_shards)
    masking.check_sampling(mask_sampling)
    if mask_sampling == "shard" and (not global_batch or self.batch_shards < 1
                                     or global_batch % self.batch_shards):
      raise ConfigError(
          f"config.data.mask_sampling='shard' needs the global batch ({global_batch}) to "
          f"split evenly over the {self.batch_shards} batch shards (or use 'example')")

  def transform(self, pixels, rng, e):
    k = 0 if len(self.views) == 1 else crop_size_group(self.seed, e // self.global_batch,
                                                        self.ratios)
    strata = None
    if self.mask_sampling == "shard":
      # e = step * G + position; batch shard s holds positions [s * B_s, (s + 1) * B_s).
      step, position = divmod(e, self.global_batch)
      shard_batch = self.global_batch // self.batch_shards
      shard, j = divmod(position, shard_batch)
      strata = masking.shard_strata(self.seed, step, self.batch_shards, shard, shard_batch,
                                    j, self.views[k].mask_probability)
    return self.views[k](pixels, rng, strata)


def crop_size_group(seed: int, step: int, ratios: Sequence[float]) -> int:
  """Which crop-size group step `step` uses: drawn with probabilities `ratios`
  from a generator of (seed, step) alone."""
  p = np.asarray(ratios, np.float64)
  return int(np.random.default_rng([int(seed), int(step), 0x53495a45]).choice(len(p), p=p / p.sum()))


_MULTICROP_FIELDS = ("global_crop_size", "global_crop_scale", "local_crop_size",
                     "local_crop_scale", "num_local_crops", "mask_probability",
                     "mask_ratio", "patch_size", "gram_crop_size", "gram_no_distortions")
# config.data keys of the groups, with the MultiCrop argument each sets.
_GROUP_FIELDS = (("global_crop_sizes", "global_crop_size"), ("local_crop_sizes", "local_crop_size"),
                 ("gram_crop_sizes", "gram_crop_size"))


def crop_size_groups(data_cfg: Any) -> tuple[list[dict], tuple[float, ...]]:
  """([MultiCrop overrides per group], ratios) from config.data.global_crop_sizes,
  local_crop_sizes, gram_crop_sizes (empty: that size fixed) and
  crop_size_ratios (DINOv3's global_local_crop_pairs_ratios); ([], ()) when
  no list is set: one size for the whole run."""
  lists = {arg: tuple(int(x) for x in data_cfg[key]) for key, arg in _GROUP_FIELDS
           if data_cfg[key]}
  if not lists:
    return [], ()
  n = {len(v) for v in lists.values()}
  ratios = tuple(float(r) for r in data_cfg.crop_size_ratios) or (1.0,) * max(n)
  if len(n | {len(ratios)}) != 1:
    raise ConfigError("config.data.global_crop_sizes, local_crop_sizes, gram_crop_sizes "
                      "and crop_size_ratios must have one entry per group (or be empty): "
                      + ", ".join(f"{k} {len(data_cfg[k])}" for k, _ in _GROUP_FIELDS)
                      + f", crop_size_ratios {len(data_cfg.crop_size_ratios)}")
  if min(ratios) < 0 or sum(ratios) <= 0:
    raise ConfigError(f"config.data.crop_size_ratios={ratios} must be >= 0, not all 0")
  groups = [{arg: v[i] for arg, v in lists.items()} for i in range(len(ratios))]
  return groups, ratios


def resolve(data_cfg: Any) -> selection_lib.Resolved:
  """The records `data_cfg.shards` and `data_cfg.mixture` name, resolved (and
  opened) once; the train loop hands them to make_pretrain_loader."""
  return selection_lib.resolve(data_cfg.shards, data_cfg.cache_dir, data_cfg.mixture)


def make_example(data_cfg: Any, seed: int, data: selection_lib.Resolved | None = None,
                 global_batch: int | None = None, batch_shards: int = 1) -> _Example:
  """The per-example function that `data_cfg.crops` asks for, over `data`
  (default: resolved from data_cfg). data_cfg is a pretraining config's `data`
  (configs/common.py: every key there, no defaults here). `batch_shards`: the
  devices the batch axis is split over, which mask_sampling "shard" stratifies
  per (the train loop passes its mesh's; 1 is a one-device run's masks)."""
  data = data or resolve(data_cfg)
  crops = data_cfg.crops
  if crops == "single":
    return PretrainExample(
        data, int(seed), image_size=data_cfg.image_size,
        crop_scale=data_cfg.crop_scale, crop_ratio=data_cfg.crop_ratio,
        hflip=data_cfg.hflip)
  if crops == "multicrop":
    groups, ratios = crop_size_groups(data_cfg)
    return MultiCropExample(data, int(seed), size_groups=groups, ratios=ratios,
                            global_batch=global_batch, batch_shards=batch_shards,
                            mask_sampling=data_cfg.mask_sampling,
                            **{k: data_cfg[k] for k in _MULTICROP_FIELDS})
  raise ConfigError(f"config.data.crops must be 'single' or 'multicrop', got {crops!r}")


class _GlobalPosition:
  """Local stream index i (from the start step) -> global example position."""

  def __init__(self, start_step: int, global_batch: int, local_batch: int,
               process_index: int):
    self.start_step, self.global_batch = start_step, global_batch
    self.local_batch, self.process_index = local_batch, process_index

  def __call__(self, i: int) -> int:
    step, j = divmod(int(i), self.local_batch)
    return ((self.start_step + step) * self.global_batch
            + self.process_index * self.local_batch + j)


def batch_spec(data_cfg: Any, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """name -> (shape, dtype) of the batches of `batch_size` examples that
  make_pretrain_loader yields for `data_cfg`, without reading any data (with
  several crop sizes: the largest group's)."""
  b = int(batch_size)
  if data_cfg.crops == "single":
    s = int(data_cfg.image_size)
    spec = {"image": ((b, s, s, 3), np.uint8)}
  elif data_cfg.crops == "multicrop":
    sizes = {"global_crop_size": data_cfg.global_crop_size,
             "local_crop_size": data_cfg.local_crop_size,
             "gram_crop_size": data_cfg.gram_crop_size}
    groups, _ = crop_size_groups(data_cfg)
    if groups:  # several sizes: the largest group (what memory must hold)
      sizes.update(max(groups, key=lambda g: tuple(
          int(g.get(k) or sizes[k] or 0) for k in ("global_crop_size", "gram_crop_size",
                                                   "local_crop_size"))))
    g, loc = int(sizes["global_crop_size"]), int(sizes["local_crop_size"])
    spec = {"global_crops": ((b, 2, g, g, 3), np.uint8),
            "local_crops": ((b, int(data_cfg.num_local_crops), loc, loc, 3), np.uint8),
            "masks": ((b, 2, (g // int(data_cfg.patch_size)) ** 2), np.bool_)}
    if sizes["gram_crop_size"] is not None:
      r = int(sizes["gram_crop_size"])
      spec["gram_crops"] = ((b, 2, r, r, 3), np.uint8)
  else:
    raise ConfigError(f"config.data.crops={data_cfg.crops!r} must be 'single' or 'multicrop'")
  spec["skipped"] = ((b,), np.int32)
  return {k: (shape, np.dtype(dt)) for k, (shape, dt) in spec.items()}


def process_share(global_batch: int, process_index: int | None,
                  process_count: int | None, what: str) -> tuple[int, int]:
  """(process_index, local batch size): each process reads a contiguous share
  of every global batch. Indices default to jax's."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(f"{what} {global_batch} must be a positive multiple of the "
                     f"process count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, global_batch // process_count


# Auto (None) input parallelism: caps on the worker processes (each holds its
# own imports and buffers) and on the in-process read threads.
_MAX_AUTO_WORKERS = 32
_MAX_AUTO_THREADS = 16


def host_cores() -> int:
  """The cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def input_parallelism(data_cfg: Any) -> tuple[int, int]:
  """(worker processes, read threads per process) for config.data.num_workers
  and read_threads; None picks from the host's cores (configs/common.py)."""
  workers, threads = data_cfg.num_workers, data_cfg.read_threads
  cores = host_cores()
  if workers is None:
    workers = min(cores - 1, _MAX_AUTO_WORKERS) if cores > 2 else 0
  if threads is None:
    threads = 2 if workers else min(cores, _MAX_AUTO_THREADS)
  return int(workers), int(threads)


def make_pretrain_loader(data_cfg: Any, *, global_batch_size: int, seed: int,
                         start_step: int = 0, process_index: int | None = None,
                         process_count: int | None = None,
                         data: selection_lib.Resolved | None = None, batch_shards: int = 1):
  """Returns an iterator of per-process batch dicts, L = G / process_count:
  crops "single":    {"image": uint8 (L, S, S, 3), "skipped": int32 (L,)}
  crops "multicrop": {"global_crops": uint8 (L, 2, G, G, 3),
                      "local_crops": uint8 (L, n_local, l, l, 3),
                      "masks": bool (L, 2, (G // patch_size)**2),
                      "skipped": int32 (L,)}
  Shapes are the same every step: batch_spec(data_cfg, L). Pixels are
  uint8, not normalised: device_input.normalize does that on the device.

  The first batch is global step `start_step`. process_index and process_count
  default to jax's. `data` is the input `resolve(data_cfg)` gives (the train
  loop resolves it once); resolved here when not given. `batch_shards`: see
  make_example (default 1: the masks of a one-device run). Close the iterator
  (`it.close()`) when done if it uses worker processes. With num_workers > 0
  the calling program needs an `if __name__ == "__main__":` guard (workers
  are spawned).
  """
  process_index, local_batch = process_share(global_batch_size, process_index,
                                             process_count, "global batch")
  if seed < 0 or start_step < 0:
    raise ValueError(f"seed and start_step must be >= 0, got {seed}, {start_step}")
  example = make_example(data_cfg, seed, data, global_batch_size, batch_shards)

  ds = (grain.MapDataset.range(_ENDLESS_STEPS * local_batch)
        .map(_GlobalPosition(start_step, global_batch_size, local_batch, process_index))
        .map(example)
        # Batch in the MapDataset, before the worker split: each worker then
        # makes whole batches, so a batch never depends on num_workers.
        .batch(local_batch, drop_remainder=True))
  num_workers, read_threads = input_parallelism(data_cfg)
  if data_cfg.num_workers is None or data_cfg.read_threads is None:
    logging.info("Input: %d worker processes, %d read threads each (config.data.num_workers="
                 "%s, read_threads=%s; None: from the host's %d cores).", num_workers,
                 read_threads, data_cfg.num_workers, data_cfg.read_threads, host_cores())
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=int(data_cfg.prefetch_buffer)))
  if num_workers > 0:
    # grain's worker start-up reads absl flags. A program run with absl's
    # app.run has parsed them; otherwise (tests, notebooks) use the defaults.
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return _Batches(iter(ds), example, data_cfg.max_skipped_fraction)


class _Batches:
  """The batch iterator: takes the skipped record numbers out of each batch,
  names each bad record once in a warning and enforces max_skipped_fraction.
  Runs in the calling process, so it sees the records of every worker."""

  def __init__(self, it, example: _Example, max_fraction: float | None):
    self._it, self._example = it, example
    self._fraction = max_fraction
    self.bad: dict[int, str] = {}   # record number -> where and why, in the order found

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    found = np.asarray(batch.pop(_BAD_KEY))
    for index in map(int, np.unique(found[found >= 0])):
      if index not in self.bad:
        self._note(index)
    if self._fraction is not None and len(self.bad) > self._fraction * self._example.chosen.size:
      per_shard = collections.Counter(self._example.locate(i)[0] for i in self.bad)
      raise CorruptDataError(
          f"{len(self.bad)} unreadable records of {self._example.chosen.size} exceed "
          f"config.data.max_skipped_fraction={self._fraction:g}: "
          + ", ".join(f"{n} in {f}" for f, n in per_shard.most_common(5))
          + f" (first: {next(iter(self.bad.values()))})")
    return batch

  def _note(self, index: int) -> None:
    # Read it again here for the reason: workers cannot send their messages.
    try:
      self._example.load(index)
      why = "read fails intermittently"
    except CorruptRecordError as err:
      # The checksums in array_record's message say nothing to a user.
      why = re.sub(r" \(computed [^)]*\)|; at byte.*", "", str(err))[:160]
    self.bad[index] = f"{self._example.where(index)} ({why})"
    if len(self.bad) <= _MAX_BAD_LOGGED:
      logging.warning("Skipping bad %s.%s", self.bad[index],
                      " Further bad records are counted, not named."
                      if len(self.bad) == _MAX_BAD_LOGGED else "")

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close:
      close()
