"""transformers model folders in (--format=hf): parity with transformers'
own forward on random, perturbed weights, so a dropped bias, LayerScale or
a wrong LayerNorm epsilon shows up."""
import dataclasses
import os

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers as hf
from flax import nnx

from biovfm_jax import load_encoder
from biovfm_jax.interop import hf as hf_import
from biovfm_jax.interop.__main__ import main as cli_main
from biovfm_jax.models import MaskedAutoencoder, vit_config
from biovfm_jax.train import checkpoint as ckpt_lib

RTOL = 1e-5
_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, image_size=28, patch_size=7)


def _perturb(model, seed=0):
  """Adds noise to every tensor (LayerNorm and LayerScale stay near 1), except
  MAE's fixed sin-cos tables, which our importer checks are sin-cos."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "pos_embed" in name or (isinstance(model, hf.ViTMAEPreTrainedModel)
                                 and "position_embeddings" in name):
        continue
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  return model.eval()


def _models():
  return {
      "dinov2": lambda: hf.Dinov2Model(hf.Dinov2Config(**_TINY, layerscale_value=0.5)),
      "dinov2_swiglu": lambda: hf.Dinov2Model(hf.Dinov2Config(
          **_TINY, use_swiglu_ffn=True)),
      "dinov2_with_registers": lambda: hf.Dinov2WithRegistersModel(
          hf.Dinov2WithRegistersConfig(**_TINY, num_register_tokens=2)),
      "vit": lambda: hf.ViTModel(hf.ViTConfig(**_TINY), add_pooling_layer=True),
      "vit_no_qkv_bias": lambda: hf.ViTModel(hf.ViTConfig(**_TINY, qkv_bias=False)),
      "vit_mae": lambda: _mae_sincos(hf.ViTMAEModel(hf.ViTMAEConfig(**_TINY,
                                                                   mask_ratio=0.0))),
  }


def _import(model, tmp_path):
  src, out = tmp_path / "hf", tmp_path / "run"
  model.save_pretrained(src)
  assert cli_main(["import", "--format=hf", f"--src={src}", f"--out={out}"]) == 0
  return out


def _images(size, n=8, seed=1):  # 8: one per fake device
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _close(ours, ref):
  ref = np.asarray(ref)
  scale = np.abs(ref).max()
  np.testing.assert_allclose(ours, ref, rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize("name", sorted(_models()))
def test_import_matches_transformers(name, tmp_path):
  torch.manual_seed(0)
  model = _perturb(_models()[name]())
  out = _import(model, tmp_path)
  enc = load_encoder(str(out))
  x = _images(_TINY["image_size"])
  kwargs = {}
  if name == "vit_mae":  # increasing noise keeps the patch order
    kwargs["noise"] = torch.arange(enc.config.num_patches).float().expand(len(x), -1)
  with torch.no_grad():
    ref = model(torch.from_numpy(x).permute(0, 3, 1, 2), **kwargs).last_hidden_state
  got = enc(x)
  regs = model.config.to_dict().get("num_register_tokens", 0)
  assert enc.config.num_registers == regs
  _close(np.asarray(got["cls"]), ref[:, 0])
  _close(np.asarray(got["patch_tokens"]), ref[:, 1 + regs:])
  want_eps = model.config.layer_norm_eps
  assert enc.config.layernorm_eps == want_eps


def _mae_sincos(model):
  """transformers 5.25 leaves a fresh model's fixed sin-cos tables unset:
  fill them with its own initialisers (published files carry them)."""
  with torch.no_grad():
    emb = getattr(model, "vit", model).embeddings
    emb.patch_embeddings.projection._is_hf_initialized = False
    emb.initialize_weights()
    if hasattr(model, "decoder"):
      model.decoder.initialize_weights(emb.patch_embeddings.num_patches)
  return model


def test_vit_mae_pretraining_keeps_the_decoder(tmp_path):
  cfg = hf.ViTMAEConfig(**_TINY, decoder_hidden_size=16, decoder_num_hidden_layers=2,
                        decoder_num_attention_heads=2, decoder_intermediate_size=48)
  model = _perturb(_mae_sincos(hf.ViTMAEForPreTraining(cfg)))
  out = _import(model, tmp_path)
  run = ckpt_lib.read_run(ckpt_lib.find_step_dir(str(out), None))
  assert run["decoder"] == dict(decoder_width=16, decoder_depth=2, decoder_heads=2,
                                decoder_mlp_dim=48)
  assert run["backbone"] == "params/encoder" and run["objective"] == "mae"
  # Fixed sin-cos positions (no parameter), as --format=mae gives them.
  assert run["encoder"]["pos_embed"] == "sincos"
  x = _images(_TINY["image_size"])
  pixels = torch.from_numpy(x).permute(0, 3, 1, 2)
  n = (_TINY["image_size"] // _TINY["patch_size"]) ** 2
  noise = np.random.default_rng(2).uniform(size=(len(x), n)).astype(np.float32)
  with torch.no_grad():
    ref = model(pixels, noise=torch.from_numpy(noise))
    ref_latent = model.vit(pixels, noise=torch.from_numpy(noise)).last_hidden_state
  # Encoder on the kept patches, then the decoder, as transformers' (same noise).
  config, params, decoder, _ = hf_import.from_hf(str(tmp_path / "hf"))
  mae = _merged(lambda: MaskedAutoencoder(config, **decoder, rngs=nnx.Rngs(0)), params)
  latent, mask, _ = mae.encode_masked(x, noise, mask_ratio=cfg.mask_ratio)
  _close(np.asarray(latent), ref_latent)
  pred, mask = mae(x, noise, mask_ratio=cfg.mask_ratio)
  np.testing.assert_array_equal(np.asarray(mask), ref.mask.numpy().astype(bool))
  _close(np.asarray(pred), ref.logits)
  # The checkpoint's encoder sees every patch.
  model.config.mask_ratio = 0.0
  with torch.no_grad():
    ref_all = model.vit(pixels, noise=torch.arange(n).float().expand(len(x), -1))
  _close(np.asarray(load_encoder(str(out))(x)["cls"]), ref_all.last_hidden_state[:, 0])


def _merged(build, params):
  """A model holding `params`, built without a random init."""
  graphdef, state, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state, rest)


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "sharded"])
def test_other_weight_files(layout, tmp_path):
  model = _perturb(_models()["vit"]())
  src = tmp_path / "hf"
  if layout == "sharded":  # model.safetensors.index.json + shards
    model.save_pretrained(src, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").exists()
  else:
    model.save_pretrained(src)
    sd = safetensors.torch.load_file(src / "model.safetensors")
    torch.save(sd, src / layout)
    os.remove(src / "model.safetensors")
  out = tmp_path / "run"
  assert cli_main(["import", "--format=hf", f"--src={src}", f"--out={out}"]) == 0
  x = _images(_TINY["image_size"])
  with torch.no_grad():
    ref = model(torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state
  _close(np.asarray(load_encoder(str(out))(x)["cls"]), ref[:, 0])


def test_unsupported_model_type(tmp_path, capsys):
  src = tmp_path / "hf"
  hf.DeiTModel(hf.DeiTConfig(**_TINY)).save_pretrained(src)
  capsys.readouterr()  # save_pretrained's progress bar
  assert cli_main(["import", "--format=hf", f"--src={src}",
                   f"--out={tmp_path / 'run'}"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert "'deit'" in err and "dinov2, dinov2_with_registers, vit, vit_mae" in err


def test_old_checkpoint_without_layernorm_eps_loads(tmp_path):
  src = tmp_path / "hf"
  _perturb(_models()["vit"]()).save_pretrained(src)
  config, params, _, _ = hf_import.from_hf(str(src))
  assert config.layernorm_eps == 1e-12
  encoder = dataclasses.asdict(config)
  del encoder["layernorm_eps"]  # what a checkpoint from before the field records
  out = str(tmp_path / "old")
  ckpt_lib.save_params(out, params, {"backbone": "params", "encoder": encoder})
  assert load_encoder(out).config.layernorm_eps == 1e-6


def test_layernorm_eps_reaches_every_layernorm():
  # At these widths 1e-12 vs 1e-6 moves outputs by less than the parity
  # tolerance, so check the plumbing itself (decoder included).
  from biovfm_jax.models import layers
  config = vit_config(None, width=32, depth=2, num_heads=4, patch_size=7,
                      image_size=28, layernorm_eps=1e-12)
  mae = nnx.eval_shape(lambda: MaskedAutoencoder(config, decoder_width=16, decoder_depth=1,
                                                 decoder_heads=2, rngs=nnx.Rngs(0)))
  norms = [m for _, m in nnx.iter_graph(mae) if isinstance(m, layers.LayerNorm)]
  assert len(norms) == 2 * 2 + 1 + 2 * 1 + 1
  assert {m.eps for m in norms} == {1e-12}


# --- Another input size: the learned position table resized, at import
# (--image-size) or at run time. A 259 px file at patch 7 is a 37x37 grid and
# 112 px a 16x16 one: DINOv2's 518 px at patch 14 fed at 224 px.
#
# transformers' interpolate_pos_encoding, for Dinov2Model and ViTModel alike,
# passes size=(16, 16) to F.interpolate (scale 16 / 37); Meta's DINOv2 uses
# scale_factor (16 + 0.1) / 37 (its interpolate_offset). Sources are sampled up
# to 0.2 of a position apart, a few % of the tokens on these rough random
# tables. A --format=hf import records interpolate_offset=0.0 and so resizes as
# transformers, at import and at run time: equal to RTOL; the DINOv2 rule
# (offset 0.1, every other import) is measured here to show the test can fail.
_FILE_PX, _RUN_PX = 259, 112


def _resized_models():
  big = dict(_TINY, image_size=_FILE_PX)
  return {"dinov2": lambda: hf.Dinov2Model(hf.Dinov2Config(**big, layerscale_value=0.5)),
          "vit": lambda: hf.ViTModel(hf.ViTConfig(**big))}


def _hf_tokens(model, x):
  """transformers' last_hidden_state, its position table interpolated to x's size."""
  kwargs = {"interpolate_pos_encoding": True} if isinstance(model, hf.ViTModel) else {}
  with torch.no_grad():  # Dinov2Model always interpolates
    return model(torch.from_numpy(x).permute(0, 3, 1, 2), **kwargs).last_hidden_state.numpy()


def _tokens(enc, x):
  out = enc(x)
  return np.concatenate([np.asarray(out["cls"])[:, None], np.asarray(out["patch_tokens"])], 1)


def _rel_err(ours, ref) -> float:
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _with_table(model, table):
  """A copy of `model` whose patch position rows are `table` (1, g*g, D)."""
  import copy
  out = copy.deepcopy(model)
  emb = out.embeddings
  with torch.no_grad():
    emb.position_embeddings = torch.nn.Parameter(
        torch.cat([emb.position_embeddings[:, :1], table], 1))
  return out


def _resized_import(name, tmp_path, *extra):
  torch.manual_seed(0)
  model = _perturb(_resized_models()[name]())
  src = tmp_path / "hf"
  if not src.exists():
    model.save_pretrained(src)
  out = tmp_path / ("run" + "".join(a.replace("-", "") for a in extra))
  assert cli_main(["import", "--format=hf", f"--src={src}", f"--out={out}", *extra]) == 0
  return model, load_encoder(str(out))


@pytest.mark.parametrize("name", sorted(_resized_models()))
def test_image_size_against_transformers_interpolate_pos_encoding(name, tmp_path):
  model, enc = _resized_import(name, tmp_path, f"--image-size={_RUN_PX}")
  assert enc.config.image_size == _RUN_PX
  x = _images(_RUN_PX)
  ours = _tokens(enc, x)
  big, small = _FILE_PX // _TINY["patch_size"], _RUN_PX // _TINY["patch_size"]
  grid = model.embeddings.position_embeddings[:, 1:].reshape(1, big, big, -1).permute(0, 3, 1, 2)

  def table(**kwargs):
    with torch.no_grad():
      out = torch.nn.functional.interpolate(grid, mode="bicubic", align_corners=False, **kwargs)
    return out.permute(0, 2, 3, 1).reshape(1, small * small, -1)

  # transformers' own interpolate_pos_encoding: equal.
  assert enc.config.interpolate_offset == 0.0
  _close(ours, _hf_tokens(model, x))
  # Meta's DINOv2 rule (offset 0.1) differs by a few %: this comparison can fail.
  meta = _with_table(model, table(scale_factor=((small + 0.1) / big,) * 2))
  assert _rel_err(ours, _hf_tokens(meta, x)) > 1e-3


@pytest.mark.parametrize("name", sorted(_resized_models()))
def test_run_time_resize_matches_the_import(name, tmp_path):
  """The file's size imported, fed 112 px: load_encoder resizes the table per
  call by the same rule as --image-size=112 at import."""
  model, at_file = _resized_import(name, tmp_path)
  _, at_run = _resized_import(name, tmp_path, f"--image-size={_RUN_PX}")
  assert at_file.config.image_size == _FILE_PX
  x = _images(_RUN_PX)
  _close(_tokens(at_file, x), _tokens(at_run, x))
  _close(_tokens(at_file, x), _hf_tokens(model, x))
