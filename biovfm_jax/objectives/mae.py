"""MAE objective: masked-patch pixel regression (He et al. 2021).

The loss maths are pure functions of arrays (patchify, random_masking,
mae_loss); `MAEObjective` binds them to a config and a model for the trainer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from biovfm_jax import sharding as shd
from biovfm_jax.models.layers import no_decay  # noqa: F401  (re-exported)
from biovfm_jax.models.mae import MaskedAutoencoder, decoder_config
from biovfm_jax.models.patches import patchify, random_masking, unpatchify
from biovfm_jax.models.vit import ViTConfig, vit_config_from
from data_pipeline.errors import ConfigError

__all__ = ["patchify", "unpatchify", "random_masking", "patch_stats", "mae_loss",
           "MAEObjective", "mae_flops", "no_decay"]



def patch_stats(target: jax.Array, eps: float = 1e-6):
  """Per-patch mean and std (sqrt(var + eps)) over the last axis.

  The variance is the *unbiased* one (divide by n - 1): the reference MAE
  calls torch's `target.var(dim=-1, keepdim=True)`, whose default is
  unbiased=True. We replicate that exactly.
  """
  mean = target.mean(axis=-1, keepdims=True)
  var = target.var(axis=-1, keepdims=True, ddof=1)
  return mean, (var + eps) ** 0.5


def mae_loss(images: jax.Array, pred: jax.Array, mask: jax.Array, patch_size: int,
             norm_pix_loss: bool = True, eps: float = 1e-6) -> jax.Array:
  """Mean over masked patches of the per-patch mean squared error.

  images (B, H, W, C) (as fed to the model, i.e. normalised), pred
  (B, N, p*p*C), mask (B, N) with 1 = masked. With norm_pix_loss the target
  patches are standardised by their own mean and unbiased std. float32.
  """
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    mean, std = patch_stats(target, eps)
    target = (target - mean) / std
  per_patch = jnp.square(pred.astype(jnp.float32) - target).mean(axis=-1)
  mask = mask.astype(jnp.float32)
  return (per_patch * mask).sum() / mask.sum()


def _block_flops(tokens: int, width: int, mlp_dim: int, ffn: str) -> float:
  t, d, m = tokens, width, mlp_dim
  attn = 2 * t * d * 3 * d + 2 * t * t * d + 2 * t * t * d + 2 * t * d * d
  ffn_flops = 6 * t * d * m if ffn == "swiglu" else 4 * t * d * m
  return float(attn + ffn_flops)


def mae_flops(enc: ViTConfig, dec: ViTConfig, mask_ratio: float) -> float:
  """Training FLOPs per image; see MAEObjective.flops_per_example."""
  n = enc.num_patches
  patch_dim = enc.patch_size ** 2 * enc.in_channels
  prefix = enc.num_prefix_tokens
  t_enc = prefix + int(n * (1 - mask_ratio))
  t_dec = prefix + n
  fwd = 2 * n * patch_dim * enc.width
  fwd += enc.depth * _block_flops(t_enc, enc.width, enc.mlp_dim, enc.ffn)
  fwd += 2 * t_enc * enc.width * dec.width
  fwd += dec.depth * _block_flops(t_dec, dec.width, dec.mlp_dim, dec.ffn)
  fwd += 2 * n * dec.width * patch_dim
  return 3.0 * fwd


def _to_uint8(images: np.ndarray, mean, std) -> np.ndarray:
  pixels = images * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(np.round(pixels * 255), 0, 255).astype(np.uint8)


class MAEObjective:
  """MAE for the generic trainer.

  config.model: size + ViTConfig overrides (see models.vit.vit_config_from).
  config.mae: mask_ratio (0.75), decoder_width (512), decoder_depth (8),
  decoder_heads (16), decoder_mlp_dim (4*decoder_width), norm_pix_loss (True).
  config.data.mean / config.data.std: the normalisation of batch["image"]
  (ImageNet's when absent); only `visualize` uses them.
  """

  # The encoder (not the decoder) is what gets evaluated and exported.
  backbone_path = ("params", "encoder")

  def __init__(self, config, **unused):
    del unused  # total_steps, steps_per_epoch: MAE has no schedule of its own
    self.config = config
    self.vit = vit_config_from(config.model)
    mae = config.mae
    self.mask_ratio = float(mae.mask_ratio)
    self.decoder_width = int(mae.decoder_width)
    self.decoder_depth = int(mae.decoder_depth)
    self.decoder_heads = int(mae.decoder_heads)
    self.decoder_mlp_dim = int(mae.decoder_mlp_dim or 4 * self.decoder_width)
    self.norm_pix_loss = bool(mae.norm_pix_loss)
    if not 0.0 < self.mask_ratio < 1.0:  # the loss averages over masked patches
      raise ConfigError(f"config.mae.mask_ratio={self.mask_ratio} must be in (0, 1)")
    if int(self.vit.num_patches * (1 - self.mask_ratio)) < 1:
      raise ConfigError(f"config.mae.mask_ratio={self.mask_ratio} leaves no "
                       f"visible patch of {self.vit.num_patches}")
    self.decoder = decoder_config(self.vit, width=self.decoder_width, depth=self.decoder_depth,
                                  heads=self.decoder_heads, mlp_dim=self.decoder_mlp_dim)
    self.mean, self.std = tuple(config.data.mean), tuple(config.data.std)

  @property
  def encoder_config(self) -> ViTConfig:
    """The backbone's config, as checkpoints record it."""
    return self.vit

  def activation_plan(self, images: float) -> dict:
    """What backward keeps for `images` images (see objectives.get_objective):
    the encoder over the visible tokens, the decoder over all of them."""
    n, prefix = self.vit.num_patches, self.vit.num_prefix_tokens
    return {"encoder": (self.vit, prefix + int(n * (1 - self.mask_ratio)), images),
            "decoder": (self.decoder, prefix + n, images)}

  def init_model(self, rngs: nnx.Rngs) -> MaskedAutoencoder:
    return MaskedAutoencoder(
        self.vit, decoder_width=self.decoder_width, decoder_depth=self.decoder_depth,
        decoder_heads=self.decoder_heads, decoder_mlp_dim=self.decoder_mlp_dim,
        rngs=rngs)

  def init_extra(self, params) -> dict:
    """MAE keeps no state besides its parameters."""
    del params
    return {}

  def after_update(self, params, extra, step):
    del params, step
    return extra

  def _noise(self, rng, images):
    p = self.vit.patch_size
    n = (images.shape[1] // p) * (images.shape[2] // p)
    return jax.random.uniform(rng, (images.shape[0], n), jnp.float32)

  def loss(self, model: MaskedAutoencoder, batch, rng: jax.Array, step=None,
           extra=None):
    """(loss, aux, extra). Masking noise is uniform from fold_in(rng, 0); drop
    path (if configured) uses fold_in(rng, 1). `step` is unused; `extra` is
    returned unchanged ({} when None)."""
    images = batch["image"]
    noise = self._noise(jax.random.fold_in(rng, 0), images)
    pred, mask = model(images, noise, mask_ratio=self.mask_ratio,
                       rng=jax.random.fold_in(rng, 1), deterministic=False)
    loss = mae_loss(images, pred, mask, self.vit.patch_size, self.norm_pix_loss)
    aux = {"mae_loss": loss, "mask_ratio": mask.mean()}
    return loss, aux, ({} if extra is None else extra)

  def flops_per_example(self) -> float:
    """Analytic training FLOPs per image = 3 x forward matmul FLOPs
    (backward ~ 2 x forward), with 2*m*n*k per (m,k)x(k,n) matmul:

      N patches, P = p*p*C, T_e = prefix + int(N*(1-mask_ratio)),
      T_d = prefix + N, block(T, D, M) = 2*T*D*3D (qkv) + 2*T*T*D (QK^T)
        + 2*T*T*D (AV) + 2*T*D*D (proj) + 4*T*D*M (MLP; 6*T*D*M for SwiGLU)
      forward = 2*N*P*D (patch embed, all patches as in MAE)
        + depth*block(T_e, D, M) + 2*T_e*D*D_dec (decoder embed)
        + dec_depth*block(T_d, D_dec, M_dec) + 2*N*D_dec*P (prediction)

    Norms, softmax, GELU and additions are ignored.
    """
    return mae_flops(self.vit, self.decoder, self.mask_ratio)

  def visualize(self, model: MaskedAutoencoder, batch, rng: jax.Array, extra=None,
                n: int = 4) -> np.ndarray:
    """uint8 (n, H, 3*W, 3): [input | masked input | reconstruction with the
    visible patches pasted in], as the MAE demo shows them. `extra` is unused.

    With norm_pix_loss the prediction is in per-patch standardised units;
    it is mapped back with the target patch's own mean/std (the demo's
    approach) before undoing the dataset normalisation.
    """
    del extra
    images = jnp.asarray(batch["image"][:n], jnp.float32)
    p = self.vit.patch_size
    grid = (images.shape[1] // p, images.shape[2] // p)
    noise = self._noise(rng, images)
    pred, mask = model(images, noise, mask_ratio=self.mask_ratio,
                       deterministic=True)
    target = patchify(images, p)
    if self.norm_pix_loss:
      mean, std = patch_stats(target)
      pred = pred * std + mean
    c = images.shape[-1]
    m = mask[..., None]
    masked = unpatchify(target * (1 - m), p, grid, c)
    pasted = unpatchify(target * (1 - m) + pred * m, p, grid, c)
    rows = jnp.concatenate([images, masked, pasted], axis=2)
    return _to_uint8(shd.to_host(rows), self.mean, self.std)
