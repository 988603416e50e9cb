"""PyTorch interop: timm / MAE / DINOv2 weights in, timm weights out.

Parity is checked against the torch models themselves (timm's
forward_features) on random weights, so a transposed or mis-ordered tensor
shows up as a large error, not just a shape mismatch.
"""
import argparse
import functools
import json
import os
import warnings

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import timm
import torch
from flax import nnx
from timm.layers import SwiGLU, SwiGLUPacked
from torch import nn

from biovfm_jax.interop import (ConversionError, create_timm_model, from_dinov2,
                                from_mae, from_timm, load_state_dict,
                                timm_model_kwargs, timm_model_name, to_timm)
from biovfm_jax.interop.__main__ import CUSTOM_TIMM_MODEL, main as cli_main
from biovfm_jax.interop.dinov2 import from_dinov2_heads
from biovfm_jax.models import MaskedAutoencoder, VisionTransformer, vit_config
from biovfm_jax.models.dino_head import DINOHead, DINOv2Model

TOL = 1e-4
_T = dict(embed_dim=192, num_heads=3)  # shrink the S-named models to T width

# name, timm kwargs, how the file is saved, whether to_timm gives back the
# same state dict (registers inside the position table are folded away).
TIMM_CASES = {
    "plain": ("vit_tiny_patch16_224", dict(img_size=32), ".safetensors", True),
    "reg_in_table_ls": ("vit_tiny_patch16_224",
                        dict(img_size=32, reg_tokens=2, init_values=1e-5), ".pth", False),
    "reg4_dinov2": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, **_T), ".pth", True),
    "swiglu_packed": ("vit_small_patch14_dinov2",
                      dict(img_size=28, mlp_layer=SwiGLUPacked, act_layer="silu",
                           mlp_ratio=2.66667 * 2, **_T), ".safetensors", True),
    "swiglu_split": ("vit_tiny_patch16_224",
                     dict(img_size=32, mlp_layer=SwiGLU, act_layer="silu",
                          mlp_ratio=512 / 192), ".safetensors", False),
    "no_cls": ("vit_tiny_patch16_224",
               dict(img_size=32, class_token=False, global_pool="avg", fc_norm=False),
               ".safetensors", True),
}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random weights of a moderate scale everywhere (norm scales and
  LayerScale around 1), so every tensor matters for the output."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight",
                                   "gamma")) else 0.0
      p.copy_(base + 0.05 * torch.randn(p.shape, generator=g))
  return model.eval()


def timm_model(name, seed=0, depth=2, **kw):
  return randomize(timm.create_model(name, pretrained=False, num_classes=0,
                                     depth=depth, **kw), seed)


def numpy_sd(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def images(size, n=2, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def torch_features(model, x):
  with torch.no_grad():
    return model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


def merged(build, params):
  """A model holding `params`, built without a random init."""
  graphdef, state, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state, rest)


def vit(config, params):
  return merged(lambda: VisionTransformer(config, rngs=nnx.Rngs(0)), params)


def our_features(config, params, x):
  return np.asarray(vit(config, params)(x))


def max_err(a, b):
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max())


def save(sd: dict, path, nest=None):
  """numpy state dict -> .safetensors, or .pth (optionally under sd[nest])."""
  path = str(path)
  if path.endswith(".safetensors"):
    safetensors.numpy.save_file(sd, path)
  else:
    tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
    torch.save(tensors if nest is None else {nest: tensors, "epoch": 3}, path)
  return path


def load_timm(model, sd: dict):
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  return model.eval()


# --- timm -------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_from_timm_parity_and_back(case, tmp_path):
  name, kw, ext, exact = TIMM_CASES[case]
  model = timm_model(name, **kw)
  sd = numpy_sd(model)
  loaded = load_state_dict(save(sd, tmp_path / f"w{ext}"))
  config, params = from_timm(loaded, size="T")
  assert config.pos_embed == "learned" and config.depth == 2
  x = images(kw["img_size"])
  ref = torch_features(model, x)
  err = max_err(our_features(config, params, x), ref)
  print(f"{case}: max |ours - timm| = {err:.2e}")
  assert err < TOL
  # Back to timm: strict load into the architecture timm_model_kwargs gives,
  # same features; bit-identical tensors where timm's layout round-trips.
  back = to_timm(config, params)
  if exact:
    assert sorted(back) == sorted(sd)
    for k in sd:
      np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  assert max_err(torch_features(load_timm(create_timm_model(config), back), x), ref) < TOL


def test_from_timm_reads_architecture():
  sd = numpy_sd(timm_model("vit_small_patch14_reg4_dinov2", img_size=28, **_T))
  config, _ = from_timm(sd, num_heads=3)
  assert (config.width, config.depth, config.num_heads, config.patch_size,
          config.image_size, config.num_registers, config.layerscale_init,
          config.ffn, config.mlp_dim) == (192, 2, 3, 14, 28, 4, 1e-5, "mlp", 768)
  name, kw = TIMM_CASES["swiglu_packed"][:2]
  sd = numpy_sd(timm_model(name, **kw))
  config, params = from_timm(sd, size="T")
  assert config.ffn == "swiglu" and config.mlp_dim == 512
  assert params["blocks"]["layers"][0]["mlp"]["w12_kernel"].shape == (192, 2, 512)


def test_from_timm_resizes_table_like_the_model():
  sd = numpy_sd(timm_model("vit_tiny_patch16_224", img_size=32))
  config, params = from_timm(sd, size="T")
  big_config, big_params = from_timm(sd, size="T", image_size=64)
  assert big_config.image_size == 64 and big_params["pos_embed"].shape == (17, 192)
  x = images(64)
  # Same as the 32px model resizing its table at run time.
  assert max_err(our_features(big_config, big_params, x),
                 our_features(config, params, x)) < 1e-5


def test_from_timm_errors():
  sd = numpy_sd(timm_model("vit_tiny_patch16_224", img_size=32))
  with pytest.raises(ConversionError, match="heads cannot be read"):
    from_timm(sd)
  with pytest.raises(ConversionError, match="size='S' has width 384"):
    from_timm(sd, size="S")
  bad = dict(sd)
  bad["blocks.1.attn.qkv.weight"] = bad["blocks.1.attn.qkv.weight"][:-3]
  with pytest.raises(ConversionError, match=r"'blocks\.1\.attn\.qkv\.weight' has shape"):
    from_timm(bad, size="T")
  extra = {**sd, "blocks.0.attn.q_norm.weight": np.ones(64, np.float32)}
  with pytest.raises(ConversionError, match=r"unexpected keys \['blocks\.0\.attn\.q_norm"):
    from_timm(extra, size="T")
  missing = {k: v for k, v in sd.items() if not k.startswith("norm.")}
  with pytest.raises(ConversionError, match="missing key 'norm.weight'"):
    from_timm(missing, size="T")
  gap = {k: v for k, v in sd.items() if not k.startswith("blocks.0.")}
  with pytest.raises(ConversionError, match=r"blocks\.0\.\* is missing"):
    from_timm(gap, size="T")
  with pytest.raises(ConversionError, match="pos_embed has 6 rows, which fits no"):
    from_timm({**sd, "pos_embed": np.zeros((1, 6, 192), np.float32)}, size="T")
  # A classifier head is fine.
  from_timm({**sd, "head.weight": np.ones((10, 192), np.float32),
             "head.bias": np.ones(10, np.float32)}, size="T")


def test_from_timm_ambiguous_table():
  # 9 rows with cls + 4 registers: 3x3 patches (no_embed_class, timm's
  # register models) or 2x2 patches + 5 prefix rows; image_size decides.
  model = timm_model("vit_tiny_patch16_224", depth=1, img_size=32, reg_tokens=4)
  sd = numpy_sd(model)
  assert from_timm(sd, size="T")[0].image_size == 48
  config, params = from_timm(sd, size="T", image_size=32)
  x = images(32)
  assert config.image_size == 32
  assert max_err(our_features(config, params, x), torch_features(model, x)) < TOL


# --- MAE --------------------------------------------------------------------


def mae_sincos(width, grid):
  """The reference MAE table written out from its definition: cls row zero,
  first half of the channels [sin, cos] of the column, second half of the row."""
  def one_axis(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2.0))
    out = np.outer(pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], 1)
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  table = np.concatenate([one_axis(width // 2, cols.ravel()),
                          one_axis(width // 2, rows.ravel())], 1)
  return np.concatenate([np.zeros((1, width)), table]).astype(np.float32)[None]


class MaeDecoder(nn.Module):
  """The reference MAE decoder's modules and names, for weights and a forward."""

  def __init__(self, width, dwidth, depth, heads, num_patches, patch_dim):
    super().__init__()
    self.decoder_embed = nn.Linear(width, dwidth)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, dwidth))
    grid = int(round(num_patches ** 0.5))
    self.decoder_pos_embed = nn.Parameter(torch.from_numpy(mae_sincos(dwidth, grid)),
                                          requires_grad=False)
    block = functools.partial(timm.models.vision_transformer.Block, dwidth, heads,
                              qkv_bias=True,
                              norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
    self.decoder_blocks = nn.ModuleList([block() for _ in range(depth)])
    self.decoder_norm = nn.LayerNorm(dwidth, eps=1e-6)
    self.decoder_pred = nn.Linear(dwidth, patch_dim)

  def forward(self, latent):  # all patches visible: no shuffling
    x = self.decoder_embed(latent) + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:]


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory):
  """An MAE pretraining checkpoint as main_pretrain.py writes it: the model
  (timm encoder with the fixed sin-cos table, decoder) under 'model', plus
  optimizer-free extras and its argparse Namespace."""
  encoder = timm_model("vit_tiny_patch16_224", img_size=32)
  with torch.no_grad():
    encoder.pos_embed.copy_(torch.from_numpy(mae_sincos(192, 2)))
  decoder = randomize(MaeDecoder(192, 64, 1, 4, 4, 16 * 16 * 3), seed=1)
  with torch.no_grad():  # randomize() touched the fixed table; restore it
    decoder.decoder_pos_embed.copy_(torch.from_numpy(mae_sincos(64, 2)))
  sd = {**encoder.state_dict(), **decoder.state_dict()}
  path = str(tmp_path_factory.mktemp("mae") / "checkpoint-399.pth")
  torch.save({"model": sd, "epoch": 399, "scaler": {"scale": 1024.0},
              "args": argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.75)}, path)
  return path, encoder, decoder


def test_from_mae_parity(mae_checkpoint):
  path, encoder, decoder = mae_checkpoint
  config, params, dec = from_mae(load_state_dict(path), size="T", decoder_heads=4)
  assert config.pos_embed == "sincos" and "pos_embed" not in params["encoder"]
  assert dec == dict(decoder_width=64, decoder_depth=1, decoder_heads=4,
                     decoder_mlp_dim=256)
  x = images(32)
  ref_latent = torch_features(encoder, x)
  err = max_err(our_features(config, params["encoder"], x), ref_latent)
  print(f"mae encoder: max |ours - timm| = {err:.2e}")
  assert err < TOL
  # The decoder continues where it left off: with every patch visible the
  # prediction equals the reference decoder on the full latent.
  mae = merged(lambda: MaskedAutoencoder(config, **dec, rngs=nnx.Rngs(0)), params)
  noise = np.random.default_rng(1).uniform(size=(2, 4)).astype(np.float32)
  pred, mask = mae(x, noise, mask_ratio=0.0)
  with torch.no_grad():
    ref_pred = decoder(torch.from_numpy(ref_latent)).numpy()
  err = max_err(np.asarray(pred), ref_pred)
  print(f"mae decoder: max |ours - torch| = {err:.2e}")
  assert err < TOL and not np.asarray(mask).any()
  pred, mask = mae(x, noise, mask_ratio=0.75)  # the pretraining call runs too
  assert pred.shape == (2, 4, 768) and np.asarray(mask).sum() == 2 * 3


def test_from_mae_learned_table_and_errors(mae_checkpoint):
  sd = load_state_dict(mae_checkpoint[0])
  moved = {**sd, "pos_embed": sd["pos_embed"] + 0.1}
  with pytest.warns(UserWarning, match="not the fixed sin-cos"):
    config, params, _ = from_mae(moved, size="T", decoder_heads=4)
  assert config.pos_embed == "learned"
  np.testing.assert_array_equal(params["encoder"]["pos_embed"], moved["pos_embed"][0])
  with pytest.raises(ConversionError, match="decoder_pos_embed is not"):
    from_mae({**sd, "decoder_pos_embed": sd["decoder_pos_embed"] + 0.1}, size="T",
             decoder_heads=4)
  encoder_only = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask"))}
  with pytest.raises(ConversionError, match="no decoder"):
    from_mae(encoder_only, size="T")
  with pytest.raises(ConversionError, match=r"unexpected keys \['extra'\]"):
    from_mae({**sd, "extra": np.ones(3, np.float32)}, size="T", decoder_heads=4)


# --- DINOv2 -----------------------------------------------------------------


def to_dinov2_layout(sd: dict, *, chunks: int = 0, prefix: str = "",
                     mask_token=None) -> dict:
  """A timm DINOv2-style state dict renamed to facebookresearch/dinov2's:
  register_tokens, a cls row in pos_embed, mask_token, SwiGLU as w12/w3,
  optionally blocks in FSDP chunks blocks.<chunk>.<i> and a prefix."""
  out = {}
  depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
  per_chunk = depth // chunks if chunks else depth
  swiglu = sd["blocks.0.mlp.fc1.weight"].shape[0] == 2 * sd["blocks.0.mlp.fc2.weight"].shape[1]
  for k, v in sd.items():
    if k == "reg_token":
      k = "register_tokens"
    elif k == "pos_embed" and "reg_token" in sd:  # timm: no cls row with registers
      v = np.concatenate([np.zeros_like(v[:, :1]), v], 1)
    elif k.startswith("blocks."):
      _, i, rest = k.split(".", 2)
      if swiglu:
        rest = rest.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
      k = (f"blocks.{int(i) // per_chunk}.{i}.{rest}" if chunks else f"blocks.{i}.{rest}")
    out[prefix + k] = v
  if mask_token is not None:
    out[prefix + "mask_token"] = mask_token
  return out


@pytest.mark.parametrize("case", ["hub_mlp", "teacher_reg4_swiglu_chunked"])
def test_from_dinov2_parity(case, tmp_path):
  d = 192
  mask_token = np.random.default_rng(3).normal(size=(1, d)).astype(np.float32)
  if case == "hub_mlp":
    model = timm_model("vit_small_patch14_dinov2", img_size=42, **_T)
    official = to_dinov2_layout(numpy_sd(model), mask_token=mask_token)
    path = save(official, tmp_path / "dinov2_vits14.pth")
  else:
    model = timm_model("vit_small_patch14_reg4_dinov2", depth=4, img_size=42,
                       mlp_layer=SwiGLUPacked, act_layer="silu", mlp_ratio=2.66667 * 2,
                       **_T)
    official = to_dinov2_layout(numpy_sd(model), chunks=2, prefix="backbone.",
                                mask_token=mask_token)
    assert "backbone.blocks.1.3.mlp.w12.weight" in official
    heads = {"dino_head.mlp.0.weight": np.ones((8, d), np.float32),
             "ibot_head.last_layer.weight_g": np.ones((8, 1), np.float32)}
    path = save({**official, **heads}, tmp_path / "teacher_checkpoint.pth",
                nest="teacher")
  config, params = from_dinov2(load_state_dict(path), size="T")
  assert config.image_size == 42 and config.mask_token and config.init == "dinov2"
  np.testing.assert_array_equal(params["mask_token"], mask_token[0])
  x = images(42)
  err = max_err(our_features(config, params, x), torch_features(model, x))
  print(f"dinov2 {case}: max |ours - timm| = {err:.2e}")
  assert err < TOL


def test_from_dinov2_full_training_checkpoint():
  """{'model': {'student.backbone.*', 'teacher.backbone.*', heads}}: the teacher."""
  sd = to_dinov2_layout(numpy_sd(timm_model("vit_small_patch14_dinov2", img_size=28,
                                            **_T)))
  student = {f"student.backbone.{k}": v + 1 for k, v in sd.items()}
  teacher = {f"teacher.backbone.{k}": v for k, v in sd.items()}
  heads = {"teacher.dino_head.last_layer.weight_v": np.ones((8, 4), np.float32)}
  config, params = from_dinov2({**student, **teacher, **heads}, size="T")
  want = from_dinov2(sd, size="T")[1]
  for k, v in _flat(want).items():
    np.testing.assert_array_equal(_flat(params)[k], v, err_msg=k)


def test_from_dinov2_errors():
  sd = numpy_sd(timm_model("vit_small_patch14_dinov2", img_size=28, **_T))
  official = to_dinov2_layout(sd, chunks=2)
  official["blocks.0.1.norm1.weight"] = official["blocks.1.1.norm1.weight"]
  with pytest.raises(ConversionError, match="block 1 appears in chunks"):
    from_dinov2(official, size="T")
  with pytest.raises(ConversionError, match="no patch_embed.proj.weight"):
    from_dinov2({"teacher.x": np.ones(1, np.float32)}, size="T")
  with pytest.raises(ConversionError, match=r"pos_embed has 6 rows"):
    from_dinov2({**to_dinov2_layout(sd), "pos_embed": np.zeros((1, 6, 192), np.float32)},
                size="T")


class RefDinoHead(nn.Module):
  """dinov2's DINOHead modules and names: mlp = Sequential(Linear, [BatchNorm1d],
  GELU, ..., Linear) (a bare Linear for one layer), then a weight-normed
  Linear without bias onto the prototypes, applied to the L2-normalised
  bottleneck."""

  def __init__(self, din, k, hidden=32, bottleneck=16, nlayers=3, use_bn=False,
               parametrized=False, seed=0):
    super().__init__()
    dims = [din] + [hidden] * (nlayers - 1) + [bottleneck]
    mods = []
    for i in range(nlayers):
      mods.append(nn.Linear(dims[i], dims[i + 1]))
      if i < nlayers - 1:
        mods += [nn.BatchNorm1d(hidden)] * use_bn + [nn.GELU()]
    self.mlp = nn.Sequential(*mods) if nlayers > 1 else mods[0]
    norm = (torch.nn.utils.parametrizations.weight_norm if parametrized
            else torch.nn.utils.weight_norm)
    with warnings.catch_warnings():  # the form dinov2 uses is deprecated
      warnings.simplefilter("ignore", FutureWarning)
      self.last_layer = norm(nn.Linear(bottleneck, k, bias=False))
    randomize(self, seed)
    with torch.no_grad():  # norm_last_layer: the gain is 1
      gain = (self.last_layer.parametrizations.weight.original0 if parametrized
              else self.last_layer.weight_g)
      gain.fill_(1.0)

  def forward(self, x):
    return self.last_layer(nn.functional.normalize(self.mlp(x), dim=-1))


def head_sd(head, prefix):
  return {f"{prefix}{k}": v for k, v in numpy_sd(head).items()}


def head_logits(head, kwargs, params, x):
  """(ours, reference) logits of the torch head and of our DINOHead built
  from the recorded kwargs and loaded with the imported params."""
  ours = merged(lambda: DINOHead(192, **kwargs, rngs=nnx.Rngs(0)), params)
  with torch.no_grad():
    ref = head(torch.from_numpy(x)).numpy()
  return np.asarray(ours(x)), ref


HEAD_ARCH = dict(num_prototypes=24, hidden_dim=32, bottleneck_dim=16, nlayers=3)


@pytest.mark.parametrize("separate_ibot", [False, True])
def test_cli_import_dinov2_training_checkpoint_keeps_heads(separate_ibot, tmp_path):
  """eval/<iter>/teacher_checkpoint.pth: {'teacher': backbone.*, dino_head.*
  (, ibot_head.*)}. The heads come along beside the backbone, with the names
  and shapes of our DINOHead, and give the reference's logits."""
  from biovfm_jax.evaluate.encoder import load_encoder
  from biovfm_jax.train import checkpoint as ckpt_lib
  model = timm_model("vit_small_patch14_reg4_dinov2", img_size=28, **_T)
  heads = {"dino_head": RefDinoHead(192, 24, seed=1)}
  if separate_ibot:  # weight norm as parametrizations (newer torch)
    heads["ibot_head"] = RefDinoHead(192, 20, parametrized=True, seed=2)
  sd = to_dinov2_layout(numpy_sd(model), prefix="backbone.")
  for name, head in heads.items():
    sd.update(head_sd(head, f"{name}."))
  src = save(sd, tmp_path / "teacher_checkpoint.pth", nest="teacher")
  out = str(tmp_path / "imported")
  assert cli_main(["import", "--format=dinov2", f"--src={src}", f"--out={out}",
                   "--num-heads=3"]) == 0
  step_dir = ckpt_lib.find_step_dir(out)
  run = ckpt_lib.read_run(step_dir)
  assert run["backbone"] == "params/backbone"
  want = {"dino_head": HEAD_ARCH}
  if separate_ibot:
    want["ibot_head"] = {**HEAD_ARCH, "num_prototypes": 20}
  assert run["heads"] == want
  # The saved heads, as the continued-pretraining loader reads them: the
  # names and shapes of a DINOv2Model's, and the reference's logits.
  dinov2 = nnx.eval_shape(lambda: DINOv2Model(
      vit_config(None, **run["encoder"]), num_prototypes=24, hidden_dim=32,
      bottleneck_dim=16, nlayers=3, separate_ibot_head=separate_ibot,
      ibot_num_prototypes=20, rngs=nnx.Rngs(0)))
  like = nnx.to_pure_dict(nnx.split(dinov2, nnx.Param, ...)[1])
  x = np.random.default_rng(5).normal(size=(6, 192)).astype(np.float32)
  for name, head in heads.items():
    saved = ckpt_lib.restore_host(step_dir, ("params", name))  # '0', '1' ... keys
    tree = ckpt_lib.relaid_like(saved, like[name])
    assert ckpt_lib.shapes(tree) == ckpt_lib.shapes(like[name])
    assert ckpt_lib.shapes(saved) == ckpt_lib.shapes(like[name])  # nothing dropped
    err = max_err(*head_logits(head, run["heads"][name], tree, x))
    print(f"{name}: max |ours - torch| = {err:.2e}")
    assert err < 1e-5
  # The backbone is where the run JSON says: evaluation sees the same features.
  x = images(28, n=8)
  ref = torch_features(model, x)
  feats = load_encoder(out)(x)
  assert max_err(np.asarray(feats["cls"]), ref[:, 0]) < TOL
  assert max_err(np.asarray(feats["patch_tokens"]), ref[:, 5:]) < TOL


def test_cli_import_dinov2_without_heads_keeps_the_backbone_layout(tmp_path):
  from biovfm_jax.train.checkpoint import find_step_dir, read_run
  sd = to_dinov2_layout(numpy_sd(timm_model("vit_small_patch14_dinov2", img_size=28, **_T)))
  out = str(tmp_path / "hub")
  assert cli_main(["import", "--format=dinov2", f"--src={save(sd, tmp_path / 'hub.pth')}",
                   f"--out={out}", "--model=T"]) == 0
  run = read_run(find_step_dir(out))
  assert run["backbone"] == "params" and "heads" not in run


def test_from_dinov2_heads_reads_the_teachers():
  """Student and teacher in one state dict: the teacher's heads (beside the
  backbone from_dinov2 reads); a one-layer MLP is a bare Linear."""
  backbone = to_dinov2_layout(numpy_sd(timm_model("vit_small_patch14_dinov2", img_size=28,
                                                  **_T)))
  teacher, student = RefDinoHead(192, 24, nlayers=1, seed=1), RefDinoHead(192, 24, seed=2)
  sd = {**{f"{who}.backbone.{k}": v for k, v in backbone.items() for who in ("student",
                                                                             "teacher")},
        **head_sd(teacher, "teacher.dino_head."), **head_sd(student, "student.dino_head.")}
  params, arch = from_dinov2_heads(sd, 192)
  assert arch == {"dino_head": dict(num_prototypes=24, hidden_dim=None, bottleneck_dim=16,
                                    nlayers=1)}
  x = np.random.default_rng(5).normal(size=(6, 192)).astype(np.float32)
  assert max_err(*head_logits(teacher, arch["dino_head"], params["dino_head"], x)) < 1e-5
  assert from_dinov2_heads(backbone, 192) == ({}, {})


def test_dinov2_heads_refused_or_warned(tmp_path, capsys):
  backbone = to_dinov2_layout(numpy_sd(timm_model("vit_small_patch14_dinov2", img_size=28,
                                                  **_T)))
  bn = head_sd(RefDinoHead(192, 24, use_bn=True), "dino_head.")
  src = save({**backbone, **bn}, tmp_path / "bn.pth", nest="teacher")
  assert cli_main(["import", "--format=dinov2", f"--src={src}",
                   f"--out={tmp_path / 'bn'}", "--model=T"]) == 2
  err = capsys.readouterr().err
  assert "dino_head.*: the MLP has BatchNorm layers (use_bn=True)" in err, err
  with pytest.raises(ConversionError, match="mlp.0, mlp.2, mlp.4"):
    from_dinov2_heads({**backbone, **{k: v for k, v in bn.items() if "running" not in k}},
                      192)
  # A trained gain (dinov2 trains weight_g, negative ones included): imported
  # as it is, the logits equal.
  head = RefDinoHead(192, 24)
  g = np.linspace(-0.5, 1.5, 24, dtype=np.float32)[:, None]
  with torch.no_grad():
    head.last_layer.weight_g.copy_(torch.from_numpy(g))
  params, arch = from_dinov2_heads({**backbone, **head_sd(head, "dino_head.")}, 192)
  np.testing.assert_array_equal(params["dino_head"]["last_layer_gain"], g[:, 0])
  x = np.random.default_rng(5).normal(size=(6, 192)).astype(np.float32)
  ours, ref = head_logits(head, arch["dino_head"], params["dino_head"], x)
  assert max_err(ours, ref) < 1e-5
  with pytest.raises(ConversionError, match=r"'mlp.0.weight' has shape \(32, 96\)"):
    from_dinov2_heads({**backbone, **head_sd(RefDinoHead(96, 24), "dino_head.")}, 192)


# --- export -----------------------------------------------------------------


def random_params(config, seed=0):
  """Our init plus noise (so LayerScale and zero biases matter too)."""
  model = VisionTransformer(config, rngs=nnx.Rngs(seed))
  _, state, _ = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  noise = lambda a: np.asarray(a) + 0.05 * rng.normal(size=a.shape).astype(np.float32)
  return _map(nnx.to_pure_dict(state), noise)


def _map(tree, fn):
  return {k: _map(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


EXPORT_CASES = {
    # MAE-style: fixed sin-cos table, scanned layers.
    "sincos_scanned": dict(size="T", depth=2, image_size=32, scan_layers=True),
    # DINOv2-style at T width (no named timm architecture: built from kwargs).
    "reg_ls_swiglu_mask": dict(size="T", depth=2, patch_size=14, image_size=28,
                               pos_embed="learned", num_registers=2,
                               layerscale_init=1e-5, ffn="swiglu", mask_token=True),
    "no_cls_learned": dict(size="T", depth=1, image_size=32, pos_embed="learned",
                           class_token=False),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_to_timm_loads_strict_and_matches(case):
  kw = dict(EXPORT_CASES[case])
  config = vit_config(kw.pop("size"), **kw)
  params = random_params(config)
  sd = to_timm(config, params)
  if config.ffn == "mlp":  # the plain timm call works with these kwargs
    model = timm.create_model(timm_model_name(config), pretrained=False,
                              **timm_model_kwargs(config))
  else:
    model = create_timm_model(config)
  model = load_timm(model, sd)
  x = images(config.image_size)
  err = max_err(torch_features(model, x), our_features(config, params, x))
  print(f"export {case}: max |timm - ours| = {err:.2e}")
  assert err < TOL
  # Re-import: the same function, and the same tensors where layouts agree.
  config2, params2 = from_timm(sd, size="T")
  assert max_err(our_features(config2, params2, x), our_features(config, params, x)) < TOL
  if case == "no_cls_learned":
    assert config2 == config
    for k, v in _flat(params).items():
      np.testing.assert_array_equal(_flat(params2)[k], v, err_msg=k)


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + str(k): v})
  return out


def test_to_timm_round_trips_exactly():
  config = vit_config("T", depth=2, image_size=32, pos_embed="learned",
                      layerscale_init=1e-5)
  params = random_params(config, seed=4)
  config2, params2 = from_timm(to_timm(config, params), size="T")
  assert config2 == config
  want, got = _flat(params), _flat(params2)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_timm_model_name():
  assert timm_model_name(vit_config("T")) == "vit_tiny_patch16_224"
  assert timm_model_name(vit_config("B", patch_size=8)) == "vit_base_patch8_224"
  assert timm_model_name(vit_config("H")) == "vit_huge_patch14_224"
  assert timm_model_name(vit_config("S", patch_size=14, layerscale_init=1e-5)) == (
      "vit_small_patch14_dinov2")
  assert timm_model_name(vit_config("L", patch_size=14, num_registers=4,
                                    layerscale_init=1e-5)) == "vit_large_patch14_reg4_dinov2"
  assert timm_model_name(vit_config("g")) == "vit_giant_patch14_dinov2"
  with pytest.raises(ConversionError):  # timm's giant is SwiGLU
    timm_model_name(vit_config("g", ffn="mlp"))
  with pytest.raises(ConversionError, match="no timm vit_\\* architecture"):
    timm_model_name(vit_config("T", patch_size=14, image_size=28))
  with pytest.raises(ConversionError, match=r"params\['encoder'\]"):
    to_timm(vit_config("T"), {"encoder": {}})


# --- files ------------------------------------------------------------------


class NotATensor:
  """Stands for any pickled object weights_only must refuse."""


def test_load_state_dict_files(tmp_path):
  (tmp_path / "w.npz").write_bytes(b"")
  with pytest.raises(ValueError, match="unknown weight file extension '.npz'"):
    load_state_dict(tmp_path / "w.npz")
  with pytest.raises(FileNotFoundError):
    load_state_dict(tmp_path / "missing.pth")
  evil = str(tmp_path / "evil.pth")
  torch.save({"model": {"a.weight": torch.ones(2)}, "obj": NotATensor()}, evil)
  with pytest.raises(ValueError, match="evil.pth: refused"):
    load_state_dict(evil)
  # Nested keys, bfloat16 -> float32, explicit key.
  torch.save({"state_dict": {"a": {"weight": torch.ones(2, dtype=torch.bfloat16)}},
              "step": 7}, tmp_path / "nested.pt")
  got = load_state_dict(tmp_path / "nested.pt")
  assert list(got) == ["a.weight"] and got["a.weight"].dtype == np.float32
  with pytest.raises(ValueError, match="has no key 'model'"):
    load_state_dict(tmp_path / "nested.pt", key="model")
  safetensors.torch.save_file({"b": torch.full((3,), 1.5, dtype=torch.bfloat16)},
                              str(tmp_path / "bf16.safetensors"))
  got = load_state_dict(tmp_path / "bf16.safetensors")
  assert got["b"].dtype == np.float32 and (got["b"] == 1.5).all()


# --- command line -----------------------------------------------------------


def test_cli_import_timm_then_export(tmp_path, capsys):
  from biovfm_jax.evaluate.encoder import load_encoder
  from biovfm_jax.train.checkpoint import find_step_dir, read_run
  model = timm_model("vit_small_patch14_reg4_dinov2", img_size=28, **_T)
  src = save(numpy_sd(model), tmp_path / "vit.safetensors")
  out = str(tmp_path / "imported")
  assert cli_main(["import", "--format=timm", f"--src={src}", f"--out={out}",
                   "--model=T"]) == 0
  run = read_run(find_step_dir(out))
  assert run["objective"] == "timm" and run["backbone"] == "params"
  assert run["source"] == {"path": os.path.abspath(src), "format": "timm"}
  enc = load_encoder(out)
  x = images(28, n=8)
  ref = torch_features(model, x)
  feats = enc(x)
  assert max_err(np.asarray(feats["cls"]), ref[:, 0]) < TOL
  assert max_err(np.asarray(feats["patch_tokens"]), ref[:, 5:]) < TOL
  # Refuses to write over it.
  with pytest.raises(SystemExit, match="already holds checkpoints"):
    cli_main(["import", "--format=timm", f"--src={src}", f"--out={out}", "--model=T"])

  dst = str(tmp_path / "export" / "vit.safetensors")
  capsys.readouterr()
  assert cli_main(["export", "--format=timm", f"--src={out}", f"--out={dst}"]) == 0
  out_err = capsys.readouterr()
  printed = json.loads(out_err.out)
  # T width at patch 14 has no timm name: the key still says how to build it, and a hint.
  assert printed["timm_model"] == CUSTOM_TIMM_MODEL
  note = out_err.err.splitlines()
  at = next(i for i, line in enumerate(note) if line.startswith("note: "))
  assert "biovfm_jax.interop.timm.create_timm_model(config)" in note[at]
  # Its two indented lines, pasted as they are, build the model and load the file.
  snippet = note[at + 1:at + 3]
  assert len(snippet) == 2 and all(line.startswith("  ") for line in snippet), note
  pasted = {}
  exec("\n".join(line[2:] for line in snippet), pasted)  # pylint: disable=exec-used
  assert max_err(torch_features(pasted["model"].eval(), x), ref) < TOL
  with safetensors.safe_open(dst, "np") as f:
    meta = f.metadata()
  assert meta["timm_model"] == CUSTOM_TIMM_MODEL
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(dst).st_mode & 0o777 == 0o666 & ~umask  # not save_file's 0600
  assert not [n for n in os.listdir(os.path.dirname(dst)) if n != "vit.safetensors"]
  exported = {k: v.numpy() for k, v in safetensors.torch.load_file(dst).items()}
  again = load_timm(create_timm_model(enc.config), exported)
  assert max_err(torch_features(again, x), ref) < TOL
  # Re-importing the exported file needs no --model: its timm_kwargs give the heads.
  back = str(tmp_path / "reimported")
  assert cli_main(["import", "--format=timm", f"--src={dst}", f"--out={back}"]) == 0
  assert load_encoder(back).config == enc.config
  assert max_err(np.asarray(load_encoder(back)(x)["cls"]), ref[:, 0]) < TOL
  # Bad input: one line on stderr, exit code 2.
  assert cli_main(["import", "--format=dinov2", f"--src={src}",
                   f"--out={tmp_path / 'x'}", "--model=T"]) == 2
  assert "DINOv2 state dict" in capsys.readouterr().err


def test_cli_import_mae(mae_checkpoint, tmp_path):
  from biovfm_jax.evaluate.encoder import load_encoder
  from biovfm_jax.train.checkpoint import find_step_dir, read_run
  path, encoder, _ = mae_checkpoint
  out = str(tmp_path / "mae")
  assert cli_main(["import", "--format=mae", f"--src={path}", f"--out={out}",
                   "--model=T", "--decoder-heads=4"]) == 0
  run = read_run(find_step_dir(out))
  assert run["objective"] == "mae" and run["backbone"] == "params/encoder"
  assert run["decoder"] == dict(decoder_width=64, decoder_depth=1, decoder_heads=4,
                                decoder_mlp_dim=256)
  assert run["encoder"]["pos_embed"] == "sincos"
  x = images(32, n=8)
  ref = torch_features(encoder, x)
  assert max_err(np.asarray(load_encoder(out)(x)["patch_tokens"]), ref[:, 1:]) < TOL


def test_an_imported_mae_starts_a_scanned_model(mae_checkpoint, tmp_path):
  """Imports keep one entry per layer; a model with scanned layers (the default
  for L, H, g) gets them stacked, decoder included, and the reverse split:
  the same features as the reference."""
  import dataclasses

  import jax

  from biovfm_jax.train.checkpoint import (find_step_dir, read_run, relaid_like,
                                           restore_host, save_params, shapes)
  path, encoder, _ = mae_checkpoint
  out = str(tmp_path / "mae")
  assert cli_main(["import", "--format=mae", f"--src={path}", f"--out={out}",
                   "--model=T", "--decoder-heads=4"]) == 0
  run = read_run(find_step_dir(out))
  looped = vit_config(None, **run["encoder"])
  dec = run["decoder"]

  def restore(step_dir, cfg):
    abstract = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: MaskedAutoencoder(
        cfg, **dec, rngs=nnx.Rngs(0))), nnx.Param, ...)[1])
    return relaid_like(restore_host(step_dir, ("params",)), abstract), abstract

  scanned_cfg = dataclasses.replace(looped, scan_layers=True)
  scanned, _ = restore(find_step_dir(out), scanned_cfg)
  assert {x.shape[0] for x in jax.tree.leaves(scanned["encoder"]["blocks"]["layers"])} == {2}
  x = images(32)
  ref = torch_features(encoder, x)
  assert max_err(our_features(scanned_cfg, scanned["encoder"], x), ref) < TOL
  # A scanned save back into a looped model.
  save_params(str(tmp_path / "scanned"), scanned, run)
  again, _ = restore(find_step_dir(str(tmp_path / "scanned")), looped)
  assert max_err(our_features(looped, again["encoder"], x), ref) < TOL
  deeper, abstract = restore(find_step_dir(out), dataclasses.replace(scanned_cfg, depth=3))
  assert shapes(deeper) != shapes(abstract)  # what init_from refuses


@pytest.mark.slow
def test_pretraining_continues_from_an_imported_mae(mae_checkpoint, tmp_path):
  """main.py --config.init_from takes the imported encoder and decoder; a
  model that does not fit is refused before training, naming the key."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path, _, _ = mae_checkpoint
  out = str(tmp_path / "mae")
  assert cli_main(["import", "--format=mae", f"--src={path}", f"--out={out}",
                   "--model=T", "--decoder-heads=4"]) == 0
  flags = ["--config=configs/quickstart.py", "--config.image_size=32",
           "--config.model.patch_size=16", "--config.model.width=192",
           "--config.model.depth=2", "--config.model.num_heads=3",
           "--config.model.mlp_dim=768", "--config.mae.decoder_width=64",
           "--config.mae.decoder_heads=4", "--config.num_train_steps=2",
           "--config.batch_size=8", f"--config.init_from={out}", "--config.evals={}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")

  def run(workdir, *extra):
    return subprocess.run([sys.executable, "main.py", f"--workdir={workdir}", *flags, *extra],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)

  ok = run(tmp_path / "run", "--config.mae.decoder_depth=1")
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "Initialised from" in ok.stderr
  losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert len(losses) == 2 and all(np.isfinite(losses))
  bad = run(tmp_path / "bad", "--config.mae.decoder_depth=2")
  assert bad.returncode == 2 and "config.init_from" in bad.stderr
