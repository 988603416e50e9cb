"""Continued DINOv2 pretraining from the public ViT-B/14 (configs/continue_base.py).

  python -m biovfm_jax.interop import --format=dinov2 --src=dinov2_vitb14_pretrain.pth --out=/ckpt/dinov2_b14
  python main.py --config=configs/continue_dinov2_b14.py --workdir=/runs/continue_dinov2_b14 \
      --config.init_from=/ckpt/dinov2_b14 --config.data.shards=/data/my_archive/
"""
from configs import continue_base


def get_config(arg=None):
  del arg
  return continue_base.dinov2("B")
