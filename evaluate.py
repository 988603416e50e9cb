"""Evaluation binary: scores any checkpoint (ours or imported) on benchmarks.

  python evaluate.py --config=configs/eval/medmnist_linear.py \
      --checkpoint=/tmp/vit_b_mae --out_dir=/tmp/eval/vit_b_mae
  python evaluate.py --config=configs/eval/mini.py --checkpoint=/tmp/quickstart \
      --out_dir=/tmp/eval/quickstart
  python -m biovfm_jax.evaluate.report --merge /tmp/eval/a /tmp/eval/b --out=/tmp/eval/cmp
  python evaluate.py --config=configs/eval/segmentation_linear.py \
      --checkpoint=/tmp/quickstart_dinov2 --out_dir=/tmp/eval/seg_dinov2

Writes report.md / report.csv / report.json and TensorBoard scalars to --out_dir
(the segmentation probe also per-benchmark folders: per_image.csv, overlays.png,
predictions; see biovfm_jax/evaluate/segmentation.py).
With --results=FILE it also appends one row per benchmark and metric to the
results store FILE (biovfm_jax/results.py); --config.results.run, .model_size,
.data_subset and .modality_subset label the rows (defaults: what the checkpoint
records).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/eval/medmnist_linear.py",
                                          "Eval config (configs/eval/*.py).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint: a workdir of main.py, "
                                  "of an import, or one step's folder.")
_BENCHMARKS = flags.DEFINE_string("benchmarks", None, "'all', 'mini' or MedMNIST flags "
                                  "(comma-separated); segmentation: mni_tissue, "
                                  "msd:<folder>, folder:<folder>; default: the config's.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "MedMNIST+ size: 28, 64, 128 or "
                                   "224; segmentation: the mask size.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the report goes.")
_RESULTS = flags.DEFINE_string("results", None, "Results store (CSV) to append the rows to.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from biovfm_jax import console
  console.start_binary()  # before jax and TensorFlow load
  from biovfm_jax import distributed
  from biovfm_jax.evaluate import runner
  # Joins the hosts of a TPU pod or SLURM job as main.py does (feature extraction
  # is split over all of them); a single process otherwise.
  distributed.initialize()
  try:
    config = runner.resolve_config(_CONFIG.value, checkpoint=_CHECKPOINT.value,
                                   benchmarks=_BENCHMARKS.value, image_size=_IMAGE_SIZE.value,
                                   out_dir=_OUT_DIR.value, results=_RESULTS.value)
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
