"""The evaluation input pipeline on grain: benchmark splits as static-shape batches.

Reads the ArrayRecord files of data_pipeline/tfds_builders.py through the tfds
data source (random access, no tensorflow). Like the pretraining loader, every
position is a pure function of its arguments: the order of epoch `epoch` is
the identity or, with `shuffle`, np.random.default_rng([seed, epoch]).permutation(N),
and example `index`'s augmentation draws from np.random.default_rng([seed, epoch,
index]). So a batch never depends on threads, processes or earlier epochs.

Global batch b holds order positions [b * B, (b + 1) * B); process p of P gets
the contiguous share [b * B + p * B / P, b * B + (p + 1) * B / P). Without
drop_last the last batch is padded to B with `valid` False (image 0, label 0,
index -1), so shapes are static and metrics just mask.

The probe augmentation is the reference one (torchvision on PIL images):
RandomRotation(30) (angle uniform in [-30, 30], nearest, about the centre,
fill 0, same size), then RandomCrop(S, padding=4) (zero-pad 4 px each side,
random S x S crop), on the uint8 image before normalising with mean 0.5, std 0.5.
"""
from __future__ import annotations

import functools
import io
import os
import grain
import numpy as np
from PIL import Image

from data_pipeline import loader, tfds_builders, transforms

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
ROTATION_DEGREES = 30.0
CROP_PADDING = 4


def decode_png(data: bytes) -> np.ndarray:
  """PNG bytes -> uint8 (H, W) grey or (H, W, 3)."""
  with Image.open(io.BytesIO(data)) as im:
    if im.mode not in ("L", "RGB"):
      im = im.convert("RGB" if im.mode in ("RGBA", "P") else "L")
    return np.asarray(im)


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize to size x size (PIL, antialiased when shrinking); no-op at size."""
  if pixels.shape[0] == size and pixels.shape[1] == size:
    return pixels
  return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))


def random_rotation(pixels: np.ndarray, rng: np.random.Generator,
                    degrees: float = ROTATION_DEGREES) -> np.ndarray:
  """torchvision RandomRotation(degrees) on a PIL image: nearest, centre, fill 0."""
  angle = float(rng.uniform(-degrees, degrees))
  fill = 0 if pixels.ndim == 2 else (0,) * pixels.shape[2]
  im = Image.fromarray(pixels).rotate(angle, resample=Image.Resampling.NEAREST,
                                      expand=False, fillcolor=fill)
  return np.asarray(im)


def random_crop(pixels: np.ndarray, rng: np.random.Generator,
                padding: int = CROP_PADDING) -> np.ndarray:
  """torchvision RandomCrop(same size, padding): zero-pad, then a random crop."""
  h, w = pixels.shape[:2]
  pad = ((padding, padding), (padding, padding)) + ((0, 0),) * (pixels.ndim - 2)
  padded = np.pad(pixels, pad)
  top = int(rng.integers(0, 2 * padding + 1))
  left = int(rng.integers(0, 2 * padding + 1))
  return padded[top:top + h, left:left + w]


def probe_augment(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """The reference linear-probe train augmentation: rotation, then padded crop."""
  return random_crop(random_rotation(pixels, rng), rng)


class _Example:
  """Global order position -> {"image", "label", "index", "valid"} (one example)."""

  def __init__(self, source, num_examples: int, order: np.ndarray | None, *,
               image_size: int, label_width: int, augment: bool, seed: int, epoch: int,
               name: str):
    self.source, self.num_examples, self.order = source, num_examples, order
    self.image_size, self.label_width = image_size, label_width
    self.augment, self.seed, self.epoch, self.name = augment, seed, epoch, name
    self.mean = np.asarray(MEAN, np.float32)
    self.std = np.asarray(STD, np.float32)

  def __call__(self, g: int) -> dict[str, np.ndarray]:
    g = int(g)
    if g >= self.num_examples:  # padding of the last batch
      return {"image": np.zeros((self.image_size, self.image_size, 3), np.float32),
              "label": np.zeros((self.label_width,), np.int32),
              "index": np.int32(-1), "valid": np.bool_(False)}
    index = int(self.order[g]) if self.order is not None else g
    record = self.source[index]
    try:
      pixels = decode_png(record["image"])
    except Exception as e:  # PIL raises many types for bad data
      raise ValueError(f"{self.name}: example {index} does not decode: {e}") from e
    pixels = resize(pixels, self.image_size)
    if self.augment:
      pixels = probe_augment(pixels, np.random.default_rng([self.seed, self.epoch, index]))
    image = transforms.normalize(transforms.to_rgb(pixels), self.mean, self.std)
    return {"image": image, "label": np.asarray(record["label"], np.int32),
            "index": np.int32(index), "valid": np.bool_(True)}


class _GlobalPosition:
  """Local stream index -> global order position (this process's share of each batch)."""

  def __init__(self, global_batch: int, local_batch: int, process_index: int):
    self.global_batch, self.local_batch = global_batch, local_batch
    self.process_index = process_index

  def __call__(self, i: int) -> int:
    b, j = divmod(int(i), self.local_batch)
    return b * self.global_batch + self.process_index * self.local_batch + j


class EvalSplit:
  """One split of a benchmark, ready to batch.

  name, split, task (MedMNIST's task string), num_classes (labels, for
  multi-label), label_width (L), num_examples, image_size (stored side),
  labels (int32 (N, L), read without decoding images).
  """

  def __init__(self, name: str, split: str, builder):
    self.name, self.split, self.builder = name, split, builder
    meta = builder.info.metadata or {}
    self.task = str(meta["task"])
    self.num_classes = int(meta["num_classes"])
    feats = builder.info.features
    self.image_size = int(feats["image"].shape[0])
    self.channels = int(feats["image"].shape[2])
    self.label_width = int(feats["label"].shape[0])
    self.classes = list(meta.get("classes", [])) or None
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    # Images stay PNG bytes: decoded (and resized, augmented) in grain's threads.
    self.source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    self.num_examples = len(self.source)

  def __repr__(self):
    return (f"EvalSplit({self.name}/{self.split}: {self.num_examples} examples, {self.task}, "
            f"{self.num_classes} classes, {self.image_size} px, {self.channels} ch)")

  @functools.cached_property
  def labels(self) -> np.ndarray:
    """All labels, int32 (N, L), in example order."""
    out = np.zeros((self.num_examples, self.label_width), np.int32)
    step = 4096
    for start in range(0, self.num_examples, step):
      keys = list(range(start, min(start + step, self.num_examples)))
      out[start:start + len(keys)] = [r["label"] for r in self.source.__getitems__(keys)]
    return out

  def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
    """Batches per epoch: N // B with drop_last, else ceil(N / B)."""
    n, b = self.num_examples, int(batch_size)
    return n // b if drop_last else -(-n // b)

  def order(self, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The example indices of epoch `epoch` in batch order."""
    if not shuffle:
      return np.arange(self.num_examples)
    return np.random.default_rng([seed, epoch]).permutation(self.num_examples)

  def batches(self, batch_size: int, *, augment: bool, seed: int = 42, epoch: int = 0,
              shuffle: bool = False, drop_last: bool = False, image_size: int | None = None,
              process_index: int | None = None, process_count: int | None = None,
              num_threads: int = 2):
    """An iterator of this process's batches of one epoch (batch_size is global):
    {"image": float32 (B/P, S, S, 3), "label": int32 (B/P, L), "index": int32
    (B/P,), "valid": bool (B/P,)}. S is `image_size` (default: the stored size).
    process_index and process_count default to jax's.
    """
    process_index, local = loader.process_share(
        batch_size, process_index, process_count, f"{self.name}/{self.split}: batch size")
    if seed < 0 or epoch < 0:
      raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
    steps = self.num_batches(batch_size, drop_last)
    size = int(image_size or self.image_size)
    example = _Example(self.source, self.num_examples,
                       self.order(seed, epoch, shuffle) if shuffle else None,
                       image_size=size, label_width=self.label_width, augment=augment,
                       seed=seed, epoch=epoch, name=f"{self.name}/{self.split}")
    ds = (grain.MapDataset.range(steps * local)
          .map(_GlobalPosition(batch_size, local, process_index))
          .map(example)
          .batch(local, drop_remainder=True))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                      prefetch_buffer_size=2)))


def load_split(benchmark: str, split: str, *, size: int, data_dir: str | os.PathLike,
               npz_dir: str | os.PathLike | None = None,
               cache_dir: str | os.PathLike | None = None, download: bool = True) -> EvalSplit:
  """Split `split` of `benchmark` stored at `size` px, prepared first if needed
  (see tfds_builders.prepare for npz_dir, cache_dir and download)."""
  if split not in tfds_builders.SPLITS:
    raise ValueError(f"{benchmark}: split must be one of {tfds_builders.SPLITS}, got {split!r}")
  builder = tfds_builders.prepare(benchmark, size=size, data_dir=data_dir, npz_dir=npz_dir,
                                  cache_dir=cache_dir, download=download)
  return EvalSplit(benchmark, split, builder)

