"""Optimiser, schedule, config checks and checkpoint safety, on the real code."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from biovfm_jax import sharding as shd
from biovfm_jax.train import optim
from biovfm_jax.train.validate import validate_config
from configs import quickstart, vit_b_mae


def tiny_config():
  c = quickstart.get_config()
  c.image_size = 32
  c.model.update(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64)
  c.mae.update(decoder_width=32, decoder_depth=1, decoder_heads=2)
  c.batch_size = 16
  c.log_every_steps = 1
  c.image_every_steps = 0
  c.evals = {}  # the quickstart's evaluator scores step 0; its own tests run it
  return c


def test_lr_schedule_is_linear_warmup_then_half_cosine():
  c = vit_b_mae.get_config()
  c.batch_size = 1024
  sched = optim.lr_schedule(c, total_steps=1000, steps_per_epoch=10)  # warmup 400 steps
  peak = 1.5e-4 * 1024 / 256
  assert optim.peak_lr(c) == pytest.approx(peak)
  assert float(sched(0)) == 0.0
  assert float(sched(200)) == pytest.approx(peak / 2, rel=1e-5)
  assert float(sched(400)) == pytest.approx(peak, rel=1e-5)
  # Half-cycle cosine: halfway through the decay the rate is half the peak.
  assert float(sched(700)) == pytest.approx(peak / 2, rel=1e-4)
  assert float(sched(1000)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("scan", [False, True])
def test_weight_decay_on_matrices_and_tokens(scan):
  # The groups themselves are checked against the references in test_decay_groups.py.
  from biovfm_jax.objectives import get_objective
  from biovfm_jax.train.state import ModelSpec
  c = tiny_config()
  c.model.scan_layers = scan
  c.model.layerscale_init = 1e-5
  mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
  objective = get_objective(c, total_steps=10, steps_per_epoch=5)
  spec = ModelSpec(objective.init_model, 0, mesh, shd.DEFAULT_RULES)
  flat = {"/".join(p): v for p, v in _flatten(spec.decay_mask)}
  decayed = {k for k, v in flat.items() if v}
  assert decayed and all(k.endswith(("kernel", "token")) for k in decayed), decayed
  assert {"encoder/cls_token", "mask_token"} <= decayed
  assert not any(("bias" in k or "norm" in k or "gamma" in k) for k in decayed)
  assert any("mask_token" in k for k in flat) and any("gamma" in k or "layerscale" in k.lower()
                                                     for k in flat)
  # One AdamW step with zero gradients: only decayed weights move, by lr * wd * w.
  tx = optim.make_optimizer(c, lambda step: 1.0, spec.decay_mask, params=spec.abstract_params,
                            depth=2, total_steps=10, steps_per_epoch=5)
  params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), spec.abstract_params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  moved = {"/".join(p): round(float(jnp.abs(u).max()), 6) for p, u in _flatten(updates)}
  assert moved == {k: (0.05 if flat[k] else 0.0) for k in moved}


def _flatten(tree):
  return [(tuple(str(getattr(k, "key", k)) for k in path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.mark.parametrize("key,value,message", [
    ("batch_size", 12, "config.batch_size=12"),
    ("optim.grad_accum_steps", 3, "config.optim.grad_accum_steps=3"),
    ("image_size", 36, "config.model.image_size"),
    ("data.crop_scale", (0.5, 0.2), "config.data.crop_scale"),
])
def test_bad_config_names_the_key(key, value, message):
  c = tiny_config()
  node, leaf = c, key
  if "." in key:
    head, leaf = key.split(".")
    node = c[head]
  node[leaf] = value
  mesh = shd.make_mesh({"data": 8})
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validate_config(c, mesh)


def test_mesh_shape_errors_name_config_mesh():
  with pytest.raises(ValueError, match="config.mesh"):
    shd.make_mesh({"data": 3, "fsdp": -1})
  mesh = shd.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_logical_rules_never_reuse_a_mesh_axis():
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  spec = shd.logical_to_mesh(("batch", "embed", "mlp"), shd.DEFAULT_RULES, mesh)
  assert spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")
  # Axes of size 1 are dropped, so a 1-device mesh replicates everything.
  one = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
  assert shd.logical_to_mesh(("batch", "embed"), shd.DEFAULT_RULES, one) == \
      jax.sharding.PartitionSpec(None, None)


def test_nan_loss_stops_and_never_saves_the_bad_state(tmp_path):
  from biovfm_jax.train import loop
  c = tiny_config()
  c.num_train_steps = 6
  c.checkpoint.every_steps = 1
  c.checkpoint.async_save = False
  c.optim.base_lr = 1e30  # the first update destroys the weights
  with pytest.raises(loop.NonFiniteLossError, match="last good checkpoint"):
    loop.train(c, str(tmp_path))
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  rows = [l for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert saved, "the finite first step should have been saved"
  assert len(rows) == saved[-1], (rows, saved)  # every saved step had a finite loss
  assert saved[-1] < 6


def test_resume_refuses_a_changed_input_stream(tmp_path):
  from biovfm_jax.train import loop
  c = tiny_config()
  c.num_train_steps = 2
  c.checkpoint.every_steps = 2
  loop.train(c, str(tmp_path))
  c.seed = 1
  with pytest.raises(ValueError, match="seed"):
    loop.train(c, str(tmp_path))


def test_grad_accumulation_trains(tmp_path):
  from biovfm_jax.train import loop
  c = tiny_config()
  c.num_train_steps = 3
  c.optim.grad_accum_steps = 2
  out = loop.train(c, str(tmp_path))
  assert np.isfinite(out["loss"]) and out["loss"] > 0


def test_dinov2_optimizer_recipe():
  """sqrt lr scaling, cosine weight decay, layer-wise decay, patch-embed x0.2,
  and the frozen last layer, checked on one hand-made parameter tree."""
  from configs import vit_b_dinov2
  c = vit_b_dinov2.get_config()
  c.batch_size = 4096
  assert optim.peak_lr(c) == pytest.approx(4e-3 * 2.0)
  wd = optim.wd_schedule(c, total_steps=100)
  assert float(wd(0)) == pytest.approx(0.04) and float(wd(100)) == pytest.approx(0.4)
  assert float(wd(50)) == pytest.approx(0.22)
  params = {"backbone": {"patch_embed": {"kernel": jnp.ones((4, 4))},
                         "cls_token": jnp.ones((4,)),
                         "blocks": {"layers": {"0": {"fc": {"kernel": jnp.ones((4, 4))}},
                                               "1": {"fc": {"kernel": jnp.ones((4, 4))}}}}},
            "dino_head": {"last_layer": {"kernel": jnp.ones((4, 8))}}}
  mults = optim.lr_multipliers(params, depth=2, layer_decay=0.9, patch_embed_mult=0.2)
  assert mults["backbone"]["patch_embed"]["kernel"] == pytest.approx(0.9 ** 3 * 0.2)
  assert mults["backbone"]["cls_token"] == pytest.approx(0.9 ** 3)
  blocks = mults["backbone"]["blocks"]["layers"]
  assert blocks["0"]["fc"]["kernel"] == pytest.approx(0.9 ** 2)
  assert blocks["1"]["fc"]["kernel"] == pytest.approx(0.9)
  assert mults["dino_head"]["last_layer"]["kernel"] == 1.0
  # Scanned stack: one factor per layer along the leading axis.
  scanned = optim.lr_multipliers({"blocks": {"layers": {"k": jnp.ones((3, 4, 4))}}},
                                 depth=3, layer_decay=0.5, patch_embed_mult=1.0)
  np.testing.assert_allclose(scanned["blocks"]["layers"]["k"].ravel(), [0.125, 0.25, 0.5])

  mask = jax.tree.map(lambda x: x.ndim > 1, params)
  tx = optim.make_optimizer(c, lambda step: 1.0, mask, params=params, depth=2,
                            total_steps=100, steps_per_epoch=2)
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  for step in range(3):
    updates, state = tx.update(grads, state, params)
    last = float(jnp.abs(updates["dino_head"]["last_layer"]["kernel"]).max())
    assert (last == 0.0) == (step < 2), (step, last)  # frozen for the first epoch
    # Block 1 moves 0.9x, block 0 0.81x: the lr multipliers reach the update.
    b0 = updates["backbone"]["blocks"]["layers"]["0"]["fc"]["kernel"]
    b1 = updates["backbone"]["blocks"]["layers"]["1"]["fc"]["kernel"]
    np.testing.assert_allclose(b0 / b1, 0.9, rtol=1e-5)


@pytest.mark.parametrize("module", ["quickstart", "quickstart_dinov2"])
def test_the_recorded_encoder_config_describes_the_backbone_in_the_state(module):
  """Checkpoints record the objective's encoder config (run_info["encoder"]):
  evaluation rebuilds the backbone from it, so it must give exactly the params
  at the objective's backbone path (DINOv2's carries the iBOT mask token)."""
  import importlib
  from flax import nnx
  from biovfm_jax.models.vit import VisionTransformer
  from biovfm_jax.objectives import get_objective
  from biovfm_jax.train import state as state_lib
  config = importlib.import_module(f"configs.{module}").get_config()
  objective = get_objective(config, total_steps=10, steps_per_epoch=5)
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  spec = state_lib.ModelSpec(objective.init_model, 0, mesh, shd.DEFAULT_RULES)
  state = jax.eval_shape(lambda: state_lib._fresh_state(spec, optax.identity(), objective))
  tree = {"params": state.params, "extra": state.extra}
  for key in objective.backbone_path:
    tree = tree[key]
  encoder = nnx.state(nnx.eval_shape(
      lambda: VisionTransformer(objective.encoder_config, rngs=nnx.Rngs(0))), nnx.Param)
  shapes = lambda t: jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(t)  # noqa: E731
                                  if isinstance(t, nnx.State) else t)
  assert shapes(encoder) == shapes(tree)
  assert objective.encoder_config.mask_token == (module == "quickstart_dinov2")


def test_lr_schedule_without_warmup_is_optax_cosine_and_silent(caplog):
  """warmup_epochs=0: the same values as optax's warmup-cosine schedule with a
  0-step warmup, without its 'non-positive transition_steps' warning."""
  config = tiny_config()
  config.optim.warmup_epochs = 0
  config.optim.min_lr = 1e-6
  with caplog.at_level("INFO"):
    schedule = optim.lr_schedule(config, total_steps=10, steps_per_epoch=5)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
  reference = optax.warmup_cosine_decay_schedule(0.0, optim.peak_lr(config), 0, 10, 1e-6)
  np.testing.assert_allclose([schedule(i) for i in range(13)],
                             [reference(i) for i in range(13)], rtol=1e-6)
