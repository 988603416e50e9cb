"""Ahead-of-time fit check (biovfm_jax/aot.py): TPU topologies compiled here
through libtpu (the `tpu` extra), and the analytic GPU estimate."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from biovfm_jax import aot
from configs import quickstart, quickstart_dinov2, vit_g_dinov2, vit_l_mae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  return subprocess.run([sys.executable, "-m", "biovfm_jax.aot", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)


# --- Topology names -------------------------------------------------------------

@pytest.mark.parametrize("name, topology, chip_config, host_bounds, devices", [
    ("v5e-4", "v5e:2x2", "default", (2, 2, 1), 4),
    ("v5litepod-8", "v5e:2x4", "default", (2, 4, 1), 8),
    ("v5e-1", "v5e:1x1", "default", (1, 1, 1), 1),
    ("v5e-256", "v5e:16x16", "default", (2, 2, 1), 256),
    ("v6e-64", "v6e:8x8", "default", (2, 2, 1), 64),
    ("v4-8", "v4:2x2x1", "megacore", (2, 2, 1), 4),
    ("v4-128", "v4:4x4x4", "megacore", (2, 2, 1), 64),
    ("v5p-16", "v5p:2x2x2", "megacore", (2, 2, 1), 8),
    ("v5p-64", "v5p:2x4x4", "megacore", (2, 2, 1), 32),
    ("v5p-256", "v5p:4x4x8", "megacore", (2, 2, 1), 128),
    ("v5p-512", "v5p:4x8x8", "megacore", (2, 2, 1), 256),
    ("v5p-8192", "v5p:16x16x16", "megacore", (2, 2, 1), 4096),
    ("v5p:4x4x12", "v5p:4x4x12", "megacore", (2, 2, 1), 192),
    ("v6e:8x16", "v6e:8x16", "default", (2, 2, 1), 128),
])
def test_topology_names_map_to_libtpu_arguments(name, topology, chip_config, host_bounds,
                                                devices):
  t = aot.parse_topology(name)
  assert (t.platform, t.topology_name, t.chip_config_name, t.chips_per_host_bounds,
          t.num_devices) == ("tpu", topology, chip_config, host_bounds, devices)


@pytest.mark.parametrize("name", ["v5p-100", "v5p-4", "v5e-3", "v5e-512", "v7-8", "tpu",
                                  "v5e:2x2x2", "v5p:4x4", "h100", "h100-0", "v5p-256x"])
def test_bad_topology_names_list_the_supported_forms(name):
  with pytest.raises(ValueError, match=r"--topology="):
    aot.parse_topology(name)


def test_libtpu_accepts_the_mapped_topologies():
  """Each form the docstring documents gives libtpu's devices of the right kind
  and count (no compile: cheap)."""
  for name in ("v5e-4", "v5e-8", "v6e-4", "v4-8", "v5p-8", "v5p-256", "v5p:4x4x12"):
    t = aot.parse_topology(name)
    devices = aot.tpu_devices(t)
    assert len(devices) == t.num_devices, name
    assert devices[0].device_kind == t.device_kind, name
  two = aot.tpu_devices(aot.parse_topology("v5p-16", num_slices=2))
  assert len(two) == 16 and {d.slice_index for d in two} == {0, 1}


# --- TPU: compile for v5e-4 -----------------------------------------------------

def test_quickstart_fits_on_v5e_4():
  config = quickstart.get_config()
  t = aot.parse_topology("v5e-4")
  r = aot.check_tpu(config, t, num_records=1000, mfus=(0.4, 0.5))
  assert r["fits"] and r["num_devices"] == 4 and r["mesh"]["data"] == 4
  assert r["device_kind"] == "TPU v5 lite" and r["hbm_capacity_bytes"] == 16 * 2 ** 30
  m = r["memory_bytes"]
  assert r["peak_hbm_bytes"] == m["xla_peak"] > 0
  assert r["allocated_bytes"] == (m["arguments"] + m["outputs"] + m["temporaries"]
                                  - m["aliased"])
  # Data parallel: every device holds all params and both Adam moments.
  params_bytes = 4 * r["params"]
  assert r["state_bytes_per_device"]["params"] == params_bytes
  assert r["peak_hbm_bytes"] > 3 * params_bytes
  assert r["peak_hbm_bytes"] < 2 ** 30  # a 1M-param model at batch 16 per device
  assert m["aliased"] >= 3 * params_bytes  # the donated state is updated in place
  flops = r["flops_per_step"]
  assert flops > 0 and 0.5 < r["xla_flops_per_step"] / flops < 2
  assert r["predicted_step_s"]["0.4"] == pytest.approx(flops / (4 * 197e12 * 0.4))
  assert r["predicted_step_s"]["0.5"] < r["predicted_step_s"]["0.4"]
  assert r["compile_s"] > 0


def test_cli_reports_a_non_fitting_config_with_the_compilers_message():
  """ViT-g DINOv2 data parallel on v5e-4: params, Adam moments and the EMA
  teacher alone (19.5 GB per chip) exceed a v5e's 16 GiB. (A big batch of a
  small model is no sure failure: XLA rematerialises to fit when it can.)"""
  out = _cli("--config=configs/vit_g_dinov2.py", "--topology=v5e-4",
             "--config.batch_size=8", "--json")
  assert out.returncode == 3, out.stderr[-2000:]
  assert "Does not fit: RESOURCE_EXHAUSTED" in out.stderr
  # What it was doing, as it did it (g scans its layers by default).
  for line in ("lowering the train step", "layers scanned",
               "compiling the train step for 4 x TPU v5 lite", "does not fit"):
    assert line in out.stderr, line
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["fits"] is False and "RESOURCE_EXHAUSTED" in report["error"]
  assert report["topology"] == "v5e-4" and report["batch_per_device"] == 2
  state = sum(report["state_bytes_per_device"].values())
  assert state > report["hbm_capacity_bytes"] and report["params"] > 1e9


def test_cli_bad_topology_is_one_clear_line():
  out = _cli("--config=configs/quickstart.py", "--topology=v5p-100")
  assert out.returncode == 2
  errors = [l for l in out.stderr.splitlines() if l.startswith("Error:")]
  assert len(errors) == 1 and "v5p:4x4x12" in errors[0] and "Traceback" not in out.stderr


def test_bad_config_names_the_key():
  t = aot.parse_topology("v5e-4")
  config = quickstart.get_config()
  config.mesh.fsdp = 3
  with pytest.raises(ValueError, match=r"config\.mesh"):
    aot.check_tpu(config, t, num_records=1000)
  config = quickstart.get_config()
  with pytest.raises(ValueError, match=r"config\.mesh\.slices=1 .*--config\.mesh\.slices=2"):
    aot.check_tpu(config, aot.parse_topology("v5e-4", num_slices=2), num_records=1000)


def test_two_slices_compile_with_the_hybrid_mesh():
  """2 x v5e-4 over DCN: data parallel across slices, FSDP inside each."""
  config = quickstart.get_config()
  config.mesh.update(data=1, fsdp=4, slices=2)
  r = aot.check_tpu(config, aot.parse_topology("v5e-4", num_slices=2), num_records=1000)
  assert r["fits"] and r["num_devices"] == 8 and r["mesh"]["data"] == 2
  assert r["batch_per_device"] == 8
  # FSDP over 4: a quarter of the params per device (the few odd-sized leaves aside).
  assert r["state_bytes_per_device"]["params"] < 0.3 * 4 * r["params"]


def test_batch_specs_match_the_loaders_examples():
  """The abstract batch has the shapes and dtypes of data_pipeline's batches."""
  from data_pipeline import loader, multicrop
  config = quickstart_dinov2.get_config()
  specs = aot.batch_specs(config, None)
  views = multicrop.MultiCrop(**{k: config.data[k] for k in loader._MULTICROP_FIELDS})
  example = views(np.random.default_rng(0).integers(0, 255, (80, 70), np.uint8),
                  np.random.default_rng(1))
  for k, v in example.items():
    assert specs[k].shape == (config.batch_size, *v.shape) and specs[k].dtype == v.dtype, k
  assert specs["skipped"].shape == (config.batch_size,) and specs["skipped"].dtype == np.int32
  single = aot.batch_specs(quickstart.get_config(), None)
  assert single["image"].shape == (64, 64, 64, 3) and single["image"].dtype == np.uint8


def test_batch_spec_is_what_the_loader_yields():
  """loader.batch_spec, which the fit check compiles with, against a real batch
  of each recipe's loader (the built-in mini corpus)."""
  from data_pipeline import loader
  for module in (quickstart, quickstart_dinov2):
    data = module.get_config().data
    batch = next(loader.make_pretrain_loader(data, global_batch_size=4, seed=0,
                                             process_index=0, process_count=1))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == loader.batch_spec(data, 4)


# --- GPU: the analytic estimate -------------------------------------------------

def _gpu(config, name="h100-64", **mesh):
  config.mesh.update(mesh)
  return aot.estimate_gpu(config, aot.parse_topology(name))


def _big(module, **model):
  config = module.get_config()
  config.model.update(scan_layers=True, **model)
  return config


def test_mesh_sizes_resolve_as_make_mesh_does():
  from biovfm_jax import sharding as shd
  for shape in ({"data": -1}, {"data": 2, "fsdp": -1}, {"data": 1, "fsdp": 2, "tensor": -1},
                {"data": 2, "fsdp": 2, "tensor": 2}):
    mesh = shd.make_mesh(shape, jax.devices()[:8])
    sizes = aot._mesh_sizes(shape, 8)
    assert {k: sizes[k] for k in shd.MESH_AXES} == dict(mesh.shape), shape
  with pytest.raises(ValueError, match="config.mesh"):
    aot._mesh_sizes({"data": 3}, 8)


def test_gpu_estimate_scales_with_the_mesh_and_batch():
  base = _gpu(_big(vit_l_mae, remat_policy="full"), data=1, fsdp=64)
  mb = base["memory_bytes"]
  # Doubling FSDP halves params, gradients and Adam moments per device (all but
  # the few replicated leaves, such as the flat qkv biases).
  wide = _gpu(_big(vit_l_mae, remat_policy="full"), "h100-128", data=1, fsdp=128)
  for k in ("params", "gradients", "opt_state"):
    assert wide["memory_bytes"][k] == pytest.approx(mb[k] / 2, rel=0.05), k
  # ... and the batch per device, so the activations (but for the compute-dtype
  # copies of a layer's weights).
  assert wide["memory_bytes"]["activations_encoder"] == pytest.approx(
      mb["activations_encoder"] / 2, rel=0.1)
  # Pure data parallel holds everything: 4 bytes per param, twice for Adam.
  dp = _gpu(_big(vit_l_mae, remat_policy="full"), data=-1, fsdp=1)
  assert dp["memory_bytes"]["params"] == pytest.approx(4 * dp["params"], rel=0.01)
  assert dp["memory_bytes"]["opt_state"] == pytest.approx(8 * dp["params"], rel=0.01)
  assert "fsdp_gather" not in dp["memory_bytes"]
  # A bigger batch needs more activations, in proportion.
  config = _big(vit_l_mae, remat_policy="full")
  config.batch_size *= 2
  double = _gpu(config, data=1, fsdp=64)
  assert double["memory_bytes"]["activations_decoder"] == pytest.approx(
      2 * mb["activations_decoder"], rel=0.1)
  assert double["peak_hbm_bytes"] > base["peak_hbm_bytes"]
  # Saving less for backward needs less memory.
  acts = lambda r: sum(v for k, v in r["memory_bytes"].items()  # noqa: E731
                       if k.startswith("activations"))
  by_policy = [acts(_gpu(_big(vit_l_mae, remat_policy=p), data=1, fsdp=64))
               for p in ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "full")]
  assert by_policy == sorted(by_policy, reverse=True) and by_policy[0] > 3 * by_policy[-1]
  # Tensor parallelism splits what has a heads or FFN-hidden axis (same batch
  # per device: 128).
  one = _gpu(_big(vit_l_mae, remat_policy="none"), "h100-32", data=1, fsdp=32)
  two = _gpu(_big(vit_l_mae, remat_policy="none"), "h100-64", data=1, fsdp=32, tensor=2)
  assert one["batch_per_device"] == two["batch_per_device"] == 128
  ratio = acts(two) / acts(one)
  assert 0.5 < ratio < 0.9
  # Analytic FLOPs and step time follow the batch and the GPU count.
  assert double["flops_per_step"] == pytest.approx(2 * base["flops_per_step"])
  assert wide["predicted_step_s"]["0.4"] == pytest.approx(base["predicted_step_s"]["0.4"] / 2)


def test_gpu_estimate_dinov2_counts_the_teacher_and_tensor_parallelism():
  r = _gpu(_big(vit_g_dinov2, remat_policy="full"), "h100-128", data=1, fsdp=128)
  # The EMA teacher is a second copy of the params, plus the two replicated
  # float32 centers over the 131,072 prototypes.
  assert r["memory_bytes"]["extra"] == r["memory_bytes"]["params"] + 2 * 131072 * 4
  t2 = _gpu(_big(vit_g_dinov2, remat_policy="full"), "h100-128", data=1, fsdp=64, tensor=2)
  # Tensor parallelism splits the prototypes' logits; the batch per device doubles.
  assert t2["memory_bytes"]["activations_heads"] == pytest.approx(
      r["memory_bytes"]["activations_heads"])
  assert t2["batch_per_device"] == 2 * r["batch_per_device"]


def test_gpu_estimate_that_does_not_fit():
  config = _big(vit_g_dinov2, remat_policy="none")
  with pytest.raises(aot.DoesNotFit, match="exceeds the usable") as e:
    _gpu(config, "h100-8", data=1, fsdp=8)
  assert e.value.report["fits"] is False
  assert e.value.report["peak_hbm_bytes"] > e.value.report["usable_bytes"]


# --- One builder ----------------------------------------------------------------

def test_the_fit_check_takes_its_steps_and_state_from_loop_build(monkeypatch):
  """The GPU estimate reports what loop.build makes: a change inside build (its
  step count, the optimiser it makes) changes the answer, with nothing in aot.py
  to keep in step."""
  from biovfm_jax.train import loop

  def estimate(**kw):
    config = quickstart.get_config()
    config.update(num_train_steps=None, steps_per_epoch=None, total_epochs=2)
    return aot.estimate_gpu(config, aot.parse_topology("h100-8"), num_records=6400, **kw)

  base = estimate()
  assert (base["steps_per_epoch"], base["total_steps"]) == (100, 200)  # 6400 // 64, x 2
  assert base["predicted_run_s"]["0.4"] == pytest.approx(200 * base["predicted_step_s"]["0.4"])
  # Build with 3x the steps, and an optimiser with one more params-sized moment.
  monkeypatch.setattr(loop, "step_counts", lambda config, n: (100, 600))
  make = loop.optim.make_optimizer
  monkeypatch.setattr(loop.optim, "make_optimizer", lambda *a, **k: optax.chain(
      make(*a, **k), optax.trace(decay=0.9)))
  changed = estimate()
  assert changed["total_steps"] == 600
  assert changed["predicted_run_s"]["0.4"] == pytest.approx(3 * base["predicted_run_s"]["0.4"])
  assert changed["memory_bytes"]["opt_state"] == pytest.approx(
      1.5 * base["memory_bytes"]["opt_state"], rel=1e-3)
  assert changed["peak_hbm_bytes"] - base["peak_hbm_bytes"] == (
      changed["memory_bytes"]["opt_state"] - base["memory_bytes"]["opt_state"])


def test_gpu_estimate_refuses_a_multi_slice_mesh():
  config = quickstart.get_config()
  config.mesh.update(data=4, slices=2)
  with pytest.raises(ValueError, match=r"config\.mesh\.slices=2 but the target has 1"):
    aot.estimate_gpu(config, aot.parse_topology("h100-8"))


def test_progress_heartbeat_speaks_while_a_call_is_silent(capsys):
  import time
  say = aot._Progress(every_s=0.01)
  seen = ""
  with say.heartbeat("compiling"):
    for _ in range(3000):  # until the heartbeat thread has spoken (not a timing check)
      time.sleep(0.01)
      seen += capsys.readouterr().err
      if "still compiling" in seen:
        break
  assert "] " in seen and "still compiling:" in seen
