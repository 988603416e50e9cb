"""Evaluators that score the backbone while it pretrains (as big_vision's
registry): each entry of `config.evals` is a whole evaluation config (the keys
of configs/eval/common.py) plus `every_steps`, built in the training config by

  c.evals.knn_mini = common.eval_entry("knn", every_steps=500, benchmarks="mini",
                                       image_size=64, knn=dict(k=20))

so every key evaluate.py accepts is declared, and settable from the command
line (`--config.evals.knn_mini.knn.k=10`). Entries are checked when the run
starts, before anything compiles. Scores are logged as
`eval/<name>/<benchmark>/auc` (and acc, and the mean over benchmarks).
"""
from __future__ import annotations

import copy
import logging
import time

import ml_collections
import numpy as np

from biovfm_jax.evaluate import protocols, runner
from biovfm_jax.evaluate.encoder import Encoder
from data_pipeline.errors import ConfigError
from data_pipeline.readers import medmnist


class Evaluator:

  def __init__(self, name: str, entry: ml_collections.ConfigDict):
    if not isinstance(entry, ml_collections.ConfigDict) or "protocol" not in entry:
      raise ConfigError(f"config.evals.{name} is not an evaluation config: build it with "
                        "configs.common.eval_entry(protocol, every_steps=N, ...)")
    self.name = name
    self.config = copy.deepcopy(entry)  # expand_paths writes to it
    if self.config.protocol not in protocols.PROTOCOLS:
      raise ConfigError(f"config.evals.{name}.protocol={self.config.protocol!r}; "
                        f"known: {protocols.PROTOCOLS}")
    self.every_steps = int(self.config.every_steps)
    if self.every_steps <= 0:
      raise ConfigError(f"config.evals.{name}.every_steps must be a positive integer")
    runner.expand_paths(self.config)  # its default cache is under '~'
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
  return [Evaluator(name, entry) for name, entry in config.evals.items()]


def backbone_encoder(objective, state, mesh, rules) -> Encoder:
  """The objective's backbone inside a train state, as an Encoder on the training mesh."""
  tree = {"params": state.params, "extra": state.extra}
  for key in objective.backbone_path:
    tree = tree[key]
  return Encoder(objective.encoder_config, tree, mesh=mesh, rules=rules)
