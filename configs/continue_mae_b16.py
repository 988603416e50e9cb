"""Continued MAE pretraining from the public ViT-B/16 (configs/continue_base.py).

  python -m biovfm_jax.interop import --format=mae --src=mae_visualize_vit_base.pth --out=/ckpt/mae_b16 --model=B
  python main.py --config=configs/continue_mae_b16.py --workdir=/runs/continue_mae_b16 \
      --config.init_from=/ckpt/mae_b16 --config.data.shards=/data/my_archive/
"""
from configs import continue_base


def get_config(arg=None):
  del arg
  return continue_base.mae("B")
