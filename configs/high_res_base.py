"""DINOv3's high-resolution adaptation stage, scaled to our sizes: a short
stage that continues a DINOv2 (or DINOv3-architecture) run at larger crops,
with Gram anchoring to the run itself seen at larger crops still.

Not run directly: high_res_vit_b.py and high_res_vit_l.py set the size. Values
are dinov3's configs/train/dinov3_vit7b16_high_res_adapt.yaml, with its crop
sizes scaled from its 256 px pretraining to our 224 px (x 7/8, to multiples of
16): global crops 448 or 672 px, local 96 to 288 px, Gram crops 1.5x the
global, drawn per step with its ratios. Each crop-size group compiles its own
step program once (the log counts them). The stage starts from a run's EMA
teacher, its DINO/iBOT heads (init_from takes them beside the backbone) and
the same checkpoint as the frozen Gram teacher:

  python main.py --config=configs/high_res_vit_b.py --workdir=/runs/vit_b_dinov2_hr \
      --config.init_from=/runs/vit_b_dinov2 --config.data.shards=/data/corpus

The model keys must be the run's (config.init_from refuses a mismatch); for a
DINOv3-architecture run add its --config.model.pos_embed=rope
--config.model.key_bias=False ...: RoPE needs nothing for the larger grids, a
learned table is resized to each.
"""
from ml_collections import config_dict

from configs import dinov2_base


def get_config(size: str | None = "B") -> config_dict.ConfigDict:
  c = dinov2_base.get_config(size)
  c.data.global_crop_sizes = (448, 672, 672, 672, 672)   # dinov3: 512, 768 x 4
  c.data.local_crop_sizes = (96, 96, 144, 192, 288)      # dinov3: 112, 112, 168, 224, 336
  c.data.gram_crop_sizes = (672, 1008, 1008, 1008, 1008)  # dinov3: 768, 1152 x 4
  c.data.crop_size_ratios = (0.3, 0.3, 0.3, 0.05, 0.05)  # dinov3's
  c.data.gram_crop_size = 672       # the base size (the AOT fit check uses the largest)
  c.data.gram_no_distortions = True  # dinov3's

  g = c.dinov2.gram
  g.use_loss = True
  g.ckpt = c.get_ref("init_from")   # the run being adapted is its own Gram teacher
  g.rep_update = False              # dinov3's: a fixed Gram teacher for the stage
  g.img_level = True                # dinov3's
  g.loss_weight = 1.5               # dinov3's (its schedule is constant at 1.5)

  c.dinov2.teacher_momentum = 0.999  # dinov3's: constant
  c.dinov2.teacher_momentum_end = 0.999
  c.dinov2.warmup_teacher_temp = 0.07  # dinov3's: constant teacher temperature
  c.dinov2.warmup_teacher_temp_epochs = 0

  c.steps_per_epoch = 1000          # dinov3's OFFICIAL_EPOCH_LENGTH for this stage
  c.total_epochs = 30               # dinov3's: 30,000 steps
  # dinov3's lr rises from 0 to 1.25e-5 over 10 epochs (a cosine), then stays:
  # here linearly (our warmup), then a "cosine" from the peak to the same floor.
  c.optim.base_lr = 1.25e-5         # at batch 1024 (sqrt scaling, as dinov2_base)
  c.optim.min_lr = 1.25e-5
  c.optim.warmup_epochs = 10
  c.optim.weight_decay = 0.04       # dinov3's: constant
  c.optim.weight_decay_end = 0.04
  c.optim.layer_decay = 0.98        # dinov3's layerwise_decay
  c.optim.grad_clip_norm = 30.0     # dinov3's clip_grad
  c.optim.b2 = 0.99                 # dinov3's adamw_beta2
  c.optim.freeze_last_layer_epochs = 0
  return c
