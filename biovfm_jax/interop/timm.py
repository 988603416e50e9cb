"""timm's VisionTransformer layout in and out: from_timm reads a timm state
dict (any FFN, registers, LayerScale), to_timm writes ours for
create_timm_model(config) to load."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from biovfm_jax.interop import core
from biovfm_jax.models.patches import sincos_2d
from biovfm_jax.models.vit import ViTConfig

_TIMM_HEADS = ("head.", "fc_norm.", "attn_pool.")


def from_timm(sd: Mapping[str, Any], *, size: str | None = None,
              num_heads: int | None = None,
              image_size: int | None = None) -> tuple[ViTConfig, core.Params]:
  """timm VisionTransformer state dict -> (ViTConfig, VisionTransformer params).

  Width, depth, patch, FFN (GELU MLP or SwiGLU, packed or split), LayerScale,
  registers and the class token are read from the shapes; heads come from
  `size` or `num_heads`. Positions import as a learned table; timm's
  register positions (when the table covers them) are folded into the
  register tokens, and a table without a cls row gets a zero one. With
  `image_size` other than the table's, the table is resized (bicubic).
  Classifier heads (head, fc_norm, attn_pool) are ignored.
  """
  src = core.Source(sd, "timm state dict")
  cfg, flat = core.read_encoder(src, size=size, num_heads=num_heads,
                            image_size=image_size, pos_layout="timm",
                            register_key="reg_token", mask_key=None)
  src.finish(ignore=_TIMM_HEADS)
  params = core.nest(flat)
  core.check_params(cfg, params)
  return cfg, params


def to_timm(config: ViTConfig, params: Mapping) -> dict[str, np.ndarray]:
  """Our VisionTransformer params (unscanned or scanned) -> a timm state dict
  for create_timm_model(config) (load_state_dict strict=True).

  Sin-cos models get their computed table (zero cls row). With registers,
  timm's layout (no_embed_class) has no cls row, so the cls position is
  added to the cls token; the mask token has no timm counterpart and is
  dropped.
  """
  if "encoder" in params:
    raise core.ConversionError("to_timm takes encoder params; pass params['encoder'] "
                          "for a MaskedAutoencoder")
  if config.pos_embed == "rope":
    raise core.ConversionError(
        "timm's VisionTransformer has no rotary positions (this encoder has "
        "pos_embed='rope'): export --format=hf writes it as transformers' DINOv3ViTModel")
  core.check_params(config, params)
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, dtype=np.float32))
  d, p, c = config.width, config.patch_size, config.in_channels
  g = config.grid_size
  ncls = int(config.class_token)
  if config.pos_embed == "sincos":
    table = np.concatenate([np.zeros((ncls, d), np.float32), sincos_2d(d, g, g)])
  else:
    table = f32(params["pos_embed"])
  sd: dict[str, np.ndarray] = {}
  if config.class_token:
    cls = f32(params["cls_token"])
    if config.num_registers:
      cls = cls + table[0]
    sd["cls_token"] = cls.reshape(1, 1, d)
  if config.num_registers:
    sd["reg_token"] = f32(params["register_tokens"])[None]
    table = table[ncls:]
  sd["pos_embed"] = table[None]
  k = f32(params["patch_embed"]["kernel"])
  sd["patch_embed.proj.weight"] = k.reshape(p, p, c, d).transpose(3, 2, 0, 1)
  sd["patch_embed.proj.bias"] = f32(params["patch_embed"]["bias"])
  for i, blk in enumerate(core.unscanned_blocks(config, params)):
    b = f"blocks.{i}."
    sd[b + "norm1.weight"] = f32(blk["norm1"]["scale"])
    sd[b + "norm1.bias"] = f32(blk["norm1"]["bias"])
    sd[b + "attn.qkv.weight"] = f32(blk["attn"]["qkv_kernel"]).reshape(d, 3 * d).T
    qkv_bias = f32(blk["attn"]["qkv_bias"])
    if not config.key_bias:  # masked in our forward (zero anyway: it gets no gradient)
      qkv_bias = np.concatenate([qkv_bias[:d], np.zeros(d, np.float32), qkv_bias[2 * d:]])
    sd[b + "attn.qkv.bias"] = qkv_bias
    sd[b + "attn.proj.weight"] = f32(blk["attn"]["proj_kernel"]).reshape(d, d).T
    sd[b + "attn.proj.bias"] = f32(blk["attn"]["proj_bias"])
    if config.layerscale_init is not None:
      sd[b + "ls1.gamma"] = f32(blk["ls1"]["gamma"])
      sd[b + "ls2.gamma"] = f32(blk["ls2"]["gamma"])
    sd[b + "norm2.weight"] = f32(blk["norm2"]["scale"])
    sd[b + "norm2.bias"] = f32(blk["norm2"]["bias"])
    mlp = blk["mlp"]
    if config.ffn == "swiglu":  # timm SwiGLUPacked: fc1 = [gate; value]
      sd[b + "mlp.fc1.weight"] = f32(mlp["w12_kernel"]).reshape(d, -1).T
      sd[b + "mlp.fc1.bias"] = f32(mlp["w12_bias"])
      sd[b + "mlp.fc2.weight"] = f32(mlp["w3"]["kernel"]).T
      sd[b + "mlp.fc2.bias"] = f32(mlp["w3"]["bias"])
    else:
      for fc in ("fc1", "fc2"):
        sd[f"{b}mlp.{fc}.weight"] = f32(mlp[fc]["kernel"]).T
        sd[f"{b}mlp.{fc}.bias"] = f32(mlp[fc]["bias"])
  sd["norm.weight"] = f32(params["norm"]["scale"])
  sd["norm.bias"] = f32(params["norm"]["bias"])
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


# (width, heads, patch) -> timm architecture with those defaults.
_TIMM_NAMES = {
    (192, 3, 16): "vit_tiny_patch16_224",
    (384, 6, 16): "vit_small_patch16_224",
    (768, 12, 16): "vit_base_patch16_224",
    (1024, 16, 16): "vit_large_patch16_224",
    (1280, 16, 14): "vit_huge_patch14_224",
    (384, 6, 8): "vit_small_patch8_224",
    (768, 12, 8): "vit_base_patch8_224",
    (384, 6, 32): "vit_small_patch32_224",
    (768, 12, 32): "vit_base_patch32_224",
    (1024, 16, 32): "vit_large_patch32_224",
}
_TIMM_DINOV2 = {
    (384, 6): "vit_small_patch14", (768, 12): "vit_base_patch14",
    (1024, 16): "vit_large_patch14", (1536, 24): "vit_giant_patch14",
}


def timm_model_name(config: ViTConfig) -> str:
  """The timm architecture of `config`'s width, heads and patch size (DINOv2
  names for patch 14 with LayerScale, registers or SwiGLU). Depth, image
  size and the rest come from timm_model_kwargs(config)."""
  key = (config.width, config.num_heads)
  dinov2_like = (config.layerscale_init is not None or config.num_registers
                 or config.ffn == "swiglu")
  # timm's giant defaults to SwiGLU: an MLP giant would not load from kwargs.
  giant_ok = key != (1536, 24) or config.ffn == "swiglu"
  if config.patch_size == 14 and key in _TIMM_DINOV2 and giant_ok and (
      dinov2_like or key + (14,) not in _TIMM_NAMES):
    reg = "_reg4" if config.num_registers == 4 else ""
    return f"{_TIMM_DINOV2[key]}{reg}_dinov2"
  name = _TIMM_NAMES.get(key + (config.patch_size,))
  if name is None:
    raise core.ConversionError(
        f"no timm vit_* architecture has width={config.width}, num_heads="
        f"{config.num_heads}, patch_size={config.patch_size}: "
        "biovfm_jax.interop.timm.create_timm_model(config) builds timm's VisionTransformer "
        "from biovfm_jax.interop.timm.timm_model_kwargs(config)")
  return name


def _mlp_ratio(hidden: int, width: int) -> float:
  """A ratio with int(width * ratio) == hidden (timm's rule)."""
  r = hidden / width
  return r if int(width * r) == hidden else (hidden + 0.5) / width


def timm_model_kwargs(config: ViTConfig) -> dict[str, Any]:
  """JSON-able timm VisionTransformer kwargs matching `config` exactly:
  timm.create_model(timm_model_name(config), **kwargs) builds the model for
  ffn='mlp'. For 'swiglu' they hold mlp_layer='SwiGLUPacked', a name in
  timm.layers that must be replaced by the class (create_timm_model does)."""
  swiglu = config.ffn == "swiglu"
  hidden = 2 * config.mlp_dim if swiglu else config.mlp_dim
  kwargs = dict(
      img_size=config.image_size, patch_size=config.patch_size,
      in_chans=config.in_channels, embed_dim=config.width, depth=config.depth,
      num_heads=config.num_heads, mlp_ratio=_mlp_ratio(hidden, config.width),
      qkv_bias=True, init_values=config.layerscale_init,
      class_token=config.class_token,
      global_pool="token" if config.class_token else "avg", fc_norm=False,
      reg_tokens=config.num_registers, no_embed_class=config.num_registers > 0,
      act_layer="silu" if swiglu else "gelu", num_classes=0)
  if swiglu:  # timm's default mlp_layer is Mlp
    kwargs["mlp_layer"] = "SwiGLUPacked"
  return kwargs


def create_timm_model(config: ViTConfig, **overrides):
  """A timm model (random weights) that to_timm(config, ...) loads into.
  Needs timm (imported here only)."""
  import timm
  import timm.layers
  from timm.models.vision_transformer import VisionTransformer as TimmViT
  kw = {**timm_model_kwargs(config), **overrides}
  kw["mlp_layer"] = getattr(timm.layers, kw.get("mlp_layer", "Mlp"))
  try:
    name = timm_model_name(config)
  except core.ConversionError:
    return TimmViT(**kw)
  return timm.create_model(name, pretrained=False, **kw)
