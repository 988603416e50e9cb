"""The shared layer of weight conversion: checked reads of a torch state dict
(Source), the encoder and block readers that timm, MAE, DINOv2 and
transformers layouts all go through, and our parameter trees (nest,
flatten_params, check_params, unscanned_blocks).

Pure numpy (no torch). Torch stores a Linear weight as (out, in) and the
patch conv as (D, C, p, p); ours are (in, out), a (p*p*C, D) matrix over
(row, col, channel)-flattened patches, and attention split per head. Every
key read is shape-checked; keys nobody reads are an error, except known
heads, which are skipped and logged.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from biovfm_jax.models.patches import resize_pos_grid
from biovfm_jax.models.vit import VIT_SIZES, ViTConfig

Params = dict[str, Any]  # nested dict of arrays, as nnx.to_pure_dict gives

# Weights of the imported model fully define it; this only has to be a
# non-None value so the config builds LayerScale parameters.
LAYERSCALE_INIT = 1e-5


class ConversionError(ValueError):
  """A state dict that does not fit the expected layout."""

# --------------------------------------------------------------------------
# Reading torch state dicts


class Source:
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


def ffn_style(src: Source, block: str, width: int) -> tuple[str, str, int]:
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


def read_ln(src: Source, name: str, out: str, flat: dict, dim: int) -> None:
  flat[f"{out}/scale"] = src.get(f"{name}.weight", (dim,))
  flat[f"{out}/bias"] = src.get(f"{name}.bias", (dim,))


def read_block(src: Source, name: str, out: str, flat: dict, cfg: ViTConfig,
                style: str) -> None:
  """torch block `name` (e.g. 'blocks.3.') -> our keys under `out`."""
  d, h = cfg.width, cfg.num_heads
  hd, f = d // h, cfg.mlp_dim
  read_ln(src, name + "norm1", out + "norm1", flat, d)
  k, b = src.linear(name + "attn.qkv", d, 3 * d)
  flat[out + "attn/qkv_kernel"] = k.reshape(d, 3, h, hd)
  flat[out + "attn/qkv_bias"] = b
  k, b = src.linear(name + "attn.proj", d, d)
  flat[out + "attn/proj_kernel"] = k.reshape(h, hd, d)
  flat[out + "attn/proj_bias"] = b
  read_ln(src, name + "norm2", out + "norm2", flat, d)
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


def read_encoder(src: Source, *, size, num_heads, image_size,
                  pos_layout: str, register_key: str, mask_key: str | None,
                  interpolate_offset: float = 0.1) -> tuple[ViTConfig, dict]:
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
  ffn, style, hidden = ffn_style(src, "blocks.0.", d)

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
    patches = resize_pos_grid(patches, (grid, grid), (g, g), offset=interpolate_offset)
  flat["pos_embed"] = np.concatenate([cls_row, patches], 0)

  cfg = ViTConfig(
      width=d, depth=depth, num_heads=heads, mlp_dim=hidden, patch_size=p,
      image_size=image_size, in_channels=c, pos_embed="learned",
      class_token=class_token, num_registers=regs,
      layerscale_init=LAYERSCALE_INIT if src.has("blocks.0.ls1.gamma") else None,
      ffn=ffn, mask_token=has_mask, interpolate_offset=interpolate_offset)
  for i in range(depth):
    blk = f"blocks.{i}."
    if ffn_style(src, blk, d)[1] != style:
      raise ConversionError(f"{src.what}: {blk}mlp.* differs from blocks.0.mlp.*")
    read_block(src, blk, f"blocks/layers/{i}/", flat, cfg, style)
  read_ln(src, "norm", "norm", flat, d)
  return cfg, flat


# --------------------------------------------------------------------------
# Our parameter trees


def nest(flat: Mapping[str, np.ndarray]) -> Params:
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
  check_tree(build, params)


def check_tree(build, params: Mapping) -> None:
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



def unscanned_blocks(config: ViTConfig, params: Mapping) -> list[Mapping]:
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
  return [nest({k: np.asarray(v)[i] for k, v in flat.items()})
          for i in range(config.depth)]


