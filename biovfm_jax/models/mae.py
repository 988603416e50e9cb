"""Masked autoencoder (He et al. 2021): ViT encoder on the visible patches,
a light transformer decoder that predicts the pixels of every patch."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from biovfm_jax.models import layers
from biovfm_jax.models.patches import random_masking, sincos_2d
from biovfm_jax.models.vit import ViTConfig, VisionTransformer
from biovfm_jax.sharding import constrain
from data_pipeline.errors import ConfigError

_ACT = ("batch", "length", "act_embed")


def decoder_config(encoder: ViTConfig, *, width: int, depth: int, heads: int,
                   mlp_dim: int | None = None) -> ViTConfig:
  """The decoder's blocks: the encoder's numerics (dtype, attention, remat,
  scan), a GELU MLP (4 x width unless given), no drop path or LayerScale."""
  return dataclasses.replace(
      encoder, width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim or 4 * width,
      ffn="mlp", layerscale_init=None, drop_path_rate=0.0, num_registers=0,
      pos_embed="sincos", key_bias=True, rope_shift=None, rope_jitter=None,
      rope_rescale=None)


class MaskedAutoencoder(nnx.Module):
  """Encoder: a VisionTransformer (sin-cos positions by default). Decoder:
  Linear width->decoder_width, mask token, fixed 2D sin-cos positions
  (zero for the prefix tokens, like MAE's cls slot), `decoder_depth` blocks,
  LayerNorm, Linear -> patch*patch*channels. The decoder reuses the encoder's
  numerics (dtype, attention, remat, scan) but no drop path or LayerScale.
  """

  def __init__(self, encoder: ViTConfig, *, decoder_width: int = 512,
               decoder_depth: int = 8, decoder_heads: int = 16,
               decoder_mlp_dim: int | None = None, rngs: nnx.Rngs):
    if decoder_width % decoder_heads:
      raise ConfigError(f"config.mae.decoder_width={decoder_width} is not "
                       f"divisible by config.mae.decoder_heads={decoder_heads}")
    if decoder_width % 4:
      raise ConfigError(f"config.mae.decoder_width={decoder_width} must be "
                       "divisible by 4 (sin-cos position embedding)")
    self.encoder = VisionTransformer(encoder, rngs=rngs)
    dec = decoder_config(encoder, width=decoder_width, depth=decoder_depth,
                         heads=decoder_heads, mlp_dim=decoder_mlp_dim)
    self.decoder_config = dec
    pdt, dt = jnp.dtype(dec.param_dtype), jnp.dtype(dec.dtype)
    self.dtype = dt
    patch_dim = encoder.patch_size ** 2 * encoder.in_channels
    self.decoder_embed = layers.Linear(encoder.width, decoder_width, (None, "embed"),
                                       param_dtype=pdt, dtype=dt, rngs=rngs)
    self.mask_token = layers.param(rngs, layers.normal02, (decoder_width,),
                                   ("embed",), pdt)
    self.decoder_blocks = layers.BlockStack(dec, rngs=rngs)
    self.decoder_norm = layers.LayerNorm(decoder_width, param_dtype=pdt, dtype=dt,
                                         rngs=rngs, eps=dec.layernorm_eps)
    self.decoder_pred = layers.Linear(decoder_width, patch_dim, ("embed", "patch"),
                                      param_dtype=pdt, dtype=dt, rngs=rngs)

  def encode_masked(self, images, noise, *, mask_ratio: float = 0.75, rng=None,
                    deterministic: bool = True):
    """Encodes the patches kept by `random_masking(noise, mask_ratio)`.

    Returns (latent (B, prefix + n_keep, D), mask (B, N), restore_idx (B, N)).
    """
    x = self.encoder.embed_patches(images)
    keep, mask, restore = random_masking(noise, mask_ratio)
    x = jnp.take_along_axis(x, keep[..., None], axis=1)
    p = self.encoder.config.patch_size
    grid = (images.shape[1] // p, images.shape[2] // p)
    # With RoPE the kept tokens rotate by their own grid positions.
    latent = self.encoder.encode_tokens(x, rng=rng, deterministic=deterministic,
                                        grid=grid, keep=keep)
    return latent, mask, restore

  def decode(self, latent, restore_idx, grid: tuple[int, int]):
    """(B, prefix + n_keep, D) latent -> (B, N, p*p*C) float32 predictions."""
    nprefix = self.encoder.num_prefix_tokens
    x = self.decoder_embed(latent)
    prefix, visible = x[:, :nprefix], x[:, nprefix:]
    b, n = restore_idx.shape
    mask_tokens = jnp.broadcast_to(self.mask_token[...].astype(x.dtype),
                                   (b, n - visible.shape[1], x.shape[-1]))
    x = jnp.concatenate([visible, mask_tokens], axis=1)
    x = jnp.take_along_axis(x, restore_idx[..., None], axis=1)  # unshuffle
    x = x + jnp.asarray(sincos_2d(self.decoder_config.width, *grid)).astype(x.dtype)
    x = constrain(jnp.concatenate([prefix, x], axis=1), _ACT)
    x = self.decoder_blocks(x)
    x = self.decoder_norm(x)
    return self.decoder_pred(x[:, nprefix:]).astype(jnp.float32)

  def __call__(self, images, noise, *, mask_ratio: float = 0.75, rng=None,
               deterministic: bool = True):
    """images (B, H, W, C), noise (B, N) -> (pred (B, N, p*p*C) float32,
    mask (B, N) float32, 1 = masked). mask_ratio must be a Python float."""
    p = self.encoder.config.patch_size
    grid = (images.shape[1] // p, images.shape[2] // p)
    if noise.shape != (images.shape[0], grid[0] * grid[1]):
      raise ValueError(f"noise shape {noise.shape} != (batch, patches) "
                       f"{(images.shape[0], grid[0] * grid[1])}")
    latent, mask, restore = self.encode_masked(
        images, noise, mask_ratio=mask_ratio, rng=rng, deterministic=deterministic)
    return self.decode(latent, restore, grid), mask
