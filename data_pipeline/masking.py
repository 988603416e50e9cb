"""iBOT block-wise patch masks for DINOv2, in numpy (they run in grain workers).

A mask is made of random rectangular blocks of patches, the way BEiT and
DINOv2 mask: contiguous regions are harder to fill in from neighbours than
scattered patches, so the masked-patch loss learns more than texture copying.

The reference draws the mask ratios in its collate function, stratified over
the batch: exactly mask_probability x B of the global crops are masked, with
ratios spread evenly over [min, max]. Here each global crop draws its own
Bernoulli(mask_probability) and ratio instead. The batch is then masked in
that proportion only on average, but an example depends on (seed, example
position) alone, not on the batch size or how the batch is split over
processes, which is what keeps the input resumable and process-count free.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MAX_TRIES = 10  # block placements that add nothing before giving up


def _place_block(mask: np.ndarray, budget: int, rng: np.random.Generator,
                 min_block: int, log_aspect: tuple[float, float]) -> int:
  """Mask one random block adding between 1 and `budget` new patches.

  Returns how many it added (0 when MAX_TRIES blocks all failed: each either
  did not fit, added nothing, or would overshoot the budget).
  """
  grid_h, grid_w = mask.shape
  for _ in range(MAX_TRIES):
    area = rng.uniform(min(min_block, budget), budget)
    aspect = math.exp(rng.uniform(*log_aspect))  # h / w
    h = int(round(math.sqrt(area * aspect)))
    w = int(round(math.sqrt(area / aspect)))
    if not (1 <= h <= grid_h and 1 <= w <= grid_w):
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
               min_aspect: float = 0.3, max_aspect: float = 1 / 0.3,
               min_block: int = 4) -> np.ndarray:
  """Bool (grid_h * grid_w,) mask of at most `num_masked` patches, in blocks.

  Blocks have an area uniform in [min_block, patches still to mask] and an
  aspect ratio log-uniform in [min_aspect, max_aspect]; they are placed until
  the count is reached or MAX_TRIES placements in a row add nothing, so the
  count can fall a little short (never over).
  """
  if grid_h < 1 or grid_w < 1:
    raise ValueError(f"grid must be at least 1x1, got {grid_h}x{grid_w}")
  mask = np.zeros((grid_h, grid_w), bool)
  target = min(max(int(num_masked), 0), grid_h * grid_w)
  log_aspect = (math.log(min_aspect), math.log(max_aspect))
  count = 0
  while count < target:
    added = _place_block(mask, target - count, rng, min_block, log_aspect)
    if added == 0:
      break
    count += added
  return mask.reshape(-1)


def crop_mask(grid_h: int, grid_w: int, rng: np.random.Generator,
              probability: float = 0.5,
              ratio: Sequence[float] = (0.1, 0.5)) -> np.ndarray:
  """One global crop's mask: with `probability`, a block mask of a ratio
  uniform in `ratio` of the patches; else all False.

  Always draws the coin and the ratio, so the draws after it do not depend on
  the outcome.
  """
  masked = rng.random() < probability
  r = rng.uniform(ratio[0], ratio[1])
  num = int(r * grid_h * grid_w) if masked else 0
  return block_mask(grid_h, grid_w, num, rng)
