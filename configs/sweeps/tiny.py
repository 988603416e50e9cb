"""The scaling study's grid in miniature, on the built-in "mini" corpus: 2 model
sizes x 2 objectives x 2 data mixtures, pretrained long enough to learn
something (200 steps at 32 px), scored by kNN on mni_anatomy (which random
weights do not pass) and on the mini corpus's modality (which they do):

  python -m biovfm_jax.sweep --sweep=configs/sweeps/tiny.py --root=/tmp/sweep_tiny
  python -m biovfm_jax.analysis fit --results=/tmp/sweep_tiny/results.csv --out=/tmp/fit_tiny

Each grid point runs twice (`seeds = 2`; `--seeds=N` changes it), so the fit's
intervals and the axis effects come from repeated runs: 16 runs, 7 minutes on
2 idle cores. What it shows: README, "Run the scaling study" (a size effect on
mni_anatomy, none on the saturated mini_modality, none of the data subset).

Short-run settings, not the recipes': the lr warms up over 20 of the 200
steps; DINOv2's teacher momentum starts at 0.9 (not 0.992, under which the
teacher, the evaluated backbone, would barely leave its initialisation in
200 steps) and its temperature warms up over 40 steps. Results land in
/tmp/sweep_tiny/results.csv (biovfm_jax/results.py).
"""
import ml_collections

from configs.sweeps import common


def get_config(arg=None):
  del arg
  s = common.get_config()
  s.name = "tiny"
  s.seeds = 2
  s.overrides = ml_collections.ConfigDict({
      "image_size": 32, "batch_size": 32, "num_train_steps": 200, "steps_per_epoch": 20,
      "log_every_steps": 50, "image_every_steps": 0,
      "model": {"patch_size": 8},
      "optim": {"warmup_epochs": 1},
      "checkpoint": {"every_steps": 200, "async_save": False},
      # The quickstarts' in-training evaluator: the sweep scores the final step.
      "evals": {}})
  s.axes = (
      # Custom sizes, labelled so (results column model_size); ~8x apart in parameters.
      ("model_size", {
          "w32": {"model.width": 32, "model.depth": 2, "model.num_heads": 2,
                  "model.mlp_dim": 64},
          "w96": {"model.width": 96, "model.depth": 4, "model.num_heads": 3,
                  "model.mlp_dim": 192}}),
      ("objective", {
          "mae": {"config": "configs/quickstart.py", "mae.decoder_width": 32,
                  "mae.decoder_depth": 1, "mae.decoder_heads": 2},
          "dinov2": {"config": "configs/quickstart_dinov2.py", "dinov2.head_hidden": 64,
                     "dinov2.head_bottleneck": 32, "dinov2.num_prototypes": 256,
                     "dinov2.n_local_crops": 2, "data.local_crop_size": 16,
                     "dinov2.teacher_momentum": 0.9,
                     "dinov2.warmup_teacher_temp_epochs": 2}}),
      # All of mini, or only its MR and CT records (mixture weights: no files).
      ("data_subset", {
          "mini": {"data.shards": "mini"},
          "mini_mr_ct": {"data.shards": "mini", "data.mixture.weights": "MR:1,CT:1"}}),
      ("modality_subset", {"all": {}}),
  )
  s.eval.config = "configs/eval/mini.py"
  s.eval.protocol = "knn"  # no head to train: the scores move only with the encoder
  s.eval.overrides = ml_collections.ConfigDict({
      "benchmarks": "anatomy,mini", "image_size": 64,
      "features": {"batch_size": 512, "read_threads": 0}})
  s.emit.slurm = ("--nodes=1", "--gpus-per-node=1")
  s.emit.tpu_pod = ("--zone=us-central2-b", "--accelerator=v4-8", "--spot")
  return s
