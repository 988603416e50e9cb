"""facebookresearch/mae pretraining checkpoints (encoder + decoder) in."""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from biovfm_jax.interop import core
from biovfm_jax.models.patches import sincos_2d
from biovfm_jax.models.vit import ViTConfig

# MAE's decoder uses 16 heads at every published size.
MAE_DECODER_HEADS = 16

def is_mae_sincos(table: np.ndarray, grid: int, atol: float = 1e-5) -> bool:
  """True when a (1 + grid**2, D) table is MAE's: zero cls row + sin-cos."""
  d = table.shape[1]
  if d % 4 or table.shape[0] != 1 + grid * grid:
    return False
  return (np.allclose(table[0], 0, atol=atol)
          and np.allclose(table[1:], sincos_2d(d, grid, grid), atol=atol))


def from_mae(sd: Mapping[str, Any], *, size: str | None = None,
             num_heads: int | None = None,
             decoder_heads: int = MAE_DECODER_HEADS
             ) -> tuple[ViTConfig, core.Params, dict[str, int]]:
  """facebookresearch/mae pretraining state dict (the checkpoint's 'model')
  -> (encoder ViTConfig, MaskedAutoencoder params, decoder kwargs).

  The encoder's fixed position table is checked against our sin-cos table;
  when it matches, pos_embed='sincos' (no parameter), else it imports as a
  learned table with a warning. The decoder's table must be sin-cos (ours
  is fixed). `decoder_heads` cannot be read from shapes (MAE: 16).
  """
  src = core.Source(sd, "MAE state dict")
  if not src.has("decoder_embed.weight"):
    raise core.ConversionError(
        "MAE state dict: no decoder (decoder_embed.weight is missing); an "
        "encoder-only MAE checkpoint imports with format 'timm'")
  cfg, flat = core.read_encoder(src, size=size, num_heads=num_heads, image_size=None,
                            pos_layout="cls_slot", register_key="reg_token",
                            mask_key=None)
  if not cfg.class_token or cfg.num_registers:
    raise core.ConversionError("MAE state dict: expected a cls_token and no registers")
  grid = cfg.grid_size
  if is_mae_sincos(flat["pos_embed"], grid):
    cfg = dataclasses.replace(cfg, pos_embed="sincos")
    del flat["pos_embed"]
  else:
    warnings.warn("MAE state dict: pos_embed is not the fixed sin-cos table; "
                  "importing it as a learned position embedding", stacklevel=2)

  dw = src.shape("decoder_embed.weight")[0]
  if dw % decoder_heads:
    raise core.ConversionError(f"MAE state dict: decoder width {dw} is not divisible "
                          f"by decoder_heads={decoder_heads}")
  ddepth = src.indices("decoder_blocks.")
  dffn, dstyle, dhidden = core.ffn_style(src, "decoder_blocks.0.", dw)
  if dffn != "mlp":
    raise core.ConversionError("MAE state dict: decoder_blocks use a SwiGLU FFN; our "
                          "decoder has a GELU MLP")
  dec_cfg = dataclasses.replace(cfg, width=dw, depth=ddepth, num_heads=decoder_heads,
                                mlp_dim=dhidden, ffn="mlp", layerscale_init=None,
                                pos_embed="sincos", num_registers=0)
  dec: dict[str, np.ndarray] = {}
  dec["decoder_embed/kernel"], dec["decoder_embed/bias"] = src.linear(
      "decoder_embed", cfg.width, dw)
  dec["mask_token"] = src.get("mask_token", (1, 1, dw)).reshape(dw)
  dpos = src.get("decoder_pos_embed", (1, 1 + grid * grid, dw))[0]
  if not is_mae_sincos(dpos, grid):
    raise core.ConversionError("MAE state dict: decoder_pos_embed is not the fixed "
                          "sin-cos table (with a zero cls row) our decoder uses")
  for i in range(ddepth):
    core.read_block(src, f"decoder_blocks.{i}.", f"decoder_blocks/layers/{i}/", dec,
                dec_cfg, dstyle)
  core.read_ln(src, "decoder_norm", "decoder_norm", dec, dw)
  patch_dim = cfg.patch_size ** 2 * cfg.in_channels
  dec["decoder_pred/kernel"], dec["decoder_pred/bias"] = src.linear(
      "decoder_pred", dw, patch_dim)
  src.finish()

  decoder = dict(decoder_width=dw, decoder_depth=ddepth,
                 decoder_heads=int(decoder_heads), decoder_mlp_dim=dhidden)
  params = {"encoder": core.nest(flat), **core.nest(dec)}
  core.check_params(cfg, params, decoder)
  return cfg, params, decoder

