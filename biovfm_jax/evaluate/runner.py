"""Evaluates one checkpoint from an eval config: the body of evaluate.py,
importable by tests, benchmarks and notebooks."""
from __future__ import annotations

import json
import os

from absl import logging

from data_pipeline import storage
from data_pipeline.errors import ConfigError

# An eval config's path fields (configs/eval/common.py).
PATH_KEYS = ("checkpoint", "npz_dir", "data_dir", "out_dir", "cache_dir")


def expand_paths(config) -> None:
  """'~' and relative paths of an eval config made absolute in place, once,
  where the config enters (evaluate.py, the evaluators run in pretraining)."""
  with config.unlocked():
    for key in PATH_KEYS:
      config[key] = storage.expand(config[key])


def resolve_config(config, *, checkpoint=None, benchmarks=None, image_size=None,
                   out_dir=None):
  """Applies the flags and fills the defaults; fails on a bad config before
  anything is loaded."""
  from biovfm_jax.evaluate import protocols
  from data_pipeline.readers import medmnist
  with config.unlocked():
    for key, value in (("checkpoint", checkpoint), ("benchmarks", benchmarks),
                       ("image_size", image_size), ("out_dir", out_dir)):
      if value is not None:
        config[key] = value
    expand_paths(config)  # once, here: '~' expanded, relative made absolute
    if not config.checkpoint:
      raise ConfigError("config.checkpoint is empty: pass --checkpoint=DIR")
    if not config.out_dir:
      raise ConfigError("config.out_dir is empty: pass --out_dir=DIR")
    config.cache_dir = config.cache_dir or os.path.join(config.out_dir, "features")
    config.name = config.name or os.path.basename(config.checkpoint.rstrip("/"))
  if config.protocol not in protocols.PROTOCOLS:
    raise ConfigError(f"config.protocol={config.protocol!r}; known: {protocols.PROTOCOLS}")
  names = protocols.benchmark_names(config.benchmarks)
  if any(n != protocols.MINI for n in names) and config.image_size not in medmnist.SIZES:
    raise ConfigError(f"config.image_size={config.image_size}: MedMNIST+ comes in "
                     f"{medmnist.SIZES}")
  return config


def run(config) -> dict:
  import jax
  from biovfm_jax import sharding as shd
  from biovfm_jax.evaluate import protocols, report
  from biovfm_jax.evaluate.encoder import load_encoder

  encoder = load_encoder(config.checkpoint, step=None if config.step < 0 else config.step,
                         mesh=shd.make_mesh(dict(config.mesh)), **dict(config.encoder))
  logging.info("Encoder %s: %s parameters, %s, %d device(s)", encoder.source,
               f"{encoder.num_params:,}", encoder.config.width, jax.device_count())
  step = int(os.path.basename(encoder.source))  # source: <workdir>/checkpoints/<step>
  results = protocols.evaluate_encoder(encoder, config,
                                       scores_dir=os.path.join(config.out_dir, "scores"))
  meta = {"checkpoint": encoder.source, "protocol": config.protocol,
          "image_size": int(config.image_size),
          "input_size": protocols.input_size(encoder, config),
          "parameters": encoder.num_params}
  if jax.process_index() == 0:
    os.makedirs(config.out_dir, exist_ok=True)
    with open(os.path.join(config.out_dir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=1, default=str)
    paths = report.write_report(results, config.out_dir, name=config.name,
                                meta=meta, step=step)
    with open(paths["md"]) as f:
      print(f.read())
  return results
