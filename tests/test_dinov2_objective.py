"""DINOv2 objective on a tiny ViT: the loss assembled as PAPER.md describes
(checked against numpy), gradients, teacher EMA, centers, bf16, FLOPs,
visualisation, and a short training run that does not collapse."""
import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from biovfm_jax.models.dino_head import DINOHead
from biovfm_jax.objectives.dinov2 import DINOv2Objective
from configs import dinov2_base
from test_dinov2_losses import (ref_cost, ref_dino, ref_ibot, ref_koleo, ref_log_softmax,
                                ref_sinkhorn, ref_softmax)

K = 64
B = 8
N_LOCAL = 2
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def make_config(model=None, **dinov2):
  c = dinov2_base.get_config(None)
  c.image_size = 32  # the global crops too
  c.model.update(dict(width=32, depth=2, num_heads=2, patch_size=8, pos_embed="learned",
                      layerscale_init=1e-5, drop_path_rate=0.1, dtype="float32"),
                 **(model or {}))
  c.dinov2.update(dict(head_hidden=64, head_bottleneck=16, head_layers=3,
                       num_prototypes=K, n_local_crops=N_LOCAL), **dinov2)
  c.data.update(local_crop_size=16, mean=MEAN, std=STD)
  return c


def make_batch(seed=0, b=B):
  """Random crops; iBOT masks on half of the images (10-50% of 16 patches)."""
  rng = np.random.default_rng(seed)
  masks = np.zeros((b, 2, 16), bool)
  for i in range(b):
    for c in range(2):
      if (i + c) % 2 == 0:
        masks[i, c, rng.permutation(16)[:rng.integers(2, 9)]] = True
  return {"global_crops": rng.normal(size=(b, 2, 32, 32, 3)).astype(np.float32),
          "local_crops": rng.normal(size=(b, N_LOCAL, 16, 16, 3)).astype(np.float32),
          "masks": masks, "skipped": np.zeros((b,), np.int32)}


COLORS = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)


def color_batch(seed, b=B):
  """Toy data with 8 classes: every crop of an image of class c is colour c
  plus pixel noise. Returns (batch, class ids)."""
  rng = np.random.default_rng(seed)
  batch = make_batch(seed, b)
  ids = rng.integers(0, len(COLORS), b)
  for key, size, n in (("global_crops", 32, 2), ("local_crops", 16, N_LOCAL)):
    noise = 0.3 * rng.normal(size=(b, n, size, size, 3))
    batch[key] = (COLORS[ids][:, None, None, None] + noise).astype(np.float32)
  return batch, ids


def params_of(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def make_train_step(obj, model, tx):
  """The trainer's update, in plain JAX: loss+grad on the student, AdamW,
  then the objective's EMA teacher update."""
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def step(params, opt_state, extra, batch, rng, i):
    def loss_fn(p):
      student = nnx.merge(graphdef, nnx.State(p), rest)
      loss, aux, new_extra = obj.loss(student, batch, rng, i, extra)
      return loss, (aux, new_extra)
    (loss, (aux, new_extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    new_extra = obj.after_update(params, new_extra, i)
    return params, opt_state, new_extra, loss, aux, grads

  return step


@pytest.fixture(scope="module")
def trained():
  """Objective, model, initial state and the compiled step (used by several
  tests). Stock DINOv2 settings except MAE's init and no LayerScale, so the
  cls token depends on the image from the first step: at DINOv2's init
  (LayerScale 1e-5) it is ~the same for every image, and on this tiny model
  the teacher's targets drift to uniform over the first few hundred steps
  (checked by hand: entropy ~log K by step 300 on the toy data below)."""
  obj = DINOv2Objective(make_config(dict(init="mae", layerscale_init=None)),
                        total_steps=50, steps_per_epoch=5)
  model = obj.init_model(nnx.Rngs(0))
  params = params_of(model)
  extra = obj.init_extra(params)
  tx = optax.adamw(1e-3, b1=0.9, b2=0.999, weight_decay=0.04)
  step = make_train_step(obj, model, tx)
  return obj, model, params, extra, tx, step


def leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --- model and state ------------------------------------------------------------------

def test_model_structure_and_init_extra(trained):
  obj, model, params, extra, _, _ = trained
  assert set(extra) == {"teacher", "center", "patch_center"}
  assert jax.tree.structure(extra["teacher"]) == jax.tree.structure(params)
  assert leaves_equal(extra["teacher"], params)
  for key in ("center", "patch_center"):
    assert extra[key].shape == (1, K) and extra[key].dtype == jnp.float32
    assert not np.asarray(extra[key]).any()
  # The iBOT mask token (zeros) and the prototypes, sharded over 'prototypes'.
  np.testing.assert_array_equal(model.backbone.mask_token[...], 0.0)
  assert model.backbone.config.mask_token
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert tuple(specs["dino_head"]["last_layer"].get_value()) == ("embed", "prototypes")
  assert model.dino_head.last_layer.shape == (16, K)
  assert model.ibot_head is None
  assert [m.kernel.shape for m in model.dino_head.mlp] == [(32, 64), (64, 64), (64, 16)]
  paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  assert [p for p in paths if "last_layer" in p] == ["dino_head/last_layer",
                                                     "dino_head/last_layer_gain"]
  assert tuple(specs["dino_head"]["last_layer_gain"].get_value()) == ("prototypes",)
  np.testing.assert_array_equal(model.dino_head.last_layer_gain[...], 1.0)
  # Head: linears trunc-normal .02, zero biases.
  np.testing.assert_allclose(np.asarray(model.dino_head.mlp[1].kernel[...]).std(), 0.02,
                             rtol=0.15)
  assert not np.asarray(model.dino_head.mlp[0].bias[...]).any()
  # DINOv2's backbone init is the default: cls ~ N(0, 1e-6), LayerScale 1e-5,
  # block linears N(0, .02), patch embedding U(+-1/sqrt(fan_in)).
  dino = DINOv2Objective(make_config(dict(width=64, num_heads=4)), total_steps=10,
                         steps_per_epoch=5).init_model(nnx.Rngs(0))
  bb = dino.backbone
  assert bb.config.init == "dinov2" and bb.config.layerscale_init == 1e-5
  assert 0 < np.abs(np.asarray(bb.cls_token[...])).max() < 1e-5
  blk = bb.blocks.layers[0]
  for kernel in (blk.attn.qkv_kernel, blk.attn.proj_kernel, blk.mlp.fc1.kernel,
                 blk.mlp.fc2.kernel):
    np.testing.assert_allclose(np.asarray(kernel[...]).std(), 0.02, rtol=0.1)
  bound = 1 / np.sqrt(8 * 8 * 3)
  pe = np.asarray(bb.patch_embed.kernel[...])
  assert np.abs(pe).max() <= bound and np.abs(pe).max() > 0.95 * bound
  assert np.abs(np.asarray(bb.patch_embed.bias[...])).max() > 0
  assert not np.asarray(blk.attn.qkv_bias[...]).any()
  # Separate iBOT head with its own prototype count.
  sep = DINOv2Objective(make_config(separate_ibot_head=True, ibot_num_prototypes=48),
                        total_steps=10, steps_per_epoch=5)
  m2 = nnx.eval_shape(lambda: sep.init_model(nnx.Rngs(0)))
  assert m2.ibot_head.last_layer.shape == (16, 48)
  assert jax.eval_shape(sep.init_extra, params_of(m2))["patch_center"].shape == (1, 48)


def test_dino_head_outputs_cosines():
  head = DINOHead(32, 40, hidden_dim=64, bottleneck_dim=16, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (5, 32))
  y = head(x)
  assert y.shape == (5, 40) and y.dtype == jnp.float32
  # Normalised bottleneck . unit prototypes: cosine similarities.
  z = np.asarray(head.features(x))
  v = np.asarray(head.last_layer[...])
  np.testing.assert_allclose(y, z @ (v / np.linalg.norm(v, axis=0)), rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(y)).max() <= 1.0 + 1e-6
  # Scaling the prototypes changes nothing (weight norm: their gain g, from 1,
  # sets the scale), g scales each prototype's logits.
  head.last_layer.set_value(head.last_layer[...] * 7.0)
  np.testing.assert_allclose(head(x), y, rtol=1e-5, atol=1e-6)
  g = np.linspace(-1.0, 2.0, 40, dtype=np.float32)
  head.last_layer_gain.set_value(jnp.asarray(g))
  np.testing.assert_allclose(head(x), np.asarray(y) * g, rtol=1e-5, atol=1e-6)


def test_schedules_and_after_update(trained):
  obj, _, params, extra, _, _ = trained
  assert float(obj.teacher_momentum(0)) == pytest.approx(0.992)
  assert float(obj.teacher_momentum(50)) == 1.0
  # 30 warmup epochs x 5 steps: np.linspace(0.04, 0.07, 150), then 0.07.
  assert float(obj.teacher_temperature(0)) == pytest.approx(0.04)
  assert float(obj.teacher_temperature(60)) == pytest.approx(0.04 + 0.03 * 60 / 149)
  assert float(obj.teacher_temperature(149)) == pytest.approx(0.07)
  assert float(obj.teacher_temperature(400)) == pytest.approx(0.07)
  moved = jax.tree.map(lambda x: x + 1.0, params)
  new = obj.after_update(moved, extra, 0)
  assert new["center"] is extra["center"] and new["patch_center"] is extra["patch_center"]
  for t, p, n in zip(jax.tree.leaves(extra["teacher"]), jax.tree.leaves(moved),
                     jax.tree.leaves(new["teacher"])):
    np.testing.assert_allclose(n, 0.992 * t + 0.008 * p, rtol=1e-6, atol=1e-7)
  assert leaves_equal(obj.after_update(moved, extra, 50)["teacher"], extra["teacher"])


# --- the loss --------------------------------------------------------------------------

def _manual_loss(obj, student, teacher, batch, extra, step=0):
  """The loss written out from PAPER.md on crop-major rows, with numpy
  references, from the raw outputs of the two networks (drop path off)."""
  gc, lc, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
  temp = float(obj.teacher_temperature(step))
  t_cls, t_patch, s_cls, s_patch = [], [], [], []
  for c in range(2):   # crop-major: crop 0 of all images, then crop 1
    tc, tp = teacher.encode(jnp.asarray(gc[:, c]))
    sc, sp = student.encode(jnp.asarray(gc[:, c]), masks=jnp.asarray(masks[:, c]))
    t_cls.append(tc), t_patch.append(tp), s_cls.append(sc), s_patch.append(sp)
  f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
  t_logits = f64(teacher.dino_head(jnp.concatenate(t_cls)))
  s_global = f64(student.dino_head(jnp.concatenate(s_cls)))
  s_local = [f64(student.dino_head(student.encode(jnp.asarray(lc[:, i]))[0]))
             for i in range(lc.shape[1])]
  t_patch_logits = f64(teacher.patch_head()(jnp.concatenate(t_patch)))
  s_patch_logits = f64(student.patch_head()(jnp.concatenate(s_patch)))
  m = np.concatenate([masks[:, 0], masks[:, 1]])
  center, patch_center = f64(extra["center"]), f64(extra["patch_center"])
  if obj.centering == "softmax":
    t_probs = ref_softmax((t_logits - center) / temp)
    t_patch_probs = ref_softmax((t_patch_logits - patch_center) / temp)
  else:
    t_probs = ref_sinkhorn(t_logits, temp)
    t_patch_probs = np.zeros_like(t_patch_logits)
    t_patch_probs[m] = ref_sinkhorn(t_patch_logits[m], temp)
  local, glob = ref_dino(s_global, s_local, t_probs)
  koleo = sum(ref_koleo(f64(x)) for x in s_cls)
  ibot = ref_ibot(s_patch_logits, t_patch_probs, m)
  return dict(
      loss=local + glob + 0.1 * koleo + ibot, dino_local=local, dino_global=glob, koleo=koleo,
      ibot=ibot, teacher_entropy=np.mean(-(t_probs * np.log(t_probs + 1e-30)).sum(-1)),
      center=0.9 * center + 0.1 * t_logits.mean(0, keepdims=True),
      patch_center=0.9 * patch_center + 0.1 * t_patch_logits[m].mean(0, keepdims=True))


@pytest.mark.parametrize("centering,separate", [("softmax", False),
                                                ("sinkhorn_knopp", True)])
def test_loss_matches_paper_assembly(centering, separate):
  # No drop path; no LayerScale and MAE's init, so that cls tokens differ
  # between images (at DINOv2's init they are all ~equal and KoLeo is
  # dominated by float32 rounding).
  obj = DINOv2Objective(make_config(dict(drop_path_rate=0.0, layerscale_init=None,
                                         init="mae"), centering=centering,
                                    separate_ibot_head=separate),
                        total_steps=50, steps_per_epoch=5)
  student = obj.init_model(nnx.Rngs(0))
  teacher = obj.init_model(nnx.Rngs(1))   # a teacher that differs from the student
  rng = np.random.default_rng(7)
  extra = {"teacher": params_of(teacher),
           "center": jnp.asarray(rng.normal(size=(1, K)) * 0.1, jnp.float32),
           "patch_center": jnp.asarray(rng.normal(size=(1, K)) * 0.1, jnp.float32)}
  batch = make_batch(1)
  graphdef, state = nnx.split(student)
  loss, aux, new_extra = jax.jit(lambda st: obj.loss(nnx.merge(graphdef, st), batch,
                                                     jax.random.key(0), 3, extra))(state)
  want = _manual_loss(obj, student, teacher, batch, extra, step=3)
  for key in ("dino_local", "dino_global", "koleo", "ibot", "teacher_entropy"):
    np.testing.assert_allclose(aux[key], want[key], rtol=2e-4, atol=1e-5, err_msg=key)
  np.testing.assert_allclose(loss, want["loss"], rtol=2e-4)
  assert aux["teacher_temp"] == pytest.approx(0.04 + 0.03 * 3 / 149, rel=1e-6)
  if centering == "softmax":
    # The loss used the old centers; the new ones are returned.
    np.testing.assert_allclose(new_extra["center"], want["center"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new_extra["patch_center"], want["patch_center"], rtol=1e-4,
                               atol=1e-6)
  else:   # Sinkhorn-Knopp: centers unused and unchanged
    np.testing.assert_array_equal(new_extra["center"], extra["center"])
  assert leaves_equal(new_extra["teacher"], extra["teacher"])


def test_train_step_gradients_centers_and_ema(trained):
  obj, _, params, extra, tx, step = trained
  batch = make_batch(2)
  new_params, _, new_extra, loss, aux, grads = step(
      params, tx.init(params), extra, batch, jax.random.key(0), jnp.int32(0))
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  for g in (grads["backbone"]["mask_token"], grads["dino_head"]["last_layer"],
            grads["backbone"]["blocks"]["layers"][0]["attn"]["qkv_kernel"],
            grads["backbone"]["pos_embed"]):
    assert np.abs(np.asarray(g)).max() > 0
  for key in ("dino_local", "dino_global", "koleo", "ibot", "teacher_entropy",
              "center_norm", "teacher_temp", "teacher_momentum"):
    assert aux[key].shape == () and np.isfinite(float(aux[key])), key
  assert float(aux["teacher_momentum"]) == pytest.approx(0.992)
  assert float(aux["ibot_truncated"]) == 0.0
  np.testing.assert_allclose(float(loss), float(
      aux["dino_local"] + aux["dino_global"] + 0.1 * aux["koleo"] + aux["ibot"]), rtol=1e-5)
  # Centers moved away from zero; the teacher moved toward the new student.
  assert np.abs(np.asarray(new_extra["center"])).max() > 0
  assert np.abs(np.asarray(new_extra["patch_center"])).max() > 0
  assert float(aux["center_norm"]) == pytest.approx(
      float(jnp.linalg.norm(new_extra["center"])), rel=1e-5)
  for t0, p1, t1 in zip(jax.tree.leaves(extra["teacher"]), jax.tree.leaves(new_params),
                        jax.tree.leaves(new_extra["teacher"])):
    np.testing.assert_allclose(t1, 0.992 * t0 + 0.008 * p1, rtol=1e-5, atol=1e-7)
  dist = lambda a, b: sum(float(jnp.sum((x - y) ** 2))  # noqa: E731
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert 0 < dist(new_extra["teacher"], new_params) < dist(extra["teacher"], new_params)


def test_short_training_does_not_collapse(trained):
  """50 AdamW steps with the EMA teacher (momentum 0.992, teacher temperature
  in its warmup, as in the stock recipe's first epochs) on 8-class toy data:
  the teacher's cls targets stay away from both collapses (one-hot: entropy
  0; uniform: log K), and different classes get different prototypes."""
  obj, model, params, extra, tx, step = trained
  opt_state = tx.init(params)
  entropies, losses = [], []
  for i in range(50):
    params, opt_state, extra, loss, aux, _ = step(
        params, opt_state, extra, color_batch(100 + i)[0], jax.random.key(i), jnp.int32(i))
    entropies.append(float(aux["teacher_entropy"]))
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  log_k = np.log(K)
  assert min(entropies) > 0.05 * log_k and max(entropies) < 0.98 * log_k, entropies
  # Held-out images: the teacher's favourite prototype is mostly the same
  # within a class and differs between classes.
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  teacher = obj.teacher(nnx.merge(graphdef, nnx.State(params), rest), extra)
  batch, ids = color_batch(999, 64)
  logits = teacher.dino_head(teacher.encode(jnp.asarray(batch["global_crops"][:, 0]))[0])
  top = np.asarray(jnp.argmax(logits - extra["center"], axis=-1))
  majority = {c: np.bincount(top[ids == c]).argmax() for c in set(ids.tolist())}
  agree = np.mean([top[i] == majority[c] for i, c in enumerate(ids)])
  assert agree > 0.75 and len(set(majority.values())) >= 4, (top, ids)


def test_bf16_compute():
  obj = DINOv2Objective(make_config(dict(dtype="bfloat16")), total_steps=10,
                        steps_per_epoch=5)
  model = obj.init_model(nnx.Rngs(0))
  params = params_of(model)
  extra = obj.init_extra(params)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p):
    loss, aux, new_extra = obj.loss(nnx.merge(graphdef, nnx.State(p), rest), make_batch(3),
                                    jax.random.key(0), 0, extra)
    return loss, (aux, new_extra)

  (loss, (aux, new_extra)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  assert all(v.dtype == jnp.float32 for v in aux.values())
  assert new_extra["center"].dtype == jnp.float32
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  # bf16 activations, float32 head logits.
  x = jnp.asarray(make_batch(3)["global_crops"][:, 0])
  cls, _ = model.encode(x)
  assert cls.dtype == jnp.bfloat16 and model.dino_head(cls).dtype == jnp.float32


# --- reporting ------------------------------------------------------------------------

def _block(t, d, m):
  return 2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d + 4 * t * d * m


def test_flops_per_example():
  obj = DINOv2Objective(make_config(), total_steps=10, steps_per_epoch=5)
  # Tiny: patch 8, D=32, M=128, depth 2; global 32 px (16 patches + cls),
  # local 16 px (4 + cls); head 32-64-64-16, K=64; 9 iBOT slots per crop.
  d, m, pd = 32, 128, 8 * 8 * 3
  vit = lambda n: 2 * n * pd * d + 2 * _block(n + 1, d, m)  # noqa: E731
  head = lambda rows: rows * (2 * (32 * 64 + 64 * 64 + 64 * 16) + 2 * 16 * K)  # noqa: E731
  student = 2 * vit(16) + 2 * vit(4) + head(2 + 2) + head(2 * 9)
  teacher = 2 * vit(16) + head(2) + head(2 * 9)
  assert obj.ibot_slots == 9
  # The slot count follows the loader's largest mask ratio when given.
  c = make_config()
  c.data.mask_ratio = (0.1, 0.25)
  assert DINOv2Objective(c, total_steps=10, steps_per_epoch=5).ibot_slots == 5
  assert obj.flops_per_example() == 3 * student + teacher
  # ViT-B/16 with the stock recipe: ~35 GFLOPs per 224 crop forward; 2 global
  # + 8 local crops, student x3 plus the teacher, heads with 65k prototypes.
  big = dinov2_base.get_config("B")  # 8 local crops, 224 and 96 px
  f = DINOv2Objective(big, total_steps=10, steps_per_epoch=5).flops_per_example()
  assert 4.2e11 < f < 5.2e11, f


def test_visualize(trained):
  obj, model, _, extra, _, _ = trained
  pixels = np.random.default_rng(5).uniform(size=(3, 2, 32, 32, 3)).astype(np.float32)
  batch = make_batch(4, b=3)
  batch["global_crops"] = (pixels - 0.5) / 0.25
  out = obj.visualize(model, batch, jax.random.key(0), extra)
  assert out.shape == (3, 32, 64, 3) and out.dtype == np.uint8
  np.testing.assert_allclose(out[:, :, :32].astype(int),
                             np.round(pixels[:, 0] * 255).astype(int), atol=1)
  pca = out[:, :, 32:]
  assert pca.min() == 0 and pca.max() == 255
  # One colour per 8x8 patch.
  blocks = pca.reshape(3, 4, 8, 4, 8, 3)
  assert (blocks == blocks[:, :, :1, :, :1]).all()
  assert obj.visualize(model, batch, jax.random.key(0), extra, n=2).shape == (2, 32, 64, 3)


def test_bad_configs_name_the_key():
  with pytest.raises(ValueError, match=r"config\.dinov2\.centering"):
    DINOv2Objective(make_config(centering="kmeans"), total_steps=1, steps_per_epoch=1)
  for key in ("koleo_scope", "ibot_center_scope"):
    with pytest.raises(ValueError, match=rf"config\.dinov2\.{key}='gpu'"):
      DINOv2Objective(make_config(**{key: "gpu"}), total_steps=1, steps_per_epoch=1)
  obj = DINOv2Objective(make_config(koleo_group_size=3), total_steps=1, steps_per_epoch=1)
  assert obj._koleo_group(24, 2) == 3   # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"config\.dinov2\.koleo_group_size=3"):
    obj._koleo_group(16, 2)             # pylint: disable=protected-access
  c = ml_collections.ConfigDict(make_config().to_dict())  # plain values: no shared references
  c.data.global_crop_size = 48
  with pytest.raises(ValueError, match=r"config\.data\.global_crop_size"):
    DINOv2Objective(c, total_steps=1, steps_per_epoch=1)
  c = make_config()
  c.data.local_crop_size = 12
  with pytest.raises(ValueError, match=r"config\.data\.local_crop_size"):
    DINOv2Objective(c, total_steps=1, steps_per_epoch=1)


def test_sharded_loss_matches_unsharded(trained):
  """Batch over 'data', prototypes and MLPs over 'tensor', with the global
  KoLeo and iBOT center: the same loss and centers as on one device."""
  from biovfm_jax import sharding as shd
  _, model, params, extra, _, _ = trained
  obj = DINOv2Objective(make_config(dict(init="mae", layerscale_init=None),
                                    koleo_scope="global", ibot_center_scope="global"),
                        total_steps=50, steps_per_epoch=5)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  batch = make_batch(6)

  def loss_fn(p, e, b):
    loss, aux, new_extra = obj.loss(nnx.merge(graphdef, nnx.State(p), rest), b,
                                    jax.random.key(0), 0, e)
    return loss, aux["koleo"], new_extra["center"], new_extra["patch_center"]

  want = jax.jit(loss_fn)(params, extra, batch)
  mesh = shd.make_mesh({"data": 4, "tensor": 2})
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
  place = lambda tree: jax.tree.map(  # noqa: E731
      lambda x, s: jax.device_put(x, shd.named_sharding(tuple(s), mesh)), tree, specs,
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  sharded_params = place(params)
  assert "tensor" in str(sharded_params["dino_head"]["last_layer"].sharding.spec)
  sharded_extra = {**extra, "teacher": place(extra["teacher"])}
  sharded_batch = jax.device_put(batch, shd.named_sharding(("batch",), mesh))
  with shd.use_mesh(mesh):
    got = jax.jit(loss_fn)(sharded_params, sharded_extra, sharded_batch)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def _per_gpu_reference(student, teacher, batch, extra, temp, world, n_local):
  """The reference's step on `world` GPUs, each given a contiguous block of
  images, transcribed to numpy from dinov2's loss classes and
  SSLMetaArch.forward_backward (softmax centering). Each rank's tensors are
  crop-major (crop 0 of its images, then crop 1). Returns each term as the
  mean over ranks (the gradient all-reduce averages the ranks' losses, so
  the mean is the loss that is optimised) and the new centers."""
  gc, lc, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
  f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
  crop = lambda net, c, m=None: net.encode(jnp.asarray(gc[:, c]),  # noqa: E731
                                           masks=None if m is None else jnp.asarray(m))
  t_out = [crop(teacher, c) for c in range(2)]
  s_out = [crop(student, c, masks[:, c]) for c in range(2)]
  t_cls = [f64(teacher.dino_head(o[0])) for o in t_out]             # [crop] (B, K)
  t_patch = [f64(teacher.patch_head()(o[1])) for o in t_out]        # [crop] (B, N, K)
  s_cls = [f64(o[0]) for o in s_out]
  s_head = [f64(student.dino_head(o[0])) for o in s_out]
  s_patch = [f64(student.patch_head()(o[1])) for o in s_out]
  s_loc = [f64(student.dino_head(student.encode(jnp.asarray(lc[:, i]))[0]))
           for i in range(n_local)]
  center, patch_center = f64(extra["center"]), f64(extra["patch_center"])
  bl = gc.shape[0] // world
  n_terms = 2 * 1 + max(n_local * 2, 1)
  terms = {k: [] for k in ("dino_local", "dino_global", "koleo", "ibot")}
  center_sum, patch_means = 0.0, []
  for r in range(world):
    rows = slice(r * bl, (r + 1) * bl)
    cat = lambda xs: np.concatenate([x[rows] for x in xs])  # noqa: E731
    t_logits = cat(t_cls)
    t_probs = ref_softmax((t_logits - center) / temp).reshape(2, bl, K)
    targets = [t_probs[1], t_probs[0]]          # chunked and cat'd in reverse
    center_sum = center_sum + t_logits.sum(0)
    m = cat([masks[:, 0], masks[:, 1]])          # (2bl, N)
    t_masked = cat(t_patch)[m]                   # the rank's masked patches, in order
    patch_means.append(t_masked.mean(0))
    t_masked_probs = ref_softmax((t_masked - patch_center) / temp)
    local = sum(ref_cost(s[rows], t) for s in s_loc for t in targets) / n_terms
    glob = ref_cost(cat(s_head), np.concatenate(targets)) * 2 / n_terms
    koleo = sum(ref_koleo(x[rows]) for x in s_cls)
    weight = np.repeat(1 / np.maximum(m.sum(-1), 1), m.sum(-1))
    lsm = ref_log_softmax(cat(s_patch)[m] / 0.1)
    ibot = -((t_masked_probs * lsm).sum(-1) * weight).sum() / m.shape[0] * 2 * (1 / 2)
    for k, v in zip(terms, (local if n_local else 0.0, glob, koleo, ibot)):
      terms[k].append(v)
  out = {k: np.mean(v) for k, v in terms.items()}
  out["loss"] = out["dino_local"] + out["dino_global"] + 0.1 * out["koleo"] + out["ibot"]
  out["center"] = 0.9 * center + 0.1 * center_sum / (2 * bl * world)
  out["patch_center"] = 0.9 * patch_center + 0.1 * np.sum(patch_means, 0) / world
  return out


@pytest.mark.parametrize("n_local", [N_LOCAL, 0])
def test_loss_on_8_devices_matches_reference_per_gpu(n_local):
  """Stock settings on a data 4 x fsdp 2 mesh: every term and both centers
  equal the reference's on 8 GPUs with the same images per GPU; and with
  the global options, KoLeo and the iBOT center differ from it."""
  from biovfm_jax import sharding as shd
  b = 32                                   # 4 images per device
  cfg = dict(drop_path_rate=0.0, layerscale_init=None, init="mae")
  obj = DINOv2Objective(make_config(cfg, n_local_crops=n_local), total_steps=50,
                        steps_per_epoch=5)
  student, teacher = obj.init_model(nnx.Rngs(0)), obj.init_model(nnx.Rngs(1))
  rng = np.random.default_rng(8)
  extra = {"teacher": params_of(teacher),
           "center": jnp.asarray(rng.normal(size=(1, K)) * 0.1, jnp.float32),
           "patch_center": jnp.asarray(rng.normal(size=(1, K)) * 0.1, jnp.float32)}
  batch = make_batch(9, b)
  batch["local_crops"] = batch["local_crops"][:, :n_local]
  mesh = shd.make_mesh({"data": 4, "fsdp": 2})
  sharded = jax.device_put(batch, shd.named_sharding(("batch",), mesh))
  # Device k of the batch axis holds images 4k..4k+3: the blocks of the reference below.
  first = {d: i[0].start for d, i in sharded["masks"].sharding.devices_indices_map(
      (b, 2, 16)).items()}
  assert sorted(first.values()) == list(range(0, b, 4))
  graphdef, state = nnx.split(student)

  def run(o):
    with shd.use_mesh(mesh):
      return jax.jit(lambda st, bt: o.loss(nnx.merge(graphdef, st), bt, jax.random.key(0),
                                           3, extra))(state, sharded)

  loss, aux, new_extra = run(obj)
  want = _per_gpu_reference(student, teacher, batch, extra,
                            float(obj.teacher_temperature(3)), 8, n_local)
  for key in ("dino_local", "dino_global", "koleo", "ibot"):
    np.testing.assert_allclose(aux[key], want[key], rtol=2e-4, atol=1e-5, err_msg=key)
  np.testing.assert_allclose(loss, want["loss"], rtol=2e-4)
  for key in ("center", "patch_center"):
    np.testing.assert_allclose(new_extra[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)
  # The global variants really are different quantities here.
  glob = DINOv2Objective(make_config(cfg, n_local_crops=n_local, koleo_scope="global",
                                     ibot_center_scope="global"),
                         total_steps=50, steps_per_epoch=5)
  _, aux_g, extra_g = run(glob)
  assert abs(float(aux_g["koleo"]) - want["koleo"]) > 1e-2 * abs(want["koleo"])
  assert np.abs(np.asarray(extra_g["patch_center"]) - want["patch_center"]).max() > 1e-4
  np.testing.assert_allclose(aux_g["dino_global"], want["dino_global"], rtol=2e-4)
