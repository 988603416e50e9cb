"""Evaluators that score the backbone while it pretrains (as big_vision's
registry): each entry of `config.evals` names a protocol and how often.

  config.evals.knn_mini = dict(type="knn", every_steps=500, benchmarks="mini",
                               image_size=64, knn=dict(k=20))

Every key besides `type` and `every_steps` overrides the evaluation config of
that protocol (configs/eval/common.py), so whatever evaluate.py accepts works
here. Unknown keys fail when the run starts, before anything compiles.
Scores are logged as `eval/<name>/<benchmark>/auc` (and acc, and the mean
over benchmarks).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from biovfm_jax.evaluate import protocols
from biovfm_jax.evaluate.encoder import Encoder
from configs.eval import common as eval_common
from data_pipeline.errors import ConfigError
from data_pipeline.readers import medmnist


class Evaluator:

  def __init__(self, name: str, entry: dict):
    entry = dict(entry)
    self.name = name
    kind = entry.pop("type", None)
    if kind not in protocols.PROTOCOLS:
      raise ConfigError(f"config.evals.{name}.type={kind!r}; known: {protocols.PROTOCOLS}")
    self.every_steps = int(entry.pop("every_steps", 0))
    if self.every_steps <= 0:
      raise ConfigError(f"config.evals.{name}.every_steps must be a positive integer")
    self.config = eval_common.get_config(kind)
    self.config.features.cache = False   # the features change as the model trains
    # Decode in the training thread: reader threads started anew at each evaluation
    # left glibc malloc arenas behind, ~50-100 MB of host memory per evaluation.
    self.config.features.read_threads = 0
    self.config.lock()                   # nested update, unknown keys refused
    try:
      self.config.update(entry)
    except (KeyError, AttributeError) as e:
      raise ConfigError(f"config.evals.{name}: unknown key {e}") from None
    eval_common.expand_paths(self.config)  # its default cache is under '~'
    self.benchmarks = protocols.benchmark_names(self.config.benchmarks)
    if self.config.image_size not in medmnist.SIZES:  # the stored sizes, mini's too
      raise ConfigError(f"config.evals.{name}.image_size={self.config.image_size}: the "
                       f"benchmarks are stored at {medmnist.SIZES}")
    self._splits = {}

  def due(self, step: int) -> bool:
    return step % self.every_steps == 0

  def run(self, encoder: Encoder) -> dict[str, float]:
    t0 = time.perf_counter()
    scalars = {}
    for bench in self.benchmarks:
      if bench not in self._splits:
        self._splits[bench] = protocols.load_splits(bench, self.config)
      result = protocols.run_protocol(encoder, self._splits[bench], self.config)
      del result["test_scores"]
      for metric in ("auc", "acc"):
        scalars[f"eval/{self.name}/{bench}/{metric}"] = float(result[metric])
    for metric in ("auc", "acc"):
      scalars[f"eval/{self.name}/mean/{metric}"] = float(np.mean(
          [scalars[f"eval/{self.name}/{b}/{metric}"] for b in self.benchmarks]))
    logging.info("eval %s: mean AUC %.2f (%.0f s)", self.name,
                 100 * scalars[f"eval/{self.name}/mean/auc"], time.perf_counter() - t0)
    return scalars


def build_evaluators(config) -> list[Evaluator]:
  evals = config.evals
  return [Evaluator(name, entry.to_dict() if hasattr(entry, "to_dict") else entry)
          for name, entry in evals.items()]


def backbone_encoder(objective, state, mesh, rules) -> Encoder:
  """The objective's backbone inside a train state, as an Encoder on the training mesh."""
  tree = {"params": state.params, "extra": state.extra}
  for key in objective.backbone_path:
    tree = tree[key]
  return Encoder(objective.encoder_config, tree, mesh=mesh, rules=rules)
