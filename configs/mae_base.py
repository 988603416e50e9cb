"""The MAE recipe of He et al. (PAPER.md), over configs/common.py.

Not run directly: the thin per-size files (vit_b_mae.py, ...) set the size.
"""
from ml_collections import config_dict

from configs import common


def get_config(size: str | None = "B") -> config_dict.ConfigDict:
  c = common.get_config(size)
  c.objective = "mae"

  c.mae = config_dict.ConfigDict()
  c.mae.mask_ratio = 0.75
  c.mae.decoder_width = 512
  c.mae.decoder_depth = 8
  c.mae.decoder_heads = 16
  c.mae.decoder_mlp_dim = config_dict.placeholder(int | None)  # None: 4 x decoder_width
  c.mae.norm_pix_loss = True

  c.data.crops = "single"
  c.data.crop_scale = (0.2, 1.0)    # random resized crop, bicubic
  c.data.hflip = True

  c.batch_size = 4096
  c.total_epochs = 800
  c.optim.base_lr = 1.5e-4          # lr = base_lr * batch_size / 256
  c.optim.lr_batch_base = 256
  c.optim.lr_scaling = "linear"
  c.optim.min_lr = 0.0
  c.optim.warmup_epochs = 40
  c.optim.weight_decay = 0.05       # none on biases, norms; tokens decay (models.layers.no_decay)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  return c
