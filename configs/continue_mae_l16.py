"""Continued MAE pretraining from the public ViT-L/16 (configs/continue_base.py).

  python -m biovfm_jax.interop import --format=mae --src=mae_visualize_vit_large.pth --out=/ckpt/mae_l16 --model=L
  python main.py --config=configs/continue_mae_l16.py --workdir=/runs/continue_mae_l16 \
      --config.init_from=/ckpt/mae_l16 --config.data.shards=/data/my_archive/
"""
from configs import continue_base


def get_config(arg=None):
  del arg
  return continue_base.mae("L")
