"""A sweep definition (configs/sweeps/*.py) expanded into runs: each run's
pretraining and evaluation configs, built and checked before anything runs,
and the main.py / evaluate.py command lines that give the same configs."""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import re
import string

import ml_collections

from data_pipeline import storage
from data_pipeline.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Axes whose labels fill the results store's columns of the same names.
LABEL_AXES = ("model_size", "data_subset", "modality_subset")
_LABEL = re.compile(r"[A-Za-z0-9][\w.+-]*")
EVAL_PREFIX = "eval."


class SweepError(ConfigError):
  """A sweep definition that cannot run; one line naming the sweep, axis and key."""


@dataclasses.dataclass
class Run:
  """One point of the grid."""
  name: str
  labels: dict[str, str]          # axis -> label
  config_file: str                # repository-relative where it lies in the repository
  eval_file: str                  # the evaluation config file, likewise
  overrides: dict                 # dotted pretraining key -> value (sweep's, then axes')
  eval_overrides: dict            # dotted eval key -> value
  config: ml_collections.ConfigDict = None       # the pretraining config, overrides applied
  eval_config: ml_collections.ConfigDict = None  # the evaluation config (not resolved)

  def label(self, axis: str) -> str:
    return self.labels.get(axis, "")


class _Label(str):
  """An axis label in a config file template: "{model_size:lower}" lower-cases."""

  def __format__(self, spec):
    if spec in ("lower", "upper"):
      return getattr(str(self), spec)()
    return super().__format__(spec)


def find_file(path: str, where: str) -> str:
  """A config file named in a sweep: as given (from the working directory),
  else relative to the repository; repository files come back relative to it
  (so job commands work in a copy of the repository elsewhere)."""
  spec, sep, arg = path.partition(":")
  for candidate in (storage.expand(spec), os.path.join(REPO, spec)):
    if os.path.isfile(candidate):
      full = os.path.abspath(candidate)
      rel = os.path.relpath(full, REPO)
      return (full if rel.startswith("..") else rel) + sep + arg
  raise SweepError(f"{where}: no config file {spec!r} (looked in {os.getcwd()} and {REPO})")


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """get_config(arg) of a config file "file.py[:arg]" (as config_flags loads it)."""
  spec, _, arg = path.partition(":")
  full = spec if os.path.isabs(spec) else os.path.join(REPO, spec)
  name = "_sweep_config_" + re.sub(r"\W", "_", os.path.relpath(full, REPO))
  module_spec = importlib.util.spec_from_file_location(name, full)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _flatten(overrides, prefix: str = "") -> dict:
  """Nested dicts / ConfigDicts -> dotted keys (dotted keys pass as given)."""
  items = overrides.items() if overrides is not None else ()
  out = {}
  for key, value in items:
    if isinstance(value, (dict, ml_collections.ConfigDict)) and value:
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value.to_dict() if isinstance(
          value, ml_collections.ConfigDict) else value
  return out


def _fill(value, fields: dict, where: str):
  """"{data_root}" / "{root}" in a string override."""
  if not isinstance(value, str) or "{" not in value:
    return value
  names = [f for _, f, _, _ in string.Formatter().parse(value) if f]
  for field in names:
    if field not in fields:
      raise SweepError(f"{where}: {{{field}}} is not known; use {sorted(fields)}")
    if not fields[field]:
      flag = "--sweep.data_root=DIR" if field == "data_root" else f"--{field}=DIR"
      raise SweepError(f"{where} uses {{{field}}}: pass {flag}")
  return value.format(**fields)


def apply_overrides(config, overrides: dict, where: str) -> None:
  """Sets dotted keys of `config` in place; unknown keys and values of the
  wrong type fail in one line naming `where` and the key."""
  for key, value in overrides.items():
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise SweepError(f"{where}: no config key {key!r}"
                         + (f" ({'.'.join(parts[:i]) or 'the config'} has no {part!r})"
                            if i else ""))
      if i < len(parts) - 1:
        node = node[part]
    try:
      node[parts[-1]] = value
    except (TypeError, ValueError, KeyError) as e:
      raise SweepError(f"{where}: {key}={value!r}: {' '.join(str(e).split())}") from None


def _axes(sweep, where: str) -> list[tuple[str, dict]]:
  axes = []
  for entry in sweep.axes:
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2
            and isinstance(entry[1], dict) and entry[1]):
      raise SweepError(f"{where}.axes: each axis is (name, {{label: overrides}}), got "
                       f"{entry!r:.80}")
    name, values = entry
    if not _LABEL.fullmatch(str(name)) or name in [a for a, _ in axes]:
      raise SweepError(f"{where}.axes: axis name {name!r} is not a unique word")
    for label, overrides in values.items():
      if not _LABEL.fullmatch(str(label)):
        raise SweepError(f"{where}: axis {name!r} label {label!r}: use letters, digits and "
                         "'_', '.', '+', '-'")
      if not isinstance(overrides, dict):
        raise SweepError(f"{where}: axis {name!r} value {label!r}: overrides must be a dict")
    axes.append((str(name), values))
  if not axes:
    raise SweepError(f"{where}.axes is empty: nothing to run")
  return axes


def _excluded(labels: dict, exclude, axes, where: str) -> bool:
  known = dict(axes)
  out = False
  for entry in exclude:
    for axis, label in dict(entry).items():
      if axis not in known or label not in known[axis]:
        raise SweepError(f"{where}.exclude: no axis {axis!r} with label {label!r}")
    out = out or all(labels[a] == l for a, l in dict(entry).items())
  return out


def seeds_of(sweep, where: str) -> int:
  """The sweep's `seeds` (1 where a definition lacks the field): a positive int."""
  seeds = sweep.get("seeds", 1)
  if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
    raise SweepError(f"{where}: seeds={seeds!r}: the number of runs per grid point must be "
                     "a positive integer")
  return seeds


def expand(sweep, *, root: str = "", sweep_file: str = "sweep") -> list[Run]:
  """The runs of a sweep ConfigDict, each config built with its overrides applied
  (every key checked: SweepError names the axis, label and key). With
  `sweep.seeds` = N > 1 each grid point runs N times, named "<name>-s0" ..
  "<name>-s{N-1}" with the pretraining override seed=0 .. N-1 and the same
  labels: the analysis reads runs with equal labels and N as replicates."""
  where = f"sweep {sweep.name or sweep_file}"
  axes = _axes(sweep, where)
  seeds = seeds_of(sweep, where)
  eval_file = find_file(sweep.eval.config, f"{where}.eval.config")
  fields = {"data_root": storage.expand(sweep.data_root) or "", "root": root}
  points = []  # per grid point, its runs (one per seed)
  for combo in itertools.product(*[list(values.items()) for _, values in axes]):
    labels = {axis: str(label) for (axis, _), (label, _) in zip(axes, combo)}
    if _excluded(labels, sweep.exclude, axes, where):
      continue
    config_file, overrides = sweep.config, {}
    eval_overrides = {"protocol": sweep.eval.protocol}
    sources = {"eval.protocol": f"{where}.eval.protocol"}  # key -> where it was set
    for key, value in _flatten(sweep.overrides).items():
      overrides[key] = _fill(value, fields, f"{where}.overrides.{key}")
      sources[key] = f"{where}.overrides"
    for key, value in _flatten(sweep.eval.overrides).items():
      eval_overrides[key] = _fill(value, fields, f"{where}.eval.overrides.{key}")
      sources[EVAL_PREFIX + key] = f"{where}.eval.overrides"
    for (axis, _), (label, values) in zip(axes, combo):
      at = f"{where}: axis {axis!r} value {label!r}"
      for key, value in _flatten(values).items():
        if key == "config":
          config_file = value
        elif key.startswith(EVAL_PREFIX):
          eval_overrides[key[len(EVAL_PREFIX):]] = _fill(value, fields, at)
          sources[key] = at
        else:
          overrides[key] = _fill(value, fields, at)
          sources[key] = at
    if not config_file:
      raise SweepError(f"{where}: no pretraining config: set the sweep's `config` or a "
                       "`config` key in an axis value")
    try:
      config_file = config_file.format(**{a: _Label(l) for a, l in labels.items()})
    except (KeyError, ValueError) as e:
      raise SweepError(f"{where}: config file template {config_file!r}: {e}") from None
    name = "-".join(labels.values())
    replicates = [(name, overrides)]
    if seeds > 1:
      if "seed" in overrides:  # two sources for one key: refuse to guess which wins
        raise SweepError(f"{sources['seed']}: sets seed, and seeds={seeds} sets it per "
                         "replicate; drop one")
      replicates = [(f"{name}-s{k}", {**overrides, "seed": k}) for k in range(seeds)]
      sources["seed"] = f"{where}.seeds"
    point = []
    config_file = find_file(config_file, where)  # once per point, not per replicate
    for run_name, run_overrides in replicates:
      run = Run(run_name, labels, config_file, eval_file, run_overrides,
                dict(eval_overrides))
      run.config = load_config_file(run.config_file)
      for key, value in run_overrides.items():
        apply_overrides(run.config, {key: value}, f"{sources[key]} ({run.config_file})")
      run.eval_config = load_config_file(eval_file)
      for key, value in eval_overrides.items():
        apply_overrides(run.eval_config, {key: value},
                        f"{sources[EVAL_PREFIX + key]} (evaluation config)")
      apply_overrides(run.eval_config, eval_labels(run), f"{where} (results labels)")
      point.append(run)
    points.append(point)
  if not points:
    raise SweepError(f"{where}: every run is excluded")
  # Seed-major: seed 0 of every point first, so a stopped sweep holds the whole
  # grid once before any repeat.
  return [point[k] for k in range(seeds) for point in points]


# --- Command lines: the same configs through main.py's and evaluate.py's flags.

def flag_value(value) -> str:
  """A config value as config_flags parses it back."""
  if isinstance(value, (tuple, list)):
    return "(" + ", ".join(repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  if isinstance(value, dict) and not value:
    return "{}"  # an emptied dict field (config_flags parses it back), e.g. evals
  if isinstance(value, dict):
    raise SweepError(f"{value!r}: a dict cannot be passed as one flag; set its keys")
  return str(value)


def _config_flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={flag_value(v)}" for k, v in overrides.items()]


def paths(root: str, run: Run) -> dict[str, str]:
  return {"workdir": storage.join(root, "runs", run.name),
          "eval_dir": storage.join(root, "evals", run.name)}


def eval_labels(run: Run) -> dict:
  """results.* keys of a run's evaluation: its name and axis labels."""
  labels = {"results.run": run.name, "results.finished_only": True}
  for axis in LABEL_AXES:
    if run.label(axis):
      labels[f"results.{axis}"] = run.label(axis)
  return labels


def train_args(root: str, run: Run) -> list[str]:
  return [f"--config={run.config_file}", f"--workdir={paths(root, run)['workdir']}",
          *_config_flags(run.overrides)]


def eval_args(root: str, run: Run, results: str) -> list[str]:
  p = paths(root, run)
  return [f"--config={run.eval_file}", f"--checkpoint={p['workdir']}", f"--out_dir={p['eval_dir']}",
          f"--results={results}", *_config_flags(run.eval_overrides),
          *_config_flags(eval_labels(run))]
