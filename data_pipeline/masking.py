"""iBOT block-wise patch masks for DINOv2, in numpy (they run in grain workers).

A mask is made of random rectangular blocks of patches, the way BEiT and
DINOv2 mask: contiguous regions are harder to fill in from neighbours than
scattered patches, so the masked-patch loss learns more than texture copying.
The blocks follow the reference's MaskingGenerator (dinov2/data/masking.py):
each block adds at most `max_block` patches (half the grid in training), fits
strictly inside the grid, and up to MAX_TRIES placements are tried per block.

Which crops are masked, and how much (config.data.mask_sampling):
  "shard"   the reference's collate (dinov2/data/collate.py), run per batch
            shard (its GPU): of the shard's 2 B_s global crops exactly
            n = int(mask_probability x 2 B_s) are masked, crop k of them with a
            ratio uniform in the k-th of n equal strata of mask_ratio, and the
            crops are shuffled over the slots. The shuffle comes from (seed,
            step, shard count, shard), so every example of a shard computes it
            alone; but a run resumed on another shard count draws other masks.
  "example" each global crop draws its own Bernoulli(mask_probability) coin and
            ratio: the batch is masked in that proportion only on average, but
            a mask depends on (seed, example position) alone, so a run resumes
            bit for bit on any device count.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from data_pipeline.errors import ConfigError

MAX_TRIES = 10  # block placements that add nothing before giving up
_SHUFFLE_TAG = 0x4D41534B  # "MASK": the shard shuffle's stream, apart from the examples'

Stratum = tuple[int, int] | None  # (k, n): the k-th of n ratio strata; None: not masked
SAMPLINGS = ("shard", "example")  # config.data.mask_sampling


def check_sampling(mask_sampling: str) -> None:
  """ConfigError naming config.data.mask_sampling unless it is one of SAMPLINGS."""
  if mask_sampling not in SAMPLINGS:
    raise ConfigError(f"config.data.mask_sampling={mask_sampling!r}: "
                      + " or ".join(map(repr, SAMPLINGS)))


def max_block_patches(img_size: int, patch_size: int) -> float:
  """The reference's cap on one block (dinov2/train/train.py). Python reads
  its expression as ((0.5 * img // patch) * img) // patch: half the grid's
  patches when 0.5 * img divides by patch (224/16: 98.0, 224/14: 128.0)."""
  return 0.5 * img_size // patch_size * img_size // patch_size


def _place_block(mask: np.ndarray, budget: float, rng: np.random.Generator,
                 min_block: int, log_aspect: tuple[float, float]) -> int:
  """Mask one random block adding between 1 and `budget` new patches.

  Returns how many it added (0 when MAX_TRIES blocks all failed: each either
  did not fit, added nothing, or would overshoot the budget).
  """
  grid_h, grid_w = mask.shape
  for _ in range(MAX_TRIES):
    # Python's random.uniform(min_block, budget), as the reference: a budget below
    # min_block gives an area in [budget, min_block] (then often more than the budget).
    area = min_block + (budget - min_block) * rng.random()
    aspect = math.exp(rng.uniform(*log_aspect))  # h / w
    h = int(round(math.sqrt(area * aspect)))
    w = int(round(math.sqrt(area / aspect)))
    if not (h < grid_h and w < grid_w):  # strict, as the reference: never the full side
      continue
    top = int(rng.integers(0, grid_h - h + 1))
    left = int(rng.integers(0, grid_w - w + 1))
    block = mask[top:top + h, left:left + w]
    added = h * w - int(block.sum())
    if 0 < added <= budget:
      block[...] = True
      return added
  return 0


def block_mask(grid_h: int, grid_w: int, num_masked: int, rng: np.random.Generator,
               max_block: float | None = None, min_aspect: float = 0.3,
               max_aspect: float = 1 / 0.3, min_block: int = 4) -> np.ndarray:
  """Bool (grid_h * grid_w,) mask of at most `num_masked` patches, in blocks.

  Each block has an area uniform between min_block and the patches it may
  still add (the rest of the count, capped at `max_block`; None: no cap) and
  an aspect ratio log-uniform in [min_aspect, max_aspect]; blocks are placed
  until the count is reached or one block fails MAX_TRIES placements, so the
  count can fall short (never over).
  """
  if grid_h < 1 or grid_w < 1:
    raise ValueError(f"grid must be at least 1x1, got {grid_h}x{grid_w}")
  mask = np.zeros((grid_h, grid_w), bool)
  target = min(max(int(num_masked), 0), grid_h * grid_w)
  cap = target if max_block is None else max_block
  log_aspect = (math.log(min_aspect), math.log(max_aspect))
  count = 0
  while count < target:
    added = _place_block(mask, min(target - count, cap), rng, min_block, log_aspect)
    if added == 0:
      break
    count += added
  return mask.reshape(-1)


def crop_mask(grid_h: int, grid_w: int, rng: np.random.Generator,
              probability: float = 0.5, ratio: Sequence[float] = (0.1, 0.5),
              max_block: float | None = None) -> np.ndarray:
  """One global crop's mask for mask_sampling "example": with `probability`,
  a block mask of a ratio uniform in `ratio` of the patches; else all False.

  Always draws the coin and the ratio, so how many numbers a crop takes
  before its blocks does not depend on the outcome.
  """
  masked = rng.random() < probability
  r = rng.uniform(ratio[0], ratio[1])
  num = int(r * grid_h * grid_w) if masked else 0
  return block_mask(grid_h, grid_w, num, rng, max_block)


def stratum_mask(grid_h: int, grid_w: int, rng: np.random.Generator, stratum: Stratum,
                 ratio: Sequence[float] = (0.1, 0.5),
                 max_block: float | None = None) -> np.ndarray:
  """One global crop's mask for mask_sampling "shard": stratum (k, n) masks
  int(N x r) patches, r uniform in [p_k, p_k+1] of linspace(*ratio, n + 1)
  (the reference's collate); None masks nothing."""
  if stratum is None:
    return np.zeros(grid_h * grid_w, bool)
  k, n = stratum
  lo, hi = np.linspace(ratio[0], ratio[1], n + 1)[k:k + 2]
  num = int(grid_h * grid_w * (lo + (hi - lo) * rng.random()))
  return block_mask(grid_h, grid_w, num, rng, max_block)


def shard_strata(seed: int, step: int, num_shards: int, shard: int, shard_batch: int,
                 j: int, probability: float) -> list[Stratum]:
  """The strata of image j's two global crops in batch shard `shard` of step
  `step` ("shard" sampling). The shard's 2 * shard_batch global crops sit
  crop-major, as the reference stacks them (crop c of image j: slot
  c * shard_batch + j); a shuffle of the slots drawn from (seed, step,
  num_shards, shard) alone gives the first n = int(probability * slots) of
  them the strata 0..n-1, the rest no mask. Every image of the shard draws
  the same shuffle, so exactly n crops of the shard are masked.
  """
  slots = 2 * shard_batch
  n = int(slots * probability)
  order = np.random.default_rng(
      [int(seed), int(step), int(num_shards), int(shard), _SHUFFLE_TAG]).permutation(slots)
  rank = np.empty(slots, np.int64)
  rank[order] = np.arange(slots)
  ks = (int(rank[c * shard_batch + j]) for c in (0, 1))
  return [(k, n) if k < n else None for k in ks]
