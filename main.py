"""Pretraining binary: one program for a laptop CPU, a GPU node or a TPU pod.

  python main.py --config=configs/quickstart.py --workdir=/tmp/quickstart
  python main.py --config=configs/vit_l_mae.py --workdir=gs://bucket/run \
      --config.data.shards=/data/biovfm21m/ --config.batch_size=4096

Running it again with the same --workdir resumes from the latest checkpoint.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and summaries.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import jax  # after absl parsed flags: lets XLA_FLAGS / JAX_* env settle first
  from biovfm_jax import console
  from biovfm_jax.train.loop import NonFiniteLossError, train

  console.setup()
  logging.info("JAX %s, %d process(es), %d device(s): %s", jax.__version__,
               jax.process_count(), jax.device_count(), jax.devices()[0].device_kind)
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except ValueError as e:  # config errors: one clear line, no traceback wall
    if "config." in str(e):
      logging.error("Bad config: %s", e)
      sys.exit(2)
    raise
  except NonFiniteLossError as e:
    logging.error("%s", e)
    sys.exit(3)


if __name__ == "__main__":
  app.run(main)
