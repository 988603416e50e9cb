"""Evaluators that score the backbone while it pretrains (as big_vision's
registry): each entry of `config.evals` is a whole evaluation config (the keys
of configs/eval/common.py) plus `every_steps`, built in the training config by

  c.evals.knn_mini = common.eval_entry("knn", every_steps=500, benchmarks="mini",
                                       image_size=64, knn=dict(k=20))

so every key evaluate.py accepts is declared, and settable from the command
line (`--config.evals.knn_mini.knn.k=10`). Entries are checked when the run
starts, before anything compiles. Scores are logged as
`eval/<name>/<benchmark>/auc` (and acc, and the mean over benchmarks).

With `at_start` (the default) an entry also scores the weights the run starts
from, at step 0 (random, or the model it continues from), and every later
score is shown against it: `auc_gain` / `acc_gain` in TensorBoard, and on the
console

  eval knn_mini, step 300: mni_anatomy kNN ACC 41.4 (init) -> 55.2, AUC 83.9 (init) -> 90.2

A resumed run reads the step-0 scores back from metrics.jsonl.
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
    self.at_start = bool(self.config.get("at_start", True))
    self.init: dict[str, float] | None = None  # the step-0 scalars, once known
    self._splits = {}

  def due(self, step: int) -> bool:
    return step % self.every_steps == 0 if step else self.at_start

  def restore_init(self, row: dict) -> None:
    """The step-0 scores of a resumed run (its metrics.jsonl row), if it has them."""
    prefix = f"eval/{self.name}/"
    init = {k: float(v) for k, v in row.items() if k.startswith(prefix)
            and not k.endswith("_gain")}
    self.init = init or None

  def run(self, encoder: Encoder, step: int) -> dict[str, float]:
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
    if step == 0:
      self.init = dict(scalars)
    elif self.init:
      scalars.update({f"{k}_gain": v - self.init[k] for k, v in list(scalars.items())
                      if k in self.init})
    logging.info("eval %s, step %d%s: %s (%.0f s)", self.name, step,
                 " (the starting weights)" if step == 0 else "",
                 "; ".join(self.summary(bench, scalars) for bench in self.benchmarks),
                 time.perf_counter() - t0)
    return scalars

  def summary(self, bench: str, scalars: dict[str, float]) -> str:
    """'mni_anatomy kNN ACC 41.4 (init) -> 55.2, AUC 83.9 (init) -> 90.2':
    ACC beside AUC (an easy benchmark saturates AUC first), each from its
    step-0 value when there is one."""
    protocol = {"knn": "kNN", "fast": "linear", "biovfm": "linear"}.get(
        self.config.protocol, self.config.protocol)
    parts = []
    for metric in ("acc", "auc"):
      key = f"eval/{self.name}/{bench}/{metric}"
      now = f"{100 * scalars[key]:.1f}"
      if self.init and key in self.init and f"{key}_gain" in scalars:
        now = f"{100 * self.init[key]:.1f} (init) -> {now}"
      parts.append(f"{metric.upper()} {now}")
    return f"{bench} {protocol} {', '.join(parts)}"


def build_evaluators(config) -> list[Evaluator]:
  return [Evaluator(name, entry) for name, entry in config.evals.items()]


def backbone_encoder(objective, state, mesh, rules) -> Encoder:
  """The objective's backbone inside a train state, as an Encoder on the training mesh."""
  tree = {"params": state.params, "extra": state.extra}
  for key in objective.backbone_path:
    tree = tree[key]
  return Encoder(objective.encoder_config, tree, mesh=mesh, rules=rules)
