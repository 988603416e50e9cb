"""Weighted kNN (cosine, T=0.07, k=20) on the 12 MedMNIST benchmarks.

  python evaluate.py --config=configs/eval/medmnist_knn.py \
      --checkpoint=/tmp/vit_b_mae --out_dir=/tmp/eval/vit_b_mae_knn --config.knn.k=50
"""
from configs.eval import common


def get_config(arg=None):
  del arg
  return common.get_config("knn")
