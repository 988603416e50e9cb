"""config.optim.freeze_blocks / freeze_blocks_steps: the backbone's first blocks
and its embeddings stay bit-identical for the first steps, on the real optimiser."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biovfm_jax import sharding as shd
from biovfm_jax.objectives import get_objective
from biovfm_jax.train import optim
from biovfm_jax.train.state import ModelSpec
from biovfm_jax.train.validate import validate_config
from data_pipeline.errors import ConfigError
from test_train_units import tiny_config


def _setup(objective: str, scan: bool):
  if objective == "mae":
    c = tiny_config()
  else:
    from configs import quickstart_dinov2
    c = quickstart_dinov2.get_config()
    c.image_size = 32
    c.model.update(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64)
    c.dinov2.update(head_hidden=64, head_bottleneck=32, num_prototypes=128, n_local_crops=2)
  c.model.scan_layers = scan
  c.optim.grad_clip_norm = 1.0  # the chain with a clip, as DINOv2 runs it
  mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
  spec = ModelSpec(get_objective(c, total_steps=10, steps_per_epoch=5).init_model, 0, mesh,
                   shd.DEFAULT_RULES)
  params = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype), spec.abstract_params)
  return c, spec, params


def _run(c, spec, params, steps=3):
  """Params after each of `steps` AdamW steps with constant non-zero gradients."""
  tx = optim.make_optimizer(c, lambda step: 0.1, spec.decay_mask, params=params, depth=2,
                            total_steps=10, steps_per_epoch=5)
  state, out = tx.init(params), []
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)  # one compile, not one per eager op and shape
  for _ in range(steps):
    updates, state = update(grads, state, params)
    params = jax.tree.map(jnp.add, params, updates)
    out.append(params)
  return out


def _leaves(tree, backbone):
  """name -> array under `backbone`, a scanned leaf split into its layers."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree[backbone])[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.startswith("blocks/layers/") and not name.split("/")[2].isdigit():
      for i in range(leaf.shape[0]):  # scanned: blocks/layers/<name> -> blocks/layers/<i>/<name>
        out[f"blocks/layers/{i}/{name[len('blocks/layers/'):]}"] = leaf[i]
    else:
      out[name] = leaf
  return out


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("objective,backbone", [("mae", "encoder"), ("dinov2", "backbone")])
def test_first_block_and_embeddings_are_held_for_n_steps(objective, backbone, scan):
  c, spec, params = _setup(objective, scan)
  c.optim.weight_decay = 0.5  # decay alone would move every kernel and token
  c.optim.freeze_blocks, c.optim.freeze_blocks_steps = 1, 2
  start = _leaves(params, backbone)
  after = [_leaves(p, backbone) for p in _run(c, spec, params)]
  held = [k for k in start if k.startswith(("blocks/layers/0/", "patch_embed", "cls_token",
                                            "pos_embed", "mask_token"))]
  free = [k for k in start if k.startswith("blocks/layers/1/")]
  assert len(held) > 10 and len(free) > 10 and any(k.startswith("patch_embed") for k in held)
  assert set(held) | set(free) | {"norm/scale", "norm/bias"} >= set(start), set(start)
  for k in held:
    for step in (0, 1):  # steps 1 and 2: bit-identical
      np.testing.assert_array_equal(after[step][k], start[k], err_msg=f"{k} step {step + 1}")
    assert not np.array_equal(after[2][k], start[k]), f"{k} did not move at step 3"
  for k in free:
    assert not np.array_equal(after[0][k], start[k]), f"{k} did not move at step 1"
  # An lr of 0 while held: Adam's moments saw the (constant) gradients all
  # along, so the first free step is the steady one, m/sqrt(v) = 1.
  bias = "blocks/layers/0/mlp/fc1/bias"  # not decayed
  lr = 0.1 * c.optim.layer_decay ** 2  # block 0 is layer 1 of depth 2's layer-wise decay
  np.testing.assert_allclose(after[2][bias] - after[1][bias], -lr, rtol=1e-4)


def test_zero_blocks_changes_nothing():
  c, spec, params = _setup("mae", scan=True)  # K=0 adds nothing to the chain, whatever the layout
  plain = _run(c, spec, params)
  c.optim.freeze_blocks, c.optim.freeze_blocks_steps = 0, 2
  same = _run(c, spec, params)
  jax.tree.map(np.testing.assert_array_equal, plain, same)


def test_freeze_for_the_whole_run_and_only_the_backbone():
  """freeze_blocks_steps=None holds them throughout; nothing outside the
  backbone (here the DINOv2 head) is held."""
  c, spec, params = _setup("dinov2", scan=False)
  c.optim.freeze_blocks = 2
  mask = optim.frozen_blocks(params, depth=2, blocks=2)
  assert not any(jax.tree.leaves(mask["dino_head"]))
  assert all(jax.tree.leaves(mask["backbone"]["blocks"]))
  last = _run(c, spec, params, steps=4)[-1]
  jax.tree.map(np.testing.assert_array_equal, last["backbone"]["blocks"],
               params["backbone"]["blocks"])
  scanned = optim.frozen_blocks({"encoder": {"blocks": {"layers": {"k": jnp.ones((3, 4, 4))}}}},
                                depth=3, blocks=1)
  np.testing.assert_array_equal(scanned["encoder"]["blocks"]["layers"]["k"].ravel(), [1, 0, 0])


def test_held_gradients_count_in_the_clip_norm():
  """Held as with an lr of 0 (the way dinov2 holds its last layer): every
  gradient is in the clip's global norm, 2.83 for 8 ones, and block 1 moves
  by 1 / 2.83. A huge Adam epsilon makes the update linear in the clipped
  gradient: g / eps."""
  c = tiny_config()
  c.optim.update(grad_clip_norm=1.0, eps=1e6, weight_decay=0.0, freeze_blocks=1,
                 freeze_blocks_steps=5)
  params = {"encoder": {"blocks": {"layers": {str(i): {"k": jnp.ones(4)} for i in (0, 1)}}}}
  mask = jax.tree.map(lambda _: False, params)
  tx = optim.make_optimizer(c, lambda step: 1.0, mask, params=params, depth=2,
                            total_steps=10, steps_per_epoch=5)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  layers = updates["encoder"]["blocks"]["layers"]
  np.testing.assert_array_equal(layers["0"]["k"], 0.0)
  np.testing.assert_allclose(-layers["1"]["k"] * 1e6, 1 / np.sqrt(8), rtol=1e-5)


@pytest.mark.parametrize("key,value,message", [
    ("freeze_blocks", 3, "config.optim.freeze_blocks=3 exceeds the model's depth 2"),
    ("freeze_blocks", -1, "config.optim.freeze_blocks=-1 must be zero or more"),
    ("freeze_blocks_steps", -5, "config.optim.freeze_blocks_steps=-5 must be zero or more"),
])
def test_bad_freeze_values_name_the_key(key, value, message):
  c = tiny_config()
  c.optim[key] = value
  with pytest.raises(ConfigError, match=message):
    validate_config(c, shd.make_mesh({"data": 1}, devices=jax.devices()[:1]))
