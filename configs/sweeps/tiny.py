"""The scaling study's grid in miniature, on the built-in "mini" corpus: 2 model
sizes x 2 objectives x 2 data subsets, a few steps each at 32 px, scored with
the fast protocol on the mini benchmark (modality classification). A minute or
two on a laptop CPU:

  python -m biovfm_jax.sweep --sweep=configs/sweeps/tiny.py --root=/tmp/sweep_tiny
  python -m biovfm_jax.sweep --sweep=configs/sweeps/tiny.py --root=/tmp/sweep_tiny --dry_run

Results land in /tmp/sweep_tiny/results.csv (biovfm_jax/results.py).
"""
import ml_collections

from configs.sweeps import common


def get_config(arg=None):
  del arg
  s = common.get_config()
  s.name = "tiny"
  s.overrides = ml_collections.ConfigDict({
      "image_size": 32, "batch_size": 16, "num_train_steps": 3, "steps_per_epoch": 3,
      "log_every_steps": 1, "image_every_steps": 0,
      "model": {"patch_size": 8},
      "checkpoint": {"every_steps": 3, "async_save": False},
      "optim": {"warmup_epochs": 0}})
  s.axes = (
      # Widths 16 and 32: custom sizes, labelled so (results column model_size).
      ("model_size", {
          "w16": {"model.width": 16, "model.depth": 1, "model.num_heads": 2,
                  "model.mlp_dim": 32},
          "w32": {"model.width": 32, "model.depth": 2, "model.num_heads": 2,
                  "model.mlp_dim": 64}}),
      ("objective", {
          "mae": {"config": "configs/quickstart.py", "mae.decoder_width": 16,
                  "mae.decoder_depth": 1, "mae.decoder_heads": 2},
          "dinov2": {"config": "configs/quickstart_dinov2.py", "dinov2.head_hidden": 32,
                     "dinov2.head_bottleneck": 16, "dinov2.num_prototypes": 64,
                     "dinov2.n_local_crops": 2, "data.local_crop_size": 16}}),
      # All of mini, or only its MR and CT records (mixture weights: no files).
      ("data_subset", {
          "mini": {"data.shards": "mini"},
          "mini_mr_ct": {"data.shards": "mini", "data.mixture.weights": "MR:1,CT:1"}}),
      ("modality_subset", {"all": {}}),
  )
  s.eval.config = "configs/eval/mini.py"
  s.eval.overrides = ml_collections.ConfigDict({
      "image_size": 28, "features": {"batch_size": 512, "read_threads": 0},
      "probe": {"epochs": 3, "batch_size": 256}})
  s.emit.slurm = ("--nodes=1", "--gpus-per-node=1")
  s.emit.tpu_pod = ("--zone=us-central2-b", "--accelerator=v4-8", "--spot")
  return s
