"""Pooled features of a frozen encoder over an evaluation split.

Batches are split over every device of the encoder's mesh (and over processes:
each reads its share of the global batch); rows come back to the host in
example order. `cached` keeps them on disk, keyed by everything that changes
them, so the `fast` probe and kNN pay for the encoder once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from biovfm_jax import sharding as shd

POOLS = ("mean_patch", "cls", "cls_mean_patch")


def pool(out: dict, how: str) -> jax.Array:
  """{"cls", "patch_tokens"} -> (N, D') features. 'mean_patch' is the
  reference probe's: the mean of the patch tokens, no cls, no registers."""
  if how == "mean_patch":
    return out["patch_tokens"].mean(axis=1)
  if out.get("cls") is None:
    raise ValueError(f"pool={how!r} needs a class token; this encoder has none")
  if how == "cls":
    return out["cls"]
  if how == "cls_mean_patch":
    return jnp.concatenate([out["cls"], out["patch_tokens"].mean(axis=1)], axis=-1)
  raise ValueError(f"pool={how!r} is unknown; known: {POOLS}")


def pooled_fn(encoder, how: str):
  """Traceable (params, images, rng, deterministic) -> (N, D') float32."""

  def fn(params, images, rng=None, deterministic=True):
    tokens = encoder.tokens(params, images, rng, deterministic).astype(jnp.float32)
    split = encoder.config.num_prefix_tokens
    cls = tokens[:, 0] if encoder.config.class_token else None
    return pool({"cls": cls, "patch_tokens": tokens[:, split:]}, how)

  return fn


def global_batch(encoder, local: np.ndarray):
  return jax.make_array_from_process_local_data(encoder.batch_sharding, np.asarray(local))


class Progress:
  """A log line every `every` seconds: done/total, examples/s, ETA."""

  def __init__(self, desc: str, total: int, every: float = 10.0):
    self.desc, self.total, self.every = desc, total, every
    self.start = self.last = time.perf_counter()
    self.done = 0

  def update(self, n: int) -> None:
    self.done += n
    now = time.perf_counter()
    if now - self.last >= self.every or self.done >= self.total:
      self.last = now
      rate = self.done / max(now - self.start, 1e-9)
      eta = (self.total - self.done) / max(rate, 1e-9)
      logging.info("%s: %d/%d (%.0f ex/s, ETA %dm%02ds)", self.desc, self.done,
                   self.total, rate, eta // 60, eta % 60)


def _jitted(encoder, how: str):
  """One compiled feature function per (encoder, pooling), reused across splits."""
  cache = encoder.__dict__.setdefault("_pooled_jit", {})
  if how not in cache:
    cache[how] = jax.jit(pooled_fn(encoder, how), static_argnames=("deterministic",))
  return cache[how]


def extract(encoder, split, *, batch_size: int, how: str = "mean_patch",
            image_size: int | None = None, augment: bool = False, seed: int = 42,
            epoch: int = 0, rng=None, read_threads: int = 2) -> np.ndarray:
  """(N, D') float32 features of every example of `split`, in example order.
  `rng` turns on the encoder's stochastic layers (drop path); `read_threads`
  decode images ahead (0: in this thread)."""
  fn = _jitted(encoder, how)
  feats = None
  progress = Progress(f"features {split.name}/{split.split}", split.num_examples)
  for i, batch in enumerate(split.batches(
      batch_size, augment=augment, seed=seed, epoch=epoch, shuffle=False, drop_last=False,
      image_size=image_size, process_index=jax.process_index(),
      process_count=jax.process_count(), num_threads=read_threads)):
    images = global_batch(encoder, batch["image"])
    key = None if rng is None else jax.random.fold_in(rng, i)
    out = shd.to_host(fn(encoder.params, images, key, deterministic=rng is None))
    index = shd.to_host(global_batch(encoder, batch["index"]))
    valid = shd.to_host(global_batch(encoder, batch["valid"]))
    if feats is None:
      feats = np.zeros((split.num_examples, out.shape[-1]), np.float32)
    feats[index[valid]] = out[valid]
    progress.update(int(valid.sum()))
  if feats is None:
    raise ValueError(f"{split.name}/{split.split} has no examples")
  return feats


def cached(encoder, split, cache_dir: str | None, **kwargs) -> np.ndarray:
  """`extract`, read from / written to `cache_dir` when given. The key covers
  the checkpoint, its config, the split, image size and pooling."""
  if not cache_dir or kwargs.get("augment") or kwargs.get("rng") is not None:
    return extract(encoder, split, **kwargs)
  key = json.dumps({"source": os.path.abspath(encoder.source) if encoder.source else "",
                    "encoder": repr(encoder.config), "benchmark": split.name,
                    "split": split.split, "n": split.num_examples,
                    "stored_size": getattr(split, "image_size", None),
                    "image_size": kwargs.get("image_size"), "how": kwargs.get("how")},
                   sort_keys=True)
  name = f"{split.name}_{split.split}_{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy"
  return cached_array(os.path.join(cache_dir, name), split.num_examples,
                      lambda: extract(encoder, split, **kwargs),
                      f"features {split.name}/{split.split}")


def cached_array(path: str, rows: int, compute, desc: str) -> np.ndarray:
  """The (rows, ...) array saved at `path`, else compute() saved there
  (atomically, by process 0)."""
  if os.path.exists(path):
    feats = np.load(path)
    if feats.shape[0] == rows:
      logging.info("%s from cache %s", desc, path)
      return feats
  feats = compute()
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, feats)
    os.replace(tmp, path)
  return feats
