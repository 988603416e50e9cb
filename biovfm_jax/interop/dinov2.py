"""facebookresearch/dinov2 backbones in (hub files and training checkpoints,
chunked or not), with the DINO/iBOT heads beside them."""
from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from biovfm_jax.interop import core
from biovfm_jax.models.vit import ViTConfig

_DINOV2_PREFIXES = ("teacher.backbone.", "backbone.", "")
_DINOV2_HEADS = ("head.", "dino_head.", "ibot_head.")


def _dinov2_prefix(sd: Mapping[str, Any]) -> str:
  """The backbone's key prefix (the teacher's when both networks are there)."""
  for prefix in _DINOV2_PREFIXES:
    if f"{prefix}patch_embed.proj.weight" in sd:
      return prefix
  raise core.ConversionError(
      "DINOv2 state dict: no patch_embed.proj.weight under any of "
      f"{[p + '*' for p in _DINOV2_PREFIXES]}")


def _dinov2_backbone(sd: Mapping[str, Any]) -> tuple[dict, list[str]]:
  """The backbone keys (prefix stripped, block chunks flattened) and the
  skipped keys (student, DINO/iBOT heads)."""
  prefix = _dinov2_prefix(sd)
  backbone = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  skipped = [k for k in sd if not k.startswith(prefix)]
  # Block chunks (FSDP training): blocks.<chunk>.<i>.*, with i the global index.
  chunked = re.compile(r"blocks\.(\d+)\.(\d+)\.(.*)")
  if any(chunked.match(k) for k in backbone):
    flat, seen = {}, {}
    for k, v in backbone.items():
      m = chunked.match(k)
      if m is None:
        if k.startswith("blocks."):
          raise core.ConversionError(f"DINOv2 state dict: {prefix}{k} mixes chunked "
                                "and flat block keys")
        flat[k] = v
        continue
      chunk, i = int(m.group(1)), int(m.group(2))
      if seen.setdefault(i, chunk) != chunk:
        raise core.ConversionError(f"DINOv2 state dict: block {i} appears in chunks "
                              f"{seen[i]} and {chunk}")
      flat[f"blocks.{i}.{m.group(3)}"] = v
    backbone = flat
  return backbone, skipped


def from_dinov2(sd: Mapping[str, Any], *, size: str | None = None,
                num_heads: int | None = None,
                image_size: int | None = None,
                interpolate_offset: float = 0.1) -> tuple[ViTConfig, core.Params]:
  """facebookresearch/dinov2 backbone -> (ViTConfig, VisionTransformer params).

  Takes a hub state dict (cls_token, pos_embed with a cls row,
  register_tokens, mask_token, blocks.<i>.*, norm) or a training checkpoint's
  teacher ('backbone.' or 'teacher.backbone.' prefixed, blocks possibly in
  chunks 'blocks.<chunk>.<i>.*'); DINO/iBOT heads (see from_dinov2_heads)
  and the student are skipped. image_size defaults to the table's (518 for
  hub models); another value resizes the table (bicubic).
  """
  backbone, skipped = _dinov2_backbone(sd)
  src = core.Source(backbone, "DINOv2 state dict")
  cfg, flat = core.read_encoder(src, size=size, num_heads=num_heads,
                            image_size=image_size, pos_layout="cls_slot",
                            register_key="register_tokens", mask_key="mask_token",
                            interpolate_offset=interpolate_offset)
  src.finish(ignore=_DINOV2_HEADS)
  if skipped:
    logging.info("DINOv2 state dict: skipped %d keys outside the backbone (%s...)",
                 len(skipped), skipped[0])
  cfg = dataclasses.replace(cfg, init="dinov2")
  params = core.nest(flat)
  core.check_params(cfg, params)
  return cfg, params


DINOV2_HEAD_NAMES = ("dino_head", "ibot_head")


def from_dinov2_heads(sd: Mapping[str, Any], in_dim: int
                      ) -> tuple[dict[str, core.Params], dict[str, dict[str, Any]]]:
  """The DINO/iBOT heads beside the backbone from_dinov2 reads (the
  teacher's in a full training checkpoint) -> ({name: DINOHead params},
  {name: DINOHead kwargs}), both empty when the state dict has no heads.

  The kwargs (num_prototypes, hidden_dim, bottleneck_dim, nlayers) are read
  from the shapes: DINOHead(in_dim, **kwargs) takes the params. Heads with
  BatchNorm (use_bn) are refused. The reference's last layer is weight-normed,
  W = g * v / ||v|| per prototype, as ours: v and g are read as they are.
  """
  root = _dinov2_prefix(sd).removesuffix("backbone.")
  params, arch = {}, {}
  for name in DINOV2_HEAD_NAMES:
    at = f"{root}{name}."
    head = {k[len(at):]: v for k, v in sd.items() if k.startswith(at)}
    if head:
      params[name], arch[name] = _read_dino_head(core.Source(head, f"DINOv2 {at}*"), in_dim)
  return params, arch


def _read_dino_head(src: core.Source, in_dim: int) -> tuple[core.Params, dict[str, Any]]:
  from flax import nnx

  from biovfm_jax.models.dino_head import DINOHead
  what = src.what
  if any(k.endswith("running_mean") for k in src.sd):
    raise core.ConversionError(f"{what}: the MLP has BatchNorm layers (use_bn=True), "
                          "which our DINOHead does not have")
  # nn.Sequential(Linear, GELU, ..., Linear): Linears at 0, 2, 4 ...; a
  # one-layer MLP is a bare Linear named 'mlp'.
  if src.has("mlp.weight"):
    names = ["mlp"]
  else:
    found = sorted(int(m.group(1)) for k in src.sd
                   if (m := re.fullmatch(r"mlp\.(\d+)\.weight", k)))
    if not found or found != list(range(0, 2 * len(found), 2)):
      raise core.ConversionError(f"{what}: expected Linear layers mlp.0, mlp.2, mlp.4 ... "
                            f"(Linear, GELU, ...), found mlp.<i>.weight at {found}")
    names = [f"mlp.{i}" for i in found]
  flat, dims = {}, [in_dim]
  for i, name in enumerate(names):
    dims.append(src.shape(f"{name}.weight")[0])
    flat[f"mlp/{i}/kernel"], flat[f"mlp/{i}/bias"] = src.linear(name, dims[-2], dims[-1])
  # weight_norm's g and v: torch.nn.utils.weight_norm, or its parametrizations form.
  for g_key, v_key in (("weight_g", "weight_v"),
                       ("parametrizations.weight.original0",
                        "parametrizations.weight.original1")):
    g_key, v_key = "last_layer." + g_key, "last_layer." + v_key
    if src.has(v_key):
      break
  else:
    raise core.ConversionError(f"{what}: no weight-normed last layer (last_layer.weight_g "
                          "and last_layer.weight_v)")
  k = src.shape(v_key)[0]
  v, g = src.get(v_key, (k, dims[-1])), src.get(g_key, (k, 1))
  flat["last_layer"], flat["last_layer_gain"] = v.T, g.reshape(k)  # (bottleneck, K), (K,)
  src.finish()
  kwargs = dict(num_prototypes=k, hidden_dim=dims[1] if len(names) > 1 else None,
                bottleneck_dim=dims[-1], nlayers=len(names))
  params = core.nest(flat)
  core.check_tree(lambda: DINOHead(in_dim, **kwargs, rngs=nnx.Rngs(0)), params)
  return params, kwargs


