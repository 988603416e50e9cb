"""Fields every evaluation config shares; see configs/eval/medmnist_linear.py."""
import os

import ml_collections


def get_config(protocol: str):
  c = ml_collections.ConfigDict()
  c.protocol = protocol              # biovfm | fast | knn | finetune
  c.checkpoint = ""                  # workdir of main.py or of an import (--checkpoint)
  c.step = -1                        # -1: the latest finished step
  c.name = ""                        # the run's column in reports; default: checkpoint folder
  c.benchmarks = "all"               # 'all', 'mini' or MedMNIST flags: 'derma,breast'
  c.image_size = 224                 # which MedMNIST+ files: 28, 64, 128 or 224
  # Size fed to the encoder; None: image_size if the patch divides it, else the encoder's.
  c.input_size = ml_collections.FieldReference(None, field_type=int | None)
  # The documented cache: $BIOVFM_DATA, else ~/.cache/biovfm_jax (made absolute
  # where the config enters: biovfm_jax/evaluate/runner.expand_paths).
  c.npz_dir = os.path.join(os.environ.get("BIOVFM_DATA", "~/.cache/biovfm_jax"), "medmnist")
  c.download = False                 # fetch missing npz files from MedMNIST's servers
  c.data_dir = os.path.join(os.environ.get("BIOVFM_DATA", "~/.cache/biovfm_jax"), "tfds")
  c.out_dir = ""                     # report folder (--out_dir)
  c.cache_dir = ""                   # feature cache; default <out_dir>/features
  # The results store (biovfm_jax/results.py): file (--results) gets one row per
  # benchmark and metric. The labels default to what the checkpoint records: run to
  # config.name, model_size to the run's model size (else "w<width>d<depth>"),
  # data_subset to its shards ("unknown" for imports), modality_subset to its
  # mixture weights ("all": none).
  # finished_only: refuse a checkpoint before its run's last step (sweeps set it).
  c.results = ml_collections.ConfigDict({
      "file": "", "run": "", "model_size": "", "data_subset": "", "modality_subset": "",
      "finished_only": False})
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # Runtime overrides of the saved encoder (bf16 compute, attention kernel ...).
  c.encoder = ml_collections.ConfigDict({
      "dtype": "float32",
      "attention_impl": ml_collections.FieldReference(None, field_type=str | None)})
  # read_threads: image decoding ahead of the encoder (0: in the calling thread).
  c.features = ml_collections.ConfigDict({"batch_size": 256, "cache": True, "read_threads": 2})
  # The head, PAPER.md's reference settings.
  c.probe = ml_collections.ConfigDict({
      "pool": "mean_patch", "batch_size": 128, "epochs": 100, "lr": 1e-2,
      "weight_decay": 0.0, "seed": 42, "bootstrap": 0, "stochastic_encoder": False})
  c.knn = ml_collections.ConfigDict({"k": 20, "temperature": 0.07, "bootstrap": 0})
  # MAE's fine-tuning recipe (ViT-B values; L: layer_decay 0.75, drop_path 0.2, 50 epochs).
  c.finetune = ml_collections.ConfigDict({
      "batch_size": 128, "epochs": 100, "warmup_epochs": 5, "base_lr": 5e-4,
      "lr_batch_base": 256, "min_lr": 1e-6, "weight_decay": 0.05, "layer_decay": 0.65,
      "drop_path_rate": 0.1, "label_smoothing": 0.1, "b1": 0.9, "b2": 0.999,
      "grad_clip_norm": 0.0, "pool": "mean_patch", "seed": 0, "bootstrap": 0,
      # train/optim.py's other fields, as the fine-tuning recipe sets them
      "lr_scaling": "linear", "eps": 1e-8, "patch_embed_lr_mult": 1.0,
      "weight_decay_end": ml_collections.FieldReference(None, field_type=float | None),
      "freeze_last_layer_epochs": 0, "freeze_pattern": "", "freeze_blocks": 0,
      "freeze_blocks_steps": ml_collections.FieldReference(None, field_type=int | None)})
  return c

