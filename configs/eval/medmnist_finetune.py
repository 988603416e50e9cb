"""Full fine-tuning on the MedMNIST benchmarks, MAE's recipe (layer-wise lr
decay, drop path, label smoothing, warmup + cosine).

  python evaluate.py --config=configs/eval/medmnist_finetune.py \
      --checkpoint=/tmp/vit_b_mae --out_dir=/tmp/eval/vit_b_mae_ft --benchmarks=derma,breast
"""
from configs.eval import common


def get_config(arg=None):
  del arg
  return common.get_config("finetune")
