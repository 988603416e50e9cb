"""DINOv3's high-resolution adaptation stage for a ViT-B DINOv2 run (configs/high_res_base.py).

  python main.py --config=configs/high_res_vit_b.py --workdir=/runs/vit_b_dinov2_hr \
      --config.init_from=/runs/vit_b_dinov2 --config.data.shards=/data/corpus
"""
from configs import high_res_base


def get_config(arg=None):
  del arg
  return high_res_base.get_config("B")
