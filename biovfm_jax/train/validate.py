"""Config checks that run before anything is compiled, naming the bad key,
and the flag parser that turns a mistyped key into one line."""
from __future__ import annotations

import glob
import os
import sys

import jax
import numpy as np
from absl import flags

from biovfm_jax.train import compile_cache
from data_pipeline import masking, storage
from data_pipeline.errors import ConfigError


def data_parallel_size(mesh) -> int:
  return int(mesh.shape["data"] * mesh.shape["fsdp"])


def validate_config(config, mesh) -> None:
  """Raises ConfigError naming the config key when the run cannot work."""
  from biovfm_jax.models.vit import vit_config_from  # raises for bad model keys

  depth = vit_config_from(config.model).depth
  b = config.batch_size
  dp = data_parallel_size(mesh)
  accum = config.optim.grad_accum_steps
  if b <= 0:
    raise ConfigError(f"config.batch_size={b} must be positive")
  if accum < 1 or b % accum:
    raise ConfigError(f"config.batch_size={b} is not divisible by "
                     f"config.optim.grad_accum_steps={accum}")
  if (b // accum) % dp:
    raise ConfigError(
        f"config.batch_size={b} (per micro-batch {b // accum}) is not divisible by the "
        f"data-parallel size {dp} (config.mesh data x fsdp = "
        f"{mesh.shape['data']} x {mesh.shape['fsdp']})")
  if b % jax.process_count():
    raise ConfigError(f"config.batch_size={b} is not divisible by the number of "
                     f"processes {jax.process_count()}")
  if config.image_size != config.data.image_size:
    raise ConfigError(f"config.data.image_size={config.data.image_size} differs from "
                     f"config.image_size={config.image_size}")
  # Counts that must be >= 1 (keep=0 would keep no checkpoint; a step count <= 0
  # would "finish" having trained nothing), or >= 0; None: unset, the default applies.
  for key, low in (("log_every_steps", 1), ("checkpoint.every_steps", 1),
                   ("checkpoint.keep", 1), ("num_train_steps", 1), ("steps_per_epoch", 1),
                   ("total_epochs", 0), ("image_every_steps", 0),
                   ("optim.warmup_epochs", 0), ("optim.freeze_last_layer_epochs", 0),
                   ("optim.freeze_blocks", 0), ("optim.freeze_blocks_steps", 0),
                   ("optim.base_lr", 0), ("optim.min_lr", 0), ("optim.grad_clip_norm", 0),
                   ("optim.lr_batch_base", 1), ("optim.weight_decay", 0),
                   ("data.num_workers", 0), ("data.prefetch_buffer", 0),
                   ("data.device_prefetch", 0), ("data.read_threads", 1)):
    value = _get(config, key)
    if value is not None and value < low:
      raise ConfigError(f"config.{key}={value} must be "
                       f"{'positive' if low == 1 else 'zero or more'}")
  if config.optim.freeze_blocks > depth:
    raise ConfigError(f"config.optim.freeze_blocks={config.optim.freeze_blocks} exceeds the "
                      f"model's depth {depth}")
  if not config.num_train_steps and not config.total_epochs:
    raise ConfigError(f"config.total_epochs={config.total_epochs} with no "
                     "config.num_train_steps: nothing to train")
  _check_paths(config)
  multicrop = config.data.crops == "multicrop"
  for key in ("global_crop_scale", "local_crop_scale") if multicrop else ("crop_scale",):
    scale = tuple(config.data[key])
    if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
      raise ConfigError(f"config.data.{key}={scale} must be (low, high) in (0, 1]")
  if multicrop:
    patch = vit_config_from(config.model).patch_size  # crop sizes: DINOv2Objective checks
    if config.data.patch_size != patch:
      raise ConfigError(f"config.data.patch_size={config.data.patch_size} differs from the "
                       f"model's patch size {patch}")
    masking.check_sampling(config.data.mask_sampling)
  if len(config.data.mean) != 3 or len(config.data.std) != 3 or min(np.abs(config.data.std)) == 0:
    raise ConfigError("config.data.mean and config.data.std must be 3 values, std nonzero")


def expand_paths(c) -> None:
  """Path fields of a pretraining config, '~' expanded and made absolute, in
  place: once, where the config enters (main.py, the sweep launcher; gs://
  kept as given)."""
  c.init_from = storage.expand(c.init_from)
  if c.objective == "dinov2":
    c.dinov2.gram.ckpt = storage.expand(c.dinov2.gram.ckpt)
  c.data.cache_dir = storage.expand(c.data.cache_dir)
  if str(c.compile_cache_dir).lower() != compile_cache.OFF:
    c.compile_cache_dir = storage.expand(c.compile_cache_dir)
  if isinstance(c.data.shards, str):
    c.data.shards = storage.expand_list(c.data.shards)


def _get(config, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def _check_paths(config) -> None:
  """Local inputs that do not exist, named before anything is built."""
  for item in str(config.data.shards).split(","):
    item = item.strip()
    if item and item != "mini" and not storage.is_remote(item) and not glob.has_magic(item) \
        and not os.path.exists(item):
      raise ConfigError(f"config.data.shards: {item} does not exist")
  gram_ckpt = config.dinov2.gram.ckpt if config.objective == "dinov2" else None
  for key, path in (("init_from", config.init_from), ("dinov2.gram.ckpt", gram_ckpt)):
    if path and not storage.is_remote(path) and not os.path.exists(path):
      raise ConfigError(f"config.{key}={path} does not exist")


# Config-file flags of the binaries (main.py, evaluate.py: --config; the sweep: --sweep).
_CONFIG_FLAGS = ("config.", "noconfig.", "sweep.", "nosweep.")


def _one_line(e: Exception, argv) -> str:
  """The error of a bad flag, with absl/ml_collections' suggestion, as one line."""
  while isinstance(e, (KeyError, AttributeError)) and e.args:  # KeyError's own str is a repr
    e = e.args[0]
  text = str(e).strip()
  key, _, hint = text.partition("\n")
  hint = hint.strip()
  for arg in argv[1:]:  # the override that names this key: --config.model.widht=64
    name = arg.split("=", 1)[0].lstrip("-")
    if name.startswith(_CONFIG_FLAGS) and key.strip("'") in name.split(".")[1:]:
      return f"--{name}: no such config key" + (f". {hint}" if hint else "")
  return " ".join(text.split())


def parse_flags(argv):
  """absl's flag parsing (app.run(main, flags_parser=parse_flags)) where a bad
  flag or config override ends in one line and exit code 2, not a traceback."""
  try:
    rest = flags.FLAGS(argv)
    for name in flags.FLAGS:  # a --config file that failed to load raises on first use
      getattr(flags.FLAGS[name].value, "keys", None)
    return rest
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    print(f"error: {_one_line(e, argv)}", file=sys.stderr)
    sys.exit(2)
