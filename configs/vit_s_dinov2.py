"""DINOv2 ViT-S/16, the reference recipe (PAPER.md).

  python main.py --config=configs/vit_s_dinov2.py --workdir=/tmp/vit_s_dinov2 \
      --config.data.shards=/data/biovfm21m/
"""
from configs import dinov2_base


def get_config(arg=None):
  del arg
  return dinov2_base.get_config("S")
