"""Config checks that run before anything is compiled, naming the bad key."""
from __future__ import annotations

import jax
import numpy as np


def data_parallel_size(mesh) -> int:
  return int(mesh.shape["data"] * mesh.shape["fsdp"])


def validate_config(config, mesh) -> None:
  """Raises ValueError naming the config key when the run cannot work."""
  from biovfm_jax.models.vit import vit_config_from  # raises for bad model keys

  vit_config_from(config.model)
  b = config.batch_size
  dp = data_parallel_size(mesh)
  accum = config.optim.grad_accum_steps
  if b <= 0:
    raise ValueError(f"config.batch_size={b} must be positive")
  if accum < 1 or b % accum:
    raise ValueError(f"config.batch_size={b} is not divisible by "
                     f"config.optim.grad_accum_steps={accum}")
  if (b // accum) % dp:
    raise ValueError(
        f"config.batch_size={b} (per micro-batch {b // accum}) is not divisible by the "
        f"data-parallel size {dp} (config.mesh data x fsdp = "
        f"{mesh.shape['data']} x {mesh.shape['fsdp']})")
  if b % jax.process_count():
    raise ValueError(f"config.batch_size={b} is not divisible by the number of "
                     f"processes {jax.process_count()}")
  if config.image_size != config.data.image_size:
    raise ValueError(f"config.data.image_size={config.data.image_size} differs from "
                     f"config.image_size={config.image_size}")
  for key in ("log_every_steps", "checkpoint.every_steps"):
    value = config
    for part in key.split("."):
      value = value[part]
    if value <= 0:
      raise ValueError(f"config.{key}={value} must be positive")
  for key in ("crop_scale", "global_crop_scale", "local_crop_scale"):
    if config.data.get(key) is not None:
      scale = tuple(config.data[key])
      if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"config.data.{key}={scale} must be (low, high) in (0, 1]")
  if config.data.get("crops", "single") == "multicrop":
    patch = vit_config_from(config.model).patch_size  # crop sizes: DINOv2Objective checks
    if config.data.get("patch_size") not in (None, patch):
      raise ValueError(f"config.data.patch_size={config.data.patch_size} differs from the "
                       f"model's patch size {patch}")
  if len(config.data.mean) != 3 or len(config.data.std) != 3 or min(np.abs(config.data.std)) == 0:
    raise ValueError("config.data.mean and config.data.std must be 3 values, std nonzero")
