"""Pure array helpers shared by the models and the objectives: patches,
fixed sin-cos position tables and random masking."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def patchify(images: jax.Array, p: int) -> jax.Array:
  """(B, H, W, C) -> (B, N, p*p*C).

  Patches are numbered row-major over the grid and each patch is flattened
  in (row-in-patch, column-in-patch, channel) order: the reference MAE's
  'nchpwq->nhwpqc'. The patch-embedding kernel uses the same order.
  """
  b, h, w, c = images.shape
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
  gh, gw = h // p, w // p
  x = images.reshape(b, gh, p, gw, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * gw, p * p * c)


def unpatchify(patches: jax.Array, p: int, grid: tuple[int, int] | None = None,
               channels: int = 3) -> jax.Array:
  """(B, N, p*p*C) -> (B, H, W, C); the inverse of `patchify`.

  `grid` is (rows, cols) of patches; square when omitted.
  """
  b, n, d = patches.shape
  if d != p * p * channels:
    raise ValueError(f"patch dim {d} != {p}*{p}*{channels}")
  if grid is None:
    g = int(round(n ** 0.5))
    if g * g != n:
      raise ValueError(f"{n} patches do not form a square grid; pass grid=")
    grid = (g, g)
  gh, gw = grid
  x = patches.reshape(b, gh, gw, p, p, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, channels)


@functools.lru_cache(maxsize=32)
def sincos_2d(width: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed 2D sin-cos position table, (grid_h*grid_w, width) float32.

  Same values as the reference MAE table (without its cls row): the first
  half of the channels encodes the column, the second half the row; each
  half is [sin(pos*w_k), cos(pos*w_k)] with w_k = 10000^(-k/(width/4)).
  """
  if width % 4:
    raise ValueError(f"sin-cos position embedding needs width % 4 == 0, got {width}")
  quarter = width // 4
  omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                           np.arange(grid_w, dtype=np.float64), indexing="ij")
  cols = np.outer(cols.reshape(-1), omega)
  rows = np.outer(rows.reshape(-1), omega)
  table = np.concatenate([np.sin(cols), np.cos(cols), np.sin(rows), np.cos(rows)],
                         axis=1)
  table = table.astype(np.float32)
  table.setflags(write=False)  # cached: callers must not modify it
  return table


# DINOv2's interpolate_pos_encoding asks torch for a scale factor of
# (out + 0.1) / in (a kludge kept for its released weights), so its source
# coordinates are (i + 0.5) * in / (out + 0.1) - 0.5, not in / out.
DINOV2_POS_OFFSET = 0.1


@functools.lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int, offset: float = DINOV2_POS_OFFSET) -> np.ndarray:
  """(n_out, n_in) float32 matrix of torch's bicubic resize along one axis
  (align_corners=False, no antialias, cubic a=-0.75, edges clamped), with the
  scale in / (out + offset): offset 0 is F.interpolate(size=out). Resizing a
  (h, w, D) grid is M_h @ grid @ M_w^T, on the host or inside jit."""
  scale = n_in / (n_out + offset)
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
  base = np.floor(src)
  t = src - base
  a = -0.75

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
  m = np.zeros((n_out, n_in), np.float64)
  for k in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + k, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), idx), weights[:, k])
  m = m.astype(np.float32)
  m.setflags(write=False)  # cached: callers must not modify it
  return m


def resize_pos_grid(table, src: tuple[int, int], dst: tuple[int, int],
                    offset: float = DINOV2_POS_OFFSET):
  """A (src_h*src_w, D) position table resized to a (dst_h*dst_w, D) one, as
  DINOv2's interpolate_pos_encoding does it (bicubic_matrix); numpy in, numpy
  out, jax in (traced too), jax out."""
  if tuple(src) == tuple(dst):
    return table
  xp = jnp if isinstance(table, jax.Array) else np
  grid = table.reshape(src[0], src[1], -1).astype(xp.float32)
  mh, mw = bicubic_matrix(src[0], dst[0], offset), bicubic_matrix(src[1], dst[1], offset)
  out = xp.einsum("ih,hwd,jw->ijd", mh, grid, mw)
  return out.reshape(dst[0] * dst[1], -1)


@functools.lru_cache(maxsize=16)
def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in): bilinear resize along one axis (half-pixel centres, edges
  clamped, no antialias)."""
  src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), lo), 1 - (src - lo))
  np.add.at(m, (np.arange(n_out), hi), src - lo)
  return m


def resample_patch_kernel(kernel: np.ndarray, p_old: int, p_new: int,
                          channels: int) -> np.ndarray:
  """A (p_old*p_old*C, D) patch-embedding kernel for p_new x p_new patches,
  by FlexiViT's pseudo-inverse resize: the new kernel w' solves B^T w' = w in
  the least-squares sense, B the bilinear resize of a patch from p_old to p_new,
  so <resize(x), w'> = <x, w> for every patch x when upsampling."""
  if p_old == p_new:
    return kernel
  axis = _bilinear_matrix(p_old, p_new)
  b = np.kron(axis, axis)                     # (p_new^2, p_old^2), row-major pixels
  pinv_bt = np.linalg.pinv(b.T)               # (p_new^2, p_old^2)
  w = kernel.reshape(p_old * p_old, channels, -1).astype(np.float64)
  out = np.einsum("np,pcd->ncd", pinv_bt, w)
  return out.reshape(p_new * p_new * channels, -1).astype(np.float32)


def random_masking(noise: jax.Array, mask_ratio: float):
  """Per-sample random masking from a noise array (B, N), as the MAE reference.

  Patches are ranked by ascending noise and the first
  int(N * (1 - mask_ratio)) are kept.
  Returns (keep_idx (B, n_keep) int32, mask (B, N) float32 with 1 = masked,
  restore_idx (B, N) int32: position of each patch in the shuffled order, so
  gathering [kept tokens, mask tokens] with it restores patch order).
  """
  n = noise.shape[1]
  n_keep = int(n * (1 - mask_ratio))
  shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  restore = jnp.argsort(shuffle, axis=1).astype(jnp.int32)
  keep = shuffle[:, :n_keep]
  shuffled_mask = (jnp.arange(n) >= n_keep).astype(jnp.float32)
  mask = jnp.take_along_axis(
      jnp.broadcast_to(shuffled_mask, noise.shape), restore, axis=1)
  return keep, mask, restore
