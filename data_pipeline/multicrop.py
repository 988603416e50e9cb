"""DINOv2 multi-crop views of one image, with the iBOT masks of its global crops.

The reference recipe (DINOv2's DataAugmentationDINO), per image:
  global crop 1: random resized crop 224, scale (0.32, 1), flip p=0.5,
                 colour jitter p=0.8, grey p=0.2, blur p=1.0
  global crop 2: the same, but blur p=0.1, then solarise p=0.2
  local crops:   random resized crop 96, scale (0.05, 0.32), flip, colour
                 jitter, grey, blur p=0.5
then ToTensor and normalise (here: on the device, in the train step). Crops are bicubic with aspect ratio (3/4, 4/3).

Medical images are often grey. A grey image means three equal channels, and
every op here treats the channels alike, so it stays grey through the whole
chain (saturation and hue jitter change nothing on it). That makes the three
channels redundant: a grey image (H, W), or RGB with equal channels, is
augmented as one channel and repeated to three at the end, which gives the
same bytes as augmenting the three-channel image (tested) at a third the cost.

Randomness: the caller passes the example's generator; each crop and the masks
draw from their own child of it (`Generator.spawn`), so changing the number of
local crops leaves the global crops and masks of an example unchanged. Which
global crops are masked, and how much, is either drawn per crop or given by
the caller per batch shard (`strata`; see data_pipeline/masking.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_pipeline import masking, transforms

CROP_RATIO = (3 / 4, 4 / 3)
BLUR_SIGMA = (0.1, 2.0)
# The reference probabilities, per global crop (1, 2) and for local crops.
GLOBAL_BLUR_P = (1.0, 0.1)
GLOBAL_SOLARIZE_P = (0.0, 0.2)
LOCAL_BLUR_P = 0.5
LOCAL_SOLARIZE_P = 0.0
HFLIP_P = 0.5
JITTER_P = 0.8
GREY_P = 0.2
SOLARIZE_THRESHOLD = 128


def augment(pixels: np.ndarray, rng: np.random.Generator, *, size: int,
            scale: Sequence[float], blur_p: float, solarize_p: float) -> np.ndarray:
  """One crop of uint8 `pixels`, (H, W, 3) or grey (H, W): geometry, then
  colour, blur, solarise. Returns uint8 (size, size, 3).
  """
  return distort(geometry(pixels, rng, size=size, scale=scale), rng, blur_p=blur_p,
                 solarize_p=solarize_p)


def geometry(pixels: np.ndarray, rng: np.random.Generator, *, size: int,
             scale: Sequence[float]) -> np.ndarray:
  """Random resized crop to `size`, then a random flip."""
  box = transforms.sample_crop_box(pixels.shape[0], pixels.shape[1], scale, CROP_RATIO, rng)
  return transforms.random_hflip(transforms.resized_crop(pixels, box, size), rng, HFLIP_P)


def distort(img: np.ndarray, rng: np.random.Generator, *, blur_p: float,
            solarize_p: float) -> np.ndarray:
  """Colour jitter, grey, blur and solarise; uint8 (S, S, 3) out."""
  img = transforms.color_jitter(img, rng, p=JITTER_P)
  img = transforms.random_grayscale(img, rng, p=GREY_P)
  img = transforms.random_gaussian_blur(img, rng, blur_p, BLUR_SIGMA)
  img = transforms.random_solarize(img, rng, solarize_p, SOLARIZE_THRESHOLD)
  return transforms.to_rgb(img)


def resize(img: np.ndarray, size: int) -> np.ndarray:
  """Bicubic resize of a square crop (no-op at its size)."""
  h, w = img.shape[:2]
  return img if (h, w) == (size, size) else transforms.resized_crop(img, (0, 0, h, w), size)


def as_grey_or_rgb(pixels: np.ndarray) -> np.ndarray:
  """(H, W) for grey images (also RGB with equal channels), else (H, W, 3)."""
  if pixels.ndim == 3 and pixels.shape[-1] == 1:
    pixels = pixels[..., 0]
  if pixels.ndim == 2:
    return pixels
  rgb = transforms.to_rgb(pixels)
  return np.ascontiguousarray(rgb[..., 0]) if transforms.is_grey(rgb) else rgb


class MultiCrop:
  """pixels (H, W) or (H, W, 3) uint8, generator -> {
       "global_crops": uint8 (2, G, G, 3),
       "local_crops": uint8 (n_local, l, l, 3),
       "masks": bool (2, (G // patch_size)**2)}  (True = masked patch),
     and with gram_crop_size R "gram_crops": uint8 (2, R, R, 3).

  Gram teacher crops (DINOv3): each global crop is first cut at max(G, R)
  and flipped; with gram_no_distortions its gram crop is that cut resized to
  R, and the global crop is resized to G before its colour distortions; else
  the distortions apply at max(G, R) and both crops are resized from the
  distorted image, so they share them. Resizes are bicubic on uint8 (the
  reference resizes the normalised tensor; the two differ by rounding and the
  clipping of bicubic overshoot). Without gram_crop_size the global crops
  draw the same numbers as before it existed.

  Picklable (grain ships it to worker processes).
  """

  def __init__(self, *, global_crop_size: int = 224,
               global_crop_scale: Sequence[float] = (0.32, 1.0),
               local_crop_size: int = 96,
               local_crop_scale: Sequence[float] = (0.05, 0.32),
               num_local_crops: int = 8, mask_probability: float = 0.5,
               mask_ratio: Sequence[float] = (0.1, 0.5), patch_size: int = 16,
               gram_crop_size: int | None = None, gram_no_distortions: bool = False):
    self.global_crop_size = int(global_crop_size)
    self.global_crop_scale = tuple(float(x) for x in global_crop_scale)
    self.local_crop_size = int(local_crop_size)
    self.local_crop_scale = tuple(float(x) for x in local_crop_scale)
    self.num_local_crops = int(num_local_crops)
    self.mask_probability = float(mask_probability)
    self.mask_ratio = tuple(float(x) for x in mask_ratio)
    self.patch_size = int(patch_size)
    self.gram_crop_size = None if gram_crop_size is None else int(gram_crop_size)
    self.gram_no_distortions = bool(gram_no_distortions)
    if self.gram_crop_size is not None and self.gram_crop_size < 1:
      raise ValueError(f"gram_crop_size {self.gram_crop_size} must be positive")
    if self.patch_size < 1 or self.global_crop_size % self.patch_size:
      raise ValueError(f"global_crop_size {self.global_crop_size} is not a multiple "
                       f"of patch_size {self.patch_size}")
    if self.num_local_crops < 0 or self.local_crop_size < 1:
      raise ValueError(f"bad local crops: {self.num_local_crops} of size "
                       f"{self.local_crop_size}")
    if not 0 <= self.mask_probability <= 1:
      raise ValueError(f"mask_probability {self.mask_probability} not in [0, 1]")
    if not 0 <= self.mask_ratio[0] <= self.mask_ratio[1] <= 1:
      raise ValueError(f"mask_ratio {self.mask_ratio} is not a range within [0, 1]")
    self.grid = self.global_crop_size // self.patch_size
    self.max_block = masking.max_block_patches(self.global_crop_size, self.patch_size)

  def __call__(self, pixels: np.ndarray, rng: np.random.Generator,
               strata: Sequence[masking.Stratum] | None = None) -> dict[str, np.ndarray]:
    """The views of `pixels`. `strata`: each global crop's mask stratum in
    its batch shard (masking.shard_strata); None: each crop draws its own
    coin and ratio (mask_sampling "example")."""
    img = as_grey_or_rgb(pixels)
    global_rngs = rng.spawn(2)
    mask_rng, = rng.spawn(1)
    local_rngs = rng.spawn(self.num_local_crops) if self.num_local_crops else []

    if self.gram_crop_size is None:
      globals_ = [
          augment(img, r, size=self.global_crop_size, scale=self.global_crop_scale,
                  blur_p=GLOBAL_BLUR_P[i], solarize_p=GLOBAL_SOLARIZE_P[i])
          for i, r in enumerate(global_rngs)]
      grams = []
    else:
      globals_, grams = zip(*(self._global_and_gram(img, r, i)
                              for i, r in enumerate(global_rngs)))
    locals_ = [
        augment(img, r, size=self.local_crop_size, scale=self.local_crop_scale,
                blur_p=LOCAL_BLUR_P, solarize_p=LOCAL_SOLARIZE_P)
        for r in local_rngs]
    if strata is None:
      masks = [masking.crop_mask(self.grid, self.grid, mask_rng, self.mask_probability,
                                 self.mask_ratio, self.max_block) for _ in range(2)]
    else:
      masks = [masking.stratum_mask(self.grid, self.grid, mask_rng, s, self.mask_ratio,
                                    self.max_block) for s in strata]

    size = self.local_crop_size
    local_u8 = np.stack(locals_) if locals_ else np.zeros((0, size, size, 3), np.uint8)
    out = {"global_crops": np.stack(globals_), "local_crops": local_u8,
           "masks": np.stack(masks)}
    if grams:
      out["gram_crops"] = np.stack(grams)
    return out

  def _global_and_gram(self, img, rng, i: int) -> tuple[np.ndarray, np.ndarray]:
    g, r = self.global_crop_size, self.gram_crop_size
    base = geometry(img, rng, size=max(g, r), scale=self.global_crop_scale)
    opts = dict(blur_p=GLOBAL_BLUR_P[i], solarize_p=GLOBAL_SOLARIZE_P[i])
    if self.gram_no_distortions:
      return distort(resize(base, g), rng, **opts), transforms.to_rgb(resize(base, r))
    distorted = distort(base, rng, **opts)
    return resize(distorted, g), resize(distorted, r)
