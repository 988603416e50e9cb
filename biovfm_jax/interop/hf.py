"""Imports a transformers model folder (config.json + weights) as ours.

Supported model_types: dinov2, dinov2_with_registers, vit, vit_mae (with the
MAE decoder when the folder holds ViTMAEForPreTraining), dinov3_vit (RoPE;
see _from_dinov3). The architecture
comes from config.json; the weights are renamed into the timm/MAE key layout
(q/k/v fused into qkv) and read by the checked readers of core.py (through mae.py and dinov2.py), so every
shape check and leftover-key error is theirs. Needs no transformers (a .bin
file needs torch, through torch_files' safe loader).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from biovfm_jax.interop import core, dinov2, mae, torch_files
from biovfm_jax.interop.core import ConversionError
from biovfm_jax.models.vit import ViTConfig

SUPPORTED = ("dinov2", "dinov2_with_registers", "vit", "vit_mae", "dinov3_vit")
# Tried in order; an index file lists the shards of a large model.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json")
# Where the base model sits in a task model (ViTForImageClassification ...).
_BASE_PREFIXES = ("", "vit.", "dinov2.", "dinov2_with_registers.")
_PATCH = "embeddings.patch_embeddings.projection.weight"
# Heads beside the base model: skipped and logged, as timm's heads are.
_HEADS = ("pooler.", "classifier.")

# Block sub-modules, both the file names (save_pretrained writes these) and
# transformers 5's in-memory names -> timm's.
_BLOCK = {
    "norm1": "norm1", "layernorm_before": "norm1",
    "norm2": "norm2", "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "layer_scale1": "ls1", "layer_scale2": "ls2",
    "mlp.fc1": "mlp.fc1", "intermediate.dense": "mlp.fc1",
    "mlp.fc2": "mlp.fc2", "output.dense": "mlp.fc2",
    "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3", "mlp.down_proj": "mlp.w3",
}
# Separate linears that ours fuse: (fused name, position in the concatenation).
_FUSED = {
    "attention.attention.query": ("attn.qkv", 0), "attention.q_proj": ("attn.qkv", 0),
    "attention.attention.key": ("attn.qkv", 1), "attention.k_proj": ("attn.qkv", 1),
    "attention.attention.value": ("attn.qkv", 2), "attention.v_proj": ("attn.qkv", 2),
    # SwiGLU: gate (silu) first, as the file's weights_in and our w12 hold it.
    "mlp.gate_proj": ("mlp.w12", 0), "mlp.up_proj": ("mlp.w12", 1),
}
_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}
_DECODER_TOP = {
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.mask_token": "mask_token", "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
}


def read_config(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{folder}: no config.json (expected a transformers "
                            "model folder, as save_pretrained writes)")
  with open(path) as f:
    cfg = json.load(f)
  kind = cfg.get("model_type")
  if kind not in SUPPORTED:
    raise ConversionError(f"{path}: model_type {kind!r} is not supported; "
                          f"supported: {', '.join(SUPPORTED)}")
  return cfg


def read_weights(folder: str) -> dict[str, np.ndarray]:
  """The folder's weights, through the safe loader (no pickle execution)."""
  for name in _WEIGHT_FILES:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      continue
    if not name.endswith(".index.json"):
      return torch_files.load_state_dict(path)
    with open(path) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    sd = {}
    for shard in shards:
      sd.update(torch_files.load_state_dict(os.path.join(folder, shard)))
    return sd
  raise FileNotFoundError(f"{folder}: none of {', '.join(_WEIGHT_FILES)}")


def _rename_blocks(sd: Mapping[str, Any], src_prefix: str, out_prefix: str,
                   out: dict, used: set, qkv_bias: bool, width: int) -> None:
  """HF layers `<src_prefix><i>.*` -> timm blocks `<out_prefix><i>.*`."""
  pat = re.compile(re.escape(src_prefix) + r"(\d+)\.(.+)\.(weight|bias|lambda1)")
  parts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
  for key, value in sd.items():
    m = pat.fullmatch(key)
    if not m:
      continue
    i, module, leaf = m.groups()
    block = f"{out_prefix}{i}."
    if module in _BLOCK:
      out[f"{block}{_BLOCK[module]}.{'gamma' if leaf == 'lambda1' else leaf}"] = value
    elif module in _FUSED:
      name, pos = _FUSED[module]
      parts.setdefault((f"{block}{name}", leaf), {})[pos] = value
    else:
      continue  # left for core.Source.finish to report
    used.add(key)
  for (name, leaf), got in parts.items():
    n = 3 if name.endswith("qkv") else 2
    if sorted(got) != list(range(n)):
      raise ConversionError(f"transformers weights: {name} needs {n} parts, "
                            f"found {sorted(got)} ({leaf})")
    out[f"{name}.{leaf}"] = np.concatenate([np.asarray(got[j]) for j in range(n)])
  # qkv_bias=False: ours always has a qkv bias, which zero makes equivalent.
  for key in list(out):
    if key.endswith("attn.qkv.weight") and key[:-6] + "bias" not in out:
      if qkv_bias:
        raise ConversionError(f"transformers weights: no bias for {key} although "
                              "config.json has qkv_bias=true")
      out[key[:-6] + "bias"] = np.zeros(3 * width, np.float32)


def to_timm_layout(cfg: Mapping[str, Any], sd: Mapping[str, Any]
                   ) -> tuple[dict[str, Any], list[str]]:
  """HF state dict -> (timm/MAE-layout state dict, skipped head keys).

  Keys nobody maps are passed through unchanged, so the reader's leftover
  check names them."""
  prefix = next((p for p in _BASE_PREFIXES if p + _PATCH in sd), None)
  if prefix is None:
    raise ConversionError(f"transformers weights: no {_PATCH} under any of "
                          f"{[p + '*' for p in _BASE_PREFIXES]}")
  width, used, out = int(cfg["hidden_size"]), set(), {}
  qkv_bias = bool(cfg.get("qkv_bias", True))
  for hf, ours in _TOP.items():
    if prefix + hf in sd:
      out[ours] = sd[prefix + hf]
      used.add(prefix + hf)
  if "mask_token" in out:  # ViT's is (1, 1, D), Dinov2's (1, D): the reader's
    out["mask_token"] = np.reshape(out["mask_token"], (1, -1))
  _rename_blocks(sd, prefix + "encoder.layer.", "blocks.", out, used, qkv_bias, width)
  if cfg["model_type"] == "vit_mae" and any(k.startswith("decoder.") for k in sd):
    for hf, ours in _DECODER_TOP.items():
      if hf in sd:
        out[ours] = sd[hf]
        used.add(hf)
    _rename_blocks(sd, "decoder.decoder_encoder.layer.", "decoder_blocks.", out, used,
                   qkv_bias, int(cfg["decoder_hidden_size"]))
  skipped = []
  for key, value in sd.items():
    if key in used:
      continue
    if key.startswith(prefix) and key[len(prefix):].startswith(_HEADS) or (
        prefix and key.startswith(_HEADS)):
      skipped.append(key)
    else:
      out[key] = value
  return out, skipped


def _check_supported(cfg: Mapping[str, Any]) -> None:
  """Refuses config.json choices our ViT cannot run exactly."""
  act = cfg.get("hidden_act", "gelu")
  if act != "gelu" and not cfg.get("use_swiglu_ffn", False):
    raise ConversionError(f"config.json hidden_act={act!r}: only 'gelu' (exact) is "
                          "supported")
  for key in ("image_size", "patch_size"):
    if isinstance(cfg.get(key), (list, tuple)) and len(set(cfg[key])) > 1:
      raise ConversionError(f"config.json {key}={cfg[key]}: only square sizes are "
                            "supported")


def from_hf(folder: str, *, image_size: int | None = None
            ) -> tuple[ViTConfig, core.Params, dict[str, int] | None, dict]:
  """A transformers model folder -> (ViTConfig, params, MAE decoder kwargs or
  None, config.json). With a decoder (ViTMAEForPreTraining) the params are a
  MaskedAutoencoder's, as mae.from_mae gives them."""
  cfg = read_config(folder)
  if cfg["model_type"] == "dinov3_vit":
    config, params = _from_dinov3(cfg, read_weights(folder), image_size)
    return config, params, None, cfg
  _check_supported(cfg)
  sd, skipped = to_timm_layout(cfg, read_weights(folder))
  if skipped:
    logging.info("transformers weights: skipped %d head keys (%s...)", len(skipped),
                 skipped[0])
  heads = int(cfg["num_attention_heads"])
  eps = float(cfg.get("layer_norm_eps", 1e-12 if cfg["model_type"].startswith("vit")
                      else 1e-6))
  decoder = None
  if "decoder_embed.weight" in sd:
    if image_size is not None:
      raise ConversionError("--image-size does not apply to a ViTMAEForPreTraining "
                            "folder (its sin-cos positions follow the image size)")
    config, params, decoder = mae.from_mae(
        sd, num_heads=heads, decoder_heads=int(cfg["decoder_num_attention_heads"]))
  else:
    # transformers resizes position tables to the target size (no offset): so
    # does the import, and the model at run time.
    config, params = dinov2.from_dinov2(sd, num_heads=heads, image_size=image_size,
                                        interpolate_offset=0.0)
    if not cfg["model_type"].startswith("dinov2"):
      config = dataclasses.replace(config, init="mae")
  return dataclasses.replace(config, layernorm_eps=eps), params, decoder, cfg


# --------------------------------------------------------------------------
# DINOv3ViTModel: RoPE (no position table), separate q/k/v/o projections whose
# biases config.json may switch off (key_bias is off by default), LayerScale
# in every block, a plain (up/down) or gated (gate/up/down, silu) MLP.

# Where its layers sit: the file's names (save_pretrained), transformers'
# in-memory ones, and inside DINOv3ViTBackbone-like wrappers.
_DINOV3_LAYERS = ("layer.", "model.layer.")
_DINOV3_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight", "norm.bias": "norm.bias",
}
# Projection -> the config.json switch of its bias.
_DINOV3_BIAS = {
    "attention.q_proj": "query_bias", "attention.k_proj": "key_bias",
    "attention.v_proj": "value_bias", "attention.o_proj": "proj_bias",
    "mlp.gate_proj": "mlp_bias", "mlp.up_proj": "mlp_bias", "mlp.down_proj": "mlp_bias",
}


def _dinov3_state(cfg: Mapping[str, Any], sd: Mapping[str, Any]) -> dict[str, Any]:
  """DINOv3ViTModel weights -> the timm layout core's readers take. A bias
  config.json switches off becomes zeros (the same forward); the MLP is
  fc1/fc2 when plain, w12 (gate, up) / w3 when gated."""
  gated = bool(cfg.get("use_gated_mlp", False))
  layers = next((p for p in _DINOV3_LAYERS if p + "0.norm1.weight" in sd), None)
  if layers is None:
    raise ConversionError("transformers DINOv3 weights: no layer.0.norm1.weight under "
                          f"any of {[p + '*' for p in _DINOV3_LAYERS]}")
  sd = dict(sd)
  pat = re.compile(re.escape(layers) + r"(\d+)\.(.+)\.weight")
  for key in [k for k in sd if pat.fullmatch(k)]:
    module = pat.fullmatch(key).group(2)
    flag = _DINOV3_BIAS.get(module)
    bias = key[:-len("weight")] + "bias"
    if flag is None or bias in sd:
      continue
    if cfg.get(flag, True):
      raise ConversionError(f"transformers DINOv3 weights: no {bias} although "
                            f"config.json has {flag}=true")
    sd[bias] = np.zeros(np.shape(sd[key])[0], np.float32)
  if not gated:  # a plain MLP: up -> fc1, down -> fc2
    sd = {re.sub(r"\.mlp\.up_proj\.", ".mlp.fc1.",
                 re.sub(r"\.mlp\.down_proj\.", ".mlp.fc2.", k))
          if k.startswith(layers) else k: v for k, v in sd.items()}
  out, used = {}, set()
  for hf, ours in _DINOV3_TOP.items():
    if hf in sd:
      out[ours] = sd[hf]
      used.add(hf)
  _rename_blocks(sd, layers, "blocks.", out, used, True, int(cfg["hidden_size"]))
  out.update({k: v for k, v in sd.items() if k not in used})  # the reader names them
  return out


def _from_dinov3(cfg: Mapping[str, Any], sd: Mapping[str, Any],
                 image_size: int | None) -> tuple[ViTConfig, core.Params]:
  """config.json + weights of a DINOv3ViTModel -> (ViTConfig, params).

  config.json gives the architecture, the RoPE base (rope_theta) and its
  training-time augmentation (pos_embed_shift/jitter/rescale, kept for
  continued pretraining); image_size is the file's unless given (RoPE has no
  table: any size divisible by the patch size runs the same weights)."""
  gated = bool(cfg.get("use_gated_mlp", False))
  act = cfg.get("hidden_act", "gelu")
  if act != ("silu" if gated else "gelu"):
    raise ConversionError(f"config.json hidden_act={act!r} with use_gated_mlp={gated}: "
                          f"only {'silu' if gated else 'gelu (exact)'} is supported")
  for key in ("image_size", "patch_size"):
    if isinstance(cfg.get(key), (list, tuple)) and len(set(cfg[key])) > 1:
      raise ConversionError(f"config.json {key}={cfg[key]}: only square sizes are "
                            "supported")
  size = lambda key: int(np.ravel(cfg[key])[0])
  src = core.Source(_dinov3_state(cfg, sd), "transformers DINOv3 weights")
  d, c, p, p2 = src.shape("patch_embed.proj.weight")
  if (d, p) != (int(cfg["hidden_size"]), size("patch_size")) or p != p2:
    raise ConversionError(f"transformers DINOv3 weights: patch embedding {(d, c, p, p2)} "
                          f"does not fit config.json (hidden_size {cfg['hidden_size']}, "
                          f"patch_size {cfg['patch_size']})")
  depth = src.indices("blocks.")
  if depth != int(cfg["num_hidden_layers"]):
    raise ConversionError(f"transformers DINOv3 weights: {depth} layers, config.json "
                          f"has num_hidden_layers={cfg['num_hidden_layers']}")
  ffn, style, hidden = core.ffn_style(src, "blocks.0.", d)
  regs = src.shape("register_tokens")[1] if src.has("register_tokens") else 0
  image_size = image_size or size("image_size")
  if image_size % p:
    raise ConversionError(f"image_size={image_size} is not divisible by the patch "
                          f"size {p}")
  opt = lambda key: None if cfg.get(key) is None else float(cfg[key])
  config = ViTConfig(
      width=d, depth=depth, num_heads=int(cfg["num_attention_heads"]), mlp_dim=hidden,
      patch_size=p, image_size=image_size, in_channels=c, pos_embed="rope",
      class_token=True, num_registers=regs, layerscale_init=core.LAYERSCALE_INIT,
      ffn=ffn, mask_token=src.has("mask_token"), init="dinov2",
      layernorm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
      key_bias=bool(cfg.get("key_bias", False)),
      rope_base=float(cfg.get("rope_theta", 100.0)), rope_normalize="separate",
      rope_shift=opt("pos_embed_shift"), rope_jitter=opt("pos_embed_jitter"),
      rope_rescale=opt("pos_embed_rescale"))
  flat: dict[str, np.ndarray] = {}
  w = src.get("patch_embed.proj.weight")
  flat["patch_embed/kernel"] = w.transpose(2, 3, 1, 0).reshape(p * p * c, d)
  flat["patch_embed/bias"] = src.get("patch_embed.proj.bias", (d,))
  flat["cls_token"] = src.get("cls_token", (1, 1, d)).reshape(d)
  if src.has("register_tokens"):  # (1, 0, D) without registers
    tokens = src.get("register_tokens", (1, regs, d))[0]
    if regs:
      flat["register_tokens"] = tokens
  if config.mask_token:
    flat["mask_token"] = src.get("mask_token").reshape(d)
  for i in range(depth):
    if core.ffn_style(src, f"blocks.{i}.", d)[1] != style:
      raise ConversionError(f"transformers DINOv3 weights: layer {i}'s MLP differs "
                            "from layer 0's")
    core.read_block(src, f"blocks.{i}.", f"blocks/layers/{i}/", flat, config, style)
  core.read_ln(src, "norm", "norm", flat, d)
  src.finish()
  params = core.nest(flat)
  core.check_params(config, params)
  return config, params
