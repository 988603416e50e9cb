"""Configs are the only defaults: every key a training run reads is declared in
every config of its objective, and every key an evaluation reads in every
eval config, so each can be set from the command line.

A run records each key the code reads (attribute, item or `get`) while it
builds and trains two steps, or evaluates a checkpoint with each protocol; a
`get` of an undeclared key (a hidden default in the code) fails the test, and
so does a read key that some config file lacks."""
import glob
import os

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from biovfm_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
EVAL_CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "eval", "*.py"))
                      if os.path.basename(p) not in ("common.py", "__init__.py"))


def _paths(config, prefix=""):
  """id(ConfigDict) -> its dotted path, for every ConfigDict under `config`."""
  out = {id(config): prefix}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_paths(value, f"{prefix}{key}."))
  return out


class _Recorder:
  """Patches ConfigDict's reads to record dotted keys (and undeclared `get`s)."""

  def __init__(self, monkeypatch, config):
    self.paths, self.read, self.hidden = _paths(config), set(), set()
    cls = ml_collections.ConfigDict
    getattr_, getitem, get = cls.__getattr__, cls.__getitem__, cls.get
    rec = self

    def note(obj, key):
      where = rec.paths.get(id(obj))
      if where is not None and isinstance(key, str) and not key.startswith("_"):
        rec.read.add(where + key)
      return where

    def patched_getattr(obj, key):
      note(obj, key)
      return getattr_(obj, key)

    def patched_getitem(obj, key):
      note(obj, key)
      return getitem(obj, key)

    def patched_get(obj, key, default=None):
      where = note(obj, key)
      if where is not None and key not in obj:
        rec.hidden.add(where + key)
      return get(obj, key, default)

    monkeypatch.setattr(cls, "__getattr__", patched_getattr)
    monkeypatch.setattr(cls, "__getitem__", patched_getitem)
    monkeypatch.setattr(cls, "get", patched_get)


def _tiny(name):
  from configs import quickstart, quickstart_dinov2
  c = (quickstart if name == "mae" else quickstart_dinov2).get_config()
  c.update_from_flattened_dict({
      "image_size": 32, "model.patch_size": 8, "model.width": 32, "model.depth": 2,
      "model.num_heads": 2, "model.mlp_dim": 64, "batch_size": 16, "num_train_steps": 2,
      "checkpoint.every_steps": 2, "log_every_steps": 1, "image_every_steps": 2})
  if name == "mae":
    c.update_from_flattened_dict({"mae.decoder_width": 32, "mae.decoder_depth": 1,
                                  "mae.decoder_heads": 2})
  else:
    c.update_from_flattened_dict({"dinov2.head_hidden": 64, "dinov2.head_bottleneck": 32,
                                  "dinov2.num_prototypes": 128, "dinov2.n_local_crops": 2,
                                  "data.local_crop_size": 16})
  c.evals = ml_collections.ConfigDict()  # eval configs are checked by their own tests
  return c


def _has(config, dotted):
  node = config
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mae", "dinov2"])
def test_every_key_a_run_reads_is_declared_in_every_config(tmp_path, monkeypatch, objective):
  config = _tiny(objective)
  rec = _Recorder(monkeypatch, config)
  loop.train(config, str(tmp_path / "run"))
  monkeypatch.undo()
  assert not rec.hidden, f"keys read with a default in the code, not declared: {rec.hidden}"
  # Containers (e.g. "data") are read on the way to their fields: keep the leaves.
  leaves = {k for k in rec.read if not isinstance(_lookup(config, k), ml_collections.ConfigDict)}
  assert {"optim.eps", "data.crop_ratio", "data.prefetch_buffer"} & leaves  # it did record
  same = [p for p in CONFIGS if _objective_of(p) == objective]
  assert len(same) >= 5
  _check_declared_and_settable(same, config, leaves, at_least=20)


def _check_declared_and_settable(paths, config, leaves, at_least):
  """Each config file declares every read key, and the command line reaches
  them: one override per scalar key, parsed as the binaries parse them."""
  for path in paths:
    c = _load(path)
    missing = sorted(k for k in leaves if not _has(c, k))
    assert not missing, f"{os.path.basename(path)} lacks keys the code reads: {missing}"
  overrides = [f"--config.{k}={_lookup(config, k)}" for k in sorted(leaves)
               if type(_lookup(config, k)) in (int, float, str, bool)]
  argv = ["binary", f"--config={paths[0]}", *overrides]
  fv = flags.FlagValues()
  # config_flags finds the override flags in the argv it is given at definition.
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  assert len(overrides) > at_least
  for arg in overrides:
    key = arg.split("=", 1)[0][len("--config."):]
    assert _lookup(fv.config, key) == _lookup(config, key), arg


@pytest.mark.slow
def test_every_key_an_evaluation_reads_is_declared_in_every_eval_config(tmp_path,
                                                                        monkeypatch):
  import sys
  sys.path.insert(0, os.path.dirname(__file__))
  from test_eval_protocols import eval_config, save_encoder
  from biovfm_jax.evaluate import runner
  from data_pipeline.readers import medmnist
  medmnist.make_synthetic_npz(medmnist.npz_path(tmp_path / "npz", "breastmnist", 28),
                              "breastmnist", 28, counts=(64, 16, 32), seed=1)
  data = {"npz_dir": str(tmp_path / "npz"), "data_dir": str(tmp_path / "tfds")}
  save_encoder(tmp_path / "enc")
  leaves, hidden = set(), set()
  for protocol in ("biovfm", "fast", "knn", "finetune"):
    config = eval_config(protocol, data, str(tmp_path / "enc"), tmp_path / protocol,
                         benchmarks="breastmnist")
    config.probe.epochs = config.finetune.epochs = 1
    rec = _Recorder(monkeypatch, config)
    runner.run(config)
    monkeypatch.undo()
    hidden |= rec.hidden
    leaves |= {k for k in rec.read
               if not isinstance(_lookup(config, k), ml_collections.ConfigDict)}
  assert not hidden, f"keys read with a default in the code, not declared: {hidden}"
  assert {"knn.k", "probe.lr", "finetune.layer_decay", "features.read_threads"} <= leaves
  assert len(EVAL_CONFIGS) >= 4
  _check_declared_and_settable(EVAL_CONFIGS, config, leaves, at_least=15)


def test_the_recorder_sees_a_hidden_default(monkeypatch):
  """The check above can fail: a `get` of an undeclared key is caught."""
  c = ml_collections.ConfigDict({"data": {"shards": "mini"}})
  rec = _Recorder(monkeypatch, c)
  assert c.data.get("prefetch", 2) == 2 and c.data.shards == "mini"
  monkeypatch.undo()
  assert rec.hidden == {"data.prefetch"} and "data.shards" in rec.read


def _lookup(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _load(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _objective_of(path):
  name = os.path.basename(path)
  if name in ("common.py", "__init__.py") or name.endswith("_base.py"):
    return None
  return _load(path).objective  # what the file configures, not what its name says


# --- Optional fields: `--config.<key>=None` sets them back to None (issue 24, item 8).

_SAMPLES = {int: ("7", 7), float: ("2", 2.0), str: ("x", "x")}  # what a value parses to


def _parse(path, *overrides):
  argv = ["binary", f"--config={path}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def _may_be_none(config, prefix=""):
  """dotted key -> declared type, of every field that is None or may be."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_may_be_none(value, f"{prefix}{key}."))
    elif value is None or isinstance(None, config.get_type(key)):
      out[prefix + key] = config.get_type(key)
  return out


@pytest.mark.parametrize("path", [p for p in CONFIGS if _objective_of(p)] + EVAL_CONFIGS,
                         ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "configs")))
def test_every_optional_field_takes_none_and_a_value_on_the_command_line(path):
  optional = _may_be_none(_load(path))
  assert optional  # every config has some (model.width, input_size ...)
  plain = {k: t for k, t in optional.items() if t not in {t | None for t in _SAMPLES}}
  assert not plain, f"declare these as config_dict.placeholder(T | None): {plain}"
  c = _parse(path, *[f"--config.{k}=None" for k in optional])
  assert {k: _lookup(c, k) for k in optional} == dict.fromkeys(optional)
  samples = {k: _SAMPLES[next(t for t in _SAMPLES if t | None == optional[k])]
             for k in optional}
  c = _parse(path, *[f"--config.{k}={text}" for k, (text, _) in samples.items()])
  for key, (_, value) in samples.items():
    assert _lookup(c, key) == value and type(_lookup(c, key)) is type(value), key


def test_a_field_of_plain_type_refuses_none():
  with pytest.raises(flags.IllegalFlagValueError, match="config.image_size=None"):
    _parse(os.path.join(ROOT, "configs", "quickstart.py"), "--config.image_size=None")


def test_layerscale_none_passes_the_run_checks():
  """`--config.model.layerscale_init=None` on a DINOv2 config (1e-5 there): the
  run builds as main.py builds it (config checks, model, optimiser), without
  LayerScale."""
  import jax
  path = os.path.join(ROOT, "configs", "vit_t_dinov2.py")
  for value, has_ls in (("1e-5", True), ("None", False)):
    c = _parse(path, f"--config.model.layerscale_init={value}")
    s = loop.build(c, num_records=4096, evaluators=False)
    names = {jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_leaves_with_path(s.spec.abstract_params)}
    assert any("'ls1'" in n for n in names) == has_ls, value
