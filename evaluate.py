"""Evaluation binary: scores any checkpoint (ours or imported) on benchmarks.

  python evaluate.py --config=configs/eval/medmnist_linear.py \
      --checkpoint=/tmp/vit_b_mae --out_dir=/tmp/eval/vit_b_mae
  python evaluate.py --config=configs/eval/mini.py --checkpoint=/tmp/quickstart \
      --out_dir=/tmp/eval/quickstart
  python -m biovfm_jax.evaluate.report --merge /tmp/eval/a /tmp/eval/b --out=/tmp/eval/cmp

Writes report.md / report.csv / report.json and TensorBoard scalars to --out_dir.
"""
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from biovfm_jax import console, distributed
  from biovfm_jax.evaluate import runner
  from data_pipeline import mini
  os.environ.setdefault("KERAS_HOME", os.path.join(mini.cache_root(), "keras"))  # not ~/.keras
  console.setup()
  distributed.skip_absent_tpu()
  try:
    config = runner.resolve_config(_CONFIG.value, checkpoint=_CHECKPOINT.value,
                                   benchmarks=_BENCHMARKS.value, image_size=_IMAGE_SIZE.value,
                                   out_dir=_OUT_DIR.value)
    runner.run(config)
  # One clear line (-v 1 shows the traceback): a ConfigError, or a checkpoint or
  # benchmark file that is missing or does not match.
  except (ValueError, FileNotFoundError) as e:
    logging.error("%s", e)
    logging.debug("traceback:", exc_info=True)
    sys.exit(2)


if __name__ == "__main__":
  from biovfm_jax.train.validate import parse_flags
  app.run(main, flags_parser=parse_flags)
