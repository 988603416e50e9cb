"""The two built-in benchmarks, offline, 64 px: mni_anatomy (the plane and
level of MNI152 slices; random weights score ~41% kNN ACC, pretraining must
earn more) and mini_modality (the modality of the mini corpus's images: CT,
MR, microscopy ...; saturated, random weights already score ~99% AUC).

  python main.py --config=configs/quickstart.py --workdir=/tmp/quickstart
  python evaluate.py --config=configs/eval/mini.py --checkpoint=/tmp/quickstart \
      --out_dir=/tmp/eval/quickstart

Any protocol works: --config.protocol=biovfm|fast|knn|finetune.
"""
from configs.eval import common


def get_config(arg=None):
  del arg
  c = common.get_config("fast")
  c.benchmarks = "anatomy,mini"
  c.image_size = 64
  c.probe.epochs = 30
  c.probe.batch_size = 64
  c.finetune.epochs = 5
  c.finetune.warmup_epochs = 1
  c.finetune.batch_size = 64
  return c
