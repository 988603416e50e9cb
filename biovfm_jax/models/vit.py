"""Vision Transformer encoder (pre-LN, as MAE/DINOv2 use it) and its config."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from biovfm_jax.models import layers, rope
from biovfm_jax.models.patches import patchify, resize_pos_grid, sincos_2d
from biovfm_jax.sharding import constrain
from data_pipeline.errors import ConfigError

_ACT = ("batch", "length", "act_embed")


def swiglu_hidden(width: int, mlp_ratio: float = 4.0) -> int:
  """DINOv2's SwiGLU hidden size: 2/3 of the MLP hidden, rounded up to 8."""
  hidden = int(width * mlp_ratio * 2 / 3)
  return (hidden + 7) // 8 * 8


# mlp_dim is the FFN hidden size actually used: 4*width for 'mlp', and the
# DINOv2 SwiGLU size (swiglu_hidden) for 'swiglu'.
VIT_SIZES: dict[str, dict[str, Any]] = {
    "T": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    # DINOv2 variant of H: ffn='swiglu' (mlp_dim then defaults to 3416).
    "H": dict(width=1280, depth=32, num_heads=16, mlp_dim=5120, patch_size=14),
    "g": dict(width=1536, depth=40, num_heads=24, mlp_dim=4096, patch_size=14,
              ffn="swiglu"),
}

_POS_EMBEDS = ("sincos", "learned", "rope")
_INITS = ("mae", "dinov2")
_FFNS = ("mlp", "swiglu")
_ATTENTION_IMPLS = ("xla", "cudnn", None)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture and numerics of a ViT. Validated on construction; error
  messages name the config key (config.model.<field>)."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int = 16
  image_size: int = 224
  in_channels: int = 3
  # 'sincos' (fixed, not a Param) | 'learned' | 'rope' (DINOv3's axial RoPE
  # on q, k of the patch tokens; no position parameter, any grid).
  pos_embed: str = "sincos"
  class_token: bool = True
  num_registers: int = 0
  layerscale_init: float | None = None
  drop_path_rate: float = 0.0        # same rate in every block (DINOv2 uniform)
  ffn: str = "mlp"                   # 'mlp' (GELU) | 'swiglu' (DINOv2 fused)
  dtype: str = "float32"             # compute dtype
  param_dtype: str = "float32"
  attention_impl: str | None = "xla"  # jax.nn.dot_product_attention(implementation=)
  # "xla" attention over at least this many tokens recomputes its softmax in the
  # backward pass (layers.attention_recompute); None: never.
  attention_recompute_from: int | None = None
  remat_policy: str = "none"         # see layers.REMAT_POLICIES
  scan_layers: bool = False
  mask_token: bool = False           # learnable token for masked patches (iBOT)
  init: str = "mae"                  # 'mae' (xavier) | 'dinov2' (see _dinov2_init)
  # Every LayerNorm's epsilon; transformers' ViT/ViTMAE use 1e-12, so
  # imported ones match their forward exactly.
  layernorm_eps: float = layers.LN_EPS
  # How a learned position table is resized to another grid: bicubic with the
  # scale in / (out + offset). 0.1 is Meta's DINOv2 (its interpolate_offset);
  # transformers resizes to the size (0.0), so its imports match it exactly.
  interpolate_offset: float = 0.1
  # False: the k third of the qkv bias is held at zero (DINOv3 has none).
  key_bias: bool = True
  # pos_embed='rope' (see models/rope.py): frequency base, how patch centres
  # map to [-1, 1] ('separate' per axis | 'max' | 'min' side), and DINOv3's
  # training-time (deterministic=False) coordinate augmentation: shift
  # U(-s, s), per-axis jitter and joint rescale log-uniform in [1/v, v].
  rope_base: float = 100.0
  rope_normalize: str = "separate"
  rope_shift: float | None = None
  rope_jitter: float | None = None
  rope_rescale: float | None = None

  def __post_init__(self):
    def bad(key, msg):
      raise ConfigError(f"config.model.{key}={getattr(self, key)!r} {msg}")

    for key in ("width", "depth", "num_heads", "mlp_dim", "patch_size",
                "image_size", "in_channels"):
      v = getattr(self, key)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        bad(key, "must be a positive integer")
    if self.image_size % self.patch_size:
      bad("image_size", f"is not divisible by config.model.patch_size="
          f"{self.patch_size}")
    if self.width % self.num_heads:
      bad("width", f"is not divisible by config.model.num_heads={self.num_heads}")
    if self.pos_embed not in _POS_EMBEDS:
      bad("pos_embed", f"must be one of {_POS_EMBEDS}")
    if self.pos_embed == "sincos" and self.width % 4:
      bad("width", "must be divisible by 4 for the sin-cos position embedding")
    if not isinstance(self.key_bias, (bool, np.bool_)):
      bad("key_bias", "must be True or False")
    if self.pos_embed == "rope" and (self.width // self.num_heads) % 4:
      bad("num_heads", f"gives a head size of {self.width // self.num_heads}, which "
          "must be divisible by 4 for config.model.pos_embed='rope'")
    if not (isinstance(self.rope_base, (int, float, np.number))
            and not isinstance(self.rope_base, bool) and self.rope_base > 0):
      bad("rope_base", "must be a number > 0")
    if self.rope_normalize not in rope.NORMALIZE:
      bad("rope_normalize", f"must be one of {rope.NORMALIZE}")
    for key, low in (("rope_shift", 0.0), ("rope_jitter", 1.0), ("rope_rescale", 1.0)):
      v = getattr(self, key)
      if v is None:
        continue
      if self.pos_embed != "rope":
        bad(key, "needs config.model.pos_embed='rope' (or None)")
      if not isinstance(v, (int, float, np.number)) or isinstance(v, bool) or v < low:
        bad(key, f"must be None or a number >= {low}")
    if self.ffn not in _FFNS:
      bad("ffn", f"must be one of {_FFNS}")
    if self.num_registers < 0:
      bad("num_registers", "must be >= 0")
    if not self.layernorm_eps > 0:
      bad("layernorm_eps", "must be > 0")
    if not 0 <= self.interpolate_offset < 1:
      bad("interpolate_offset", "must be in [0, 1)")
    if not 0.0 <= self.drop_path_rate < 1.0:
      bad("drop_path_rate", "must be in [0, 1)")
    if self.attention_impl not in _ATTENTION_IMPLS:
      bad("attention_impl", f"must be one of {_ATTENTION_IMPLS}")
    if self.attention_recompute_from is not None and not (
        isinstance(self.attention_recompute_from, int)
        and not isinstance(self.attention_recompute_from, bool)
        and self.attention_recompute_from >= 0):
      bad("attention_recompute_from", "must be None or a token count >= 0")
    if self.init not in _INITS:
      bad("init", f"must be one of {_INITS}")
    if self.remat_policy not in layers.REMAT_POLICIES:
      bad("remat_policy", f"must be one of {layers.REMAT_POLICIES}")
    for key in ("dtype", "param_dtype"):
      try:
        dt = jnp.dtype(getattr(self, key))
      except TypeError:
        bad(key, "is not a dtype name")
      if not jnp.issubdtype(dt, jnp.floating):
        bad(key, "must be a floating dtype")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  @property
  def num_prefix_tokens(self) -> int:
    return int(self.class_token) + self.num_registers


_FIELDS = tuple(f.name for f in dataclasses.fields(ViTConfig))


def vit_config(size: str | None = None, **overrides) -> ViTConfig:
  """ViTConfig from a size name ('T','S','B','L','H','g') plus overrides.

  Overrides that are None are ignored (taken from the size). With size=None,
  width, depth and num_heads are required. When mlp_dim is not given but
  width or ffn differ from the size's, mlp_dim follows the ffn rule
  (4*width, or swiglu_hidden(width) for 'swiglu').
  """
  overrides = {k: v for k, v in overrides.items() if v is not None}
  unknown = sorted(set(overrides) - set(_FIELDS))
  if unknown:
    raise ConfigError(f"unknown config.model keys {unknown}; known: {_FIELDS}")
  if size is None:
    base = {}
  elif size in VIT_SIZES:
    base = dict(VIT_SIZES[size])
  else:
    raise ConfigError(f"config.model.size={size!r} is not one of "
                     f"{sorted(VIT_SIZES)} (or None)")
  merged = {**base, **overrides}
  for key in ("width", "depth", "num_heads"):
    if key not in merged:
      raise ConfigError(f"config.model.{key} is required when config.model.size "
                       "is None")
  if "mlp_dim" not in overrides and (
      "mlp_dim" not in base or merged["width"] != base.get("width")
      or merged.get("ffn", "mlp") != base.get("ffn", "mlp")):
    w = merged["width"]
    merged["mlp_dim"] = (swiglu_hidden(w) if merged.get("ffn", "mlp") == "swiglu"
                         else 4 * w)
  return ViTConfig(**merged)


def vit_config_from(cfg) -> ViTConfig:
  """ViTConfig from a ConfigDict (or mapping) `config.model`: key `size` plus
  any ViTConfig field; None means "take it from size"."""
  d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  size = d.pop("size", None)
  return vit_config(size, **d)


class VisionTransformer(nnx.Module):
  """ViT encoder: patch embedding, [cls, registers, patches], pre-LN blocks,
  final LayerNorm. Token order is DINOv2's: cls, registers, then patches.
  """

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    cfg = config
    self.config = cfg
    pdt = jnp.dtype(cfg.param_dtype)
    self.dtype = jnp.dtype(cfg.dtype)
    p, c, d = cfg.patch_size, cfg.in_channels, cfg.width
    # A linear map on (p, q, c)-flattened patches == a stride-p conv; the
    # xavier fans are those of the flattened conv kernel, as in MAE.
    self.patch_embed = layers.Linear(p * p * c, d, ("patch", "embed"),
                                     param_dtype=pdt, dtype=self.dtype, rngs=rngs)
    self.cls_token = (layers.param(rngs, layers.normal02, (d,), ("embed",), pdt)
                      if cfg.class_token else None)
    self.register_tokens = (
        layers.param(rngs, layers.normal02, (cfg.num_registers, d),
                     (None, "embed"), pdt) if cfg.num_registers else None)
    self.rope = cfg.pos_embed == "rope"
    if cfg.pos_embed == "learned":
      # Includes a cls slot when there is a cls token (DINOv2 layout).
      n = cfg.num_patches + int(cfg.class_token)
      self.pos_embed = layers.param(rngs, layers.normal02, (n, d), (None, "embed"), pdt)
    else:
      self.pos_embed = None  # fixed sin-cos or RoPE, computed from the grid
    # Zeros, as DINOv2's mask token; absent unless configured (MAE sizes unchanged).
    self.mask_token = (layers.param(rngs, layers.zeros, (d,), ("embed",), pdt)
                       if cfg.mask_token else None)
    self.blocks = layers.BlockStack(cfg, rngs=rngs)
    self.norm = layers.LayerNorm(d, param_dtype=pdt, dtype=self.dtype, rngs=rngs,
                                 eps=cfg.layernorm_eps)
    if cfg.init == "dinov2":
      self._dinov2_init(rngs)

  def _dinov2_init(self, rngs: nnx.Rngs) -> None:
    """Re-initialises as DINOv2 does: every transformer linear
    trunc_normal(std=.02) (torch truncates at +-2 absolute, i.e. 100 std: a
    plain normal), biases zero; the patch embedding keeps torch's Conv2d
    default U(+-1/sqrt(fan_in)) for kernel and bias; cls and registers
    N(0, 1e-6); learned positions stay N(0, .02); mask token zero."""
    fan_in = self.patch_embed.kernel.shape[0]
    bound = 1.0 / fan_in ** 0.5
    for var in (self.patch_embed.kernel, self.patch_embed.bias):
      var.set_value(jax.random.uniform(rngs.params(), var.shape, var.dtype,
                                       -bound, bound))
    for var in (self.cls_token, self.register_tokens):
      if var is not None:
        var.set_value(1e-6 * jax.random.normal(rngs.params(), var.shape, var.dtype))
    for path, node in nnx.iter_graph(self.blocks):
      if isinstance(node, nnx.Param) and path and str(path[-1]).endswith("kernel"):
        node.set_value(0.02 * jax.random.normal(rngs.params(), node.shape, node.dtype))

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patch tokens in encode_tokens' output."""
    return self.config.num_prefix_tokens

  def patch_pos_embed(self, grid: tuple[int, int]) -> jax.Array:
    """(gh*gw, D) position embedding of the patch tokens for a grid (zero
    with RoPE, whose positions act inside attention)."""
    cfg = self.config
    if self.rope:
      return jnp.zeros((grid[0] * grid[1], cfg.width), jnp.float32)
    if self.pos_embed is None:
      return jnp.asarray(sincos_2d(cfg.width, *grid))
    table = self.pos_embed[...][int(cfg.class_token):]
    # Resized as DINOv2 resizes its table (bicubic, its 0.1 offset).
    return resize_pos_grid(table, (cfg.grid_size, cfg.grid_size), tuple(grid),
                           offset=cfg.interpolate_offset)

  def embed_patches(self, images: jax.Array,
                    masks: jax.Array | None = None) -> jax.Array:
    """(B, H, W, C) float images -> (B, N, D) patch tokens + position embedding.

    Any H, W divisible by the patch size work: sin-cos tables are computed
    for the grid, learned tables are resized. `masks` (B, N) bool, True =
    masked: those patch embeddings are replaced by the mask token before the
    position is added (DINOv2/iBOT); needs config.model.mask_token=True.
    """
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
      raise ValueError(f"expected NHWC images with {cfg.in_channels} channels, "
                       f"got shape {images.shape}")
    p = cfg.patch_size
    grid = (images.shape[1] // p, images.shape[2] // p)
    x = patchify(images, p)
    x = constrain(x, ("batch", "length", None))
    x = self.patch_embed(x)
    if masks is not None:
      if self.mask_token is None:
        raise ValueError("masks given but config.model.mask_token is False")
      if masks.shape != x.shape[:2]:
        raise ValueError(f"masks shape {masks.shape} != (batch, patches) {x.shape[:2]}")
      x = jnp.where(masks[..., None], self.mask_token[...].astype(x.dtype), x)
    if not self.rope:
      x = x + self.patch_pos_embed(grid).astype(self.dtype)
    return constrain(x, _ACT)

  def rope_tables(self, grid: tuple[int, int], *, keep: jax.Array | None = None,
                  rng: jax.Array | None = None, deterministic: bool = True
                  ) -> tuple[jax.Array, jax.Array]:
    """RoPE (cos, sin) for the patch tokens of a grid: (gh*gw, head_dim), or
    (B, n, head_dim) for the tokens `keep` (B, n) indexes. With
    deterministic=False the configured coordinate augmentation is drawn from
    fold_in(rng, rope.RNG_STREAM) (drop path's keys are unaffected)."""
    cfg = self.config
    coords = jnp.asarray(rope.patch_coords(tuple(grid), cfg.rope_normalize))
    augment = (cfg.rope_shift, cfg.rope_jitter, cfg.rope_rescale)
    if not deterministic and any(a is not None for a in augment):
      if rng is None:
        raise ValueError("deterministic=False with config.model.rope_shift/"
                         "rope_jitter/rope_rescale set needs rng")
      coords = rope.augment_coords(
          coords, jax.random.fold_in(rng, rope.RNG_STREAM), shift=cfg.rope_shift,
          jitter=cfg.rope_jitter, rescale=cfg.rope_rescale)
    if keep is not None:
      coords = jnp.take(coords, keep, axis=0)
    return rope.cos_sin(coords, cfg.width // cfg.num_heads, cfg.rope_base)

  def prefix_tokens(self, batch: int) -> jax.Array | None:
    """(B, num_prefix_tokens, D) cls (+ its position) and registers."""
    cfg = self.config
    parts = []
    if self.cls_token is not None:
      cls = self.cls_token[...].astype(self.dtype)
      if self.pos_embed is not None:
        cls = cls + self.pos_embed[...][0].astype(self.dtype)
      # Sin-cos: the cls position is zero, as in MAE.
      parts.append(jnp.broadcast_to(cls, (batch, 1, cfg.width)))
    if self.register_tokens is not None:
      reg = self.register_tokens[...].astype(self.dtype)
      parts.append(jnp.broadcast_to(reg, (batch,) + reg.shape))
    return jnp.concatenate(parts, axis=1) if parts else None

  def encode_tokens(self, tokens: jax.Array, *, rng: jax.Array | None = None,
                    deterministic: bool = True, grid: tuple[int, int] | None = None,
                    keep: jax.Array | None = None) -> jax.Array:
    """(B, n, D) embedded patch tokens (any subset) -> (B, prefix + n, D):
    prepends cls/registers, runs the blocks and the final norm.

    `rng` drives drop path (layer i uses fold_in(rng, i)); it is only needed
    when deterministic=False and drop_path_rate > 0 (or RoPE augmentation).
    With pos_embed='rope', `grid` is the patch grid the tokens come from
    (default: a square grid of n) and `keep` (B, n) their indices in it
    when they are a subset (MAE).
    """
    rope_cs = None
    if self.rope:
      n = tokens.shape[1]
      if grid is None:
        side = int(round(n ** 0.5))
        if keep is not None or side * side != n:
          raise ValueError("pos_embed='rope' needs the patch grid of these tokens "
                           "(encode_tokens(grid=...))")
        grid = (side, side)
      if keep is None and grid[0] * grid[1] != n:
        raise ValueError(f"{n} tokens for a {grid[0]}x{grid[1]} grid; pass keep=")
      rope_cs = self.rope_tables(grid, keep=keep, rng=rng, deterministic=deterministic)
      rope_cs = tuple(t.astype(jnp.float32) for t in rope_cs)
    prefix = self.prefix_tokens(tokens.shape[0])
    x = tokens.astype(self.dtype)
    if prefix is not None:
      x = jnp.concatenate([prefix, x], axis=1)
    x = constrain(x, _ACT)
    if (not deterministic and self.config.drop_path_rate > 0 and rng is None):
      raise ValueError("deterministic=False with drop_path_rate > 0 needs rng")
    x = self.blocks(x, rng=rng, deterministic=deterministic, rope=rope_cs)
    return constrain(self.norm(x), _ACT)

  def __call__(self, images: jax.Array, *, masks: jax.Array | None = None,
               rng: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """(B, H, W, C) -> (B, num_prefix_tokens + N, D) normalised tokens.
    `masks`: see embed_patches."""
    p = self.config.patch_size
    grid = (images.shape[1] // p, images.shape[2] // p)
    return self.encode_tokens(self.embed_patches(images, masks), rng=rng,
                              deterministic=deterministic, grid=grid)

  def intermediate_tokens(self, images: jax.Array, n: int) -> list[jax.Array]:
    """Outputs of the last `n` blocks for (B, H, W, C) images, each through
    the final norm, earliest first: a list of n (B, prefix + N, D), as
    DINOv2's get_intermediate_layers(n, norm=True); the last equals
    __call__'s output. Deterministic (no drop path, no RoPE augmentation):
    for frozen-feature evaluation (biovfm_jax/evaluate/segmentation.py).
    The tokens enter the blocks as in encode_tokens (same embedding, prefix
    and RoPE tables); a looped stack runs block by block, a scanned one scans
    its first depth - n layers, then the last n collecting each output."""
    depth = self.config.depth
    if not 1 <= n <= depth:
      raise ValueError(f"n={n}: the encoder has {depth} blocks")
    p = self.config.patch_size
    grid = (images.shape[1] // p, images.shape[2] // p)
    rope_cs = None
    if self.rope:
      rope_cs = tuple(t.astype(jnp.float32) for t in self.rope_tables(grid))
    x = self.embed_patches(images).astype(self.dtype)
    prefix = self.prefix_tokens(x.shape[0])
    if prefix is not None:
      x = jnp.concatenate([prefix, x], axis=1)
    x = constrain(x, _ACT)
    stack = self.blocks
    if stack.scan:
      graphdef, state = nnx.split(stack.layers)

      def body(x, layer_state):
        y = nnx.merge(graphdef, layer_state)(x, None, True, rope_cs)
        return y, y

      first = jax.tree.map(lambda a: a[:depth - n], state)
      last = jax.tree.map(lambda a: a[depth - n:], state)
      x, _ = jax.lax.scan(body, x, first)
      _, ys = jax.lax.scan(body, x, last)
      outs = [ys[i] for i in range(n)]
    else:
      outs = []
      for i, block in enumerate(stack.layers):
        x = block(x, None, True, rope_cs)
        if i >= depth - n:
          outs.append(x)
    return [constrain(self.norm(o), _ACT) for o in outs]
