"""Imports the vision tower of an open_clip checkpoint whose image encoder is a
timm ViT (e.g. BiomedCLIP): the `visual.trunk.*` weights go through
timm.from_timm; the text tower, logit_scale and the vision head
(`visual.head.*`, pooling/projection onto the joint space) are ignored. Our
encoder's tokens are the trunk's final-norm output (forward_features).

`src` is a weights file, or a folder with open_clip_pytorch_model.bin (or
.safetensors) and open_clip_config.json, whose vision_cfg gives the timm
model name (hence the size) and the image size.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from biovfm_jax.interop import timm, torch_files
from biovfm_jax.interop.core import ConversionError

CONFIG = "open_clip_config.json"
_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TRUNK = "visual.trunk."
# timm's ViT names -> our sizes (from_timm checks the width against it).
_TIMM_SIZES = {"tiny": "T", "small": "S", "base": "B", "large": "L", "huge": "H"}


def read_folder(folder: str) -> tuple[str, dict[str, Any]]:
  """(weights file, vision_cfg of open_clip_config.json or {})."""
  path = next((os.path.join(folder, n) for n in _WEIGHT_FILES
               if os.path.isfile(os.path.join(folder, n))), None)
  if path is None:
    raise FileNotFoundError(f"{folder}: none of {', '.join(_WEIGHT_FILES)}")
  cfg_path = os.path.join(folder, CONFIG)
  if not os.path.isfile(cfg_path):
    return path, {}
  with open(cfg_path) as f:
    return path, json.load(f).get("model_cfg", {}).get("vision_cfg", {})


def size_of(timm_model_name: str | None) -> str | None:
  """'vit_base_patch16_224' -> 'B' (None when the name says no known size)."""
  m = re.match(r"vit_([a-z]+)_", timm_model_name or "")
  return _TIMM_SIZES.get(m.group(1)) if m else None


def trunk_state_dict(sd: dict[str, Any]) -> dict[str, Any]:
  """The timm trunk's weights, unprefixed; logs the ignored rest."""
  trunk = {k[len(_TRUNK):]: v for k, v in sd.items() if k.startswith(_TRUNK)}
  if not trunk:
    raise ConversionError(
        "open_clip weights: no visual.trunk.* keys; only towers with a timm ViT trunk "
        "are supported (not open_clip's own visual.transformer.* ViT)")
  rest = [k for k in sd if not k.startswith(_TRUNK)]
  text = sum(not k.startswith("visual.") for k in rest)
  logging.info("open_clip weights: ignored %d text-tower/logit_scale keys and %d vision "
               "head keys", text, len(rest) - text)
  return trunk


def from_open_clip(src: str, *, size: str | None = None, num_heads: int | None = None,
                   image_size: int | None = None, key: str | None = None):
  """open_clip weights file or folder -> (ViTConfig, params, vision_cfg).
  Explicit size / num_heads / image_size win over open_clip_config.json."""
  vision = {}
  if os.path.isdir(src):
    src, vision = read_folder(src)
  if size is None and num_heads is None:
    size = size_of(vision.get("timm_model_name"))
    if size is None and vision.get("timm_model_name"):
      raise ConversionError(f"open_clip_config.json: timm_model_name "
                            f"{vision['timm_model_name']!r} gives no size; pass --model "
                            "or --num-heads")
  if image_size is None and isinstance(vision.get("image_size"), int):
    image_size = vision["image_size"]
  sd = trunk_state_dict(torch_files.load_state_dict(src, key=key))
  config, params = timm.from_timm(sd, size=size, num_heads=num_heads,
                                     image_size=image_size)
  return config, params, vision
