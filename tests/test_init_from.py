"""Continued pretraining (config.init_from, biovfm_jax/train/init_from.py):
MAE or DINOv2 from any checkpoint that holds a backbone, imported or ours, of
either objective; mismatches refused before compiling. Tiny widths throughout:
public layouts are built with timm (and the reference MAE decoder's modules)
with random weights, then imported with the real CLI."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from biovfm_jax.interop.__main__ import main as interop_main
from data_pipeline.errors import ConfigError
from test_interop import (MaeDecoder, mae_sincos, numpy_sd, randomize, save, timm_model,
                          to_dinov2_layout, _T)
from test_train_e2e import ROOT, checkpoint_steps, losses

# DINOv2's released ViT-S/14 + 4 registers in its own layout, at T width: a
# 28 px table (2x2 grid), continued at 56 px (4x4).
DINO = ["--config=configs/quickstart_dinov2.py", "--config.image_size=56",
        "--config.data.local_crop_size=28", "--config.model.size=None",
        "--config.model.patch_size=14", "--config.model.width=192",
        "--config.model.depth=2", "--config.model.num_heads=3", "--config.model.mlp_dim=768",
        "--config.model.num_registers=4", "--config.model.layerscale_init=1e-5",
        "--config.dinov2.head_hidden=64", "--config.dinov2.head_bottleneck=32",
        "--config.dinov2.num_prototypes=128", "--config.dinov2.n_local_crops=2",
        "--config.batch_size=8", "--config.log_every_steps=1", "--config.image_every_steps=0",
        "--config.evals={}"]


@pytest.fixture(scope="module")
def imports(tmp_path_factory):
  """{name: workdir} of imports made by `python -m biovfm_jax.interop import`."""
  tmp = tmp_path_factory.mktemp("imports")
  out = {}
  mask = np.random.default_rng(3).normal(size=(1, 192)).astype(np.float32)
  dino = to_dinov2_layout(numpy_sd(timm_model("vit_small_patch14_reg4_dinov2", img_size=28,
                                              **_T)), mask_token=mask)
  timm_enc = timm_model("vit_tiny_patch16_224", img_size=32)
  mae_enc = timm_model("vit_tiny_patch16_224", img_size=32)
  with torch_no_grad():
    mae_enc.pos_embed.copy_(torch_tensor(mae_sincos(192, 2)))
  decoder = randomize(MaeDecoder(192, 64, 1, 4, 4, 16 * 16 * 3), seed=1)
  with torch_no_grad():
    decoder.decoder_pos_embed.copy_(torch_tensor(mae_sincos(64, 2)))
  files = {
      "dinov2": (save(dino, tmp / "dinov2_vits14_reg4.pth"), ["--format=dinov2",
                                                              "--num-heads=3"]),
      "timm": (save(numpy_sd(timm_enc), tmp / "vit_t.safetensors"), ["--format=timm",
                                                                    "--model=T"]),
      "mae_encoder": (save(numpy_sd(mae_enc), tmp / "mae_pretrain_vit_t.pth"),
                      ["--format=timm", "--model=T"]),
      "mae": (save({**numpy_sd(mae_enc), **numpy_sd(decoder)}, tmp / "mae_visualize_t.pth",
                   nest="model"), ["--format=mae", "--model=T", "--decoder-heads=4"]),
  }
  for name, (path, flags) in files.items():
    out[name] = str(tmp / name)
    assert interop_main(["import", *flags, f"--src={path}", f"--out={out[name]}"]) == 0
  return out


def torch_no_grad():
  import torch
  return torch.no_grad()


def torch_tensor(x):
  import torch
  return torch.from_numpy(x)


def _setup(flags, tmp_path, fsdp=False):
  """loop.build of a config given as main.py flags (one device, or all 8
  sharded over fsdp), and its first params from init_from."""
  from absl import flags as absl_flags
  from ml_collections import config_flags
  from biovfm_jax.train import init_from, loop, validate
  argv = ["test", *flags]
  fv = absl_flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
  fv(argv)
  config = fv.config
  validate.expand_paths(config)
  if fsdp:
    config.mesh.update(data=1, fsdp=-1)
  else:
    config.mesh.data = 1
  s = loop.build(config, devices=None if fsdp else jax.devices()[:1], evaluators=False)
  return s, init_from.initial_params(config, s.spec, s.objective)


def _flat(tree, prefix=""):
  if not hasattr(tree, "items"):
    return {prefix: np.asarray(tree)}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}/{k}" if prefix else str(k)))
  return out


def _saved(workdir, path):
  from biovfm_jax.train import checkpoint as ckpt_lib
  return _flat(ckpt_lib.restore_host(ckpt_lib.find_step_dir(workdir), tuple(path.split("/"))))


def _assert_same(got: dict, want: dict, skip=()):
  assert set(got) - set(skip) == set(want) - set(skip), set(got) ^ set(want)
  for k in want:
    if k not in skip:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


# --- In process: what each kind of checkpoint gives each objective.

MAE_T = ["--config=configs/quickstart.py", "--config.image_size=32",
         "--config.model.width=192", "--config.model.num_heads=3", "--config.model.mlp_dim=768",
         "--config.model.depth=2", "--config.model.patch_size=16",
         "--config.batch_size=8", "--config.evals={}"]


def test_mae_from_an_encoder_only_file_has_a_fresh_decoder(imports, tmp_path, caplog):
  caplog.set_level("INFO")
  s, params = _setup([*MAE_T, f"--config.init_from={imports['mae_encoder']}"], tmp_path)
  # A timm import keeps its table as a learned one; this run's positions are
  # sin-cos (the table's values, as the reference MAE's), so it is dropped.
  _assert_same(_flat(params["encoder"]), _saved(imports["mae_encoder"], "params"),
               skip=("pos_embed",))
  assert "pos_embed" not in params["encoder"]
  fresh = jax.device_get(jax.jit(s.spec.init_params)())
  _assert_same(_flat({k: v for k, v in params.items() if k != "encoder"}),
               _flat({k: v for k, v in fresh.items() if k != "encoder"}))
  line = next(r.getMessage() for r in caplog.records if "Initialised from" in r.getMessage())
  assert "encoder from its params" in line and "initialised: decoder_blocks" in line, line


def test_mae_from_mae_visualize_keeps_its_decoder(imports, tmp_path):
  _, params = _setup([*MAE_T, "--config.mae.decoder_width=64", "--config.mae.decoder_depth=1",
                      "--config.mae.decoder_heads=4",
                      f"--config.init_from={imports['mae']}"], tmp_path, fsdp=True)
  assert len(params["encoder"]["patch_embed"]["kernel"].sharding.device_set) == 8
  _assert_same(_flat(jax.device_get(params)), _saved(imports["mae"], "params"))


def test_a_timm_table_is_kept_learned_or_dropped_for_sincos(imports, tmp_path, caplog):
  caplog.set_level("INFO")
  _, params = _setup([*MAE_T, "--config.model.pos_embed=learned",
                      f"--config.init_from={imports['timm']}"], tmp_path)
  _assert_same(_flat(params["encoder"]), _saved(imports["timm"], "params"))
  _, params = _setup([*MAE_T, f"--config.init_from={imports['timm']}"], tmp_path)
  assert "pos_embed" not in params["encoder"]
  assert any("learned position table dropped" in r.getMessage() for r in caplog.records)


def test_dinov2_from_a_mae_checkpoint(imports, tmp_path):
  """MAE encoder -> DINOv2 student (and teacher, its copy): heads and mask token fresh."""
  flags = [f for f in DINO if not f.startswith(("--config.model.patch_size",
                                                 "--config.model.num_registers",
                                                 "--config.model.layerscale",
                                                 "--config.image_size",
                                                 "--config.data.local_crop"))]
  s, params = _setup([*flags, "--config.image_size=32", "--config.data.local_crop_size=16",
                      "--config.model.patch_size=16", "--config.model.pos_embed=sincos",
                      f"--config.init_from={imports['mae']}"], tmp_path)
  _assert_same(_flat(params["backbone"]), _saved(imports["mae"], "params/encoder"),
               skip=("mask_token",))
  extra = jax.device_get(jax.jit(s.objective.init_extra)(params))
  _assert_same(_flat(extra["teacher"]), _flat(params))


def test_mae_from_a_dinov2_backbone(imports, tmp_path, caplog):
  """DINOv2 (ViT-S/14 + 4 registers, LayerScale) -> MAE's encoder: its table
  resized 2x2 -> 4x4, its iBOT mask token dropped, the decoder fresh."""
  caplog.set_level("INFO")
  _, params = _setup([*MAE_T, "--config.image_size=56", "--config.model.patch_size=14",
                      "--config.model.num_registers=4", "--config.model.layerscale_init=1e-5",
                      "--config.model.pos_embed=learned",
                      f"--config.init_from={imports['dinov2']}"], tmp_path)
  saved = _saved(imports["dinov2"], "params")
  got = _flat(params["encoder"])
  _assert_same(got, saved, skip=("pos_embed", "mask_token"))
  from biovfm_jax.models.patches import resize_pos_grid
  np.testing.assert_allclose(got["pos_embed"][1:],
                             resize_pos_grid(saved["pos_embed"][1:], (2, 2), (4, 4)), rtol=1e-6)
  line = next(r.getMessage() for r in caplog.records if "Initialised from" in r.getMessage())
  assert "position table 2x2 -> 4x4" in line and "initialised: decoder_blocks" in line, line


# --- main.py, end to end: DINOv2 from Meta's layout, then resumed after a SIGKILL.


def _main(workdir, *flags, wait=True):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                                   "--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "main.py", f"--workdir={workdir}", *DINO, *flags]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_dinov2_continues_a_released_backbone_and_resumes_its_own_run(imports, tmp_path):
  import biovfm_jax
  run = tmp_path / "run"
  init = f"--config.init_from={imports['dinov2']}"
  # One step at lr 0: student and EMA teacher are still the import.
  r = _main(run, init, "--config.num_train_steps=1", "--config.optim.base_lr=0")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "position table 2x2 -> 4x4" in r.stderr, r.stderr[-3000:]
  assert "initialised: dino_head" in r.stderr
  x = np.random.default_rng(0).normal(size=(8, 56, 56, 3)).astype(np.float32)
  ours = biovfm_jax.load_encoder(str(run))(x)              # the teacher's backbone
  theirs = biovfm_jax.load_encoder(imports["dinov2"])(x)   # resized at run time alike
  for k in ("cls", "patch_tokens"):
    a, b = np.asarray(ours[k]), np.asarray(theirs[k])
    assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max(), k
  _assert_same(_saved(run, "params/backbone"), _saved(run, "extra/teacher/backbone"))

  # Trained on, killed after its step-2 checkpoint, restarted: it resumes its own
  # run (init_from is ignored), and the losses are finite.
  more = [init, "--config.num_train_steps=4", "--config.checkpoint.every_steps=1"]
  child = _main(run, *more, wait=False)
  end = time.time() + 300
  while 2 not in checkpoint_steps(run) and child.poll() is None and time.time() < end:
    time.sleep(0.2)
  child.send_signal(signal.SIGKILL)
  first = child.communicate()[0]
  assert 2 in checkpoint_steps(run), first[-3000:]
  assert "Resuming from step 1" in first and "Initialised from" not in first
  r = _main(run, *more)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Resuming from step" in r.stderr and "Initialised from" not in r.stderr
  assert checkpoint_steps(run)[-1] == 4
  assert all(np.isfinite(v) for v in losses(run).values()) and len(losses(run)) == 4


# --- Refusals: one line per mismatch, naming the key and both values.


@pytest.mark.parametrize("flag,says", [
    ("--config.model.width=96", "config.model.width=96, but the backbone in"),
    ("--config.model.depth=3", "config.model.depth=3"),
    ("--config.model.num_heads=6", "config.model.num_heads=6"),
    ("--config.model.patch_size=7", "config.model.patch_size=7"),
    ("--config.model.ffn=swiglu", "config.model.ffn='swiglu'"),
    ("--config.model.num_registers=0", "config.model.num_registers=0"),
    ("--config.model.layerscale_init=None", "has LayerScale"),
])
def test_mismatches_are_refused_before_compiling(imports, tmp_path, flag, says):
  with pytest.raises(ConfigError) as e:
    _setup([*DINO, flag, f"--config.init_from={imports['dinov2']}"], tmp_path)
  lines = str(e.value).splitlines()[1:]
  assert any(says in line and "has " in line for line in lines), str(e.value)


def test_main_refuses_in_one_line_per_mismatch(imports, tmp_path):
  r = _main(tmp_path / "run", f"--config.init_from={imports['dinov2']}",
            "--config.model.width=96", "--config.model.num_heads=4",
            "--config.model.mlp_dim=384")
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr and "First step" not in r.stderr
  for key, mine, theirs in (("width", 96, 192), ("num_heads", 4, 3), ("mlp_dim", 384, 768)):
    assert f"config.model.{key}={mine}, but the backbone in" in r.stderr
    assert f"has {key}={theirs}" in r.stderr
  assert not (tmp_path / "run").exists()  # a refused run leaves nothing behind


# --- configs/continue_*.py fit the releases they continue.


@pytest.mark.parametrize("config,release,convert", [
    ("continue_dinov2_b14", "vit_base_patch14_dinov2", "dinov2"),
    ("continue_mae_b16", "vit_base_patch16_224", "timm"),
])
def test_continue_configs_fit_their_release(config, release, convert):
  """The release's architecture (timm's build of it, random weights, through
  our importer) against the config's model: no mismatch."""
  import importlib
  from biovfm_jax import interop as conv
  from biovfm_jax.objectives import get_objective
  from biovfm_jax.train import init_from
  sd = numpy_sd(timm_model(release, depth=12, img_size=28 if convert == "dinov2" else 32))
  if convert == "dinov2":
    saved, _ = conv.from_dinov2(to_dinov2_layout(sd), size="B")
  else:
    saved, _ = conv.from_timm(sd, size="B")
  c = importlib.import_module(f"configs.{config}").get_config()
  mine = get_objective(c, total_steps=10, steps_per_epoch=5).encoder_config
  assert init_from.mismatches(saved, mine, release) == []


@pytest.mark.parametrize("config,release", [
    ("continue_dinov2_l14", dict(width=1024, depth=24, num_heads=16, mlp_dim=4096,
                                 patch_size=14, ffn="mlp", num_registers=0)),
    ("continue_mae_l16", dict(width=1024, depth=24, num_heads=16, mlp_dim=4096,
                              patch_size=16, ffn="mlp", num_registers=0)),
])
def test_large_continue_configs_have_the_released_architecture(config, release):
  """ViT-L/14 (dinov2_vitl14, LayerScale) and ViT-L/16 (MAE): as published."""
  import dataclasses
  import importlib
  from biovfm_jax.objectives import get_objective
  c = importlib.import_module(f"configs.{config}").get_config()
  mine = dataclasses.asdict(get_objective(c, total_steps=10, steps_per_epoch=5).encoder_config)
  assert {k: mine[k] for k in release} == release
  assert (mine["layerscale_init"] is not None) == config.startswith("continue_dinov2")


def _pinv_resize_reference(kernel, p_old, p_new, channels):
  """FlexiViT's resize written out independently: B from jax.image.resize of
  each one-hot patch (bilinear, no antialias), then w' = pinv(B^T) w."""
  basis = np.eye(p_old * p_old).reshape(-1, p_old, p_old)
  b = np.stack([np.asarray(jax.image.resize(e, (p_new, p_new), "bilinear", antialias=False))
                .ravel() for e in basis], axis=1)                  # (p_new^2, p_old^2)
  w = kernel.reshape(p_old * p_old, channels, -1)
  return np.einsum("np,pcd->ncd", np.linalg.pinv(b.T), w).reshape(p_new * p_new * channels, -1)


@pytest.mark.parametrize("p_old,p_new", [(14, 16), (8, 16), (16, 14)])
def test_patch_resample_is_flexivit_pseudo_inverse(p_old, p_new):
  from biovfm_jax.models.patches import resample_patch_kernel
  kernel = np.random.default_rng(0).normal(size=(p_old * p_old * 3, 5)).astype(np.float32)
  ours = resample_patch_kernel(kernel, p_old, p_new, 3)
  np.testing.assert_allclose(ours, _pinv_resize_reference(kernel, p_old, p_new, 3),
                             rtol=1e-4, atol=1e-4)  # B from float32 resizes
  if p_new > p_old:  # upsampling: the token of a patch is the token of its resize
    x = np.random.default_rng(1).normal(size=(p_old, p_old, 3))
    big = np.asarray(jax.image.resize(x, (p_new, p_new, 3), "bilinear", antialias=False))
    np.testing.assert_allclose(big.reshape(-1) @ ours, x.reshape(-1) @ kernel, rtol=1e-4,
                               atol=1e-4)


def test_a_14_backbone_continues_at_16_with_patch_resampling(imports, tmp_path, caplog):
  caplog.set_level("INFO")
  flags = [f for f in DINO if not f.startswith(("--config.model.patch_size",
                                                "--config.data.local_crop"))]
  flags += ["--config.model.patch_size=16", "--config.image_size=64",
            "--config.data.local_crop_size=32", f"--config.init_from={imports['dinov2']}"]
  with pytest.raises(ConfigError, match=r"patch_size=16, but .* has patch_size=14 "
                                        r"\(config.init_patch_resample=True resamples it\)"):
    _setup(flags, tmp_path)
  _, params = _setup([*flags, "--config.init_patch_resample=True"], tmp_path)
  from biovfm_jax.models.patches import resample_patch_kernel
  saved = _saved(imports["dinov2"], "params")
  np.testing.assert_allclose(np.asarray(params["backbone"]["patch_embed"]["kernel"]),
                             resample_patch_kernel(saved["patch_embed/kernel"], 14, 16, 3),
                             rtol=1e-6)
  assert any("patch embedding resampled 14 -> 16" in r.getMessage() for r in caplog.records)
