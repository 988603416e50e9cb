"""The BioVFM-21M scaling study (../shared/PAPER.md): ViT-T/S/B/L x MAE, DINOv2
x data subsets (ultrasound only, 0.2M, all 21M) x modality mixture, each run
with its stock recipe (configs/vit_<size>_<objective>.py) and scored on the
12 MedMNIST benchmarks at 224 px with the fast linear probe.

The data subsets live in the corpus folder you pass (a folder written by
python -m data_pipeline.ingest --catalog=biovfm21m, local or gs://); make
them once, as the catalog defines them (data_pipeline/catalog/biovfm21m.toml,
[subsets]: us_only is the three single-modality ultrasound sources, 0.2M a
seeded draw stratified by source):

  python -m data_pipeline.selection --shards=/data/biovfm21m --named=us_only,0.2M

then plan, and run (locally one run after another, or one job per run):

  python -m biovfm_jax.sweep --sweep=configs/sweeps/biovfm21m.py --root=/runs/biovfm21m \
      --sweep.data_root=/data/biovfm21m --dry_run
  python -m biovfm_jax.sweep --sweep=configs/sweeps/biovfm21m.py --root=/shared/biovfm21m \
      --sweep.data_root=/shared/biovfm21m_corpus --emit=slurm

The modality axis reweights the corpus by modality (config.data.mixture); its
"balanced" value names the single-modality sources of PAPER.md's corpus table:
adapt the names to those your corpus's manifest.json lists. The MedMNIST+ files
are fetched once (eval.overrides download=True) into $BIOVFM_DATA/medmnist.
"""
import ml_collections

from configs.sweeps import common

_BALANCED = ",".join(f"{m}:1" for m in ("CT", "MR", "microscopy", "X-ray", "dermoscopy",
                                         "endoscopy", "fundus", "ultrasound"))


def get_config(arg=None):
  del arg
  s = common.get_config()
  s.name = "biovfm21m"
  s.config = "configs/vit_{model_size:lower}_{objective}.py"
  s.axes = (
      ("model_size", {"T": {}, "S": {}, "B": {}, "L": {}}),
      ("objective", {"mae": {}, "dinov2": {}}),
      ("data_subset", {
          "us_only": {"data.shards": "{data_root}/subsets/us_only.subset.json"},
          "0.2M": {"data.shards": "{data_root}/subsets/0.2M.subset.json"},
          "all": {"data.shards": "{data_root}"}}),
      ("modality_subset", {"all": {}, "balanced": {"data.mixture.weights": _BALANCED}}),
  )
  # Ultrasound only has one modality to balance.
  s.exclude = ({"data_subset": "us_only", "modality_subset": "balanced"},)
  s.eval.config = "configs/eval/medmnist_linear.py"
  s.eval.overrides = ml_collections.ConfigDict({"image_size": 224, "download": True})
  s.emit.slurm = ("--nodes=1", "--gpus-per-node=8", "--time=2-00:00:00")
  s.emit.tpu_pod = ("--zone=us-east5-a", "--accelerator=v5p-64", "--spot")
  return s
