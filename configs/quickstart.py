"""Quickstart: a small MAE ViT on the built-in "mini" corpus; ~5 minutes on 2 CPU cores.

  python main.py --config=configs/quickstart.py --workdir=/tmp/quickstart
  tensorboard --logdir=/tmp/quickstart

The same program and recipe as configs/vit_*_mae.py, only smaller: 64 px
images, patch 8, a 4-layer encoder and a 2-layer decoder.
"""
from configs import common, mae_base


def get_config(arg=None):
  del arg
  c = mae_base.get_config(size=None)
  c.image_size = 64
  c.model.patch_size = 8
  c.model.width = 128
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.mlp_dim = 512
  c.model.dtype = "float32"  # bf16 matmuls are emulated, so slower, on most CPUs
  c.data.num_workers = 0  # on a CPU the cores train the model: no worker processes
  c.mae.decoder_width = 96
  c.mae.decoder_depth = 2
  c.mae.decoder_heads = 4

  c.batch_size = 64
  c.num_train_steps = 300
  c.optim.base_lr = 1.5e-4 * 8  # small batch, short run: a higher base rate
  c.optim.warmup_epochs = 1
  c.steps_per_epoch = 30

  c.log_every_steps = 10
  c.checkpoint.every_steps = 50
  c.image_every_steps = 100
  # kNN on the built-in benchmarks, logged as eval/knn_mini/*, from step 0 on:
  # mni_anatomy (random weights score ~46% ACC there) and the mini corpus's
  # modality (saturated from the start: random weights score ~99% AUC).
  c.evals.knn_mini = common.eval_entry("knn", every_steps=150, benchmarks="anatomy,mini",
                                       image_size=64)
  return c
