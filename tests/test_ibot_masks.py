"""iBOT masks against the reference's: DINOv2's MaskingGenerator with its
train.py arguments, and the mask part of its collate, per batch shard (GPU).

The reference side is a transcription (below, Python's `random` as there) of
dinov2/data/masking.py (MaskingGenerator) and dinov2/data/collate.py
(collate_data_and_cast, its masks); with DINOV2_REPO naming a clone of
facebookresearch/dinov2 the tests also run against those two files
themselves (loaded alone: dinov2.data's __init__ imports the whole training
stack; the collate needs torch). Statistics are compared with two-sample
Kolmogorov-Smirnov tests at level 1e-6 each (asymptotic, conservative for
these integer counts): a negligible false-failure rate, and each test shows
that the rules this replaced, or a generator without the reference's block
cap, fail the same check.
"""
import importlib.util
import math
import os
import random

import numpy as np
import pytest

from data_pipeline import masking

# (image size, patch size): the 14x14 (ViT-*/16) and 16x16 (ViT-*/14) grids.
SIZES = [(224, 16), (224, 14)]
B_SHARD = 8          # images per batch shard: 16 global crops, n = 8 of them masked
PROB = 0.5           # config.data.mask_probability
RATIO = (0.1, 0.5)   # config.data.mask_ratio
BATCHES = 400        # shard batches drawn per side and case
ALPHA = 1e-6


# --- the reference, transcribed ---------------------------------------------------------

class RefMaskingGenerator:
  """dinov2/data/masking.py: MaskingGenerator (train.py passes input_size and
  max_num_patches; the rest are its defaults)."""

  def __init__(self, input_size, num_masking_patches=None, min_num_patches=4,
               max_num_patches=None, min_aspect=0.3, max_aspect=None):
    self.height, self.width = input_size
    self.min_num_patches = min_num_patches
    self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
    max_aspect = max_aspect or 1 / min_aspect
    self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

  def _mask(self, mask, max_mask_patches):
    delta = 0
    for _ in range(10):
      target_area = random.uniform(self.min_num_patches, max_mask_patches)
      aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
      h = int(round(math.sqrt(target_area * aspect_ratio)))
      w = int(round(math.sqrt(target_area / aspect_ratio)))
      if w < self.width and h < self.height:
        top = random.randint(0, self.height - h)
        left = random.randint(0, self.width - w)
        num_masked = mask[top:top + h, left:left + w].sum()
        if 0 < h * w - num_masked <= max_mask_patches:
          for i in range(top, top + h):
            for j in range(left, left + w):
              if mask[i, j] == 0:
                mask[i, j] = 1
                delta += 1
        if delta > 0:
          break
    return delta

  def __call__(self, num_masking_patches=0):
    mask = np.zeros((self.height, self.width), dtype=bool)
    mask_count = 0
    while mask_count < num_masking_patches:
      max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
      delta = self._mask(mask, max_mask_patches)
      if delta == 0:
        break
      mask_count += delta
    return mask


def ref_collate_masks(b_gpu, mask_ratio_tuple, mask_probability, n_tokens, mask_generator):
  """dinov2/data/collate.py: collate_data_and_cast, its masks ((2 b_gpu, N),
  crop-major). torch.linspace's float32 strata are float64 here."""
  B = 2 * b_gpu
  n_samples_masked = int(B * mask_probability)
  probs = np.linspace(*mask_ratio_tuple, n_samples_masked + 1)
  masks_list = []
  for i in range(n_samples_masked):
    masks_list.append(mask_generator(int(n_tokens * random.uniform(probs[i], probs[i + 1]))))
  for _ in range(n_samples_masked, B):
    masks_list.append(mask_generator(0))
  random.shuffle(masks_list)
  return np.stack(masks_list).reshape(B, -1)


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _reference_from_repo(repo):
  torch = pytest.importorskip("torch")
  gen_cls = _load(os.path.join(repo, "dinov2/data/masking.py"), "ref_masking").MaskingGenerator
  collate = _load(os.path.join(repo, "dinov2/data/collate.py"), "ref_collate")

  def collate_masks(b_gpu, ratio, prob, n_tokens, gen):
    crop = torch.zeros(1)
    samples = [({"global_crops": [crop, crop], "local_crops": [crop]}, None)] * b_gpu
    out = collate.collate_data_and_cast(samples, ratio, prob, torch.float32,
                                        n_tokens=n_tokens, mask_generator=gen)
    return out["collated_masks"].numpy()
  return gen_cls, collate_masks


@pytest.fixture(params=["transcription", "DINOV2_REPO"])
def reference(request):
  """(MaskingGenerator class, collate's masks) of the reference; Python's
  random state is put back afterwards."""
  if request.param == "transcription":
    impl = RefMaskingGenerator, ref_collate_masks
  else:
    if not os.environ.get("DINOV2_REPO"):
      pytest.skip("DINOV2_REPO does not name a facebookresearch/dinov2 clone")
    impl = _reference_from_repo(os.environ["DINOV2_REPO"])
  state = random.getstate()
  yield impl
  random.setstate(state)


def reference_batches(reference, img, patch, ratio=RATIO, cap=None):
  """BATCHES shard batches of masks (BATCHES, 2 B, N) from the reference, with
  train.py's generator (cap: max_num_patches, default its value), and every
  block's patch count."""
  gen_cls, collate_masks = reference
  grid = img // patch
  gen = gen_cls(input_size=(grid, grid),
                max_num_patches=0.5 * img // patch * img // patch if cap is None else cap)
  blocks = []
  place = gen._mask
  gen._mask = lambda mask, most: blocks.append(place(mask, most)) or blocks[-1]
  random.seed(img * 1000 + patch)
  masks = np.stack([collate_masks(B_SHARD, ratio, PROB, grid * grid, gen)
                    for _ in range(BATCHES)])
  return masks, [d for d in blocks if d]


# --- ours ------------------------------------------------------------------------------

def our_batches(monkeypatch, img, patch, ratio=RATIO, cap=None, sampling="shard", seed=0):
  """The same from data_pipeline.masking as MultiCropExample draws them (one
  batch shard of B_SHARD images per step; each image its own generator), and
  every block's patch count. cap None: the reference's; "none": no cap."""
  grid = img // patch
  cap = masking.max_block_patches(img, patch) if cap is None else cap
  cap = None if cap == "none" else cap
  blocks = []
  place = masking._place_block
  monkeypatch.setattr(masking, "_place_block",
                      lambda *a: blocks.append(place(*a)) or blocks[-1])
  out = np.zeros((BATCHES, 2, B_SHARD, grid * grid), bool)
  for step in range(BATCHES):
    for j in range(B_SHARD):
      rng = np.random.default_rng([seed, step * B_SHARD + j])
      if sampling == "shard":
        strata = masking.shard_strata(seed, step, 1, 0, B_SHARD, j, PROB)
        out[step, :, j] = [masking.stratum_mask(grid, grid, rng, s, ratio, cap) for s in strata]
      else:
        out[step, :, j] = [masking.crop_mask(grid, grid, rng, PROB, ratio, cap)
                           for _ in range(2)]
  monkeypatch.undo()
  return out.reshape(BATCHES, 2 * B_SHARD, -1), [d for d in blocks if d]


def ks_differs(a, b, alpha=ALPHA) -> bool:
  """Two-sample Kolmogorov-Smirnov: do samples a and b differ at level alpha?"""
  a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
  x = np.concatenate([a, b])
  d = np.abs(np.searchsorted(a, x, "right") / a.size - np.searchsorted(b, x, "right") / b.size)
  return bool(d.max() > math.sqrt(-math.log(alpha / 2) / 2 * (a.size + b.size) / (a.size * b.size)))


def ranked_counts(masks):
  """(batches, n): each batch's masked-patch counts of its masked crops, sorted."""
  counts = masks.sum(-1)
  n = int(2 * B_SHARD * PROB)
  return np.sort(counts, axis=1)[:, -n:]


# --- the tests -------------------------------------------------------------------------

def test_reference_block_cap_is_half_the_grid():
  assert masking.max_block_patches(224, 16) == 98.0 == 196 / 2
  assert masking.max_block_patches(224, 14) == 128.0 == 256 / 2
  assert masking.max_block_patches(256, 14) == 164.0  # Python's precedence, not 0.5 * 324


@pytest.mark.parametrize("img,patch", SIZES)
def test_exactly_n_crops_of_each_shard_batch_are_masked(reference, monkeypatch, img, patch):
  n = int(2 * B_SHARD * PROB)
  ref, _ = reference_batches(reference, img, patch)
  ours, _ = our_batches(monkeypatch, img, patch)
  assert ((ref.sum(-1) > 0).sum(1) == n).all()
  assert ((ours.sum(-1) > 0).sum(1) == n).all()
  # Both crops of an image are masked together in some batches, as in the
  # reference's shuffle (not one masked crop per image).
  for m in (ours, ref):
    both = (m.reshape(BATCHES, 2, B_SHARD, -1).sum(-1) > 0).all(1)  # (batches, images)
    assert both.any(1).mean() > 0.9
  # The per-crop coin ("example" sampling) masks n of them only on average.
  example, _ = our_batches(monkeypatch, img, patch, sampling="example")
  per_batch = (example.sum(-1) > 0).sum(1)
  assert (per_batch != n).mean() > 0.5 and abs(per_batch.mean() - n) < 0.5


@pytest.mark.parametrize("img,patch", SIZES)
def test_masked_fractions_per_stratum_match_the_reference(reference, monkeypatch, img, patch):
  """The k-th smallest masked crop of a shard batch is (nearly always) the
  k-th stratum's: its patch count has the reference's distribution, for each
  k, and so has the count over all crops."""
  ref, _ = reference_batches(reference, img, patch)
  ours, _ = our_batches(monkeypatch, img, patch)
  n_patches = (img // patch) ** 2
  assert ours.sum(-1).max() <= int(RATIO[1] * n_patches)
  r, o = ranked_counts(ref), ranked_counts(ours)
  for k in range(r.shape[1]):
    assert not ks_differs(o[:, k], r[:, k]), f"stratum {k}"
  assert not ks_differs(ours.sum(-1).ravel(), ref.sum(-1).ravel())
  # Crops that each draw a ratio from the whole range spread differently over
  # the ranks (the lowest and the highest masked crop of a batch above all).
  example, _ = our_batches(monkeypatch, img, patch, sampling="example")
  e = np.sort(example.sum(-1), axis=1)
  assert ks_differs(e[:, -1], r[:, -1]) or ks_differs(e[:, -r.shape[1]], r[:, 0])


@pytest.mark.parametrize("img,patch", SIZES)
@pytest.mark.parametrize("ratio", [RATIO, (0.3, 0.9)])
def test_block_sizes_match_the_reference(reference, monkeypatch, img, patch, ratio):
  """Each block adds at most the cap (half the grid): at mask_ratio up to 0.5
  no target exceeds it; with (0.3, 0.9) it binds, and a generator without it
  makes blocks the reference never makes."""
  cap = masking.max_block_patches(img, patch)
  ref_masks, ref_blocks = reference_batches(reference, img, patch, ratio)
  masks, blocks = our_batches(monkeypatch, img, patch, ratio)
  assert max(ref_blocks) <= cap and max(blocks) <= cap
  assert not ks_differs(blocks, ref_blocks)
  assert not ks_differs(masks.sum(-1).ravel(), ref_masks.sum(-1).ravel())
  if ratio[1] > 0.5:
    _, uncapped = our_batches(monkeypatch, img, patch, ratio, cap="none")
    assert max(uncapped) > cap


def test_blocks_never_span_the_grid_and_small_budgets_match():
  """The reference's strict fit (h < grid height, w < grid width), and its
  block area uniform(min_block, budget) also when the budget is below
  min_block: a 1-patch budget is met as often as there."""
  rng = np.random.default_rng(0)
  log_aspect = (math.log(0.3), math.log(1 / 0.3))
  placed = 0
  for _ in range(300):
    m = np.zeros((6, 6), bool)
    placed += masking._place_block(m, 36, rng, 4, log_aspect) > 0
    assert not m.all(0).any() and not m.all(1).any()  # one block: never a full column or row
  assert placed > 250
  hits = sum(masking.block_mask(14, 14, 1, rng).sum() == 1 for _ in range(1000))
  random.seed(0)
  gen = RefMaskingGenerator((14, 14), max_num_patches=98.0)
  ref_hits = sum(gen(1).sum() == 1 for _ in range(1000))
  assert abs(hits - ref_hits) < 80, (hits, ref_hits)
