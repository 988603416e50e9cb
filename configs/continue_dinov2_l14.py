"""Continued DINOv2 pretraining from the public ViT-L/14 (configs/continue_base.py).

  python -m biovfm_jax.interop import --format=dinov2 --src=dinov2_vitl14_pretrain.pth --out=/ckpt/dinov2_l14
  python main.py --config=configs/continue_dinov2_l14.py --workdir=/runs/continue_dinov2_l14 \
      --config.init_from=/ckpt/dinov2_l14 --config.data.shards=/data/my_archive/
"""
from configs import continue_base


def get_config(arg=None):
  del arg
  return continue_base.dinov2("L")
