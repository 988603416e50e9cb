"""Imports a transformers model folder (config.json + weights) as ours.

Supported model_types: dinov2, dinov2_with_registers, vit, vit_mae (with the
MAE decoder when the folder holds ViTMAEForPreTraining). The architecture
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

SUPPORTED = ("dinov2", "dinov2_with_registers", "vit", "vit_mae")
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
    config, params = dinov2.from_dinov2(sd, num_heads=heads, image_size=image_size)
    if not cfg["model_type"].startswith("dinov2"):
      config = dataclasses.replace(config, init="mae")
  return dataclasses.replace(config, layernorm_eps=eps), params, decoder, cfg
