"""Transformer building blocks: linear maps, LayerNorm, attention, FFNs,
LayerScale, drop path, and a stack of blocks (looped or scanned, optionally
rematerialised).

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds logical
axis names (see biovfm_jax/sharding.py). They are metadata only
(eager_sharding=False): creating a model needs no mesh, and the trainer maps
the names with `nnx.get_partition_spec` + `sharding.logical_to_mesh`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from biovfm_jax.models.rope import apply_rope
from biovfm_jax.sharding import constrain

LN_EPS = 1e-6


def param(rngs: nnx.Rngs | None, init: Callable, shape: Sequence[int],
          names: Sequence[str | None], dtype) -> nnx.Param:
  """An nnx.Param carrying logical axis names as metadata only."""
  if len(names) != len(shape):
    raise ValueError(f"{len(names)} axis names {names} for shape {shape}")
  key = rngs.params() if rngs is not None else jax.random.key(0)
  # eager_sharding=False per variable (not only the global switch in
  # models/__init__.py), because that switch is thread-local in flax.
  return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(names),
                   eager_sharding=False)


def xavier(in_axis, out_axis):
  # Same fans as torch's xavier_uniform_ on the equivalent nn.Linear weight.
  return jax.nn.initializers.variance_scaling(
      1.0, "fan_avg", "uniform", in_axis=in_axis, out_axis=out_axis)


zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones
normal02 = jax.nn.initializers.normal(stddev=0.02)


class Linear(nnx.Module):
  """y = x @ W + b on the last axis; W (in, out) xavier-uniform, b zero."""

  def __init__(self, din: int, dout: int, names: tuple[str | None, str | None],
               *, param_dtype, dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.kernel = param(rngs, xavier(0, 1), (din, dout), names, param_dtype)
    self.bias = param(rngs, zeros, (dout,), names[1:], param_dtype)

  def __call__(self, x):
    y = jnp.einsum("...d,de->...e", x.astype(self.dtype),
                   self.kernel[...].astype(self.dtype))
    return y + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis; statistics and affine in float32."""

  def __init__(self, dim: int, *, param_dtype, dtype, rngs: nnx.Rngs,
               eps: float = LN_EPS):
    self.dtype = dtype
    self.eps = eps
    self.scale = param(rngs, ones, (dim,), ("embed",), param_dtype)
    self.bias = param(rngs, zeros, (dim,), ("embed",), param_dtype)

  def __call__(self, x):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def _logits(q, k):
  """Scaled q.k in float32, as jax.nn.dot_product_attention's "xla" path
  computes them (bf16 inputs: the BF16_BF16_F32 dot algorithm)."""
  precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16 else None
  s = jnp.einsum("btnh,bsnh->bnts", q, k, precision=precision,
                 preferred_element_type=jnp.float32)
  return s * jnp.float32(q.shape[-1] ** -0.5)


def _max_and_exp_sum(m1l1, m2l2):
  """Merges two (max, sum of exp(x - max)) pairs of a softmax row."""
  (m1, l1), (m2, l2) = m1l1, m2l2
  m = jnp.maximum(m1, m2)
  shift = jnp.where(m == -jnp.inf, 0.0, m)  # two empty halves stay (-inf, 0)
  return m, l1 * jnp.exp(m1 - shift) + l2 * jnp.exp(m2 - shift)


def _attention_forward(q, k, v):
  s = _logits(q, k)
  # The row's max and sum of exp(s - max) in one pass over the (T x T) logits
  # (online softmax), not two: XLA's TPU cost model, MAE decoder block: -6%.
  m, total = jax.lax.reduce((s, jnp.ones_like(s)), (jnp.float32(-jnp.inf), jnp.float32(0)),
                            _max_and_exp_sum, (3,))
  p = jnp.exp(s - m[..., None]) / total[..., None]
  o = jnp.einsum("bnts,bsnh->btnh", p.astype(v.dtype), v)
  return o, (q, k, v, o, m + jnp.log(total))


def _attention_backward(residuals, do):
  """Flash attention's backward with XLA ops: P = exp(q.k - lse) again, then
  dV = P^T dO, dS = P (dO V^T - rowsum(dO * O)), dQ = dS K, dK = dS^T Q."""
  q, k, v, o, lse = residuals
  p = jnp.exp(_logits(q, k) - lse[..., None])
  dv = jnp.einsum("bnts,btnh->bsnh", p.astype(v.dtype), do)
  dp = jnp.einsum("btnh,bsnh->bnts", do, v, preferred_element_type=jnp.float32)
  delta = jnp.einsum("btnh,btnh->bnt", do.astype(jnp.float32), o.astype(jnp.float32))
  ds = (p * (dp - delta[..., None]) * jnp.float32(q.shape[-1] ** -0.5)).astype(q.dtype)
  dq = jnp.einsum("bnts,bsnh->btnh", ds, k)
  dk = jnp.einsum("bnts,btnh->bsnh", ds, q)
  return dq, dk, dv


@jax.custom_vjp
def attention_recompute(q, k, v):
  """softmax(q.k / sqrt(h)) v over (batch, tokens, heads, head) inputs: the
  maths of jax.nn.dot_product_attention(implementation="xla") (float32
  logits and softmax; the probabilities cast to v's dtype for p.v), but the
  backward recomputes the probabilities from the saved log-sum-exp, as flash
  attention does, instead of keeping two (T x T) copies (the float32 softmax
  and its cast) from the forward. XLA's TPU cost model of one block's fwd+bwd
  (benchmarks/RESULTS.md): at 1,024 images per chip -28% time at 197 tokens
  (MAE decoder), -5% at 50 (ViT-L encoder); at 64 images per chip and 50
  tokens +9%, hence configs' attention_recompute_from."""
  return _attention_forward(q, k, v)[0]


attention_recompute.defvjp(_attention_forward, _attention_backward)


def softmax_attention(q, k, v, impl: str | None, recompute_from: int | None = None):
  """softmax(q.k / sqrt(h)) v, the softmax in float32 for any input dtype:
  attention_recompute for "xla" over >= recompute_from tokens, else
  jax.nn.dot_product_attention(implementation=impl). (Its own function: the
  cost report tells its instructions from the projections by it.)"""
  if impl == "xla" and recompute_from is not None and q.shape[1] >= recompute_from:
    return attention_recompute(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=impl)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection.

  qkv kernel (embed, 3, heads, kv) so it shards over heads; its bias is kept
  flat (3*width,) like every bias, so a "no decay on ndim<=1" rule catches it
  (it is tiny and replicated). key_bias=False (DINOv3) multiplies the k third
  of that bias by zero in the forward: it has no effect and no gradient, so it
  stays at its (zero) initial value.
  `rope` (cos, sin), when given, rotates q and k of the patch tokens after the
  projection (see models/rope.py).
  With attention_impl "xla", sequences of at least `recompute_from` tokens
  use attention_recompute (None: never).
  """

  def __init__(self, width: int, num_heads: int, *, param_dtype, dtype,
               attention_impl, rngs: nnx.Rngs, key_bias: bool = True,
               recompute_from: int | None = None):
    head_dim = width // num_heads
    self.dtype = dtype
    self.attention_impl = attention_impl
    self.recompute_from = recompute_from
    self.num_heads = num_heads
    self.key_bias = bool(key_bias)
    # Fans as torch nn.Linear(width, 3*width) and nn.Linear(width, width).
    self.qkv_kernel = param(rngs, xavier(0, (1, 2, 3)),
                            (width, 3, num_heads, head_dim),
                            ("embed", None, "heads", "kv"), param_dtype)
    self.qkv_bias = param(rngs, zeros, (3 * width,), (None,), param_dtype)
    self.proj_kernel = param(rngs, xavier((0, 1), 2), (num_heads, head_dim, width),
                             ("heads", "kv", "embed"), param_dtype)
    self.proj_bias = param(rngs, zeros, (width,), ("embed",), param_dtype)

  def __call__(self, x, rope=None):
    kernel = self.qkv_kernel[...].astype(self.dtype)
    bias = self.qkv_bias[...].astype(self.dtype).reshape(kernel.shape[1:])
    if not self.key_bias:
      bias = bias * jnp.array([1, 0, 1], bias.dtype)[:, None, None]
    x = x.astype(self.dtype)
    names = ("batch", "length", "act_heads", None)
    q, k, v = (constrain(jnp.einsum("btd,dhk->bthk", x, kernel[:, i]) + bias[i], names)
               for i in range(3))
    if rope is not None:
      q = constrain(apply_rope(q, *rope), names)
      k = constrain(apply_rope(k, *rope), names)
    o = constrain(softmax_attention(q, k, v, self.attention_impl, self.recompute_from), names)
    y = jnp.einsum("bthk,hkd->btd", o, self.proj_kernel[...].astype(self.dtype))
    return y + self.proj_bias[...].astype(self.dtype)


class Mlp(nnx.Module):
  """fc1 -> exact GELU -> fc2."""

  def __init__(self, width: int, hidden: int, *, param_dtype, dtype, rngs):
    self.fc1 = Linear(width, hidden, ("embed", "mlp"), param_dtype=param_dtype,
                      dtype=dtype, rngs=rngs)
    self.fc2 = Linear(hidden, width, ("mlp", "embed"), param_dtype=param_dtype,
                      dtype=dtype, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.gelu(self.fc1(x), approximate=False)
    h = constrain(h, ("batch", "length", "act_mlp"))
    return self.fc2(h)


class SwiGLU(nnx.Module):
  """DINOv2's fused SwiGLU FFN: w12 (width -> 2*hidden), silu(x1)*x2, w3."""

  def __init__(self, width: int, hidden: int, *, param_dtype, dtype, rngs):
    self.dtype = dtype
    # Kernel (embed, 2, mlp) so both halves shard over mlp alike; fans as
    # torch nn.Linear(width, 2*hidden).
    self.w12_kernel = param(rngs, xavier(0, (1, 2)), (width, 2, hidden),
                            ("embed", None, "mlp"), param_dtype)
    self.w12_bias = param(rngs, zeros, (2 * hidden,), (None,), param_dtype)
    self.w3 = Linear(hidden, width, ("mlp", "embed"), param_dtype=param_dtype,
                     dtype=dtype, rngs=rngs)

  def __call__(self, x):
    h = jnp.einsum("btd,dsm->btsm", x.astype(self.dtype),
                   self.w12_kernel[...].astype(self.dtype))
    h = h + self.w12_bias[...].astype(self.dtype).reshape(h.shape[2:])
    h = jax.nn.silu(h[:, :, 0]) * h[:, :, 1]
    h = constrain(h, ("batch", "length", "act_mlp"))
    return self.w3(h)


class LayerScale(nnx.Module):

  def __init__(self, width: int, init_value: float, *, param_dtype, rngs):
    self.gamma = param(rngs, jax.nn.initializers.constant(init_value), (width,),
                       ("embed",), param_dtype)

  def __call__(self, x):
    return x * self.gamma[...].astype(x.dtype)


def drop_path(x: jax.Array, rate: float, key: jax.Array | None,
              deterministic: bool) -> jax.Array:
  """Per-sample stochastic depth on a residual branch (B, ...)."""
  if deterministic or rate == 0.0:
    return x
  if key is None:
    raise ValueError("drop path with deterministic=False needs an rng key")
  keep = 1.0 - rate
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  mask = jax.random.bernoulli(key, keep, shape)
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Block(nnx.Module):
  """Pre-LN transformer block: x + DP(LS(attn(LN(x)))), x + DP(LS(ffn(LN(x))))."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.drop_path_rate = float(cfg.drop_path_rate)
    self.norm1 = LayerNorm(cfg.width, param_dtype=pdt, dtype=dt, rngs=rngs,
                           eps=cfg.layernorm_eps)
    self.attn = Attention(cfg.width, cfg.num_heads, param_dtype=pdt, dtype=dt,
                          attention_impl=cfg.attention_impl, rngs=rngs,
                          key_bias=getattr(cfg, "key_bias", True),
                          recompute_from=getattr(cfg, "attention_recompute_from", None))
    self.norm2 = LayerNorm(cfg.width, param_dtype=pdt, dtype=dt, rngs=rngs,
                           eps=cfg.layernorm_eps)
    ffn = SwiGLU if cfg.ffn == "swiglu" else Mlp
    self.mlp = ffn(cfg.width, cfg.mlp_dim, param_dtype=pdt, dtype=dt, rngs=rngs)
    if cfg.layerscale_init is not None:
      self.ls1 = LayerScale(cfg.width, cfg.layerscale_init, param_dtype=pdt, rngs=rngs)
      self.ls2 = LayerScale(cfg.width, cfg.layerscale_init, param_dtype=pdt, rngs=rngs)
    else:
      self.ls1 = self.ls2 = None

  def __call__(self, x, key=None, deterministic=True, rope=None):
    k1 = k2 = None
    if key is not None:
      k1, k2 = jax.random.split(key)
    act = ("batch", "length", "act_embed")
    h = self.attn(self.norm1(x), rope)
    if self.ls1 is not None:
      h = self.ls1(h)
    x = constrain(x + drop_path(h, self.drop_path_rate, k1, deterministic), act)
    h = self.mlp(self.norm2(x))
    if self.ls2 is not None:
      h = self.ls2(h)
    return constrain(x + drop_path(h, self.drop_path_rate, k2, deterministic), act)


# Names accepted for ViTConfig.remat_policy.
REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable",
                  "everything_saveable", "dots_with_no_batch_dims_saveable",
                  "checkpoint_dots", "checkpoint_dots_with_no_batch_dims")


def remat_policy(name: str):
  """'none' -> None (no remat); 'full' -> save nothing but the block inputs;
  any other name -> jax.checkpoint_policies.<name>."""
  if name == "none":
    return None
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  return getattr(jax.checkpoint_policies, name)


class BlockStack(nnx.Module):
  """`depth` blocks, applied in a Python loop or with jax.lax.scan over
  stacked parameters (leading 'layers' axis).

  Both modes initialise block i from the same key (split of one params key),
  so a scanned and a looped stack built from the same seed hold the same
  weights. Drop-path keys are fold_in(rng, layer index). `rope` (cos, sin)
  reaches every block's attention (see models/rope.py).
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.depth = cfg.depth
    self.scan = bool(cfg.scan_layers)
    self.remat_policy = cfg.remat_policy
    keys = jax.random.split(rngs.params(), cfg.depth)
    make = lambda k: Block(cfg, rngs=nnx.Rngs(params=k))
    if self.scan:
      self.layers = nnx.vmap(
          make, transform_metadata={nnx.PARTITION_NAME: "layers"})(keys)
    else:
      self.layers = nnx.List([make(keys[i]) for i in range(cfg.depth)])

  def __call__(self, x, *, rng=None, deterministic=True, rope=None):
    need_keys = not deterministic and rng is not None

    def apply(graphdef, state, x, i, rope):
      block = nnx.merge(graphdef, state)
      key = jax.random.fold_in(rng, i) if need_keys else None
      return block(x, key, deterministic, rope)

    if self.remat_policy != "none":
      apply = jax.checkpoint(apply, policy=remat_policy(self.remat_policy),
                             static_argnums=(0,))

    if self.scan:
      graphdef, state = nnx.split(self.layers)

      def body(x, xs):
        layer_state, i = xs
        return apply(graphdef, layer_state, x, i, rope), None

      x, _ = jax.lax.scan(body, x, (state, jnp.arange(self.depth)))
      return x

    for i, block in enumerate(self.layers):
      if self.remat_policy == "none":
        key = jax.random.fold_in(rng, i) if need_keys else None
        x = block(x, key, deterministic, rope)
      else:
        graphdef, state = nnx.split(block)
        x = apply(graphdef, state, x, i, rope)
    return x


def no_decay(path: tuple, *, finetune: bool = False) -> bool:
  """True for parameters that get no weight decay, by name: biases, norm
  scales and LayerScale gammas. Tokens (cls, mask, registers) and a learned
  pos_embed decay, as in both pretraining references: DINOv2 exempts names
  holding 'bias', 'norm' or 'gamma'; MAE (timm's add_weight_decay) exempts
  1-D tensors and biases, and stores its tokens as (1, 1, D), so they decay
  there although ours are (D,) -- hence names, not shapes.
  finetune=True is MAE's fine-tuning rule, which also exempts cls_token and
  pos_embed (timm's no_weight_decay list). tests/test_decay_groups.py checks
  each rule against its reference."""
  leaf = str(path[-1])
  if finetune and leaf in ("cls_token", "pos_embed"):
    return True
  return leaf.endswith("bias") or leaf in ("scale", "gamma")
