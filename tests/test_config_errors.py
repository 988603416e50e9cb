"""A mistyped or impossible config fails before compiling: exit code 2, one
line naming the key, no traceback; and a CPU run prints no TPU probe errors
even with libtpu installed (the test extra installs it)."""
import os
import subprocess
import sys

import pytest

from biovfm_jax import sharding as shd
from biovfm_jax.train.validate import validate_config
from configs import quickstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(tmp_path, *flags):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # as a user runs it
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  cmd = [sys.executable, "main.py", "--config=configs/quickstart.py",
         f"--workdir={tmp_path / 'run'}", *flags]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flag,says", [
    ("--config.foo=1", "--config.foo: no such config key"),
    ("--config.model.widht=64", 'no such config key. Did you mean "width"'),
    ("--config.batch_size=abc", "--config.batch_size=abc"),
    ("--config.checkpoint.keep=0", "config.checkpoint.keep=0 must be positive"),
    ("--config.num_train_steps=-5", "config.num_train_steps=-5 must be positive"),
    ("--config.data.shards=/nonexistent", "config.data.shards: /nonexistent does not exist"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, flag, says):
  r = run_main(tmp_path, flag)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  last = [line for line in r.stderr.splitlines() if line.strip()][-1]
  assert says in last, r.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run" / "checkpoints")  # nothing trained
  # No TPU probe on a machine without TPU chips, libtpu installed or not.
  out = (r.stdout + r.stderr).lower()
  assert "libtpu" not in out and "tpu_worker" not in out and "tpu accelerator" not in out


def _config(**overrides):
  c = quickstart.get_config()
  c.update_from_flattened_dict(overrides)  # "a.b" keys, as on the command line
  return c


@pytest.mark.parametrize("key,value", [
    ("checkpoint.every_steps", 0), ("checkpoint.keep", -1), ("batch_size", 0),
    ("num_train_steps", 0), ("steps_per_epoch", 0), ("total_epochs", -1),
    ("log_every_steps", 0), ("image_every_steps", -1), ("optim.warmup_epochs", -1),
    ("optim.base_lr", -1e-3), ("data.num_workers", -1), ("data.read_threads", 0),
])
def test_counts_out_of_range_are_refused(key, value):
  mesh = shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  validate_config(_config(), mesh)  # the quickstart itself passes
  with pytest.raises(ValueError, match=rf"^config\.{key}={value} must be"):
    validate_config(_config(**{key: value}), mesh)


def test_no_steps_at_all_is_refused():
  mesh = shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  with pytest.raises(ValueError, match="config.total_epochs=0 with no config.num_train_steps"):
    validate_config(_config(num_train_steps=None, total_epochs=0), mesh)


def test_dinov2_choices_are_refused_before_compiling():
  """The masks' and the clip's modes: one line naming the key, from build()
  (validate_config and make_optimizer), which runs before any compile."""
  from biovfm_jax.train import loop
  from configs import quickstart_dinov2
  for key, value in (("data.mask_sampling", "often"), ("optim.clip_scope", "layer")):
    c = quickstart_dinov2.get_config()
    c.update_from_flattened_dict({key: value, "evals": {}})
    with pytest.raises(ValueError, match=rf"^config\.{key}='{value}': "):
      loop.build(c, num_records=1000)


def test_missing_inputs_are_named(tmp_path):
  mesh = shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  with pytest.raises(ValueError, match=f"config.data.shards: {tmp_path}/gone does not"):
    validate_config(_config(**{"data.shards": f"mini,{tmp_path}/gone"}), mesh)
  with pytest.raises(ValueError, match=f"config.init_from={tmp_path}/ckpt does not exist"):
    validate_config(_config(init_from=f"{tmp_path}/ckpt"), mesh)
  validate_config(_config(**{"data.shards": f"{tmp_path}/*.array_record"}), mesh)  # globs:
  validate_config(_config(**{"data.shards": "gs://bucket/shards"}), mesh)  # the loader's


def test_skip_absent_tpu_respects_the_user_and_real_chips(tmp_path):
  from biovfm_jax import distributed
  assert not distributed.skip_absent_tpu(env={"JAX_PLATFORMS": ""}, sysfs=str(tmp_path))
  chip = tmp_path / "0000:00:04.0"
  chip.mkdir()
  (chip / "vendor").write_text("0x1ae0\n")  # a Google TPU on the PCI bus
  assert not distributed.skip_absent_tpu(env={}, sysfs=str(tmp_path))
