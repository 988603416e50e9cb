"""Pretraining binary: one program for a laptop CPU, a GPU node or a TPU pod.

  python main.py --config=configs/quickstart.py --workdir=/tmp/quickstart
  python main.py --config=configs/vit_l_mae.py --workdir=gs://bucket/run \
      --config.data.shards=/data/biovfm21m/ --config.batch_size=4096

Running it again with the same --workdir resumes from the latest checkpoint
(the newest one that restores: a damaged one is moved to
<workdir>/checkpoints_unreadable/). One run at a time holds a workdir (the
lock file <workdir>/run.lock; none on gs://). Ctrl-C saves a checkpoint at the
next step and exits; a second Ctrl-C aborts at once.

Exit codes (every failure is one line on stderr):
  0    trained to the last step, stopped for preemption (SIGTERM) after saving,
       or nothing to do (already finished)
  2    bad flags or config; bad input data (shards that differ from their
       manifest or from the checkpoint's run, too many unreadable records);
       the workdir is in use by another run; or its checkpoint was written
       for another model or objective
  3    non-finite loss
  4    a checkpoint could not be saved (e.g. disk full) or none restores
  130  stopped by Ctrl-C after saving the checkpoint of the stop step
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and summaries.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for multi-process runs "
    "(with --num_processes and --process_id; not needed under SLURM or on TPU pods).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's number.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Multi-host start-up: auto-detect SLURM/MPI/TPU pods, force, "
                                 "or skip.")
_CPU_COLLECTIVES = flags.DEFINE_string("cpu_collectives", None, "CPU collectives across "
                                       "processes (gloo), for multi-process CPU runs.")
flags.mark_flags_as_required(["config", "workdir"])


def _run_args():
  """The config and workdir as the run uses them: every path absolute, '~'
  expanded, once, here (orbax needs absolute paths; './~' must never appear)."""
  from configs import common
  from data_pipeline import storage
  config = _CONFIG.value
  common.expand_paths(config)
  return config, storage.expand(_WORKDIR.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from biovfm_jax import console
  console.start_binary()  # before jax and TensorFlow load
  config, workdir = _run_args()
  import jax  # after absl parsed flags: lets XLA_FLAGS / JAX_* env settle first
  from biovfm_jax import distributed
  from biovfm_jax.train import checkpoint, workdir_lock
  from biovfm_jax.train.loop import Interrupted, NonFiniteLossError, train
  from data_pipeline.errors import ConfigError
  from data_pipeline.shards import InputDataError

  try:
    distributed.initialize(coordinator_address=_COORDINATOR.value,
                           num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                           mode=_DISTRIBUTED.value, cpu_collectives=_CPU_COLLECTIVES.value)
  except ValueError as e:
    logging.error("%s", e)
    sys.exit(2)
  logging.info("JAX %s, %d process(es), %d device(s): %s", jax.__version__,
               jax.process_count(), jax.device_count(), jax.devices()[0].device_kind)
  try:
    train(config, workdir)
  except InputDataError as e:
    logging.error("Bad input data: %s", e)
    sys.exit(2)
  except ConfigError as e:  # one clear line, no traceback wall
    logging.error("Bad config: %s", e)
    sys.exit(2)
  except NonFiniteLossError as e:
    logging.error("%s", e)
    sys.exit(3)
  except (workdir_lock.WorkdirBusy, checkpoint.ModelMismatch) as e:
    logging.error("%s", e)
    sys.exit(2)
  except checkpoint.CheckpointError as e:
    logging.error("%s", e)
    sys.exit(4)
  except Interrupted as e:
    logging.warning("%s", e)
    sys.exit(130)


if __name__ == "__main__":
  from biovfm_jax.train.validate import parse_flags
  app.run(main, flags_parser=parse_flags)
