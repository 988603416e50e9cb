"""transformers' DINOv3ViTModel in (--format=hf, model_type dinov3_vit): parity
with transformers' own forward on random, perturbed weights (a dropped bias or
LayerScale shows), at the file's image size and another (non-square) one; and
the import as config.init_from of a DINOv2-with-RoPE run."""
import numpy as np
import pytest
import torch
import transformers as hf

from biovfm_jax import load_encoder
from biovfm_jax.interop import hf as hf_import
from biovfm_jax.interop.__main__ import main as cli_main
from biovfm_jax.train import checkpoint as ckpt_lib
from test_init_from import _flat, _setup

RTOL = 1e-5
_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=48, image_size=16, patch_size=4)
_CASES = {
    # key_bias False (transformers' default), registers, plain GELU MLP.
    "plain_registers": dict(num_register_tokens=2),
    # Gated (SwiGLU) MLP with a k bias.
    "gated_key_bias": dict(use_gated_mlp=True, hidden_act="silu", key_bias=True),
    # Every optional bias off; another RoPE base and LayerNorm epsilon.
    "no_biases": dict(use_gated_mlp=True, hidden_act="silu", query_bias=False,
                      value_bias=False, proj_bias=False, mlp_bias=False,
                      num_register_tokens=1, rope_theta=30.0, layer_norm_eps=1e-6),
}


def _model(**kw):
  torch.manual_seed(0)
  model = hf.DINOv3ViTModel(hf.DINOv3ViTConfig(**{**_TINY, **kw}))
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():  # LayerNorm and LayerScale stay near 1
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  return model.eval()


def _import(model, tmp_path, *flags):
  src, out = tmp_path / "hf", tmp_path / "run"
  model.save_pretrained(src)
  assert cli_main(["import", "--format=hf", f"--src={src}", f"--out={out}", *flags]) == 0
  return src, out


def _images(h, w, n=8, seed=1):  # 8: one per fake device
  return np.random.default_rng(seed).normal(size=(n, h, w, 3)).astype(np.float32)


def _rel_err(ours, ref):
  ref = np.asarray(ref)
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", sorted(_CASES))
def test_import_matches_transformers(name, tmp_path):
  model = _model(**_CASES[name])
  _, out = _import(model, tmp_path)
  enc = load_encoder(str(out))
  c = model.config
  assert enc.config.pos_embed == "rope" and enc.config.key_bias == c.key_bias
  assert enc.config.num_registers == c.num_register_tokens
  assert enc.config.ffn == ("swiglu" if c.use_gated_mlp else "mlp")
  assert (enc.config.rope_base, enc.config.rope_rescale) == (c.rope_theta, 2.0)
  assert enc.config.layernorm_eps == c.layer_norm_eps
  prefix = 1 + c.num_register_tokens
  for h, w in ((16, 16), (24, 32)):  # the file's size, and a larger non-square grid
    x = _images(h, w)
    with torch.no_grad():
      ref = model(torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    got = enc(x)
    assert got["patch_tokens"].shape == (8, h * w // 16, 32)
    errs = (_rel_err(got["cls"], ref[:, 0]), _rel_err(got["patch_tokens"], ref[:, prefix:]))
    print(f"{name} {h}x{w}: max relative error cls {errs[0]:.2e}, patches {errs[1]:.2e}")
    assert max(errs) <= RTOL, errs


def test_missing_key_bias_is_zero_and_image_size_is_free(tmp_path):
  model = _model(num_register_tokens=1)
  src, out = _import(model, tmp_path, "--image-size=32")
  config, params, decoder, _ = hf_import.from_hf(str(src))
  assert decoder is None and config.image_size == 16 and not config.key_bias
  qkv_bias = params["blocks"]["layers"][0]["attn"]["qkv_bias"]
  assert not qkv_bias[32:64].any() and qkv_bias[:32].any() and qkv_bias[64:].any()
  enc = load_encoder(str(out))
  assert enc.config.image_size == 32
  x = _images(32, 32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state.numpy()
  assert _rel_err(enc(x)["cls"], ref[:, 0]) <= RTOL


def test_a_bias_config_json_promises_must_be_there(tmp_path):
  model = _model(key_bias=True)
  src = tmp_path / "hf"
  model.save_pretrained(src)
  import json
  cfg = json.loads((src / "config.json").read_text())
  cfg["value_bias"] = True
  sd = hf_import.read_weights(str(src))
  del sd["layer.1.attention.v_proj.bias"]
  with pytest.raises(hf_import.ConversionError, match="layer.1.attention.v_proj.bias"):
    hf_import._from_dinov3(cfg, sd, None)
  cfg["hidden_act"] = "gelu_pytorch_tanh"
  with pytest.raises(hf_import.ConversionError, match="hidden_act"):
    hf_import._from_dinov3(cfg, hf_import.read_weights(str(src)), None)


def test_dinov2_with_rope_continues_an_import(tmp_path):
  """DINOv2 pretraining (the DINOv3 architecture) from the import: the student
  starts as the import, at another crop size; a mismatched key_bias or
  position kind would be another model."""
  model = _model(num_register_tokens=2, use_gated_mlp=True, hidden_act="silu")
  _, out = _import(model, tmp_path)
  flags = ["--config=configs/quickstart_dinov2.py", "--config.image_size=32",
           "--config.data.local_crop_size=16", "--config.model.size=None",
           "--config.model.patch_size=4", "--config.model.width=32",
           "--config.model.depth=2", "--config.model.num_heads=2",
           "--config.model.mlp_dim=48", "--config.model.ffn=swiglu",
           "--config.model.num_registers=2", "--config.model.layerscale_init=1e-5",
           "--config.model.layernorm_eps=1e-5", "--config.model.pos_embed=rope",
           "--config.model.key_bias=False", "--config.model.rope_rescale=2.0",
           "--config.dinov2.head_hidden=32", "--config.dinov2.head_bottleneck=16",
           "--config.dinov2.num_prototypes=64", "--config.dinov2.n_local_crops=2",
           "--config.batch_size=8", f"--config.init_from={out}"]
  s, params = _setup(flags, tmp_path)
  assert s.objective.encoder_config.pos_embed == "rope"
  saved = _flat(ckpt_lib.restore_host(ckpt_lib.find_step_dir(str(out)), ("params",)))
  got = _flat(params["backbone"])
  assert set(got) == set(saved)
  for k in saved:
    np.testing.assert_allclose(got[k], saved[k], rtol=1e-6, atol=1e-7, err_msg=k)
