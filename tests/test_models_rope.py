"""DINOv3's axial RoPE (models/rope.py) and the encoder's use of it, and the
key_bias=False attention: against a numpy reference written here from the
formulas, not from our code."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from biovfm_jax.models import MaskedAutoencoder, VisionTransformer, rope, vit_config
from biovfm_jax.models.layers import Attention
from data_pipeline.errors import ConfigError

TINY = dict(width=32, depth=2, num_heads=4, patch_size=4, image_size=16, pos_embed="rope")


def tiny(**kw):
  return vit_config(None, **{**TINY, **kw})


@functools.partial(nnx.jit, static_argnames="deterministic")
def forward(model, x, rng=None, deterministic=True):
  return model(x, rng=rng, deterministic=deterministic)


def images(b=2, h=16, w=16, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, h, w, 3), jnp.float32)


# --- numpy reference ----------------------------------------------------------

def ref_coords(gh, gw, normalize):
  dh, dw = {"separate": (gh, gw), "max": (max(gh, gw),) * 2,
            "min": (min(gh, gw),) * 2}[normalize]
  rows = []
  for i in range(gh):
    for j in range(gw):
      rows.append((2 * (i + 0.5) / dh - 1, 2 * (j + 0.5) / dw - 1))
  return np.array(rows)


def ref_cos_sin(coords, head_dim, base):
  freqs = np.array([base ** (-4.0 * j / head_dim) for j in range(head_dim // 4)])
  half = np.concatenate([2 * np.pi * coords[:, :1] * freqs,
                         2 * np.pi * coords[:, 1:] * freqs], 1)  # y freqs, then x
  ang = np.concatenate([half, half], 1)
  return np.cos(ang), np.sin(ang)


def ref_rotate(x, cos, sin):
  """x (B, T, H, hd); the last len(cos) tokens rotate, the rest do not."""
  n, hd = cos.shape
  out = x.copy()
  p = x[:, -n:]
  rot = np.concatenate([-p[..., hd // 2:], p[..., :hd // 2]], -1)
  out[:, -n:] = p * cos[None, :, None] + rot * sin[None, :, None]
  return out


def ref_attention(x, params, cos, sin, key_bias=True):
  w, b = np.asarray(params["qkv_kernel"], np.float64), np.asarray(params["qkv_bias"])
  d, _, h, hd = w.shape
  b = b.reshape(3, h, hd).astype(np.float64)
  if not key_bias:
    b[1] = 0
  q, k, v = (np.einsum("btd,dhk->bthk", x, w[:, i]) + b[i] for i in range(3))
  q, k = ref_rotate(q, cos, sin), ref_rotate(k, cos, sin)
  s = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(hd)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  o = np.einsum("bhqt,bthk->bqhk", a, v)
  return (np.einsum("bqhk,hkd->bqd", o, np.asarray(params["proj_kernel"], np.float64))
          + np.asarray(params["proj_bias"]))


# --- the maths ----------------------------------------------------------------

@pytest.mark.parametrize("normalize", ["separate", "max", "min"])
@pytest.mark.parametrize("grid", [(3, 5), (4, 4), (6, 2)])
def test_tables_match_the_formulas(normalize, grid):
  coords = rope.patch_coords(grid, normalize)
  np.testing.assert_allclose(coords, ref_coords(*grid, normalize), atol=1e-6)
  cos, sin = rope.cos_sin(coords, 16, 100.0)
  want_cos, want_sin = ref_cos_sin(ref_coords(*grid, normalize), 16, 100.0)
  np.testing.assert_allclose(cos, want_cos, atol=2e-6)
  np.testing.assert_allclose(sin, want_sin, atol=2e-6)


def test_max_and_min_normalise_both_axes_by_one_side():
  # 2 x 4 grid: 'max' divides by 4 (rows span [-0.5, 0]), 'min' by 2 (columns
  # reach 2.5), 'separate' spans [-1, 1] on each axis.
  ys = lambda c: sorted(set(np.round(c[:, 0], 6)))
  xs = lambda c: sorted(set(np.round(c[:, 1], 6)))
  c = rope.patch_coords((2, 4), "max")
  assert ys(c) == [-0.75, -0.25] and xs(c) == [-0.75, -0.25, 0.25, 0.75]
  c = rope.patch_coords((2, 4), "min")
  assert ys(c) == [-0.5, 0.5] and xs(c) == [-0.5, 0.5, 1.5, 2.5]
  c = rope.patch_coords((2, 4), "separate")
  assert ys(c) == [-0.5, 0.5] and xs(c) == [-0.75, -0.25, 0.25, 0.75]


def test_prefix_tokens_are_not_rotated():
  x = np.random.default_rng(0).normal(size=(2, 3 + 6, 2, 8)).astype(np.float32)
  cos, sin = ref_cos_sin(ref_coords(2, 3, "separate"), 8, 10.0)
  got = np.asarray(rope.apply_rope(jnp.asarray(x), jnp.asarray(cos, jnp.float32),
                                   jnp.asarray(sin, jnp.float32)))
  np.testing.assert_array_equal(got[:, :3], x[:, :3])
  np.testing.assert_allclose(got, ref_rotate(x.astype(np.float64), cos, sin), atol=1e-5)
  assert np.abs(got[:, 3:] - x[:, 3:]).max() > 0.1


@pytest.mark.parametrize("key_bias", [True, False])
def test_attention_with_rope_matches_reference(key_bias):
  """Registers and cls unrotated, patches rotated, on a 3x5 grid; a perturbed
  k bias has no effect with key_bias=False."""
  att = Attention(32, 2, param_dtype=jnp.float32, dtype=jnp.float32, attention_impl="xla",
                  rngs=nnx.Rngs(0), key_bias=key_bias)
  rng = np.random.default_rng(1)
  att.qkv_bias.set_value(jnp.asarray(rng.normal(size=(96,)), jnp.float32))
  att.proj_bias.set_value(jnp.asarray(rng.normal(size=(32,)), jnp.float32))
  params = {k: np.asarray(v) for k, v in nnx.to_pure_dict(nnx.state(att)).items()}
  x = rng.normal(size=(2, 3 + 15, 32)).astype(np.float32)
  cos, sin = ref_cos_sin(ref_coords(3, 5, "separate"), 16, 100.0)
  got = att(jnp.asarray(x), (jnp.asarray(cos, jnp.float32), jnp.asarray(sin, jnp.float32)))
  want = ref_attention(x.astype(np.float64), params, cos, sin, key_bias)
  np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())


def test_encoder_uses_the_input_grid():
  """Any image size (non-square, unlike the config's) runs; the rotation uses
  that grid: the same patches on another grid give other tokens."""
  m = VisionTransformer(tiny(num_registers=2), rngs=nnx.Rngs(0))
  assert m.pos_embed is None
  x = images(h=16, w=24)
  out = forward(m, x)
  assert out.shape == (2, 3 + 4 * 6, 32)
  flipped = forward(m, jnp.concatenate([x[:, :, 12:], x[:, :, :12]], 2))
  assert np.abs(np.asarray(out - flipped)).max() > 1e-3


# --- training-time augmentation ----------------------------------------------

def test_augmentation_draws_follow_their_definitions():
  base = rope.patch_coords((2, 4), "separate")  # no zero coordinate
  for seed in range(5):
    key = jax.random.key(seed)
    d = np.asarray(rope.augment_coords(base, key, shift=0.3)) - base
    assert np.allclose(d, d[:1]) and np.all(np.abs(d[0]) <= 0.3)
    r = np.asarray(rope.augment_coords(base, key, jitter=1.5)) / base
    assert np.allclose(r, r[:1], rtol=1e-5) and np.all((r[0] >= 1 / 1.5) & (r[0] <= 1.5))
    r = np.asarray(rope.augment_coords(base, key, rescale=2.0)) / base
    assert np.allclose(r, r[0, 0], rtol=1e-5) and 0.5 <= r[0, 0] <= 2.0


def test_augmentation_only_in_training_and_reproducible():
  plain = VisionTransformer(tiny(), rngs=nnx.Rngs(0))
  aug = VisionTransformer(tiny(rope_shift=0.2, rope_jitter=1.3, rope_rescale=2.0),
                          rngs=nnx.Rngs(0))
  x = images()
  r1, r2 = jax.random.key(1), jax.random.key(2)
  # Evaluation: no augmentation, with or without an rng.
  want = forward(plain, x)
  np.testing.assert_array_equal(forward(aug, x), want)
  np.testing.assert_array_equal(forward(aug, x, r1), want)
  # Training: one draw from the rng, reproducible; no rng is an error.
  a1 = forward(aug, x, r1, deterministic=False)
  np.testing.assert_array_equal(forward(aug, x, r1, deterministic=False), a1)
  assert np.abs(np.asarray(a1 - want)).max() > 1e-3
  assert np.abs(np.asarray(a1 - forward(aug, x, r2, deterministic=False))).max() > 1e-3
  with pytest.raises(ValueError, match="needs rng"):
    aug(x, deterministic=False)


def test_augmentation_leaves_drop_path_keys_alone():
  """A rescale of 1 (log-range 0) is the identity: with drop path, the
  training forward equals the un-augmented one for the same rng."""
  x, r = images(), jax.random.key(3)
  plain = VisionTransformer(tiny(drop_path_rate=0.5), rngs=nnx.Rngs(0))
  noop = VisionTransformer(tiny(drop_path_rate=0.5, rope_rescale=1.0, rope_shift=0.0),
                           rngs=nnx.Rngs(0))
  want = forward(plain, x, r, deterministic=False)
  assert np.abs(np.asarray(want - forward(plain, x))).max() > 1e-3  # drop path acts
  np.testing.assert_allclose(forward(noop, x, r, deterministic=False), want, atol=1e-6)


# --- the stack, gradients, MAE -------------------------------------------------

def test_scan_equals_loop_with_rope():
  x, r = images(), jax.random.key(7)
  cfg = tiny(drop_path_rate=0.2, layerscale_init=0.5, num_registers=1, key_bias=False,
             rope_rescale=2.0, rope_jitter=1.2)
  want = forward(VisionTransformer(cfg, rngs=nnx.Rngs(0)), x, r, deterministic=False)
  for kw in (dict(remat_policy="full"), dict(scan_layers=True, remat_policy="dots_saveable")):
    m = VisionTransformer(dataclasses.replace(cfg, **kw), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(forward(m, x, r, deterministic=False), want, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_no_key_bias_gets_no_gradient(scan):
  m = VisionTransformer(tiny(key_bias=False, scan_layers=scan), rngs=nnx.Rngs(0))
  x = images()
  f = lambda m: jnp.mean(jnp.square(m(x) - 0.3))
  grads = nnx.jit(nnx.grad(f))(m)
  g = np.asarray(grads.blocks.layers.attn.qkv_bias if scan else
                 jnp.stack([grads.blocks.layers[i].attn.qkv_bias for i in range(2)]))
  q, k, v = np.split(g, 3, axis=-1)
  assert np.all(k == 0)
  assert np.abs(q).max() > 0 and np.abs(v).max() > 0


def test_mae_encodes_kept_tokens_at_their_positions():
  """With mask ratio 0 the kept tokens are a shuffle of all patches: their
  latent, unshuffled, is the full forward's (RoPE follows each token)."""
  cfg = tiny(num_registers=1)
  mae = MaskedAutoencoder(cfg, decoder_width=16, decoder_depth=1, decoder_heads=2,
                          rngs=nnx.Rngs(0))
  x = images()
  noise = jax.random.uniform(jax.random.key(4), (2, 16))

  @nnx.jit
  def run(mae, x, noise):
    latent, mask, restore = mae.encode_masked(x, noise, mask_ratio=0.0)
    pred, _ = mae(x, noise, mask_ratio=0.75)
    return latent, mask, restore, mae.encoder(x), pred

  latent, mask, restore, full, pred = run(mae, x, noise)
  assert not np.asarray(mask).any()
  patches = jnp.take_along_axis(latent[:, 2:], restore[..., None], axis=1)
  np.testing.assert_allclose(patches, full[:, 2:], atol=1e-5)
  np.testing.assert_allclose(latent[:, :2], full[:, :2], atol=1e-5)
  assert pred.shape == (2, 16, 48) and np.isfinite(np.asarray(pred)).all()


@pytest.mark.parametrize("kw,key", [
    (dict(num_heads=8, width=48), "config.model.num_heads"),  # head size 6
    (dict(rope_normalize="area"), "config.model.rope_normalize"),
    (dict(rope_base=0.0), "config.model.rope_base"),
    (dict(rope_jitter=0.5), "config.model.rope_jitter"),
    (dict(rope_rescale=0.9), "config.model.rope_rescale"),
    (dict(rope_shift=-0.1), "config.model.rope_shift"),
    (dict(pos_embed="sincos", rope_shift=0.1), "config.model.rope_shift"),
    (dict(key_bias="no"), "config.model.key_bias"),
])
def test_bad_rope_configs_name_the_key(kw, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    tiny(**kw)


# --- DINOv2 with RoPE (the DINOv3 architecture) ----------------------------------

def test_dinov2_trains_with_rope_and_no_key_bias():
  """Multi-crop (global 32 px, local 16 px grids) and iBOT masks, coordinate
  augmentation on: two AdamW steps, finite losses, the k bias still zero."""
  import optax
  from biovfm_jax.objectives.dinov2 import DINOv2Objective
  from test_dinov2_objective import make_batch, make_config, make_train_step, params_of
  obj = DINOv2Objective(make_config(dict(pos_embed="rope", key_bias=False, rope_rescale=2.0,
                                         rope_jitter=1.1, mask_token=True)),
                        total_steps=10, steps_per_epoch=5)
  assert obj.encoder_config.pos_embed == "rope" and not obj.encoder_config.key_bias
  model = obj.init_model(nnx.Rngs(0))
  params = params_of(model)
  assert "pos_embed" not in params["backbone"]
  extra = obj.init_extra(params)
  tx = optax.adamw(1e-3, weight_decay=0.04)
  step = make_train_step(obj, model, tx)
  opt_state, start = tx.init(params), params
  for i in range(2):
    params, opt_state, extra, loss, _, grads = step(params, opt_state, extra,
                                                    make_batch(i), jax.random.key(i), i)
    assert np.isfinite(float(loss))
  for p in (params, grads):
    for layer in p["backbone"]["blocks"]["layers"].values():
      assert not np.asarray(layer["attn"]["qkv_bias"])[32:64].any()
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       params["backbone"], start["backbone"])
  assert max(jax.tree.leaves(moved)) > 0
