"""MAE objective: loss maths against a numpy reference, masking, FLOPs,
visualisation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from biovfm_jax.models import MaskedAutoencoder, vit_config
from configs import mae_base
from biovfm_jax.objectives.mae import (MAEObjective, mae_loss, patchify,
                                       random_masking, unpatchify)

P = 8  # patch size of the tiny model (32 px images -> 4x4 = 16 patches)


# --- numpy reference, written from the MAE reference code ---------------------

def ref_patchify(imgs_nchw, p):
  """MAE's patchify on NCHW: 'nchpwq->nhwpqc'."""
  n, c, hh, ww = imgs_nchw.shape
  h, w = hh // p, ww // p
  x = imgs_nchw.reshape(n, c, h, p, w, p)
  x = np.einsum("nchpwq->nhwpqc", x)
  return x.reshape(n, h * w, p * p * c)


def ref_random_masking(noise, mask_ratio):
  n, length = noise.shape
  len_keep = int(length * (1 - mask_ratio))
  ids_shuffle = np.argsort(noise, axis=1)
  ids_restore = np.argsort(ids_shuffle, axis=1)
  ids_keep = ids_shuffle[:, :len_keep]
  mask = np.ones((n, length))
  mask[:, :len_keep] = 0
  mask = np.take_along_axis(mask, ids_restore, axis=1)
  return ids_keep, mask, ids_restore


def ref_loss(imgs_nchw, pred, mask, p, norm_pix_loss):
  target = ref_patchify(imgs_nchw, p).astype(np.float64)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    # torch's Tensor.var default is unbiased (divide by n - 1).
    var = ((target - mean) ** 2).sum(-1, keepdims=True) / (target.shape[-1] - 1)
    target = (target - mean) / (var + 1.e-6) ** .5
  loss = ((pred - target) ** 2).mean(axis=-1)
  return (loss * mask).sum() / mask.sum()


def rand(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --- pure functions ------------------------------------------------------------

def test_patchify_matches_reference_and_inverts():
  imgs = rand((3, 32, 48, 3))
  ours = np.asarray(patchify(jnp.asarray(imgs), P))
  np.testing.assert_array_equal(ours, ref_patchify(imgs.transpose(0, 3, 1, 2), P))
  back = unpatchify(jnp.asarray(ours), P, grid=(4, 6))
  np.testing.assert_array_equal(np.asarray(back), imgs)
  sq = rand((2, 32, 32, 3))
  np.testing.assert_array_equal(unpatchify(patchify(jnp.asarray(sq), P), P), sq)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.6])
def test_random_masking_matches_reference(ratio):
  noise = np.random.default_rng(1).uniform(size=(4, 196)).astype(np.float32)
  keep, mask, restore = random_masking(jnp.asarray(noise), ratio)
  rkeep, rmask, rrestore = ref_random_masking(noise, ratio)
  np.testing.assert_array_equal(keep, rkeep)
  np.testing.assert_array_equal(mask, rmask)
  np.testing.assert_array_equal(restore, rrestore)
  assert keep.shape == (4, int(196 * (1 - ratio)))
  np.testing.assert_array_equal(np.asarray(mask).sum(1), 196 - keep.shape[1])


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_reference(norm_pix):
  imgs = rand((3, 32, 32, 3))
  pred = rand((3, 16, P * P * 3), seed=2)
  noise = np.random.default_rng(3).uniform(size=(3, 16))
  _, mask, _ = ref_random_masking(noise, 0.75)
  want = ref_loss(imgs.transpose(0, 3, 1, 2), pred, mask, P, norm_pix)
  got = mae_loss(jnp.asarray(imgs), jnp.asarray(pred), jnp.asarray(mask), P,
                 norm_pix_loss=norm_pix)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Only masked patches count.
  pred2 = pred.copy()
  pred2[mask == 0] += 10.0
  got2 = mae_loss(jnp.asarray(imgs), jnp.asarray(pred2), jnp.asarray(mask), P,
                  norm_pix_loss=norm_pix)
  np.testing.assert_allclose(float(got2), float(got), rtol=1e-6)


def test_norm_pix_uses_unbiased_variance():
  # A perfect prediction under the biased (ddof=0) normalisation is not
  # perfect under the reference's unbiased one.
  imgs = rand((1, 8, 8, 3))
  t = ref_patchify(imgs.transpose(0, 3, 1, 2), P)
  biased = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
  mask = jnp.ones((1, 1))
  assert float(mae_loss(jnp.asarray(imgs), jnp.asarray(biased), mask, P)) > 1e-6
  n = t.shape[-1]
  unbiased = biased * np.sqrt((n - 1) / n)
  assert float(mae_loss(jnp.asarray(imgs), jnp.asarray(unbiased), mask, P)) < 1e-8


# --- model + objective -----------------------------------------------------------

def make_config(**mae):
  c = mae_base.get_config(None)
  c.image_size = 32
  c.model.update(width=64, depth=2, num_heads=4, patch_size=P, dtype="float32")
  c.mae.update(dict(mask_ratio=0.75, decoder_width=32, decoder_depth=1, decoder_heads=4,
                    norm_pix_loss=True), **mae)
  c.data.update(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
  return c


@pytest.fixture(scope="module")
def objective_and_model():
  obj = MAEObjective(make_config())
  return obj, obj.init_model(nnx.Rngs(0))


def test_encoder_sees_exactly_the_kept_patches(objective_and_model):
  _, model = objective_and_model
  imgs = jnp.asarray(rand((2, 32, 32, 3)))
  noise = jnp.asarray(np.random.default_rng(4).uniform(size=(2, 16)), jnp.float32)
  keep, mask, _ = ref_random_masking(np.asarray(noise), 0.75)

  @nnx.jit
  def run(model, imgs):
    latent, m, _ = model.encode_masked(imgs, noise, mask_ratio=0.75)
    # Manual gather of the kept patch tokens, then the encoder.
    tokens = model.encoder.embed_patches(imgs)
    manual = jnp.stack([tokens[b, keep[b]] for b in range(2)])
    pred, m2 = model(imgs, noise, mask_ratio=0.75)
    return latent, m, model.encoder.encode_tokens(manual), pred, m2

  latent, m, manual, pred, m2 = run(model, imgs)
  assert latent.shape == (2, 1 + 4, 64)
  np.testing.assert_allclose(latent, manual, atol=1e-6)
  np.testing.assert_array_equal(m, mask)
  np.testing.assert_array_equal(m2, mask)
  assert pred.shape == (2, 16, P * P * 3) and pred.dtype == jnp.float32

  # Changing the pixels of masked patches leaves the latent untouched;
  # changing a visible patch does not.
  patches = np.asarray(patchify(imgs, P)).copy()
  hidden = patches.copy()
  hidden[mask == 1] += 5.0
  visible = patches.copy()
  visible[0, keep[0, 0]] += 5.0
  for changed, same in ((hidden, True), (visible, False)):
    out = run(model, unpatchify(jnp.asarray(changed), P))[0]
    assert np.allclose(out, latent, atol=1e-6) == same


def test_loss_step(objective_and_model):
  obj, model = objective_and_model
  batch = {"image": jnp.asarray(rand((4, 32, 32, 3)))}
  extra = obj.init_extra(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert extra == {}
  step = nnx.jit(lambda m, b, r: nnx.value_and_grad(
      lambda m: obj.loss(m, b, r, 0, extra)[:2], has_aux=True)(m))
  (loss, aux), grads = step(model, batch, jax.random.key(0))
  assert loss.shape == () and np.isfinite(float(loss))
  assert float(aux["mae_loss"]) == float(loss)
  (loss_again, _), _ = step(model, batch, jax.random.key(0))
  (loss_other, _), _ = step(model, batch, jax.random.key(1))
  # The objective interface: extra passes through untouched.
  assert obj.loss(model, batch, jax.random.key(0), 0, extra)[2] == {}
  assert obj.after_update({}, {"x": 1}, 0) == {"x": 1}
  assert float(loss_again) == float(loss) and float(loss_other) != float(loss)
  for g in (grads.encoder.blocks.layers[0].attn.qkv_kernel, grads.decoder_pred.kernel,
            grads.mask_token, grads.encoder.cls_token):
    assert np.abs(np.asarray(g.get_value())).max() > 0


def _block(t, d, m):
  return 2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d + 4 * t * d * m


def test_flops_per_example():
  obj = MAEObjective(make_config(), total_steps=10, steps_per_epoch=5)
  f75 = obj.flops_per_example()
  # Tiny: N=16, P=192, D=64, M=256, decoder 32 wide, 1 deep, M=128.
  n, pd, d, m, dd, md = 16, 192, 64, 256, 32, 128
  want = (2 * n * pd * d + 2 * _block(1 + 4, d, m) + 2 * 5 * d * dd
          + _block(1 + n, dd, md) + 2 * n * dd * pd)
  assert f75 == 3 * want
  f50 = MAEObjective(make_config(mask_ratio=0.5)).flops_per_example()
  # Only the encoder's token count changes with the mask ratio.
  assert f50 - f75 == 3 * (2 * (_block(9, d, m) - _block(5, d, m)) + 2 * 4 * d * dd)
  # ViT-B MAE at 75% masking, 224 px: the encoder on 50 tokens is ~1/4 of a
  # full ViT-B forward (~35 GFLOPs), the 8-block decoder on 197 tokens
  # ~10.7 GFLOPs: ~19.5 GFLOPs forward, ~59 GFLOPs per training image.
  big = mae_base.get_config("B")  # mask ratio 0.75
  fb = MAEObjective(big).flops_per_example()
  assert 55e9 < fb < 62e9


def test_visualize(objective_and_model):
  obj, model = objective_and_model
  pixels = np.random.default_rng(5).uniform(size=(3, 32, 32, 3)).astype(np.float32)
  batch = {"image": (pixels - 0.5) / 0.25}
  out = obj.visualize(model, batch, jax.random.key(0), {}, n=2)
  assert out.shape == (2, 32, 96, 3) and out.dtype == np.uint8
  want = np.round(pixels[:2] * 255).astype(np.uint8)
  np.testing.assert_allclose(out[:, :, :32].astype(int), want, atol=1)
  # Visible patches are pasted from the input into the reconstruction, and
  # the masked input shows them too.
  noise = jax.random.uniform(jax.random.key(0), (2, 16))
  _, mask, _ = random_masking(noise, 0.75)
  vis = np.asarray(unpatchify(jnp.repeat(1 - mask[..., None], P * P * 3, -1), P)) > 0
  np.testing.assert_allclose(out[:, :, 64:][vis].astype(int), want[vis], atol=1)
  np.testing.assert_allclose(out[:, :, 32:64][vis].astype(int), want[vis], atol=1)


def test_bad_mae_config():
  with pytest.raises(ValueError, match=r"config\.mae\.mask_ratio"):
    MAEObjective(make_config(mask_ratio=1.0))
  with pytest.raises(ValueError, match=r"config\.mae\.mask_ratio=0\.99"):
    MAEObjective(make_config(mask_ratio=0.99))


def test_scanned_bf16_mae_runs():
  cfg = dataclasses.replace(vit_config(None, width=64, depth=2, num_heads=4,
                                       patch_size=P, image_size=32),
                            scan_layers=True, dtype="bfloat16", remat_policy="full")
  model = MaskedAutoencoder(cfg, decoder_width=32, decoder_depth=2, decoder_heads=4,
                            rngs=nnx.Rngs(0))
  imgs = jnp.asarray(rand((2, 32, 32, 3)))
  noise = jax.random.uniform(jax.random.key(0), (2, 16))
  loss = nnx.jit(lambda m: mae_loss(imgs, *m(imgs, noise), P))(model)
  assert np.isfinite(float(loss))
