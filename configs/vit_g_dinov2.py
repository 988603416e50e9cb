"""DINOv2 ViT-g/14, the reference recipe (PAPER.md).

  python main.py --config=configs/vit_g_dinov2.py --workdir=/tmp/vit_g_dinov2 \
      --config.data.shards=/data/biovfm21m/
"""
from configs import dinov2_base


def get_config(arg=None):
  del arg
  return dinov2_base.get_config("g")
