"""Evaluation binary: scores any checkpoint (ours or imported) on benchmarks.

  python evaluate.py --config=configs/eval/medmnist_linear.py \
      --checkpoint=/tmp/vit_b_mae --out_dir=/tmp/eval/vit_b_mae
  python evaluate.py --config=configs/eval/mini.py --checkpoint=/tmp/quickstart \
      --out_dir=/tmp/eval/quickstart
  python -m biovfm_jax.evaluate.report --merge /tmp/eval/a /tmp/eval/b --out=/tmp/eval/cmp

Writes report.md / report.csv / report.json and TensorBoard scalars to --out_dir.
"""
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/eval/medmnist_linear.py",
                                          "Eval config (configs/eval/*.py).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint: a workdir of main.py, "
                                  "of an import, or one step's folder.")
_BENCHMARKS = flags.DEFINE_string("benchmarks", None, "'all', 'mini' or MedMNIST flags "
                                  "(comma-separated); default: the config's.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "MedMNIST+ size: 28, 64, 128 or 224.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the report goes.")


def resolve_config(config, *, checkpoint=None, benchmarks=None, image_size=None,
                   out_dir=None):
  """Applies the flags and fills the defaults; fails on a bad config before
  anything is loaded."""
  from biovfm_jax.evaluate import protocols
  from data_pipeline.sources import medmnist
  with config.unlocked():
    for key, value in (("checkpoint", checkpoint), ("benchmarks", benchmarks),
                       ("image_size", image_size), ("out_dir", out_dir)):
      if value is not None:
        config[key] = value
    for key in ("npz_dir", "data_dir", "out_dir", "cache_dir", "checkpoint"):
      config[key] = os.path.expanduser(config[key]) if config[key] else config[key]
    if not config.checkpoint:
      raise ValueError("config.checkpoint is empty: pass --checkpoint=DIR")
    if not config.out_dir:
      raise ValueError("config.out_dir is empty: pass --out_dir=DIR")
    config.cache_dir = config.cache_dir or os.path.join(config.out_dir, "features")
    config.name = config.name or os.path.basename(config.checkpoint.rstrip("/"))
  if config.protocol not in protocols.PROTOCOLS:
    raise ValueError(f"config.protocol={config.protocol!r}; known: {protocols.PROTOCOLS}")
  names = protocols.benchmark_names(config.benchmarks)
  if any(n != protocols.MINI for n in names) and config.image_size not in medmnist.SIZES:
    raise ValueError(f"config.image_size={config.image_size}: MedMNIST+ comes in "
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
    paths = report.write_report(results, config.out_dir, name=config.name, meta=meta)
    with open(paths["md"]) as f:
      print(f.read())
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from biovfm_jax import console
  console.setup()
  try:
    config = resolve_config(_CONFIG.value, checkpoint=_CHECKPOINT.value,
                            benchmarks=_BENCHMARKS.value, image_size=_IMAGE_SIZE.value,
                            out_dir=_OUT_DIR.value)
    run(config)
  except (ValueError, FileNotFoundError) as e:  # one clear line, no traceback wall
    logging.error("%s", e)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
