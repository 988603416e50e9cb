"""Continued pretraining from a public release (README: "Continue from a public
model"): the release's architecture, our recipe for the objective, and a
gentler schedule, since the backbone is trained already.

Not run directly: continue_{dinov2_b14,dinov2_l14,mae_b16,mae_l16}.py. Where
each value comes from is said beside it. RAD-DINO (DINOv2 ViT-B/14 from Meta's
dinov2-base, continued on chest X-rays) lowered the learning rate and shortened
the warmup; its exact values were not at hand offline, so the values marked
"ours" are our choice in that direction, not a published recipe.
"""
from ml_collections import config_dict

from configs import dinov2_base, mae_base


def dinov2(size: str) -> config_dict.ConfigDict:
  """Meta's dinov2_vit{b,l}14 (dinov2_vit*14_pretrain.pth, imported with
  `interop import --format=dinov2`): patch 14, LayerScale, no registers, a
  GELU MLP, a learned 37x37 table (resized to the run's 16x16 grid)."""
  c = dinov2_base.get_config(size)
  c.model.patch_size = 14           # the release
  c.model.ffn = "mlp"               # the release (only g/14 uses SwiGLU)
  c.data.local_crop_size = 98       # the reference recipe for patch 14 (7x7 patches)
  c.optim.base_lr = 2e-4            # the reference's own low lr (its ViT-L/g recipe); ours for B
  c.optim.warmup_epochs = 1         # ours: 1,250 steps, a short warmup for a trained backbone
  c.total_epochs = 25               # ours: 31,250 steps at batch 1024
  c.dinov2.warmup_teacher_temp_epochs = 1  # ours: the teacher is trained already
  c.dinov2.teacher_momentum = 0.994  # the reference's large-model EMA: a slower teacher
  return c


def mae(size: str) -> config_dict.ConfigDict:
  """The official MAE ViT-{B,L}/16 (mae_visualize_vit_*.pth with its decoder,
  `--format=mae`; or the encoder-only mae_pretrain_vit_*.pth, `--format=timm`:
  a fresh decoder). The architecture is MAE's, as configs/mae_base.py."""
  c = mae_base.get_config(size)
  c.optim.warmup_epochs = 5         # ours: MAE's fine-tuning recipe warms up for 5 epochs
  c.total_epochs = 100              # ours: an eighth of the 800-epoch pretraining
  c.optim.base_lr = 1.5e-4 / 4      # ours: a quarter of MAE's pretraining lr
  return c
