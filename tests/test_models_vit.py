"""ViT / MAE model tests: sizes, shapes, numerics, scan/remat, sharding."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from biovfm_jax import sharding
from biovfm_jax.models import (VIT_SIZES, MaskedAutoencoder,
                               VisionTransformer, vit_config, vit_config_from)
from biovfm_jax.models import layers
from biovfm_jax.models.layers import drop_path
from biovfm_jax.models.patches import sincos_2d

TINY = dict(width=64, depth=2, num_heads=4, patch_size=8, image_size=32)
LOGICAL = {"embed", "mlp", "heads", "kv", "patch", "layers", None}


def tiny(**kw):
  return vit_config(None, **{**TINY, **kw})


def n_params(model) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def images(b=2, size=32, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, size, size, 3), jnp.float32)


@functools.partial(nnx.jit, static_argnames="deterministic")
def forward(model, x, rng=None, deterministic=True):
  return model(x, rng=rng, deterministic=deterministic)


# --- sizes ------------------------------------------------------------------

@pytest.mark.parametrize("size,total,encoder", [
    ("T", 31_200_000, 5_486_592),
    ("S", 47_401_728, 21_590_016),
    ("B", 111_655_680, 85_647_360),
    ("L", 329_239_296, 303_099_904),
])
def test_mae_param_counts_match_the_study(size, total, encoder):
  model = nnx.eval_shape(lambda: MaskedAutoencoder(vit_config(size), rngs=nnx.Rngs(0)))
  assert n_params(model) == total
  assert n_params(model.encoder) == encoder
  # Fixed sin-cos tables are not state at all, so nothing but Params exists.
  assert len(jax.tree.leaves(nnx.state(model))) == len(
      jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_scanned_param_count_equals_looped():
  looped = nnx.eval_shape(lambda: MaskedAutoencoder(vit_config("S"), rngs=nnx.Rngs(0)))
  scanned = nnx.eval_shape(lambda: MaskedAutoencoder(
      vit_config("S", scan_layers=True), rngs=nnx.Rngs(0)))
  assert n_params(scanned) == n_params(looped) == 47_401_728


def test_huge_and_giant_encoders_build_abstractly():
  h = nnx.eval_shape(lambda: VisionTransformer(
      vit_config("H", scan_layers=True), rngs=nnx.Rngs(0)))
  assert h.patch_embed.kernel.shape == (14 * 14 * 3, 1280)
  assert h.blocks.layers.mlp.fc1.kernel.shape == (32, 1280, 5120)
  assert h.blocks.layers.attn.qkv_kernel.shape == (32, 1280, 3, 16, 80)
  # DINOv2's H: SwiGLU with hidden 3416.
  hs = nnx.eval_shape(lambda: VisionTransformer(
      vit_config("H", ffn="swiglu", scan_layers=True), rngs=nnx.Rngs(0)))
  assert hs.config.mlp_dim == 3416
  assert hs.blocks.layers.mlp.w12_kernel.shape == (32, 1280, 2, 3416)
  g = nnx.eval_shape(lambda: VisionTransformer(
      vit_config("g", scan_layers=True, layerscale_init=1e-5), rngs=nnx.Rngs(0)))
  assert g.config.mlp_dim == 4096 and g.config.patch_size == 14
  assert g.blocks.layers.mlp.w12_kernel.shape == (40, 1536, 2, 4096)
  assert g.blocks.layers.attn.qkv_kernel.shape == (40, 1536, 3, 24, 64)
  assert 1.1e9 < n_params(g) < 1.2e9


def test_config_from_configdict():
  cd = ml_collections.ConfigDict(dict(size="L", patch_size=None, dtype="bfloat16"))
  cfg = vit_config_from(cd)
  assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim) == (1024, 24, 16, 4096)
  assert cfg.patch_size == 16 and cfg.dtype == "bfloat16"
  cfg = vit_config_from(ml_collections.ConfigDict(dict(size=None, **TINY)))
  assert cfg.mlp_dim == 256 and cfg.num_patches == 16
  assert vit_config("B", width=384).mlp_dim == 1536  # follows width, not B
  assert set(VIT_SIZES) == {"T", "S", "B", "L", "H", "g"}


@pytest.mark.parametrize("kwargs,key", [
    (dict(image_size=100), "config.model.image_size=100 is not divisible by "
                           "config.model.patch_size=8"),
    (dict(width=66), "config.model.width=66 is not divisible by config.model.num_heads=4"),
    (dict(pos_embed="alibi"), "config.model.pos_embed"),
    (dict(ffn="geglu"), "config.model.ffn"),
    (dict(remat_policy="most"), "config.model.remat_policy"),
    (dict(attention_recompute_from=-1), "config.model.attention_recompute_from"),
    (dict(drop_path_rate=1.0), "config.model.drop_path_rate"),
    (dict(dtype="int8"), "config.model.dtype"),
    (dict(widht=64), "widht"),
])
def test_bad_configs_name_the_key(kwargs, key):
  with pytest.raises(ValueError, match=key.replace(".", r"\.").replace("(", r"\(")):
    tiny(**kwargs)


def test_bad_size_and_missing_fields():
  with pytest.raises(ValueError, match=r"config\.model\.size='XL'"):
    vit_config("XL")
  with pytest.raises(ValueError, match=r"config\.model\.width is required"):
    vit_config(None, depth=2, num_heads=2)
  with pytest.raises(ValueError, match=r"config\.model\.image_size=100 is not "
                                       r"divisible by config\.model\.patch_size=16"):
    vit_config_from(ml_collections.ConfigDict(dict(size="B", image_size=100)))
  with pytest.raises(ValueError, match=r"config\.mae\.decoder_width=30"):
    MaskedAutoencoder(tiny(), decoder_width=30, decoder_heads=4, rngs=nnx.Rngs(0))


# --- forward ----------------------------------------------------------------

def test_forward_shapes_and_prefix_tokens():
  x = images()
  for kw, prefix in [(dict(), 1), (dict(num_registers=4), 5),
                     (dict(class_token=False), 0),
                     (dict(class_token=False, num_registers=2, pos_embed="learned"), 2)]:
    model = VisionTransformer(tiny(**kw), rngs=nnx.Rngs(0))
    assert model.num_prefix_tokens == prefix
    assert model.embed_patches(x).shape == (2, 16, 64)
    y = forward(model, x)
    assert y.shape == (2, prefix + 16, 64) and y.dtype == jnp.float32
    assert np.isfinite(np.asarray(y)).all()


def test_cls_and_registers_come_first():
  model = VisionTransformer(tiny(num_registers=3), rngs=nnx.Rngs(0))
  prefix = model.prefix_tokens(2)
  # Sin-cos: the cls slot has a zero position embedding, as in MAE.
  np.testing.assert_array_equal(prefix[0, 0], model.cls_token[...])
  np.testing.assert_array_equal(prefix[1, 1:], model.register_tokens[...])


def test_init_follows_the_recipe():
  model = VisionTransformer(vit_config(None, width=256, depth=1, num_heads=4,
                                       num_registers=64, layerscale_init=1e-5),
                            rngs=nnx.Rngs(0))
  blk = model.blocks.layers[0]
  # xavier-uniform bound sqrt(6 / (fan_in + fan_out)), fans as torch Linear.
  for kernel, fan_in, fan_out in [(model.patch_embed.kernel, 768, 256),
                                  (blk.attn.qkv_kernel, 256, 768),
                                  (blk.attn.proj_kernel, 256, 256),
                                  (blk.mlp.fc1.kernel, 256, 1024)]:
    k = np.asarray(kernel[...])
    bound = np.sqrt(6 / (fan_in + fan_out))
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.95 * bound
    np.testing.assert_allclose(k.std(), bound / np.sqrt(3), rtol=0.05)
  assert not np.asarray(blk.attn.qkv_bias[...]).any()
  np.testing.assert_array_equal(blk.norm1.scale[...], 1.0)
  np.testing.assert_allclose(blk.ls1.gamma[...], 1e-5)
  reg = np.asarray(model.register_tokens[...])
  np.testing.assert_allclose(reg.std(), 0.02, rtol=0.05)


def test_sincos_matches_mae_reference():
  # The reference construction (MAE util/pos_embed.py), written out in numpy.
  def ref_1d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  def ref_2d(dim, gs):
    gh = np.arange(gs, dtype=np.float32)
    gw = np.arange(gs, dtype=np.float32)
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, gs, gs)
    return np.concatenate([ref_1d(dim // 2, grid[0]), ref_1d(dim // 2, grid[1])], 1)

  np.testing.assert_allclose(sincos_2d(64, 4, 4), ref_2d(64, 4), atol=1e-6)
  np.testing.assert_allclose(sincos_2d(768, 14, 14), ref_2d(768, 14), atol=1e-6)


def test_other_resolutions():
  x = images(size=48)
  for pos in ("sincos", "learned"):
    model = VisionTransformer(tiny(pos_embed=pos), rngs=nnx.Rngs(0))
    assert model.embed_patches(x).shape == (2, 36, 64)


def test_drop_path_only_when_not_deterministic():
  model = VisionTransformer(tiny(drop_path_rate=0.5), rngs=nnx.Rngs(0))
  x = images(b=8)
  base = forward(model, x)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  np.testing.assert_array_equal(forward(model, x, k1, deterministic=True), base)
  d1 = forward(model, x, k1, deterministic=False)
  assert np.abs(np.asarray(d1 - base)).max() > 1e-3
  np.testing.assert_array_equal(forward(model, x, k1, deterministic=False), d1)
  assert np.abs(np.asarray(forward(model, x, k2, deterministic=False) - d1)).max() > 1e-3
  with pytest.raises(ValueError, match="rng"):
    model(x, deterministic=False)
  no_dp = VisionTransformer(tiny(), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(forward(no_dp, x, k1, deterministic=False),
                                forward(no_dp, x))


def test_drop_path_is_per_sample():
  x = jnp.ones((256, 3, 4))
  y = np.asarray(drop_path(x, 0.25, jax.random.key(0), deterministic=False))
  per_sample = y.reshape(256, -1)
  assert (per_sample == per_sample[:, :1]).all()  # whole samples dropped
  np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.75], rtol=1e-6)
  assert 0.15 < (per_sample[:, 0] == 0).mean() < 0.35
  np.testing.assert_array_equal(drop_path(x, 0.25, None, deterministic=True), x)


def test_bf16_compute_with_fp32_params():
  x = images()
  ref = VisionTransformer(tiny(ffn="swiglu", layerscale_init=0.1), rngs=nnx.Rngs(0))
  bf = VisionTransformer(tiny(ffn="swiglu", layerscale_init=0.1, dtype="bfloat16"),
                         rngs=nnx.Rngs(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf, nnx.Param)))
  y, y32 = forward(bf, x), forward(ref, x)
  assert y.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(y, np.float32)).all()
  np.testing.assert_allclose(np.asarray(y, np.float32), y32, atol=0.1)
  half = VisionTransformer(tiny(param_dtype="bfloat16", dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(nnx.state(half, nnx.Param)))


def _copy_looped_into_scanned(looped, scanned):
  layers_ = [nnx.state(b, nnx.Param) for b in looped.blocks.layers]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers_)
  nnx.update(scanned.blocks.layers, stacked)
  for name in ("patch_embed", "norm"):
    nnx.update(getattr(scanned, name), nnx.state(getattr(looped, name)))
  scanned.cls_token[...] = looped.cls_token[...]


def test_scan_equals_loop_and_remat_changes_nothing():
  x = images()
  rng = jax.random.key(7)
  cfg = tiny(drop_path_rate=0.2, layerscale_init=0.5)
  looped = VisionTransformer(cfg, rngs=nnx.Rngs(0))
  want = forward(looped, x, rng, deterministic=False)
  # Same seed -> same weights in both layouts.
  scanned = VisionTransformer(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(forward(scanned, x, rng, deterministic=False), want,
                             atol=1e-5)
  # Weights copied from another seed.
  other = VisionTransformer(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(5))
  assert np.abs(np.asarray(forward(other, x) - forward(looped, x))).max() > 1e-2
  _copy_looped_into_scanned(looped, other)
  np.testing.assert_allclose(forward(other, x, rng, deterministic=False), want, atol=1e-5)

  def loss_and_grads(model):
    f = lambda m: jnp.mean(jnp.square(m(x, rng=rng, deterministic=False)))
    loss, grads = nnx.jit(nnx.value_and_grad(f))(model)
    return loss, grads.blocks

  loss, grads = loss_and_grads(looped)
  # attention_recompute_from=0: every attention recomputes its softmax backward.
  for kw in (dict(remat_policy="full"), dict(remat_policy="dots_saveable", scan_layers=True),
             dict(attention_recompute_from=0),
             dict(attention_recompute_from=0, remat_policy="full", scan_layers=True)):
    m = VisionTransformer(dataclasses.replace(cfg, **kw), rngs=nnx.Rngs(0))
    l2, g2 = loss_and_grads(m)
    np.testing.assert_allclose(l2, loss, rtol=1e-5)
    for i in range(cfg.depth):
      g1 = grads.layers[i]
      g2_i = (jax.tree.map(lambda a: a[i], g2.layers) if kw.get("scan_layers")
              else g2.layers[i])
      leaves1, leaves2 = jax.tree.leaves(g1), jax.tree.leaves(g2_i)
      assert len(leaves1) == len(leaves2) == 14
      for u, v in zip(leaves1, leaves2):
        np.testing.assert_allclose(u, v, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_recomputed_softmax_attention_equals_jaxs(dtype):
  """layers.attention_recompute: jax's forward and, from its hand-written
  backward, jax's gradients, to rounding (bf16: a unit or two of its 2^-8)."""
  keys = jax.random.split(jax.random.key(3), 4)
  q, k, v, w = (2 * jax.random.normal(key, (3, 33, 4, 16)).astype(dtype) for key in keys)
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")  # noqa: E731

  def grads(fn):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w.astype(jnp.float32))  # noqa: E731
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  with jax.default_matmul_precision("highest"):
    want, got = ref(q, k, v), layers.attention_recompute(q, k, v)
    want_grads, got_grads = grads(ref), grads(layers.attention_recompute)
  f32 = lambda a: np.asarray(a.astype(jnp.float32))  # noqa: E731
  tol = 1e-6 if dtype == "float32" else 1e-2
  for a, b in zip((got, *got_grads), (want, *want_grads)):
    assert np.abs(f32(a) - f32(b)).max() <= tol * np.abs(f32(b)).max()


def test_attention_recomputes_from_the_configured_length():
  x = jnp.zeros((1, 97, 2, 8))
  uses = lambda t, start: "custom_vjp_call" in str(jax.make_jaxpr(  # noqa: E731
      lambda a: layers.softmax_attention(a, a, a, "xla", start))(x[:, :t]))
  assert uses(97, 96) and uses(96, 96) and uses(5, 0)
  assert not uses(95, 96) and not uses(97, None)


# --- sharding ---------------------------------------------------------------

@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_names(scan):
  cfg = tiny(scan_layers=scan, num_registers=2, pos_embed="learned",
             layerscale_init=1e-5, ffn="swiglu")
  for model in (nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0))),
                nnx.eval_shape(lambda: MaskedAutoencoder(
                    dataclasses.replace(cfg, pos_embed="sincos"), decoder_width=32,
                    decoder_depth=2, decoder_heads=4, rngs=nnx.Rngs(0)))):
    params = nnx.state(model, nnx.Param)
    specs = nnx.get_partition_spec(params)
    flat_p = dict(nnx.to_flat_state(params))
    flat_s = dict(nnx.to_flat_state(specs))
    assert flat_p.keys() == flat_s.keys() and len(flat_p) > 10
    for path, var in flat_p.items():
      spec = flat_s[path].get_value()
      assert isinstance(spec, jax.sharding.PartitionSpec), path
      assert len(spec) == var.get_value().ndim, (path, spec)
      assert set(spec) <= LOGICAL, (path, spec)
      if scan and "blocks" in "/".join(map(str, path)):
        assert spec[0] == "layers", path
      # Matrices always name an axis that can be sharded.
      if var.get_value().ndim - (spec[0] == "layers") >= 2:
        assert {"embed", "mlp", "heads"} & set(spec), (path, spec)
      sharding.logical_to_mesh(tuple(spec))  # maps with the default rules


def _place(model, mesh):
  """device_put every parameter by its mapped logical names; returns specs."""
  state = nnx.state(model)
  specs = nnx.get_partition_spec(state)
  shardings = jax.tree.map(
      lambda s: jax.sharding.NamedSharding(
          mesh, sharding.logical_to_mesh(tuple(s), mesh=mesh)),
      specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  nnx.update(model, jax.device_put(state, shardings))
  return shardings


def test_sharded_forward_matches_unsharded():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  x = images(b=4)
  noise = jax.random.uniform(jax.random.key(3), (4, 16))
  vit = VisionTransformer(tiny(num_registers=2), rngs=nnx.Rngs(0))
  mae = MaskedAutoencoder(tiny(scan_layers=True), decoder_width=32, decoder_depth=1,
                          decoder_heads=4, rngs=nnx.Rngs(0))
  want_vit = forward(vit, x)
  mae_fwd = nnx.jit(lambda m, x, n: m(x, n, mask_ratio=0.75))
  want_mae = mae_fwd(mae, x, noise)

  _place(vit, mesh)
  _place(mae, mesh)
  qkv = vit.blocks.layers[0].attn.qkv_kernel.get_value()
  assert qkv.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor", None)
  fc1 = mae.encoder.blocks.layers.mlp.fc1.kernel.get_value()
  assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  xs = jax.device_put(x, jax.sharding.NamedSharding(
      mesh, sharding.logical_to_mesh(("batch", None, None, None), mesh=mesh)))
  with sharding.use_mesh(mesh):
    got_vit = forward(vit, xs)
    got_mae = mae_fwd(mae, xs, noise)
  assert got_vit.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(got_vit, want_vit, atol=1e-5)
  np.testing.assert_allclose(got_mae[0], want_mae[0], atol=1e-5)
  np.testing.assert_array_equal(got_mae[1], want_mae[1])


@pytest.mark.parametrize("src,dst", [(37, 16), (16, 37), (5, 9), (8, 3)])
def test_position_tables_resize_as_dinov2_does(src, dst):
  """resize_pos_grid is torch's bicubic interpolate (no antialias) with
  DINOv2's scale factor (dst + 0.1) / src, or with size=dst at offset 0;
  numpy and jax (the model's run-time path) agree."""
  torch = pytest.importorskip("torch")
  from biovfm_jax.models.patches import resize_pos_grid
  table = np.random.default_rng(0).normal(size=(src * src, 6)).astype(np.float32)
  grid = torch.from_numpy(table).reshape(1, src, src, 6).permute(0, 3, 1, 2)

  def ref(**kw):
    out = torch.nn.functional.interpolate(grid, mode="bicubic", antialias=False, **kw)
    return out.permute(0, 2, 3, 1).reshape(dst * dst, 6).numpy()
  scale = (dst + 0.1) / src
  np.testing.assert_allclose(resize_pos_grid(table, (src, src), (dst, dst)),
                             ref(scale_factor=(scale, scale)), atol=2e-5)
  np.testing.assert_allclose(resize_pos_grid(table, (src, src), (dst, dst), offset=0.0),
                             ref(size=(dst, dst), align_corners=False), atol=2e-5)
  np.testing.assert_allclose(np.asarray(resize_pos_grid(jnp.asarray(table), (src, src),
                                                        (dst, dst))),
                             ref(scale_factor=(scale, scale)), atol=2e-5)
