"""MAE ViT-H/14, the stock recipe (batch 4096, 800 epochs).

  python main.py --config=configs/vit_h_mae.py --workdir=/tmp/vit_h_mae \
      --config.data.shards=/data/biovfm21m/
"""
from configs import mae_base


def get_config(arg=None):
  del arg
  return mae_base.get_config("H")
