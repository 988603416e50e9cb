"""DINOv3's Gram anchoring in the DINOv2 objective: the refresh steps and
weight schedule against the reference's loop, the teacher-feature resize
against torch, the config's refusals, and a run with Gram on that resumes
after a SIGKILL with identical losses, the Gram teacher included."""
import signal
import time

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from biovfm_jax.objectives import gram
from biovfm_jax.train import checkpoint as ckpt_lib
from configs import quickstart_dinov2
from data_pipeline.errors import ConfigError
from test_train_e2e import checkpoint_steps, losses, run_main


def _cfg(**gram_kw):
  c = quickstart_dinov2.get_config()
  c.dinov2.gram.update(use_loss=True, **gram_kw)
  c.data.gram_crop_size = 64
  return c


def _reference_refreshes(steps, first, freq, max_updates):
  """dinov3/train/train.py's loop, uninterrupted: which iterations end with
  update_gram(). (Its resume recounts num_gram_updates as
  ceil((start + 1 - first) / freq), one too many when a refresh is due at
  `start` itself, e.g. first=4, freq=3, start=5; ours counts from the step,
  so a resumed run refreshes as the uninterrupted one.)"""
  n = 0
  out = []
  for it in range(steps):
    if (it + 1) >= first and (it + 1) % freq == 0 and (max_updates is None or n < max_updates):
      out.append(it)
      n += 1
  return out


@pytest.mark.parametrize("first,freq,max_updates", [
    (0, 3, None), (4, 3, 2), (6, 2, 1), (1, 1, 5), (7, 5, None)])
def test_refresh_steps_match_the_reference_loop(first, freq, max_updates):
  cfg = gram.from_config(_cfg(it_load_ema_teacher=0, it_first_update=first,
                              update_frequency=freq, max_updates=max_updates),
                         total_steps=40, steps_per_epoch=10)
  ours = [s for s in range(40) if bool(gram.refreshes_after(cfg, s))]
  assert ours == _reference_refreshes(40, first, freq, max_updates)


def test_weight_schedule_and_loading_step():
  c = _cfg(it_load_ema_teacher=3)
  c.dinov2.gram.loss_weight_schedule.update(enabled=True, start=0.5, peak=2.0, end=1.0,
                                            warmup_epochs=0.5, cosine_epochs=1.0)
  cfg = gram.from_config(c, total_steps=30, steps_per_epoch=10)
  # dinov3's linear_warmup_cosine_decay(0.5, 2.0, 1.0, 5, 30, 10), written out.
  want = np.concatenate([np.linspace(0.5, 2.0, 5, endpoint=False),
                         (np.cos(np.linspace(0, np.pi, 10)) + 1) / 2 * 1.0 + 1.0,
                         np.full(15, 1.0)])
  got = np.array([float(gram.weight(cfg, s)) for s in range(32)])
  np.testing.assert_allclose(got[3:30], want[3:30], rtol=1e-6)
  assert (got[:3] == 0).all()        # before the EMA teacher is copied in
  assert got[31] == pytest.approx(1.0)


def test_teacher_features_resize_like_torch_bicubic():
  x = np.random.default_rng(0).normal(size=(3, 36, 5)).astype(np.float32)
  ours = np.asarray(gram.to_grid(jnp.asarray(x), 6, 4))
  t = torch.from_numpy(x).transpose(1, 2).unflatten(-1, (6, 6))
  ref = torch.nn.functional.interpolate(t, size=(4, 4), mode="bicubic",
                                        align_corners=False, antialias=False)
  np.testing.assert_allclose(ours, ref.flatten(-2).transpose(1, 2).numpy(), atol=1e-5)


@pytest.mark.parametrize("changes,says", [
    (dict(ema_teacher=True, ckpt="/x"), "ema_teacher and ckpt are exclusive"),
    (dict(), "set ckpt, it_load_ema_teacher >= 0 or ema_teacher"),
    (dict(it_load_ema_teacher=0, tokens_used="masked"), "tokens_used='masked'"),
    (dict(ema_teacher=True, rep_update=False), "gram_crop_size must be None"),
])
def test_bad_gram_configs_name_the_key(changes, says):
  with pytest.raises(ConfigError, match=says.replace("(", r"\(")):
    gram.from_config(_cfg(**changes), total_steps=10, steps_per_epoch=10)


def test_gram_teacher_is_sharded_like_the_backbone():
  """extra["gram"] (the backbone's tree) takes the backbone's shardings, as the
  EMA teacher takes the params'; the centers stay replicated."""
  import jax
  from biovfm_jax import sharding as shd
  from biovfm_jax.objectives import get_objective
  from biovfm_jax.train import optim
  from biovfm_jax.train.state import ModelSpec, state_shardings
  c = _cfg(it_load_ema_teacher=0)
  c.update_from_flattened_dict({"model.width": 32, "model.num_heads": 2, "model.depth": 1,
                                "model.mlp_dim": 64, "mesh.fsdp": 2, "mesh.data": -1})
  mesh = shd.make_mesh({"data": 4, "fsdp": 2})
  objective = get_objective(c, total_steps=10, steps_per_epoch=5)
  spec = ModelSpec(objective.init_model, 0, mesh, shd.DEFAULT_RULES)
  tx = optim.make_optimizer(c, lambda step: 1.0, spec.decay_mask, params=spec.abstract_params,
                            depth=1, total_steps=10, steps_per_epoch=5)
  extra = state_shardings(spec, tx, objective).extra
  assert extra["gram"] == spec.param_shardings["backbone"]
  assert extra["teacher"] == spec.param_shardings
  assert extra["center"] == spec.replicated
  assert any(s.spec != jax.sharding.PartitionSpec()
             for s in jax.tree.leaves(extra["gram"]))   # fsdp shards some of it


def test_gram_ckpt_is_read_into_the_gram_teacher(tmp_path):
  """gram.ckpt: a fresh run's Gram teacher is the backbone that checkpoint
  records, placed in the backbone's shardings; a checkpoint of another
  architecture is refused naming the key."""
  import dataclasses
  import jax
  from flax import nnx
  from biovfm_jax import sharding as shd
  from biovfm_jax.models.vit import VisionTransformer
  from biovfm_jax.objectives import get_objective
  from biovfm_jax.train import init_from
  from biovfm_jax.train.state import ModelSpec
  c = _cfg(ckpt=str(tmp_path / "src"), rep_update=False)
  c.update_from_flattened_dict({"model.width": 32, "model.num_heads": 2, "model.depth": 1,
                                "model.mlp_dim": 64})
  objective = get_objective(c, total_steps=10, steps_per_epoch=5)
  vit = VisionTransformer(objective.encoder_config, rngs=nnx.Rngs(7))
  saved = nnx.to_pure_dict(nnx.split(vit, nnx.Param, ...)[1])
  ckpt_lib.save_params(str(tmp_path / "src"), saved, {
      "objective": "test", "backbone": "params",
      "encoder": dataclasses.asdict(objective.encoder_config)})
  spec = ModelSpec(objective.init_model, 0, shd.make_mesh({"data": 8}), shd.DEFAULT_RULES)
  extra = objective.init_extra(spec.init_params())
  got = init_from.initial_extra(objective, spec, extra)["gram"]
  assert _same(jax.device_get(got), saved)
  assert not _same(jax.device_get(extra["gram"]), saved)   # it was the student's init
  c.dinov2.gram.ckpt = str(tmp_path / "src")
  c.model.width = 64
  other = get_objective(c, total_steps=10, steps_per_epoch=5)
  spec = ModelSpec(other.init_model, 0, shd.make_mesh({"data": 8}), shd.DEFAULT_RULES)
  with pytest.raises(ConfigError, match=r"(?s)config.dinov2.gram.ckpt=.*config.model.width=64"):
    init_from.initial_extra(other, spec, other.init_extra(spec.init_params()))


GRAM = ["--config.dinov2.gram.use_loss=True", "--config.dinov2.gram.it_load_ema_teacher=1",
        "--config.dinov2.gram.update_frequency=2", "--config.dinov2.gram.it_first_update=2",
        "--config.dinov2.gram.max_updates=2", "--config.data.gram_crop_size=48",
        "--config.num_train_steps=8", "--config.checkpoint.every_steps=2",
        "--config.checkpoint.keep=4"]


def _gram_and_teacher(work, step):
  d = work / "checkpoints" / str(step)
  return (ckpt_lib.restore_host(str(d), ("extra", "gram")),
          ckpt_lib.restore_host(str(d), ("extra", "teacher", "backbone")))


def _same(a, b) -> bool:
  import jax
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_gram_run_refreshes_on_schedule_and_resumes_after_sigkill(tmp_path):
  ref = run_main(tmp_path / "ref", *GRAM, objective="dinov2")
  assert ref.returncode == 0, ref.stderr[-3000:]
  rows = losses(tmp_path / "ref")
  assert sorted(rows) == list(range(1, 9)) and all(np.isfinite(list(rows.values())))
  import json
  logged = [json.loads(l) for l in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
  # Row k logs the k-th update (step index k - 1): no Gram term before index 1.
  weights = {r["step"]: r["gram_weight"] for r in logged if "gram_weight" in r}
  assert weights[1] == 0.0 and weights[2] == 1.0
  assert all(np.isfinite(r["gram"]) for r in logged if "loss" in r)
  # Refreshed after steps 1 and 3 (max_updates=2), not after step 5 or 7.
  for step in (2, 4):
    g, t = _gram_and_teacher(tmp_path / "ref", step)
    assert _same(g, t), step
  g6, t6 = _gram_and_teacher(tmp_path / "ref", 6)
  assert _same(g6, _gram_and_teacher(tmp_path / "ref", 4)[1]) and not _same(g6, t6)

  # Killed after its step-4 checkpoint, restarted: the same losses and Gram teacher.
  work = tmp_path / "killed"
  child = run_main(work, *GRAM, objective="dinov2", wait=False)
  end = time.time() + 300
  while 4 not in checkpoint_steps(work) and child.poll() is None and time.time() < end:
    time.sleep(0.2)
  child.send_signal(signal.SIGKILL)
  child.communicate()
  assert 4 in checkpoint_steps(work)
  again = run_main(work, *GRAM, objective="dinov2")
  assert again.returncode == 0 and "Resuming from step" in again.stderr, again.stderr[-3000:]
  assert losses(work) == rows
  assert _same(_gram_and_teacher(work, 8)[0], _gram_and_teacher(tmp_path / "ref", 8)[0])

