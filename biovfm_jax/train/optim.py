"""Optimiser and learning-rate schedule for pretraining (MAE recipe)."""
from __future__ import annotations

import optax


def peak_lr(config) -> float:
  return config.optim.base_lr * config.batch_size / config.optim.lr_batch_base


def lr_schedule(config, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup from 0, then half-cycle cosine to min_lr, per step."""
  warmup = min(int(config.optim.warmup_epochs * steps_per_epoch), total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr(config), warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=config.optim.min_lr)


def make_optimizer(config, schedule: optax.Schedule, decay_mask) -> optax.GradientTransformation:
  """AdamW; `decay_mask` (a tree of bools like the params) picks what decays."""
  parts = []
  if config.optim.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.optim.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=config.optim.b1, b2=config.optim.b2,
                           weight_decay=config.optim.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
