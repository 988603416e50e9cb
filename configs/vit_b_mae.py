"""MAE ViT-B/16, the stock recipe (batch 4096, 800 epochs).

  python main.py --config=configs/vit_b_mae.py --workdir=/tmp/vit_b_mae \
      --config.data.shards=/data/biovfm21m/
"""
from configs import mae_base


def get_config(arg=None):
  del arg
  return mae_base.get_config("B")
