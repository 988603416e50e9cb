"""DINOv2's projection head and the student/teacher network it sits on.

DINOHead: MLP (GELU) -> bottleneck -> L2 normalise -> weight-normalised
linear onto K prototypes (no bias): prototype k is g_k v_k / ||v_k||, with
the direction `last_layer` (v) and the gain `last_layer_gain` (g, from 1).
dinov2 trains both (its weight_g is trainable, decays and is frozen with the
last layer), so a logit is a cosine similarity scaled by its prototype's gain.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from biovfm_jax.models import layers
from biovfm_jax.models.vit import ViTConfig, VisionTransformer
from data_pipeline.errors import ConfigError

# F.normalize's eps in fp32 (the reference uses 1e-6 only under fp16).
_NORM_EPS = 1e-12


def trunc_normal02(key, shape, dtype=jnp.float32):
  # torch's trunc_normal_(std=.02) cuts at +-2 absolute (100 std): a normal.
  return 0.02 * jax.random.normal(key, shape, dtype)


class _HeadLinear(nnx.Module):
  """x @ W + b with DINOv2's head init: W trunc-normal .02, b zero."""

  def __init__(self, din, dout, names, *, param_dtype, dtype, rngs):
    self.dtype = dtype
    self.kernel = layers.param(rngs, trunc_normal02, (din, dout), names, param_dtype)
    self.bias = layers.param(rngs, layers.zeros, (dout,), names[1:], param_dtype)

  def __call__(self, x):
    y = jnp.einsum("...d,de->...e", x.astype(self.dtype),
                   self.kernel[...].astype(self.dtype))
    return y + self.bias[...].astype(self.dtype)


class DINOHead(nnx.Module):
  """(..., in_dim) features -> (..., num_prototypes) float32 logits.

  nlayers linears: in -> hidden (GELU) -> ... -> hidden (GELU) -> bottleneck
  (nlayers=1: in -> bottleneck). The prototypes `last_layer` (bottleneck, K)
  carry logical axes ('embed', 'prototypes'), so K shards over 'tensor'.
  """

  def __init__(self, in_dim: int, num_prototypes: int, *, hidden_dim: int = 2048,
               bottleneck_dim: int = 256, nlayers: int = 3, param_dtype=jnp.float32,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if nlayers < 1:
      raise ConfigError(f"config.dinov2.head_layers={nlayers} must be >= 1")
    self.dtype = jnp.dtype(dtype)
    pdt = jnp.dtype(param_dtype)
    dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
    mk = lambda a, b, names: _HeadLinear(a, b, names, param_dtype=pdt,  # noqa: E731
                                         dtype=self.dtype, rngs=rngs)
    self.mlp = nnx.List([
        mk(dims[i], dims[i + 1], ("mlp", "embed") if i == nlayers - 1 else ("embed", "mlp"))
        for i in range(nlayers)])
    # Torch's nn.Linear default U(+-1/sqrt(in)) (the reference does not re-init
    # it); only its direction matters, but its scale sets Adam's step on it.
    bound = 1.0 / bottleneck_dim ** 0.5
    self.last_layer = layers.param(
        rngs, lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound),
        (bottleneck_dim, num_prototypes), ("embed", "prototypes"), pdt)
    self.last_layer_gain = layers.param(rngs, layers.ones, (num_prototypes,),
                                        ("prototypes",), pdt)

  def features(self, x: jax.Array) -> jax.Array:
    """The L2-normalised bottleneck (..., bottleneck), float32."""
    for i, lin in enumerate(self.mlp):
      x = lin(x)
      if i < len(self.mlp) - 1:
        x = jax.nn.gelu(x, approximate=False)
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), _NORM_EPS ** 2))
    return x / norm

  def __call__(self, x: jax.Array) -> jax.Array:
    z = self.features(x)
    v = self.last_layer[...].astype(jnp.float32)
    g = self.last_layer_gain[...].astype(jnp.float32)
    w = g * v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))  # g_k v_k / ||v_k||
    # Matmul in the compute dtype, accumulated and returned in float32: the
    # losses divide these by temperatures down to 0.04.
    return jnp.einsum("...d,dk->...k", z.astype(self.dtype), w.astype(self.dtype),
                      preferred_element_type=jnp.float32)


class DINOv2Model(nnx.Module):
  """Backbone ViT + DINO head (+ a separate iBOT head). The same module is
  the student (trained) and, merged with the EMA parameters, the teacher."""

  def __init__(self, backbone: ViTConfig, *, num_prototypes: int, hidden_dim: int = 2048,
               bottleneck_dim: int = 256, nlayers: int = 3,
               separate_ibot_head: bool = False, ibot_num_prototypes: int | None = None,
               rngs: nnx.Rngs):
    self.backbone = VisionTransformer(backbone, rngs=rngs)
    head = lambda k: DINOHead(  # noqa: E731
        backbone.width, k, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
        nlayers=nlayers, param_dtype=backbone.param_dtype, dtype=backbone.dtype, rngs=rngs)
    self.dino_head = head(num_prototypes)
    self.ibot_head = (head(ibot_num_prototypes or num_prototypes)
                      if separate_ibot_head else None)

  def patch_head(self) -> DINOHead:
    """The head for iBOT patch tokens (the DINO head unless separate)."""
    return self.ibot_head if self.ibot_head is not None else self.dino_head

  def encode(self, images, *, masks=None, rng=None, deterministic=True):
    """images (B, H, W, C) -> (cls (B, D), patch tokens (B, N, D)), both after
    the final norm; registers are dropped."""
    x = self.backbone(images, masks=masks, rng=rng, deterministic=deterministic)
    return x[:, 0], x[:, self.backbone.num_prefix_tokens:]
