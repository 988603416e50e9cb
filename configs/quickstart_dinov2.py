"""Quickstart for DINOv2: a small ViT on the built-in "mini" corpus, on a laptop CPU.

  python main.py --config=configs/quickstart_dinov2.py --workdir=/tmp/quickstart_dinov2

The reference recipe (configs/dinov2_base.py) scaled down: 48 px global and
24 px local crops, patch 8, a 4-layer 96-wide encoder, 4 local crops and 1,024
prototypes; an "epoch" is 50 steps so the schedules play out in 300 steps.
"""
from configs import common, dinov2_base


def get_config(arg=None):
  del arg
  c = dinov2_base.get_config(size=None)
  c.image_size = 48
  c.model.patch_size = 8
  c.model.width = 96
  c.model.depth = 4
  c.model.num_heads = 3
  c.model.mlp_dim = 384
  c.model.drop_path_rate = 0.1
  # At this size DINOv2's own init (LayerScale 1e-5, cls token ~1e-6) makes the
  # cls output nearly image-independent, and with centering the teacher stays
  # uniform for the whole short run. MAE's init without LayerScale lets it
  # learn within a few hundred steps; the full-size configs keep the recipe.
  c.model.init = "mae"
  c.model.layerscale_init = None
  c.model.dtype = "float32"  # bf16 matmuls are emulated, so slower, on most CPUs
  c.data.num_workers = 0  # on a CPU the cores train the model: no worker processes
  c.dinov2.head_hidden = 256
  c.dinov2.head_bottleneck = 64
  c.dinov2.num_prototypes = 1024
  c.dinov2.n_local_crops = 4
  c.data.local_crop_size = 24

  c.batch_size = 64
  c.num_train_steps = 300
  c.steps_per_epoch = 50
  c.optim.warmup_epochs = 1
  c.dinov2.warmup_teacher_temp_epochs = 2

  c.log_every_steps = 10
  c.checkpoint.every_steps = 50
  c.image_every_steps = 100
  # kNN on the built-in benchmarks from step 0 on (see configs/quickstart.py),
  # on the teacher's class token, as DINO's own kNN evaluation.
  c.evals.knn_mini = common.eval_entry("knn", every_steps=150, benchmarks="anatomy,mini",
                                       image_size=64, probe={"pool": "cls"})
  return c
