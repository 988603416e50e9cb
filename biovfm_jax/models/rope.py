"""Axial 2D rotary position embedding (RoPE) of DINOv3.

Each patch has a centre (y, x) in [-1, 1]; a head of size hd gets hd/4
frequencies per axis, inv_freq = base ** -(4 j / hd). The angles of a patch,
2*pi*coord*inv_freq, are laid out [y freqs, x freqs] (hd/2) and tiled twice
(hd), and q, k are rotated "half" style (non-interleaved):
    x * cos + rotate_half(x) * sin,   rotate_half([a, b]) = [-b, a].
Only patch tokens rotate; the prefix tokens (cls, registers) do not.

During training the coordinates may be augmented, one draw per forward shared
by the batch: a shift U(-shift, shift) added per axis, a jitter log-U(1/j, j)
multiplied per axis, a rescale log-U(1/r, r) multiplied on both axes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NORMALIZE = ("separate", "max", "min")
# fold_in(forward rng, this) drives the coordinate augmentation, away from the
# drop-path keys fold_in(rng, layer index).
RNG_STREAM = 0x726F7065


def patch_coords(grid: tuple[int, int], normalize: str = "separate") -> np.ndarray:
  """(gh*gw, 2) patch-centre (y, x) coordinates, row-major, in [-1, 1]
  ('separate': each axis by its own length; 'max'/'min': both by the longer
  or shorter side, so the shorter or longer axis spans less or more)."""
  gh, gw = grid
  if normalize == "separate":
    dh, dw = gh, gw
  elif normalize == "max":
    dh = dw = max(gh, gw)
  elif normalize == "min":
    dh = dw = min(gh, gw)
  else:
    raise ValueError(f"rope normalize {normalize!r} not in {NORMALIZE}")
  ys = np.arange(0.5, gh, dtype=np.float32) / np.float32(dh)
  xs = np.arange(0.5, gw, dtype=np.float32) / np.float32(dw)
  yy, xx = np.meshgrid(ys, xs, indexing="ij")
  coords = np.stack([yy, xx], -1).reshape(-1, 2)
  return (2.0 * coords - 1.0).astype(np.float32)


def augment_coords(coords: jax.Array, key: jax.Array, *, shift: float | None = None,
                   jitter: float | None = None, rescale: float | None = None
                   ) -> jax.Array:
  """DINOv3's training-time coordinate augmentation (one draw for the call)."""
  k_shift, k_jitter, k_rescale = jax.random.split(key, 3)
  coords = jnp.asarray(coords, jnp.float32)
  if shift is not None:
    coords = coords + jax.random.uniform(k_shift, (1, 2), jnp.float32, -shift, shift)
  if jitter is not None:
    r = float(np.log(jitter))
    coords = coords * jnp.exp(jax.random.uniform(k_jitter, (1, 2), jnp.float32, -r, r))
  if rescale is not None:
    r = float(np.log(rescale))
    coords = coords * jnp.exp(jax.random.uniform(k_rescale, (1,), jnp.float32, -r, r))
  return coords


def inv_freq(head_dim: int, base: float) -> np.ndarray:
  """(head_dim/4,) inverse frequencies, as float32 like transformers'."""
  exps = np.arange(0, 1, 4 / head_dim, dtype=np.float32)
  return (1.0 / np.power(np.float32(base), exps)).astype(np.float32)


def cos_sin(coords: jax.Array, head_dim: int, base: float
            ) -> tuple[jax.Array, jax.Array]:
  """(..., 2) coordinates -> (cos, sin), each (..., head_dim), float32."""
  coords = jnp.asarray(coords, jnp.float32)
  angles = 2 * np.pi * coords[..., None] * inv_freq(head_dim, base)  # (..., 2, hd/4)
  angles = angles.reshape(*angles.shape[:-2], -1)                     # (..., hd/2)
  angles = jnp.concatenate([angles, angles], -1)                      # (..., hd)
  return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: jax.Array) -> jax.Array:
  a, b = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-b, a], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates the last n tokens of x (B, T, H, hd) by (cos, sin) of shape
  (n, hd) (shared by the batch) or (B, n, hd) (per example: a token subset);
  the first T - n tokens (the prefix) pass unchanged. Computed in float32."""
  n = cos.shape[-2]
  prefix, patches = x[:, :x.shape[1] - n], x[:, x.shape[1] - n:]
  c = cos[..., :, None, :]
  s = sin[..., :, None, :]
  p = patches.astype(jnp.float32)
  rotated = (p * c + rotate_half(p) * s).astype(x.dtype)
  return jnp.concatenate([prefix, rotated], axis=1)
