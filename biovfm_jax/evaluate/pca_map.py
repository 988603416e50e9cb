"""PCA maps of patch features: the first 3 principal components of an
encoder's patch tokens shown as RGB, the picture DINOv2 papers use to show
that patch features pick out anatomy without labels.

    enc = biovfm_jax.load_encoder("/tmp/quickstart_dinov2")
    rgb = encoder_pca_map(enc, images)   # uint8 (N, H, W, 3), one colour per patch

The components are fitted jointly over all images given, so equal colours
mean similar features across images, not only within one.
"""
from __future__ import annotations

import numpy as np


def pca_rgb(patch_tokens, grid: tuple[int, int], upsample: int = 1) -> np.ndarray:
  """uint8 (N, gh * upsample, gw * upsample, 3): patch tokens (N, gh * gw, D)
  (row-major patch order) projected on their first 3 principal components,
  each component min-max scaled to [0, 255] over all N images. Fewer than 3
  components (D or N * L < 3) leave the missing channels 0."""
  feats = np.asarray(patch_tokens, np.float32)
  if feats.ndim != 3:
    raise ValueError(f"patch_tokens must be (N, L, D), got shape {feats.shape}")
  n, length, dim = feats.shape
  gh, gw = grid
  if gh * gw != length:
    raise ValueError(f"grid {grid} has {gh * gw} patches but the tokens have {length}")
  flat = feats.reshape(-1, dim)
  flat = flat - flat.mean(axis=0)
  _, _, vt = np.linalg.svd(flat, full_matrices=False)
  comps = flat @ vt[:3].T
  if comps.shape[1] < 3:
    comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
  lo, hi = comps.min(axis=0), comps.max(axis=0)
  comps = (comps - lo) / np.where(hi > lo, hi - lo, 1.0)
  rgb = comps.reshape(n, gh, gw, 3).repeat(upsample, axis=1).repeat(upsample, axis=2)
  return np.round(rgb * 255).astype(np.uint8)


def encoder_pca_map(encoder, images) -> np.ndarray:
  """uint8 (N, H, W, 3): the PCA map of `encoder`'s (an evaluate.encoder.Encoder)
  patch tokens for `images` (N, H, W, C), normalised as the encoder was
  trained, one colour per patch, at the images' size."""
  images = np.asarray(images, np.float32)
  p = encoder.config.patch_size
  if images.ndim != 4 or images.shape[1] % p or images.shape[2] % p:
    raise ValueError(f"images {images.shape} must be (N, H, W, C) with H and W "
                     f"multiples of the patch size {p}")
  tokens = encoder(images)["patch_tokens"]
  return pca_rgb(tokens, (images.shape[1] // p, images.shape[2] // p), upsample=p)
