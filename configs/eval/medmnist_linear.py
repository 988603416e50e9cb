"""Linear probe on the 12 MedMNIST benchmarks, PAPER.md's reference protocol.

  python evaluate.py --config=configs/eval/medmnist_linear.py \
      --checkpoint=/tmp/vit_b_mae --out_dir=/tmp/eval/vit_b_mae --image_size=224

`--config.protocol=fast` trains the same head on cached features (minutes,
not hours; the same ranking of encoders).
"""
from configs.eval import common


def get_config(arg=None):
  del arg
  return common.get_config("biovfm")
