"""Optimiser and schedules, covering the MAE and DINOv2 recipes from config.

AdamW written out as a chain so each recipe feature is one visible piece:
  clip (globally, or per top-level module) -> adam -> + wd(step) * p (masked)
  -> x lr multiplier -> x -lr(step) -> freeze last layer and first blocks
which is p <- p - lr(step) * mult * (adam + wd(step) * p), torch's AdamW per
parameter group, with `mult` = layer-wise decay x patch-embedding factor.
A freeze is an lr of 0 on the final update, so gradients still reach Adam's
moments, as in dinov2's last_layer_lr (config.optim.freeze_last_layer_grads
zeroes them as well, DINO v1's way).
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from biovfm_jax.models.layers import no_decay
from data_pipeline.errors import ConfigError


def peak_lr(config) -> float:
  """lr = base_lr x batch / lr_batch_base (MAE, 'linear') or x sqrt(...) (DINOv2)."""
  ratio = config.batch_size / config.optim.lr_batch_base
  scaling = config.optim.lr_scaling
  if scaling not in ("linear", "sqrt"):
    raise ConfigError(f"config.optim.lr_scaling={scaling!r}: 'linear' or 'sqrt'")
  return config.optim.base_lr * (ratio if scaling == "linear" else math.sqrt(ratio))


def lr_schedule(config, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup from 0, then half-cycle cosine to min_lr, per step. The
  warmup's step t is peak x t / W (MAE), or with optim.warmup_reaches_peak
  peak x t / (W - 1), np.linspace(0, peak, W) as dinov2's CosineScheduler."""
  warmup = min(int(config.optim.warmup_epochs * steps_per_epoch), total_steps)
  peak, end = peak_lr(config), config.optim.min_lr
  if warmup == 0:  # the same cosine, without optax's warning on a 0-step warmup
    return optax.cosine_decay_schedule(peak, max(total_steps, 1), alpha=end / peak if peak else 0.0)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=end)
  if not config.optim.warmup_reaches_peak:
    return schedule
  return lambda step: jnp.where(step < warmup, peak * step / max(warmup - 1, 1), schedule(step))


def wd_schedule(config, total_steps: int) -> optax.Schedule:
  """Constant weight decay (MAE), or a cosine to weight_decay_end (DINOv2)."""
  start, end = config.optim.weight_decay, config.optim.weight_decay_end
  if end is None or end == start:
    return optax.constant_schedule(start)
  n = max(total_steps, 1)
  return lambda step: end + (start - end) * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(step, n) / n))


# Parameters before the first block (layer 0 of layer-wise decay).
_EMBEDDING = ("patch_embed", "cls_token", "pos_embed", "register", "mask_token")


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def decay_mask(params, *, finetune: bool = False):
  """True where a parameter decays (models.layers.no_decay names the rest),
  as a tree like `params` (abstract is fine)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: not no_decay(tuple(_path_names(p)), finetune=finetune), params)


def _layer(names: list[str], leaf, depth: int):
  """A parameter's layer as layer-wise decay counts them: embeddings 0, block i
  is i + 1, everything after the encoder depth + 1. blocks/layers/<i>/... is a
  loop; a scanned stack (blocks/layers/..., axis 0 = layer) gets an int array
  shaped (depth, 1, ...), so factors built from it broadcast over each layer."""
  if "blocks" in names:
    rest = [n for n in names[names.index("blocks") + 1:] if n != "layers"]
    if rest and rest[0].isdigit():
      return int(rest[0]) + 1
    return np.arange(1, depth + 1).reshape((depth,) + (1,) * (len(leaf.shape) - 1))
  return 0 if any(e in "/".join(names) for e in _EMBEDDING) else depth + 1


def lr_multipliers(params, *, depth: int, layer_decay: float, patch_embed_mult: float):
  """Per-parameter lr factors: layer_decay ** (depth + 1 - layer) (BEiT/DINOv2
  layer-wise decay, see _layer) times patch_embed_mult on the patch embedding.
  A scanned block stack ('blocks/layers', leading axis = layer) gets an array."""

  def mult(path, leaf):
    names = _path_names(path)
    m = layer_decay ** (depth + 1 - _layer(names, leaf, depth))
    m = m * (patch_embed_mult if "patch_embed" in "/".join(names) else 1.0)
    return float(m) if np.ndim(m) == 0 else m.astype(np.float32)

  return jax.tree_util.tree_map_with_path(mult, params)


# Where the optimised backbone lives in params: MAE's encoder, DINOv2's student
# (its teacher is an EMA, outside params), fine-tuning's encoder.
_BACKBONES = ("encoder", "backbone")


def frozen_blocks(params, *, depth: int, blocks: int):
  """Like params: True on the backbone's embeddings (patch embedding, tokens,
  position table) and first `blocks` blocks, i.e. its layers 0..blocks of
  layer-wise decay; a scanned stack gets a 0/1 array shaped (depth, 1, ...)."""

  def held(path, leaf):
    names = _path_names(path)
    if not blocks or names[0] not in _BACKBONES:
      return False
    layer = _layer(names, leaf, depth)
    return bool(layer <= blocks) if np.ndim(layer) == 0 else (layer <= blocks).astype(np.float32)

  return jax.tree_util.tree_map_with_path(held, params)


class _StepState(NamedTuple):
  count: jax.Array


def _scheduled_decay(schedule, mask) -> optax.GradientTransformation:
  """updates + wd(step) * params on the masked leaves."""

  def init(params):
    del params
    return _StepState(jnp.zeros((), jnp.int32))

  def update(updates, state, params):
    wd = schedule(state.count)
    updates = jax.tree.map(lambda u, p, m: u + wd * p if m else u, updates, params, mask)
    return updates, _StepState(state.count + 1)

  return optax.GradientTransformation(init, update)


def _scale_tree(mults) -> optax.GradientTransformation:
  return optax.stateless(lambda updates, params: jax.tree.map(
      lambda u, m: u if isinstance(m, float) and m == 1.0 else u * jnp.asarray(m, u.dtype),
      updates, mults))


def clip_per_module(max_norm: float) -> optax.GradientTransformation:
  """Each top-level subtree of the gradients (DINOv2: backbone, dino_head,
  ibot_head) scaled by min(1, max_norm / (its norm + 1e-6)), as the
  reference's clip_grad_norm_ on each student module."""

  def clip(updates, params):
    del params
    if not isinstance(updates, dict):
      raise ConfigError("config.optim.clip_scope='module' needs parameters grouped "
                        "by module (a dict at the top)")
    out = {}
    for name, tree in updates.items():
      coef = jnp.minimum(1.0, max_norm / (optax.global_norm(tree) + 1e-6))
      out[name] = jax.tree.map(lambda g: g * coef.astype(g.dtype), tree)
    return out

  return optax.stateless(clip)


def _freeze_early(groups) -> optax.GradientTransformation:
  """Zeroes frozen updates early in the run. `groups`: (frozen, steps) pairs,
  `frozen` like params (True/False, or a 0/1 array over a scanned stack's layer
  axis), held for the first `steps` steps (None: all of them). On the final
  update it is an lr of 0: DINOv2 keeps the head's last layer fixed for its
  first epoch, continued pretraining the backbone's first blocks. Before Adam
  (optim.freeze_last_layer_grads) it zeroes gradients, so moments stay 0."""

  def init(params):
    del params
    return _StepState(jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    for frozen, steps in groups:
      early = True if steps is None else state.count < steps
      updates = jax.tree.map(
          lambda u, f: u * jnp.where(early, 1 - jnp.asarray(f, u.dtype), 1).astype(u.dtype)
          if np.any(f) else u, updates, frozen)
    return updates, _StepState(state.count + 1)

  return optax.GradientTransformation(init, update)


def make_optimizer(config, schedule: optax.Schedule, decay_mask, *, params,
                   depth: int, total_steps: int, steps_per_epoch: int
                   ) -> optax.GradientTransformation:
  """The recipe's AdamW. `decay_mask` (bools like params) picks what decays;
  `params` (abstract is fine) gives paths and shapes for per-parameter factors."""
  o = config.optim
  parts, freezes = [], []
  if o.freeze_blocks:
    # On the final update only: an lr of 0 for those blocks. Their gradients
    # still reach Adam's moments, so they move on warm moments when the hold
    # ends, not on moments restarted under the run's bias correction (up to
    # ~5x torch's steps with b2=0.999). The last layer's freeze does the same.
    blocks = (frozen_blocks(params, depth=depth, blocks=o.freeze_blocks),
              o.freeze_blocks_steps)
    if not any(np.any(f) for f in jax.tree.leaves(blocks[0])):
      raise ConfigError(f"config.optim.freeze_blocks={o.freeze_blocks}: no backbone "
                        f"({' or '.join(_BACKBONES)}) among the parameters")
    freezes.append(blocks)
  if o.clip_scope not in ("global", "module"):
    raise ConfigError(f"config.optim.clip_scope={o.clip_scope!r}: 'global' or 'module'")
  if o.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm) if o.clip_scope == "global"
                 else clip_per_module(o.grad_clip_norm))
  freeze_steps = int(o.freeze_last_layer_epochs * steps_per_epoch)
  if freeze_steps:
    pattern = re.compile(o.freeze_pattern)
    frozen = jax.tree_util.tree_map_with_path(
        lambda p, _: bool(pattern.search("/".join(_path_names(p)))), params)
    if not any(jax.tree.leaves(frozen)):
      raise ConfigError(f"config.optim.freeze_pattern={pattern.pattern!r} matches no parameter")
    if o.freeze_last_layer_grads:
      parts.append(_freeze_early([(frozen, freeze_steps)]))
    freezes.append((frozen, freeze_steps))
  parts.append(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps))
  parts.append(_scheduled_decay(wd_schedule(config, total_steps), decay_mask))
  layer_decay, patch_mult = o.layer_decay, o.patch_embed_lr_mult
  if layer_decay != 1.0 or patch_mult != 1.0:
    parts.append(_scale_tree(lr_multipliers(params, depth=depth, layer_decay=layer_decay,
                                            patch_embed_mult=patch_mult)))
  parts.append(optax.scale_by_learning_rate(schedule))
  if freezes:
    parts.append(_freeze_early(freezes))
  return optax.chain(*parts)
