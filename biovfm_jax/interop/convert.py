"""Converts ViT weights between PyTorch layouts (timm, MAE, DINOv2) and ours,
so published backbones can be benchmarked or pretrained further here, and
our encoders can be used from timm.

Pure numpy (no torch). Torch stores a Linear weight as (out, in) and the
patch conv as (D, C, p, p); ours are (in, out), a (p*p*C, D) matrix over
(row, col, channel)-flattened patches, and attention split per head. Every
key read is shape-checked; keys nobody reads are an error, except known
heads (classifier, DINO/iBOT heads), which are skipped and logged. DINOv2's
DINO/iBOT heads import on their own (from_dinov2_heads).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from biovfm_jax.models.patches import resize_pos_grid, sincos_2d
from biovfm_jax.models.vit import VIT_SIZES, ViTConfig

Params = dict[str, Any]  # nested dict of arrays, as nnx.to_pure_dict gives

# Weights of the imported model fully define it; this only has to be a
# non-None value so the config builds LayerScale parameters.
_LAYERSCALE_INIT = 1e-5
# MAE's decoder uses 16 heads at every published size.
MAE_DECODER_HEADS = 16


class ConversionError(ValueError):
  """A state dict that does not fit the expected layout."""


# --------------------------------------------------------------------------
# Reading torch state dicts


class _Source:
  """A state dict being consumed: checked reads, and a record of what was
  read so that leftover keys can be reported."""

  def __init__(self, sd: Mapping[str, Any], what: str):
    self.sd = dict(sd)
    self.what = what
    self.used: set[str] = set()

  def has(self, key: str) -> bool:
    return key in self.sd

  def shape(self, key: str) -> tuple[int, ...]:
    if key not in self.sd:
      raise ConversionError(f"{self.what}: missing key {key!r}")
    return tuple(np.shape(self.sd[key]))

  def get(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    got = self.shape(key)
    if shape is not None and got != tuple(shape):
      raise ConversionError(f"{self.what}: key {key!r} has shape {got}, "
                            f"expected {tuple(shape)}")
    self.used.add(key)
    return np.asarray(self.sd[key], dtype=np.float32)

  def linear(self, name: str, din: int, dout: int) -> tuple[np.ndarray, np.ndarray]:
    """torch Linear `name` -> (kernel (din, dout), bias (dout,))."""
    return (self.get(f"{name}.weight", (dout, din)).T,
            self.get(f"{name}.bias", (dout,)))

  def indices(self, prefix: str) -> int:
    """Number of `prefix<i>.` sub-modules; they must be numbered 0..n-1."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in self.sd if (m := pat.match(k))}
    if not found:
      raise ConversionError(f"{self.what}: no {prefix}<i>.* keys")
    missing = sorted(set(range(max(found) + 1)) - found)
    if missing:
      raise ConversionError(f"{self.what}: {prefix}{missing[0]}.* is missing "
                            f"(found indices {sorted(found)})")
    return len(found)

  def finish(self, ignore: tuple[str, ...] = ()) -> None:
    """Raises on keys nobody read; logs the ignored head keys."""
    left = sorted(k for k in self.sd if k not in self.used)
    ignored = [k for k in left if k.startswith(ignore)]
    unexpected = [k for k in left if not k.startswith(ignore)]
    if unexpected:
      more = f" (and {len(unexpected) - 10} more)" if len(unexpected) > 10 else ""
      raise ConversionError(
          f"{self.what}: unexpected keys {unexpected[:10]}{more}: this layout "
          "has parts our VisionTransformer does not (e.g. qk-norm, pre-norm, "
          "a different FFN)")
    if ignored:
      logging.info("%s: ignored %d head keys (%s...)", self.what, len(ignored),
                   ignored[0])


def _num_heads(width: int, size: str | None, num_heads: int | None,
               what: str) -> int:
  """Heads are not visible in the shapes: from num_heads, else from size."""
  if num_heads is None:
    if size is None:
      raise ConversionError(
          f"{what}: the number of attention heads cannot be read from the "
          f"weights; pass size (one of {sorted(VIT_SIZES)}) or num_heads")
    if size not in VIT_SIZES:
      raise ConversionError(f"{what}: size={size!r} is not one of {sorted(VIT_SIZES)}")
    if VIT_SIZES[size]["width"] != width:
      raise ConversionError(
          f"{what}: size={size!r} has width {VIT_SIZES[size]['width']}, the "
          f"weights have width {width}; pass the matching size or num_heads")
    num_heads = VIT_SIZES[size]["num_heads"]
  if width % num_heads:
    raise ConversionError(f"{what}: width {width} is not divisible by "
                          f"num_heads={num_heads}")
  return int(num_heads)


def _ffn_style(src: _Source, block: str, width: int) -> tuple[str, str, int]:
  """(ffn, torch naming, hidden) of a block's FFN, from its keys.

  'mlp': fc1/fc2. SwiGLU: 'w12' (DINOv2: w12/w3), 'packed' (timm
  SwiGLUPacked: fc1 holds both halves, silu on the first), 'split' (timm
  SwiGLU: fc1_g gate, fc1_x value, fc2).
  """
  m = f"{block}mlp."
  if src.has(m + "w12.weight"):
    return "swiglu", "w12", src.shape(m + "w3.weight")[1]
  if src.has(m + "fc1_g.weight"):
    return "swiglu", "split", src.shape(m + "fc1_g.weight")[0]
  h1, h2 = src.shape(m + "fc1.weight")[0], src.shape(m + "fc2.weight")[1]
  if h1 == h2:
    return "mlp", "fc", h1
  if h1 == 2 * h2:
    return "swiglu", "packed", h2
  raise ConversionError(f"{src.what}: {m}fc1.weight has {h1} outputs but "
                        f"{m}fc2.weight has {h2} inputs (neither an MLP nor a "
                        "packed SwiGLU)")


def _read_ln(src: _Source, name: str, out: str, flat: dict, dim: int) -> None:
  flat[f"{out}/scale"] = src.get(f"{name}.weight", (dim,))
  flat[f"{out}/bias"] = src.get(f"{name}.bias", (dim,))


def _read_block(src: _Source, name: str, out: str, flat: dict, cfg: ViTConfig,
                style: str) -> None:
  """torch block `name` (e.g. 'blocks.3.') -> our keys under `out`."""
  d, h = cfg.width, cfg.num_heads
  hd, f = d // h, cfg.mlp_dim
  _read_ln(src, name + "norm1", out + "norm1", flat, d)
  k, b = src.linear(name + "attn.qkv", d, 3 * d)
  flat[out + "attn/qkv_kernel"] = k.reshape(d, 3, h, hd)
  flat[out + "attn/qkv_bias"] = b
  k, b = src.linear(name + "attn.proj", d, d)
  flat[out + "attn/proj_kernel"] = k.reshape(h, hd, d)
  flat[out + "attn/proj_bias"] = b
  _read_ln(src, name + "norm2", out + "norm2", flat, d)
  mlp = name + "mlp."
  if style == "fc":
    for fc, din, dout in (("fc1", d, f), ("fc2", f, d)):
      flat[f"{out}mlp/{fc}/kernel"], flat[f"{out}mlp/{fc}/bias"] = src.linear(
          mlp + fc, din, dout)
  else:
    if style == "split":
      kg, bg = src.linear(mlp + "fc1_g", d, f)
      kx, bx = src.linear(mlp + "fc1_x", d, f)
      k, b = np.concatenate([kg, kx], 1), np.concatenate([bg, bx])
    else:
      k, b = src.linear(mlp + ("w12" if style == "w12" else "fc1"), d, 2 * f)
    flat[out + "mlp/w12_kernel"] = k.reshape(d, 2, f)
    flat[out + "mlp/w12_bias"] = b
    k, b = src.linear(mlp + ("w3" if style == "w12" else "fc2"), f, d)
    flat[out + "mlp/w3/kernel"], flat[out + "mlp/w3/bias"] = k, b
  if cfg.layerscale_init is not None:
    for ls in ("ls1", "ls2"):
      flat[f"{out}{ls}/gamma"] = src.get(f"{name}{ls}.gamma", (d,))


def _square_grid(n: int) -> int | None:
  g = math.isqrt(n) if n > 0 else 0
  return g if g > 0 and g * g == n else None


def _read_encoder(src: _Source, *, size, num_heads, image_size,
                  pos_layout: str, register_key: str,
                  mask_key: str | None) -> tuple[ViTConfig, dict]:
  """Reads the encoder common to timm, MAE and DINOv2 into flat our-keys.

  pos_layout 'timm': pos_embed covers the prefix tokens or not
  (no_embed_class), told apart by which gives a square patch grid;
  'cls_slot' (MAE, DINOv2): one row for the cls token, none for registers.
  """
  d, c, p, p2 = src.shape("patch_embed.proj.weight")
  if p != p2:
    raise ConversionError(f"{src.what}: patch_embed.proj.weight has non-square "
                          f"patches {p}x{p2}")
  flat: dict[str, np.ndarray] = {}
  w = src.get("patch_embed.proj.weight")
  flat["patch_embed/kernel"] = w.transpose(2, 3, 1, 0).reshape(p * p * c, d)
  flat["patch_embed/bias"] = src.get("patch_embed.proj.bias", (d,))
  heads = _num_heads(d, size, num_heads, src.what)
  depth = src.indices("blocks.")
  ffn, style, hidden = _ffn_style(src, "blocks.0.", d)

  class_token = src.has("cls_token")
  if class_token:
    flat["cls_token"] = src.get("cls_token", (1, 1, d)).reshape(d)
  regs = src.shape(register_key)[1] if src.has(register_key) else 0
  if regs:
    flat["register_tokens"] = src.get(register_key, (1, regs, d))[0]
  has_mask = mask_key is not None and src.has(mask_key)
  if has_mask:
    flat["mask_token"] = src.get(mask_key, (1, d)).reshape(d)

  # Position table -> ours: (cls row if class_token) + patch rows.
  length = src.shape("pos_embed")[1] if src.has("pos_embed") else 0
  pos = src.get("pos_embed", (1, length, d))[0]
  ncls = int(class_token)
  if pos_layout == "timm":
    offsets = sorted({ncls + regs, 0})
  else:
    offsets = [ncls]
  fits = [o for o in offsets if _square_grid(length - o)]
  if not fits:
    raise ConversionError(f"{src.what}: pos_embed has {length} rows, which fits no "
                          f"square patch grid with {ncls} cls and {regs} register tokens")
  if len(fits) > 1:
    # E.g. 9 rows with cls + 4 registers: 3x3 patches, or 2x2 + 5 prefix
    # rows. image_size decides; else no_embed_class, as every timm model
    # with registers has it.
    fits = [o for o in fits if image_size and _square_grid(length - o) * p == image_size]
    fits = fits or [0]
  offset = fits[0]
  grid = _square_grid(length - offset)
  patches = pos[offset:]
  cls_row = pos[:1] if offset and class_token else np.zeros((ncls, d), np.float32)
  if regs and offset == ncls + regs:
    # timm with registers inside the table: a constant per register token.
    flat["register_tokens"] = flat["register_tokens"] + pos[ncls:ncls + regs]
  native = grid * p
  image_size = image_size or native
  if image_size % p:
    raise ConversionError(f"{src.what}: image_size={image_size} is not divisible "
                          f"by the patch size {p}")
  if image_size != native:
    # The same bicubic resize the model would apply at run time.
    g = image_size // p
    patches = resize_pos_grid(patches, (grid, grid), (g, g))
  flat["pos_embed"] = np.concatenate([cls_row, patches], 0)

  cfg = ViTConfig(
      width=d, depth=depth, num_heads=heads, mlp_dim=hidden, patch_size=p,
      image_size=image_size, in_channels=c, pos_embed="learned",
      class_token=class_token, num_registers=regs,
      layerscale_init=_LAYERSCALE_INIT if src.has("blocks.0.ls1.gamma") else None,
      ffn=ffn, mask_token=has_mask)
  for i in range(depth):
    blk = f"blocks.{i}."
    if _ffn_style(src, blk, d)[1] != style:
      raise ConversionError(f"{src.what}: {blk}mlp.* differs from blocks.0.mlp.*")
    _read_block(src, blk, f"blocks/layers/{i}/", flat, cfg, style)
  _read_ln(src, "norm", "norm", flat, d)
  return cfg, flat


# --------------------------------------------------------------------------
# Our parameter trees


def _nest(flat: Mapping[str, np.ndarray]) -> Params:
  """{'a/0/b': x} -> {'a': {0: {'b': x}}} (digit parts become int keys, as
  nnx.to_pure_dict gives for nnx.List)."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    parts = [int(s) if s.isdigit() else s for s in path.split("/")]
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = np.ascontiguousarray(value, dtype=np.float32)
  return tree


def flatten_params(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """Nested params -> {'a/0/b': leaf}."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten_params(v, name + "/"))
    else:
      out[name] = v
  return out


def check_params(config: ViTConfig, params: Mapping,
                 decoder: Mapping[str, Any] | None = None) -> None:
  """Raises ConversionError unless `params` has exactly the keys and shapes of
  VisionTransformer(config), or of MaskedAutoencoder(config, **decoder)."""
  from flax import nnx

  from biovfm_jax.models import MaskedAutoencoder, VisionTransformer
  if decoder is None:
    build = lambda: VisionTransformer(config, rngs=nnx.Rngs(0))
  else:
    build = lambda: MaskedAutoencoder(config, **decoder, rngs=nnx.Rngs(0))
  _check_tree(build, params)


def _check_tree(build, params: Mapping) -> None:
  """Raises ConversionError unless `params` has exactly the Param keys and
  shapes of the module `build()` makes (built abstractly, no init)."""
  from flax import nnx
  _, want, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  want = flatten_params(nnx.to_pure_dict(want))
  got = flatten_params(params)
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    raise ConversionError(f"params do not match the model: missing {missing[:5]}, "
                          f"unexpected {extra[:5]}")
  for k, s in want.items():
    if tuple(np.shape(got[k])) != tuple(s.shape):
      raise ConversionError(f"params[{k!r}] has shape {tuple(np.shape(got[k]))}, "
                            f"the model expects {tuple(s.shape)}")


# --------------------------------------------------------------------------
# Imports


_TIMM_HEADS = ("head.", "fc_norm.", "attn_pool.")


def from_timm(sd: Mapping[str, Any], *, size: str | None = None,
              num_heads: int | None = None,
              image_size: int | None = None) -> tuple[ViTConfig, Params]:
  """timm VisionTransformer state dict -> (ViTConfig, VisionTransformer params).

  Width, depth, patch, FFN (GELU MLP or SwiGLU, packed or split), LayerScale,
  registers and the class token are read from the shapes; heads come from
  `size` or `num_heads`. Positions import as a learned table; timm's
  register positions (when the table covers them) are folded into the
  register tokens, and a table without a cls row gets a zero one. With
  `image_size` other than the table's, the table is resized (bicubic).
  Classifier heads (head, fc_norm, attn_pool) are ignored.
  """
  src = _Source(sd, "timm state dict")
  cfg, flat = _read_encoder(src, size=size, num_heads=num_heads,
                            image_size=image_size, pos_layout="timm",
                            register_key="reg_token", mask_key=None)
  src.finish(ignore=_TIMM_HEADS)
  params = _nest(flat)
  check_params(cfg, params)
  return cfg, params


def _is_mae_sincos(table: np.ndarray, grid: int, atol: float = 1e-5) -> bool:
  """True when a (1 + grid**2, D) table is MAE's: zero cls row + sin-cos."""
  d = table.shape[1]
  if d % 4 or table.shape[0] != 1 + grid * grid:
    return False
  return (np.allclose(table[0], 0, atol=atol)
          and np.allclose(table[1:], sincos_2d(d, grid, grid), atol=atol))


def from_mae(sd: Mapping[str, Any], *, size: str | None = None,
             num_heads: int | None = None,
             decoder_heads: int = MAE_DECODER_HEADS
             ) -> tuple[ViTConfig, Params, dict[str, int]]:
  """facebookresearch/mae pretraining state dict (the checkpoint's 'model')
  -> (encoder ViTConfig, MaskedAutoencoder params, decoder kwargs).

  The encoder's fixed position table is checked against our sin-cos table;
  when it matches, pos_embed='sincos' (no parameter), else it imports as a
  learned table with a warning. The decoder's table must be sin-cos (ours
  is fixed). `decoder_heads` cannot be read from shapes (MAE: 16).
  """
  src = _Source(sd, "MAE state dict")
  if not src.has("decoder_embed.weight"):
    raise ConversionError(
        "MAE state dict: no decoder (decoder_embed.weight is missing); an "
        "encoder-only MAE checkpoint imports with format 'timm'")
  cfg, flat = _read_encoder(src, size=size, num_heads=num_heads, image_size=None,
                            pos_layout="cls_slot", register_key="reg_token",
                            mask_key=None)
  if not cfg.class_token or cfg.num_registers:
    raise ConversionError("MAE state dict: expected a cls_token and no registers")
  grid = cfg.grid_size
  if _is_mae_sincos(flat["pos_embed"], grid):
    cfg = dataclasses.replace(cfg, pos_embed="sincos")
    del flat["pos_embed"]
  else:
    warnings.warn("MAE state dict: pos_embed is not the fixed sin-cos table; "
                  "importing it as a learned position embedding", stacklevel=2)

  dw = src.shape("decoder_embed.weight")[0]
  if dw % decoder_heads:
    raise ConversionError(f"MAE state dict: decoder width {dw} is not divisible "
                          f"by decoder_heads={decoder_heads}")
  ddepth = src.indices("decoder_blocks.")
  dffn, dstyle, dhidden = _ffn_style(src, "decoder_blocks.0.", dw)
  if dffn != "mlp":
    raise ConversionError("MAE state dict: decoder_blocks use a SwiGLU FFN; our "
                          "decoder has a GELU MLP")
  dec_cfg = dataclasses.replace(cfg, width=dw, depth=ddepth, num_heads=decoder_heads,
                                mlp_dim=dhidden, ffn="mlp", layerscale_init=None,
                                pos_embed="sincos", num_registers=0)
  dec: dict[str, np.ndarray] = {}
  dec["decoder_embed/kernel"], dec["decoder_embed/bias"] = src.linear(
      "decoder_embed", cfg.width, dw)
  dec["mask_token"] = src.get("mask_token", (1, 1, dw)).reshape(dw)
  dpos = src.get("decoder_pos_embed", (1, 1 + grid * grid, dw))[0]
  if not _is_mae_sincos(dpos, grid):
    raise ConversionError("MAE state dict: decoder_pos_embed is not the fixed "
                          "sin-cos table (with a zero cls row) our decoder uses")
  for i in range(ddepth):
    _read_block(src, f"decoder_blocks.{i}.", f"decoder_blocks/layers/{i}/", dec,
                dec_cfg, dstyle)
  _read_ln(src, "decoder_norm", "decoder_norm", dec, dw)
  patch_dim = cfg.patch_size ** 2 * cfg.in_channels
  dec["decoder_pred/kernel"], dec["decoder_pred/bias"] = src.linear(
      "decoder_pred", dw, patch_dim)
  src.finish()

  decoder = dict(decoder_width=dw, decoder_depth=ddepth,
                 decoder_heads=int(decoder_heads), decoder_mlp_dim=dhidden)
  params = {"encoder": _nest(flat), **_nest(dec)}
  check_params(cfg, params, decoder)
  return cfg, params, decoder


_DINOV2_PREFIXES = ("teacher.backbone.", "backbone.", "")
_DINOV2_HEADS = ("head.", "dino_head.", "ibot_head.")


def _dinov2_prefix(sd: Mapping[str, Any]) -> str:
  """The backbone's key prefix (the teacher's when both networks are there)."""
  for prefix in _DINOV2_PREFIXES:
    if f"{prefix}patch_embed.proj.weight" in sd:
      return prefix
  raise ConversionError(
      "DINOv2 state dict: no patch_embed.proj.weight under any of "
      f"{[p + '*' for p in _DINOV2_PREFIXES]}")


def _dinov2_backbone(sd: Mapping[str, Any]) -> tuple[dict, list[str]]:
  """The backbone keys (prefix stripped, block chunks flattened) and the
  skipped keys (student, DINO/iBOT heads)."""
  prefix = _dinov2_prefix(sd)
  backbone = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  skipped = [k for k in sd if not k.startswith(prefix)]
  # Block chunks (FSDP training): blocks.<chunk>.<i>.*, with i the global index.
  chunked = re.compile(r"blocks\.(\d+)\.(\d+)\.(.*)")
  if any(chunked.match(k) for k in backbone):
    flat, seen = {}, {}
    for k, v in backbone.items():
      m = chunked.match(k)
      if m is None:
        if k.startswith("blocks."):
          raise ConversionError(f"DINOv2 state dict: {prefix}{k} mixes chunked "
                                "and flat block keys")
        flat[k] = v
        continue
      chunk, i = int(m.group(1)), int(m.group(2))
      if seen.setdefault(i, chunk) != chunk:
        raise ConversionError(f"DINOv2 state dict: block {i} appears in chunks "
                              f"{seen[i]} and {chunk}")
      flat[f"blocks.{i}.{m.group(3)}"] = v
    backbone = flat
  return backbone, skipped


def from_dinov2(sd: Mapping[str, Any], *, size: str | None = None,
                num_heads: int | None = None,
                image_size: int | None = None) -> tuple[ViTConfig, Params]:
  """facebookresearch/dinov2 backbone -> (ViTConfig, VisionTransformer params).

  Takes a hub state dict (cls_token, pos_embed with a cls row,
  register_tokens, mask_token, blocks.<i>.*, norm) or a training checkpoint's
  teacher ('backbone.' or 'teacher.backbone.' prefixed, blocks possibly in
  chunks 'blocks.<chunk>.<i>.*'); DINO/iBOT heads (see from_dinov2_heads)
  and the student are skipped. image_size defaults to the table's (518 for
  hub models); another value resizes the table (bicubic).
  """
  backbone, skipped = _dinov2_backbone(sd)
  src = _Source(backbone, "DINOv2 state dict")
  cfg, flat = _read_encoder(src, size=size, num_heads=num_heads,
                            image_size=image_size, pos_layout="cls_slot",
                            register_key="register_tokens", mask_key="mask_token")
  src.finish(ignore=_DINOV2_HEADS)
  if skipped:
    logging.info("DINOv2 state dict: skipped %d keys outside the backbone (%s...)",
                 len(skipped), skipped[0])
  cfg = dataclasses.replace(cfg, init="dinov2")
  params = _nest(flat)
  check_params(cfg, params)
  return cfg, params


DINOV2_HEAD_NAMES = ("dino_head", "ibot_head")


def from_dinov2_heads(sd: Mapping[str, Any], in_dim: int
                      ) -> tuple[dict[str, Params], dict[str, dict[str, Any]]]:
  """The DINO/iBOT heads beside the backbone from_dinov2 reads (the
  teacher's in a full training checkpoint) -> ({name: DINOHead params},
  {name: DINOHead kwargs}), both empty when the state dict has no heads.

  The kwargs (num_prototypes, hidden_dim, bottleneck_dim, nlayers) are read
  from the shapes: DINOHead(in_dim, **kwargs) takes the params. Heads with
  BatchNorm (use_bn) are refused. The reference's last layer is weight-normed,
  W = g * v / ||v|| per prototype; ours is v / ||v|| per column with no gain,
  so we keep v (its direction and the scale its optimiser saw): the logits
  are equal where g == 1, and divided by |g| elsewhere (a warning says so).
  """
  root = _dinov2_prefix(sd).removesuffix("backbone.")
  params, arch = {}, {}
  for name in DINOV2_HEAD_NAMES:
    at = f"{root}{name}."
    head = {k[len(at):]: v for k, v in sd.items() if k.startswith(at)}
    if head:
      params[name], arch[name] = _read_dino_head(_Source(head, f"DINOv2 {at}*"), in_dim)
  return params, arch


def _read_dino_head(src: _Source, in_dim: int) -> tuple[Params, dict[str, Any]]:
  from flax import nnx

  from biovfm_jax.models.dino_head import DINOHead
  what = src.what
  if any(k.endswith("running_mean") for k in src.sd):
    raise ConversionError(f"{what}: the MLP has BatchNorm layers (use_bn=True), "
                          "which our DINOHead does not have")
  # nn.Sequential(Linear, GELU, ..., Linear): Linears at 0, 2, 4 ...; a
  # one-layer MLP is a bare Linear named 'mlp'.
  if src.has("mlp.weight"):
    names = ["mlp"]
  else:
    found = sorted(int(m.group(1)) for k in src.sd
                   if (m := re.fullmatch(r"mlp\.(\d+)\.weight", k)))
    if not found or found != list(range(0, 2 * len(found), 2)):
      raise ConversionError(f"{what}: expected Linear layers mlp.0, mlp.2, mlp.4 ... "
                            f"(Linear, GELU, ...), found mlp.<i>.weight at {found}")
    names = [f"mlp.{i}" for i in found]
  flat, dims = {}, [in_dim]
  for i, name in enumerate(names):
    dims.append(src.shape(f"{name}.weight")[0])
    flat[f"mlp/{i}/kernel"], flat[f"mlp/{i}/bias"] = src.linear(name, dims[-2], dims[-1])
  # weight_norm's g and v: torch.nn.utils.weight_norm, or its parametrizations form.
  for g_key, v_key in (("weight_g", "weight_v"),
                       ("parametrizations.weight.original0",
                        "parametrizations.weight.original1")):
    g_key, v_key = "last_layer." + g_key, "last_layer." + v_key
    if src.has(v_key):
      break
  else:
    raise ConversionError(f"{what}: no weight-normed last layer (last_layer.weight_g "
                          "and last_layer.weight_v)")
  k = src.shape(v_key)[0]
  v, g = src.get(v_key, (k, dims[-1])), src.get(g_key, (k, 1))
  if not np.allclose(g, 1.0, rtol=0, atol=1e-6):
    warnings.warn(f"{what}: {g_key} is not 1 (from {g.min():.4g} to {g.max():.4g}); "
                  "our prototypes have no gain, so the imported head's logits are the "
                  "reference's divided by |g| per prototype", stacklevel=3)
  flat["last_layer"] = np.where(g < 0, -v, v).T  # (bottleneck, K); g < 0 flips a prototype
  src.finish()
  kwargs = dict(num_prototypes=k, hidden_dim=dims[1] if len(names) > 1 else None,
                bottleneck_dim=dims[-1], nlayers=len(names))
  params = _nest(flat)
  _check_tree(lambda: DINOHead(in_dim, **kwargs, rngs=nnx.Rngs(0)), params)
  return params, kwargs


# --------------------------------------------------------------------------
# Export to timm


def _unscanned_blocks(config: ViTConfig, params: Mapping) -> list[Mapping]:
  """Per-layer block params, from an unscanned ({i: ...}) or a scanned
  (leading layer axis) stack."""
  layers = params["blocks"]["layers"]
  if all(isinstance(k, int) or str(k).isdigit() for k in layers):
    by_index = {int(k): v for k, v in layers.items()}
    if sorted(by_index) != list(range(config.depth)):
      raise ConversionError(f"params['blocks']['layers'] has layers "
                            f"{sorted(by_index)}, config.depth={config.depth}")
    return [by_index[i] for i in range(config.depth)]
  flat = flatten_params(layers)
  for k, v in flat.items():
    if np.shape(v)[0] != config.depth:
      raise ConversionError(f"scanned params['blocks']['layers'][{k!r}] has "
                            f"{np.shape(v)[0]} layers, config.depth={config.depth}")
  return [_nest({k: np.asarray(v)[i] for k, v in flat.items()})
          for i in range(config.depth)]


def to_timm(config: ViTConfig, params: Mapping) -> dict[str, np.ndarray]:
  """Our VisionTransformer params (unscanned or scanned) -> a timm state dict
  for create_timm_model(config) (load_state_dict strict=True).

  Sin-cos models get their computed table (zero cls row). With registers,
  timm's layout (no_embed_class) has no cls row, so the cls position is
  added to the cls token; the mask token has no timm counterpart and is
  dropped.
  """
  if "encoder" in params:
    raise ConversionError("to_timm takes encoder params; pass params['encoder'] "
                          "for a MaskedAutoencoder")
  check_params(config, params)
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, dtype=np.float32))
  d, p, c = config.width, config.patch_size, config.in_channels
  g = config.grid_size
  ncls = int(config.class_token)
  if config.pos_embed == "sincos":
    table = np.concatenate([np.zeros((ncls, d), np.float32), sincos_2d(d, g, g)])
  else:
    table = f32(params["pos_embed"])
  sd: dict[str, np.ndarray] = {}
  if config.class_token:
    cls = f32(params["cls_token"])
    if config.num_registers:
      cls = cls + table[0]
    sd["cls_token"] = cls.reshape(1, 1, d)
  if config.num_registers:
    sd["reg_token"] = f32(params["register_tokens"])[None]
    table = table[ncls:]
  sd["pos_embed"] = table[None]
  k = f32(params["patch_embed"]["kernel"])
  sd["patch_embed.proj.weight"] = k.reshape(p, p, c, d).transpose(3, 2, 0, 1)
  sd["patch_embed.proj.bias"] = f32(params["patch_embed"]["bias"])
  for i, blk in enumerate(_unscanned_blocks(config, params)):
    b = f"blocks.{i}."
    sd[b + "norm1.weight"] = f32(blk["norm1"]["scale"])
    sd[b + "norm1.bias"] = f32(blk["norm1"]["bias"])
    sd[b + "attn.qkv.weight"] = f32(blk["attn"]["qkv_kernel"]).reshape(d, 3 * d).T
    sd[b + "attn.qkv.bias"] = f32(blk["attn"]["qkv_bias"])
    sd[b + "attn.proj.weight"] = f32(blk["attn"]["proj_kernel"]).reshape(d, d).T
    sd[b + "attn.proj.bias"] = f32(blk["attn"]["proj_bias"])
    if config.layerscale_init is not None:
      sd[b + "ls1.gamma"] = f32(blk["ls1"]["gamma"])
      sd[b + "ls2.gamma"] = f32(blk["ls2"]["gamma"])
    sd[b + "norm2.weight"] = f32(blk["norm2"]["scale"])
    sd[b + "norm2.bias"] = f32(blk["norm2"]["bias"])
    mlp = blk["mlp"]
    if config.ffn == "swiglu":  # timm SwiGLUPacked: fc1 = [gate; value]
      sd[b + "mlp.fc1.weight"] = f32(mlp["w12_kernel"]).reshape(d, -1).T
      sd[b + "mlp.fc1.bias"] = f32(mlp["w12_bias"])
      sd[b + "mlp.fc2.weight"] = f32(mlp["w3"]["kernel"]).T
      sd[b + "mlp.fc2.bias"] = f32(mlp["w3"]["bias"])
    else:
      for fc in ("fc1", "fc2"):
        sd[f"{b}mlp.{fc}.weight"] = f32(mlp[fc]["kernel"]).T
        sd[f"{b}mlp.{fc}.bias"] = f32(mlp[fc]["bias"])
  sd["norm.weight"] = f32(params["norm"]["scale"])
  sd["norm.bias"] = f32(params["norm"]["bias"])
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


# (width, heads, patch) -> timm architecture with those defaults.
_TIMM_NAMES = {
    (192, 3, 16): "vit_tiny_patch16_224",
    (384, 6, 16): "vit_small_patch16_224",
    (768, 12, 16): "vit_base_patch16_224",
    (1024, 16, 16): "vit_large_patch16_224",
    (1280, 16, 14): "vit_huge_patch14_224",
    (384, 6, 8): "vit_small_patch8_224",
    (768, 12, 8): "vit_base_patch8_224",
    (384, 6, 32): "vit_small_patch32_224",
    (768, 12, 32): "vit_base_patch32_224",
    (1024, 16, 32): "vit_large_patch32_224",
}
_TIMM_DINOV2 = {
    (384, 6): "vit_small_patch14", (768, 12): "vit_base_patch14",
    (1024, 16): "vit_large_patch14", (1536, 24): "vit_giant_patch14",
}


def timm_model_name(config: ViTConfig) -> str:
  """The timm architecture of `config`'s width, heads and patch size (DINOv2
  names for patch 14 with LayerScale, registers or SwiGLU). Depth, image
  size and the rest come from timm_model_kwargs(config)."""
  key = (config.width, config.num_heads)
  dinov2_like = (config.layerscale_init is not None or config.num_registers
                 or config.ffn == "swiglu")
  # timm's giant defaults to SwiGLU: an MLP giant would not load from kwargs.
  giant_ok = key != (1536, 24) or config.ffn == "swiglu"
  if config.patch_size == 14 and key in _TIMM_DINOV2 and giant_ok and (
      dinov2_like or key + (14,) not in _TIMM_NAMES):
    reg = "_reg4" if config.num_registers == 4 else ""
    return f"{_TIMM_DINOV2[key]}{reg}_dinov2"
  name = _TIMM_NAMES.get(key + (config.patch_size,))
  if name is None:
    raise ConversionError(
        f"no timm vit_* architecture has width={config.width}, num_heads="
        f"{config.num_heads}, patch_size={config.patch_size}: "
        "biovfm_jax.interop.convert.create_timm_model(config) builds timm's VisionTransformer "
        "from biovfm_jax.interop.convert.timm_model_kwargs(config)")
  return name


def _mlp_ratio(hidden: int, width: int) -> float:
  """A ratio with int(width * ratio) == hidden (timm's rule)."""
  r = hidden / width
  return r if int(width * r) == hidden else (hidden + 0.5) / width


def timm_model_kwargs(config: ViTConfig) -> dict[str, Any]:
  """JSON-able timm VisionTransformer kwargs matching `config` exactly:
  timm.create_model(timm_model_name(config), **kwargs) builds the model for
  ffn='mlp'. For 'swiglu' they hold mlp_layer='SwiGLUPacked', a name in
  timm.layers that must be replaced by the class (create_timm_model does)."""
  swiglu = config.ffn == "swiglu"
  hidden = 2 * config.mlp_dim if swiglu else config.mlp_dim
  kwargs = dict(
      img_size=config.image_size, patch_size=config.patch_size,
      in_chans=config.in_channels, embed_dim=config.width, depth=config.depth,
      num_heads=config.num_heads, mlp_ratio=_mlp_ratio(hidden, config.width),
      qkv_bias=True, init_values=config.layerscale_init,
      class_token=config.class_token,
      global_pool="token" if config.class_token else "avg", fc_norm=False,
      reg_tokens=config.num_registers, no_embed_class=config.num_registers > 0,
      act_layer="silu" if swiglu else "gelu", num_classes=0)
  if swiglu:  # timm's default mlp_layer is Mlp
    kwargs["mlp_layer"] = "SwiGLUPacked"
  return kwargs


def create_timm_model(config: ViTConfig, **overrides):
  """A timm model (random weights) that to_timm(config, ...) loads into.
  Needs timm (imported here only)."""
  import timm
  import timm.layers
  from timm.models.vision_transformer import VisionTransformer as TimmViT
  kw = {**timm_model_kwargs(config), **overrides}
  kw["mlp_layer"] = getattr(timm.layers, kw.get("mlp_layer", "Mlp"))
  try:
    name = timm_model_name(config)
  except ConversionError:
    return TimmViT(**kw)
  return timm.create_model(name, pretrained=False, **kw)
