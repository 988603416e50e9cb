"""Weight-decay groups and lr multipliers equal the references' on each recipe.

Each reference's parameter list (names, shapes, trainable) is written out below
as its model defines it, for the same small ViT; interop/'s importers
(the weight-import name mapping) say which of our parameters each one is: every
reference tensor is filled with its own index, so the imported leaf's value
names its source. The reference's rule, transcribed as it states it, is then
applied to the reference names and compared with the mask our trainer uses.

  MAE main_pretrain.py: timm add_weight_decay(model, wd), no skip list:
      no decay iff len(param.shape) == 1 or name.endswith(".bias").
  DINOv2 utils/param_groups.py get_params_groups_with_decay, per submodel:
      wd_multiplier 0 iff name.endswith(".bias") or "norm" in name or "gamma" in name;
      lr_multiplier = get_vit_lr_decay_rate(...) (x patch_embed_lr_mult on "patch_embed").
  MAE main_finetune.py: lr_decay.param_groups_lrd with timm's no_weight_decay():
      no decay iff p.ndim == 1 or name in {"pos_embed", "cls_token", "dist_token"}.
"""
import jax
import numpy as np
import pytest
from flax import nnx

from dinov2_reference import get_vit_lr_decay_rate

from biovfm_jax import sharding as shd
from biovfm_jax.interop import core, dinov2, mae, timm
from biovfm_jax.models import VisionTransformer
from biovfm_jax.models.patches import sincos_2d
from biovfm_jax.models.vit import ViTConfig
from biovfm_jax.objectives import get_objective
from biovfm_jax.train import optim
from biovfm_jax.train.state import ModelSpec
from configs import vit_b_dinov2, vit_b_mae

D, DEPTH, HEADS, MLP, PATCH, IMAGE, C = 32, 2, 2, 64, 8, 32, 3
N = (IMAGE // PATCH) ** 2


def _shrink(c):
  c.image_size = IMAGE
  c.model.update(patch_size=PATCH, width=D, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP)
  return c


def _mae_config():
  c = _shrink(vit_b_mae.get_config())
  c.mae.update(decoder_width=16, decoder_depth=1, decoder_heads=2)
  return c


def _dinov2_config():
  c = _shrink(vit_b_dinov2.get_config())
  c.model.num_registers = 2
  c.dinov2.update(head_hidden=24, head_bottleneck=8, num_prototypes=16,
                  separate_ibot_head=True, ibot_num_prototypes=12)
  return c


def _spec(c, scan=False):
  c.model.scan_layers = scan
  objective = get_objective(c, total_steps=10, steps_per_epoch=5)
  mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
  return ModelSpec(objective.init_model, 0, mesh, shd.DEFAULT_RULES)


def _flat(tree):
  return core.flatten_params(tree)


# --- the references' parameter lists (name, shape, requires_grad) ----------

def _timm_block(prefix, d, f, layerscale=False):
  """timm / DINOv2 ViT block, qkv bias, GELU MLP."""
  out = [(f"{prefix}norm1.weight", (d,)), (f"{prefix}norm1.bias", (d,)),
         (f"{prefix}attn.qkv.weight", (3 * d, d)), (f"{prefix}attn.qkv.bias", (3 * d,)),
         (f"{prefix}attn.proj.weight", (d, d)), (f"{prefix}attn.proj.bias", (d,)),
         (f"{prefix}norm2.weight", (d,)), (f"{prefix}norm2.bias", (d,)),
         (f"{prefix}mlp.fc1.weight", (f, d)), (f"{prefix}mlp.fc1.bias", (f,)),
         (f"{prefix}mlp.fc2.weight", (d, f)), (f"{prefix}mlp.fc2.bias", (d,))]
  if layerscale:
    out += [(f"{prefix}ls1.gamma", (d,)), (f"{prefix}ls2.gamma", (d,))]
  return [(n, s, True) for n, s in out]


def _mae_reference(dd, df, ddepth):
  """models_mae.MaskedAutoencoderViT: both position tables requires_grad=False."""
  ps = [("cls_token", (1, 1, D), True), ("pos_embed", (1, N + 1, D), False),
        ("patch_embed.proj.weight", (D, C, PATCH, PATCH), True),
        ("patch_embed.proj.bias", (D,), True)]
  for i in range(DEPTH):
    ps += _timm_block(f"blocks.{i}.", D, MLP)
  ps += [("norm.weight", (D,), True), ("norm.bias", (D,), True),
         ("decoder_embed.weight", (dd, D), True), ("decoder_embed.bias", (dd,), True),
         ("mask_token", (1, 1, dd), True), ("decoder_pos_embed", (1, N + 1, dd), False)]
  for i in range(ddepth):
    ps += _timm_block(f"decoder_blocks.{i}.", dd, df)
  ps += [("decoder_norm.weight", (dd,), True), ("decoder_norm.bias", (dd,), True),
         ("decoder_pred.weight", (PATCH * PATCH * C, dd), True),
         ("decoder_pred.bias", (PATCH * PATCH * C,), True)]
  return ps


def _dinov2_backbone_reference(registers, chunks):
  """DinoVisionTransformer (learned pos_embed with a cls row, mask_token (1, D));
  with block_chunks the blocks are blocks.<chunk>.<global index>."""
  ps = [("cls_token", (1, 1, D)), ("pos_embed", (1, N + 1, D)),
        ("register_tokens", (1, registers, D)), ("mask_token", (1, D)),
        ("patch_embed.proj.weight", (D, C, PATCH, PATCH)), ("patch_embed.proj.bias", (D,))]
  ps = [(n, s, True) for n, s in ps]
  for i in range(DEPTH):
    chunk = f"{i // (DEPTH // chunks)}." if chunks else ""
    ps += _timm_block(f"blocks.{chunk}{i}.", D, MLP, layerscale=True)
  return ps + [("norm.weight", (D,), True), ("norm.bias", (D,), True)]


def _dino_head_reference(hidden, bottleneck, k):
  """dino_head.DINOHead, 3 layers, weight-normalised last layer."""
  return [(n, s, True) for n, s in [
      ("mlp.0.weight", (hidden, D)), ("mlp.0.bias", (hidden,)),
      ("mlp.2.weight", (hidden, hidden)), ("mlp.2.bias", (hidden,)),
      ("mlp.4.weight", (bottleneck, hidden)), ("mlp.4.bias", (bottleneck,)),
      ("last_layer.weight_g", (k, 1)), ("last_layer.weight_v", (k, bottleneck))]]


# --- the references' rules, as they state them -----------------------------

def mae_decays(name, shape):
  return not (len(shape) == 1 or name.endswith(".bias"))


def dinov2_decays(name, shape):
  del shape
  return not (name.endswith(".bias") or "norm" in name or "gamma" in name)


def mae_finetune_decays(name, shape):
  return not (len(shape) == 1 or name in {"pos_embed", "cls_token", "dist_token"})


# --- the mapping, through the importers --------------------------------------

def _tagged(params, frozen=None):
  """A state dict with each trainable tensor filled with its index + 1."""
  frozen = frozen or {}
  return {n: (frozen[n] if n in frozen else np.full(s, i + 1, np.float32))
          for i, (n, s, _) in enumerate(params)}


def _names_by_tag(ours, params, prefix=""):
  """Our path -> the reference name whose tag the imported leaf holds."""
  out = {}
  for path, leaf in _flat(ours).items():
    values = np.unique(np.asarray(leaf))
    assert len(values) == 1 and values[0] == int(values[0]) >= 1, path
    out[prefix + path] = params[int(values[0]) - 1]
  return out


def _assert_same(ours_mask, mapping, rule, what):
  assert set(ours_mask) == set(mapping), (what, set(ours_mask) ^ set(mapping))
  want = {p: rule(n, s) for p, (n, s, _) in mapping.items()}
  got = {p: bool(v) for p, v in ours_mask.items()}
  assert got == want, (what, {p: (got[p], mapping[p][0]) for p in got if got[p] != want[p]})


def _mae_mapping(c):
  dd, df = c.mae.decoder_width, 4 * c.mae.decoder_width
  ref = _mae_reference(dd, df, c.mae.decoder_depth)
  table = lambda w: np.concatenate([np.zeros((1, w), np.float32),  # noqa: E731
                                    sincos_2d(w, IMAGE // PATCH, IMAGE // PATCH)])[None]
  sd = _tagged(ref, {"pos_embed": table(D), "decoder_pos_embed": table(dd)})
  cfg, ours, _ = mae.from_mae(sd, num_heads=HEADS, decoder_heads=c.mae.decoder_heads)
  assert cfg.pos_embed == "sincos"  # fixed there, no parameter here either
  mapping = _names_by_tag(ours, ref)
  # Every trainable reference tensor is exactly one of ours, and back.
  assert sorted(n for n, _, _ in mapping.values()) == sorted(n for n, _, g in ref if g)
  return mapping


def _dinov2_mapping(c, chunks):
  backbone = _dinov2_backbone_reference(c.model.num_registers, chunks)
  _, ours = dinov2.from_dinov2(_tagged(backbone), num_heads=HEADS)
  mapping = {f"backbone/{p}": (n, s, g) for p, (n, s, g) in _names_by_tag(ours, backbone).items()}
  assert sorted(n for n, _, _ in mapping.values()) == sorted(n for n, _, _ in backbone)
  heads = {"dino_head": c.dinov2.num_prototypes, "ibot_head": c.dinov2.ibot_num_prototypes}
  for head, k in heads.items():
    ref = dict((n, (n, s, g)) for n, s, g in _dino_head_reference(
        c.dinov2.head_hidden, c.dinov2.head_bottleneck, k))
    # The importers skip heads; ours name the same linears in order, and the
    # weight-norm direction and gain.
    for j in range(c.dinov2.head_layers):
      mapping[f"{head}/mlp/{j}/kernel"] = ref[f"mlp.{2 * j}.weight"]
      mapping[f"{head}/mlp/{j}/bias"] = ref[f"mlp.{2 * j}.bias"]
    mapping[f"{head}/last_layer"] = ref["last_layer.weight_v"]
    mapping[f"{head}/last_layer_gain"] = ref["last_layer.weight_g"]
  return mapping


# --- the tests ----------------------------------------------------------------

@pytest.mark.parametrize("scan", [False, True])
def test_mae_decay_groups_are_the_references(scan):
  c = _mae_config()
  mapping = _mae_mapping(c)
  mask = _flat(_spec(c, scan).decay_mask)
  if scan:  # one entry per stacked leaf: each layer of the reference must agree
    mask = {p.replace("layers/", f"layers/{i}/"): v for p, v in mask.items()
            for i in range(DEPTH if p.startswith("encoder") else c.mae.decoder_depth)}
  _assert_same(mask, mapping, mae_decays, "MAE")
  # The tokens are the ones that moved: they decay at 0.05 as in the reference.
  assert mask["encoder/cls_token"] and mask["mask_token"]
  # DINOv2's rule draws the same groups on this tree, so one rule serves both.
  _assert_same(mask, mapping, dinov2_decays, "DINOv2 rule on MAE")


@pytest.mark.parametrize("chunks", [0, 2])
def test_dinov2_decay_groups_and_lr_multipliers_are_the_references(chunks):
  c = _dinov2_config()
  mapping = _dinov2_mapping(c, chunks)
  spec = _spec(c)
  mask = _flat(spec.decay_mask)
  _assert_same(mask, mapping, dinov2_decays, "DINOv2")
  assert all(mask[f"backbone/{t}"] for t in ("cls_token", "pos_embed", "register_tokens",
                                             "mask_token"))
  _assert_same(mask, mapping, mae_decays, "MAE rule on DINOv2")

  # lr multipliers: layer-wise decay per submodel, x patch_embed_lr_mult.
  rate, patch_mult = c.optim.layer_decay, c.optim.patch_embed_lr_mult
  assert (rate, patch_mult) == (0.9, 0.2)
  mults = _flat(optim.lr_multipliers(spec.abstract_params, depth=DEPTH, layer_decay=rate,
                                     patch_embed_mult=patch_mult))
  for path, (name, _, _) in mapping.items():
    backbone = path.startswith("backbone/")
    want = get_vit_lr_decay_rate(name, rate, DEPTH if backbone else 0, backbone, bool(chunks))
    if "patch_embed" in name:
      want *= patch_mult
    assert float(mults[path]) == pytest.approx(want, rel=1e-6), (path, name)


def test_mae_finetune_decay_groups_are_the_references():
  # A learned position table and a cls token: the two names the rule exempts.
  vit = ViTConfig(width=D, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP, patch_size=PATCH,
                  image_size=IMAGE, in_channels=C, pos_embed="learned", class_token=True)
  _, abstract, _ = nnx.split(nnx.eval_shape(lambda: VisionTransformer(vit, rngs=nnx.Rngs(0))),
                             nnx.Param, ...)
  flat = _flat(nnx.to_pure_dict(abstract))
  paths = sorted(flat)
  tagged = core.nest({p: np.full(flat[p].shape, i + 1, np.float32)
                          for i, p in enumerate(paths)})
  sd = timm.to_timm(vit, tagged)
  mapping = {}
  for name, value in sd.items():
    values = np.unique(value)
    assert len(values) == 1, name
    mapping[f"encoder/{paths[int(values[0]) - 1]}"] = (name, value.shape, True)
  # The classifier finetune.py adds: timm's fc_norm (global pool) and head.
  k = 5
  mapping.update({"fc_norm/scale": ("fc_norm.weight", (D,), True),
                  "fc_norm/bias": ("fc_norm.bias", (D,), True),
                  "head/kernel": ("head.weight", (k, D), True),
                  "head/bias": ("head.bias", (k,), True)})
  params = {"encoder": tagged, "fc_norm": {"scale": np.ones(D), "bias": np.zeros(D)},
            "head": {"kernel": np.zeros((D, k)), "bias": np.zeros(k)}}
  mask = _flat(optim.decay_mask(params, finetune=True))
  _assert_same(mask, mapping, mae_finetune_decays, "MAE finetune")
  assert not mask["encoder/cls_token"] and not mask["encoder/pos_embed"]
