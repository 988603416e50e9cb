"""Evaluates one checkpoint from an eval config: the body of evaluate.py,
importable by tests, benchmarks and notebooks."""
from __future__ import annotations

import json
import os

from absl import logging

from data_pipeline import storage
from data_pipeline.errors import ConfigError

# An eval config's path fields (configs/eval/common.py).
PATH_KEYS = ("checkpoint", "npz_dir", "data_dir", "out_dir", "cache_dir")


def expand_paths(config) -> None:
  """'~' and relative paths of an eval config made absolute in place, once,
  where the config enters (evaluate.py, the evaluators run in pretraining)."""
  with config.unlocked():
    for key in PATH_KEYS:
      config[key] = storage.expand(config[key])
    config.results.file = storage.expand(config.results.file)


def resolve_config(config, *, checkpoint=None, benchmarks=None, image_size=None,
                   out_dir=None, results=None):
  """Applies the flags and fills the defaults; fails on a bad config before
  anything is loaded."""
  from biovfm_jax.evaluate import protocols
  from data_pipeline.readers import medmnist
  with config.unlocked():
    for key, value in (("checkpoint", checkpoint), ("benchmarks", benchmarks),
                       ("image_size", image_size), ("out_dir", out_dir)):
      if value is not None:
        config[key] = value
    if results is not None:
      config.results.file = results
    expand_paths(config)  # once, here: '~' expanded, relative made absolute
    if not config.checkpoint:
      raise ConfigError("config.checkpoint is empty: pass --checkpoint=DIR")
    if not config.out_dir:
      raise ConfigError("config.out_dir is empty: pass --out_dir=DIR")
    config.cache_dir = config.cache_dir or os.path.join(config.out_dir, "features")
    config.name = config.name or os.path.basename(config.checkpoint.rstrip("/"))
  if config.protocol == "segmentation":  # configs/eval/segmentation_linear.py
    from biovfm_jax.evaluate import segmentation
    segmentation.check_config(config)
    return config
  if config.protocol not in protocols.PROTOCOLS:
    raise ConfigError(f"config.protocol={config.protocol!r}; known: "
                      f"{protocols.PROTOCOLS + ('segmentation',)}")
  names = protocols.benchmark_names(config.benchmarks)
  if any(n not in protocols.BUILT_IN for n in names) and config.image_size not in medmnist.SIZES:
    raise ConfigError(f"config.image_size={config.image_size}: MedMNIST+ comes in "
                     f"{medmnist.SIZES}")
  return config


def run(config) -> dict:
  import jax
  from biovfm_jax import sharding as shd
  from biovfm_jax.evaluate import protocols, report
  from biovfm_jax.evaluate.encoder import load_encoder
  from biovfm_jax.train import checkpoint as ckpt_lib

  step_dir = ckpt_lib.find_step_dir(config.checkpoint,
                                    None if config.step < 0 else config.step)
  run_facts = ckpt_lib.read_run(step_dir)
  step, total = ckpt_lib.progress(step_dir, run_facts)
  if config.results.finished_only and total is not None and step < total:
    raise ConfigError(f"{step_dir} is step {step} of its run's {total}: the run has not "
                      "finished (config.results.finished_only); nothing evaluated")
  encoder = load_encoder(step_dir, mesh=shd.make_mesh(dict(config.mesh)),
                         **dict(config.encoder))
  logging.info("Encoder %s: %s parameters, %s, %d device(s)", encoder.source,
               f"{encoder.num_params:,}", encoder.config.width, jax.device_count())
  if config.protocol == "segmentation":
    return _run_segmentation(config, encoder, step)
  results = protocols.evaluate_encoder(encoder, config,
                                       scores_dir=os.path.join(config.out_dir, "scores"))
  meta = {"checkpoint": encoder.source, "protocol": config.protocol,
          "image_size": int(config.image_size),
          "input_size": protocols.input_size(encoder, config),
          "parameters": encoder.num_params}
  if jax.process_index() == 0:
    _write_outputs(config, report.write_report(results, config.out_dir, name=config.name,
                                               meta=meta, step=step))
    if config.results.file:
      _append_results(config, results, run_facts, encoder, step)
  return results


def _run_segmentation(config, encoder, step: int) -> dict:
  """The linear segmentation probe (biovfm_jax/evaluate/segmentation.py):
  report.md/.csv/.json, per-benchmark folders, TensorBoard scalars and the
  overlay sheets."""
  import jax
  from biovfm_jax.evaluate import protocols, report, segmentation
  results, sheets = segmentation.evaluate_encoder(encoder, config, out_dir=config.out_dir)
  meta = {"checkpoint": encoder.source, "protocol": config.protocol,
          "layers": config.head.layers, "augment": bool(config.head.augment),
          "image_size": int(config.image_size),
          "input_size": protocols.input_size(encoder, config),
          "parameters": encoder.num_params}
  if jax.process_index() == 0:
    _write_outputs(config, report.write_segmentation_report(
        results, config.out_dir, name=config.name, meta=meta, step=step, images=sheets))
  return results


def _write_outputs(config, paths: dict) -> None:
  """The eval config beside the report, and the report on stdout."""
  with open(os.path.join(config.out_dir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f, indent=1, default=str)
  with open(paths["md"]) as f:
    print(f.read())


def _append_results(config, results: dict, run_facts: dict, encoder, step: int) -> None:
  """The evaluation's rows into the results store config.results.file; labels
  the config leaves empty come from the checkpoint's run facts."""
  from biovfm_jax import results as results_lib
  labels = config.results
  enc = encoder.config
  mixture = run_facts.get("data_mixture") or ""
  rows = results_lib.evaluation_rows(
      results, run=labels.run or config.name, run_facts=run_facts,
      checkpoint=encoder.source, step=step, protocol=config.protocol,
      params_encoder=encoder.num_params,
      model_size=labels.model_size or run_facts.get("model_size") or
      f"w{enc.width}d{enc.depth}",
      data_subset=labels.data_subset or str(run_facts.get("data_shards") or "unknown"),
      modality_subset=labels.modality_subset or mixture or "all")
  n = results_lib.append(config.results.file, rows)
  logging.info("Appended %d rows to %s", n, config.results.file)
