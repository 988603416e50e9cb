"""PCA maps of patch features (biovfm_jax/evaluate/pca_map.py), against
scikit-learn's PCA and on a real tiny encoder."""
import jax
import numpy as np
import pytest
from flax import nnx
from sklearn.decomposition import PCA

from biovfm_jax.evaluate.encoder import Encoder
from biovfm_jax.evaluate.pca_map import encoder_pca_map, pca_rgb
from biovfm_jax.models.vit import VisionTransformer, vit_config


def _sklearn_rgb(tokens):
  comps = PCA(n_components=3).fit_transform(tokens.reshape(-1, tokens.shape[-1]))
  lo, hi = comps.min(axis=0), comps.max(axis=0)
  return np.round(255 * (comps - lo) / (hi - lo))


def test_matches_sklearn_pca_up_to_sign():
  rng = np.random.default_rng(0)
  # 3 images of 2 x 3 patches; 3 strong directions over noise in 12 dims.
  tokens = (rng.normal(size=(3, 6, 3)) * [9.0, 4.0, 2.0]) @ rng.normal(size=(3, 12))
  tokens += 0.1 * rng.normal(size=tokens.shape)
  rgb = pca_rgb(tokens, (2, 3))
  assert rgb.shape == (3, 2, 3, 3) and rgb.dtype == np.uint8
  ours = rgb.reshape(-1, 3).astype(int)
  ref = _sklearn_rgb(tokens)
  for c in range(3):  # a component's sign is arbitrary: flipped, the ramp reverses
    assert (np.abs(ours[:, c] - ref[:, c]).max() <= 1
            or np.abs(ours[:, c] - (255 - ref[:, c])).max() <= 1), c
    assert ours[:, c].min() == 0 and ours[:, c].max() == 255
  # Fitted jointly: the same token gets the same colour in every image.
  same = np.repeat(tokens[:1], 2, axis=0)
  assert (pca_rgb(same, (2, 3))[0] == pca_rgb(same, (2, 3))[1]).all()


def test_upsamples_to_patch_blocks_and_pads_missing_components():
  tokens = np.random.default_rng(1).normal(size=(2, 4, 2))  # only 2 feature dims
  rgb = pca_rgb(tokens, (2, 2), upsample=3)
  assert rgb.shape == (2, 6, 6, 3)
  blocks = rgb.reshape(2, 2, 3, 2, 3, 3)
  assert (blocks == blocks[:, :, :1, :, :1]).all()
  assert (rgb[..., 2] == 0).all() and rgb[..., :2].max() == 255
  with pytest.raises(ValueError, match=r"grid \(3, 2\) has 6 patches but the tokens have 4"):
    pca_rgb(tokens, (3, 2))
  with pytest.raises(ValueError, match=r"\(N, L, D\)"):
    pca_rgb(tokens[0], (2, 2))


def test_encoder_pca_map_is_the_map_of_its_patch_tokens():
  cfg = vit_config(None, width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=8,
                   image_size=24)
  model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
  encoder = Encoder(cfg, nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1]))
  n = encoder.data_parallel_size  # the batch splits over the test's fake devices
  images = np.random.default_rng(2).normal(size=(n, 24, 24, 3)).astype(np.float32)
  out = encoder_pca_map(encoder, images)
  assert out.shape == (n, 24, 24, 3) and out.dtype == np.uint8
  tokens = np.asarray(jax.device_get(encoder(images)["patch_tokens"]))
  np.testing.assert_array_equal(out, pca_rgb(tokens, (3, 3), upsample=8))
  with pytest.raises(ValueError, match="multiples of the patch size 8"):
    encoder_pca_map(encoder, images[:, :20, :20])
