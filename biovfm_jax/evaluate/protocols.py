"""Scoring one encoder on benchmarks with one protocol, from an eval config.

  biovfm    the reference linear probe (PAPER.md), augmented images every epoch
  fast      the same head on cached features
  knn       weighted kNN on cached features
  finetune  the whole encoder, MAE's fine-tuning recipe

Used by evaluate.py and by the evaluators that run during pretraining.
"""
from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np

from biovfm_jax.evaluate import features as feat_lib
from biovfm_jax.evaluate import knn as knn_lib
from biovfm_jax.evaluate import linear_probe
from data_pipeline.errors import ConfigError
from data_pipeline import eval_loader
from data_pipeline.readers import medmnist

PROTOCOLS = ("biovfm", "fast", "knn", "finetune")
MINI = "mini_modality"
ANATOMY = "mni_anatomy"
BUILT_IN = (MINI, ANATOMY)  # built offline from installed packages, no download


def benchmark_names(spec) -> list[str]:
  """'all' | 'mini' | 'anatomy' | comma list of MedMNIST flags ('dermamnist' or 'derma')."""
  items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
  names = []
  for item in (s.strip().lower() for s in items if s.strip()):
    if item == "all":
      names += list(medmnist.FLAGS)
    elif item in ("mini", MINI):
      names.append(MINI)
    elif item in ("anatomy", ANATOMY):
      names.append(ANATOMY)
    elif item in medmnist.FLAGS or item + "mnist" in medmnist.FLAGS:
      names.append(item if item in medmnist.FLAGS else item + "mnist")
    else:
      raise ConfigError(f"config.benchmarks: {item!r} is not a benchmark; use 'all', "
                       f"'mini', 'anatomy' or MedMNIST flags {list(medmnist.FLAGS)}")
  if not names:
    raise ConfigError("config.benchmarks is empty")
  return list(dict.fromkeys(names))


def load_splits(benchmark: str, config) -> dict:
  return {s: eval_loader.load_split(benchmark, s, size=int(config.image_size),
                                    data_dir=config.data_dir,
                                    npz_dir=config.npz_dir or None,
                                    download=bool(config.download))
          for s in ("train", "val", "test")}


def _features(encoder, splits, config, names):
  fc = config.features
  cache = config.cache_dir if fc.cache else None
  return {s: feat_lib.cached(encoder, splits[s], cache, batch_size=int(fc.batch_size),
                             how=config.probe.pool, image_size=input_size(encoder, config),
                             read_threads=int(fc.read_threads))
          for s in names}


def input_size(encoder, config) -> int:
  """The size images are fed at: config.input_size if set; else the stored
  size (config.image_size) when the patch size divides it, as the reference
  probes MedMNIST+ at 224 whatever size the encoder was trained at; else the
  encoder's own size (e.g. 28 px images for a patch-16 encoder)."""
  if config.input_size:
    return int(config.input_size)
  if int(config.image_size) % encoder.config.patch_size == 0:
    return int(config.image_size)
  return int(encoder.config.image_size)


def run_protocol(encoder, splits: dict, config) -> dict:
  protocol = config.protocol
  labels = {s: splits[s].labels for s in splits}
  if protocol == "fast":
    f = _features(encoder, splits, config, ("train", "val", "test"))
    return linear_probe.probe_fast(f["train"], labels["train"], f["val"], labels["val"],
                                   f["test"], labels["test"], splits["train"], config.probe)
  if protocol == "biovfm":
    f = _features(encoder, splits, config, ("val", "test"))
    return linear_probe.probe_biovfm(encoder, splits["train"], f["val"], labels["val"],
                                     f["test"], labels["test"], config.probe,
                                     image_size=input_size(encoder, config))
  if protocol == "knn":
    f = _features(encoder, splits, config, ("train", "test"))
    return knn_lib.knn_eval(f["train"], labels["train"], f["test"], labels["test"],
                            splits["train"], config.knn)
  if protocol == "finetune":
    from biovfm_jax.evaluate import finetune
    return finetune.finetune(encoder, splits, config.finetune,
                             image_size=input_size(encoder, config))
  raise ConfigError(f"config.protocol={protocol!r} is unknown; known: {PROTOCOLS}")


def evaluate_encoder(encoder, config, scores_dir: str | None = None) -> dict[str, dict]:
  """benchmark -> {"auc", "acc", ...} for every benchmark of the config.
  With `scores_dir`, each benchmark's test labels and scores are kept there
  (<benchmark>.npz) so any metric can be recomputed later."""
  results = {}
  for name in benchmark_names(config.benchmarks):
    t0 = time.perf_counter()
    splits = load_splits(name, config)
    result = run_protocol(encoder, splits, config)
    result["seconds"] = time.perf_counter() - t0
    scores = result.pop("test_scores")
    if scores_dir and jax.process_index() == 0:
      os.makedirs(scores_dir, exist_ok=True)
      tmp = os.path.join(scores_dir, f".{name}.tmp.npz")
      np.savez(tmp, labels=splits["test"].labels, scores=scores, task=splits["test"].task)
      os.replace(tmp, os.path.join(scores_dir, f"{name}.npz"))
    results[name] = result
    logging.info("%s (%s): AUC %.2f  ACC %.2f  (%.0f s)", name, config.protocol,
                 100 * result["auc"], 100 * result["acc"], result["seconds"])
  return results
