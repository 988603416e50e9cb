"""DINOv3's Gram anchoring for the DINOv2 objective (config.dinov2.gram).

A frozen Gram teacher's patch tokens anchor the similarity structure of the
student's (dino_losses.gram_loss). Its weights live in the train state
(extra["gram"], the backbone's tree, sharded and checkpointed like the EMA
teacher's) and change only at steps given by the config, so a resumed run
holds the same Gram teacher as an uninterrupted one:
  - loaded from `ckpt` at the run's start, or copied from the EMA teacher
    before step `it_load_ema_teacher` (the reference's gram_load_ema_teacher);
    before that step the Gram term is 0 (the reference refuses to run then);
  - with rep_update, replaced by the EMA teacher after the update of step s
    when s + 1 >= it_first_update and (s + 1) % update_frequency == 0, at most
    max_updates times: the count is a function of the step, no counter kept.
With ema_teacher the EMA teacher's own patch tokens are the targets and no
copy is kept.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from biovfm_jax.models.patches import resize_pos_grid
from biovfm_jax.objectives import dino_losses as L
from data_pipeline.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class GramConfig:
  loss_weight: float
  ema_teacher: bool
  ckpt: str | None
  it_load_ema_teacher: int
  rep_update: bool
  update_frequency: int
  it_first_update: int
  max_updates: int | None
  normalized: bool
  img_level: bool
  remove_neg: bool
  remove_only_teacher_neg: bool
  schedule: np.ndarray | None  # per-step weights (dinov3's linear_warmup_cosine_decay)


def weight_schedule(start: float, peak: float, end: float, warmup: int, total: int,
                    cosine: int | None = None) -> np.ndarray:
  """Linear warmup start -> peak over `warmup` steps (endpoint excluded), a
  cosine peak -> end over `cosine` steps (default: the rest), then `end`:
  dinov3's linear_warmup_cosine_decay."""
  cosine = total - warmup if cosine is None else cosine
  if warmup < 0 or cosine < 0 or warmup + cosine > total:
    raise ConfigError(f"config.dinov2.gram.loss_weight_schedule: {warmup} warmup and "
                      f"{cosine} cosine steps do not fit the run's {total}")
  linear = np.linspace(start, peak, warmup, endpoint=False)
  cos = (np.cos(np.linspace(0, np.pi, cosine)) + 1) / 2 * (peak - end) + end
  return np.concatenate([linear, cos, np.full(total - warmup - cosine, end)])


def from_config(config, *, total_steps: int, steps_per_epoch: int) -> GramConfig | None:
  """The Gram settings, checked as the reference checks them (None when off)."""
  g = config.dinov2.gram
  if not g.use_loss:
    return None
  where = "config.dinov2.gram"
  if g.tokens_used != "all":
    raise ConfigError(f"{where}.tokens_used={g.tokens_used!r}: only 'all' is supported")
  if g.remove_neg and g.remove_only_teacher_neg:
    raise ConfigError(f"{where}: remove_neg and remove_only_teacher_neg are exclusive")
  if g.ema_teacher and g.ckpt:
    raise ConfigError(f"{where}: ema_teacher and ckpt are exclusive (the reference's rule)")
  if g.ema_teacher and g.rep_update:
    raise ConfigError(f"{where}: ema_teacher needs rep_update=False (nothing to refresh)")
  if not g.ema_teacher and not g.ckpt and g.it_load_ema_teacher < 0:
    raise ConfigError(f"{where}: set ckpt, it_load_ema_teacher >= 0 or ema_teacher: "
                      "the Gram teacher must come from somewhere")
  gram_size = config.data.gram_crop_size
  if g.ema_teacher and gram_size is not None:
    raise ConfigError("config.data.gram_crop_size must be None with "
                      f"{where}.ema_teacher (its targets are the EMA teacher's crops)")
  if not g.ema_teacher and gram_size is None:
    raise ConfigError(f"config.data.gram_crop_size is None: {where} needs the Gram "
                      "teacher's crop size (the global crop size for none larger)")
  if gram_size is not None and int(gram_size) % int(config.model.patch_size):
    raise ConfigError(f"config.data.gram_crop_size={gram_size} is not divisible by "
                      f"config.model.patch_size={config.model.patch_size}")
  if g.rep_update and int(g.update_frequency) < 1:
    raise ConfigError(f"{where}.update_frequency={g.update_frequency} must be >= 1")
  s = g.loss_weight_schedule
  schedule = None
  if s.enabled:
    cos = None if s.cosine_epochs is None else int(round(s.cosine_epochs * steps_per_epoch))
    schedule = weight_schedule(s.start, s.peak, s.end,
                               int(round(s.warmup_epochs * steps_per_epoch)),
                               int(total_steps), cos)
  return GramConfig(
      loss_weight=float(g.loss_weight), ema_teacher=bool(g.ema_teacher),
      ckpt=g.ckpt or None, it_load_ema_teacher=int(g.it_load_ema_teacher),
      rep_update=bool(g.rep_update), update_frequency=int(g.update_frequency),
      it_first_update=int(g.it_first_update),
      max_updates=None if g.max_updates is None else int(g.max_updates),
      normalized=bool(g.normalized), img_level=bool(g.img_level),
      remove_neg=bool(g.remove_neg), remove_only_teacher_neg=bool(g.remove_only_teacher_neg),
      schedule=schedule)


def keeps_copy(cfg: GramConfig | None) -> bool:
  """Whether the state holds a Gram teacher of its own."""
  return cfg is not None and not cfg.ema_teacher


def updates_before(cfg: GramConfig, step):
  """How many refreshes happened after steps < `step`: steps s with
  s + 1 >= it_first_update and (s + 1) % update_frequency == 0."""
  f, first = cfg.update_frequency, max(cfg.it_first_update, 1)
  step = jnp.asarray(step, jnp.int32)
  return jnp.maximum(step // f - (first - 1) // f, 0)


def refreshes_after(cfg: GramConfig, step):
  """True when the update of `step` is followed by a refresh from the EMA teacher."""
  if not cfg.rep_update:
    return jnp.asarray(False)
  step = jnp.asarray(step, jnp.int32)
  due = ((step + 1) >= cfg.it_first_update) & ((step + 1) % cfg.update_frequency == 0)
  if cfg.max_updates is not None:
    due &= updates_before(cfg, step) < cfg.max_updates
  return due


def weight(cfg: GramConfig, step):
  """The Gram term's weight at `step`: 0 before the EMA teacher is copied in."""
  if cfg.schedule is None:
    w = jnp.float32(cfg.loss_weight)
  else:
    table = jnp.asarray(cfg.schedule, jnp.float32)
    w = table[jnp.minimum(jnp.asarray(step, jnp.int32), table.shape[0] - 1)]
  if keeps_copy(cfg) and not cfg.ckpt:
    w = jnp.where(jnp.asarray(step) >= cfg.it_load_ema_teacher, w, 0.0)
  return w


def select(flag, new, old):
  """Tree-wise `new if flag else old` (traced flag)."""
  return jax.tree.map(lambda a, b: jnp.where(flag, a, b).astype(b.dtype), new, old)


def to_grid(patches, src: int, dst: int):
  """(R, src*src, D) patch tokens -> (R, dst*dst, D), torch's bicubic resize
  (size=dst, align_corners=False, no antialias), as the reference resizes
  the Gram teacher's features to the student's grid."""
  if src == dst:
    return patches
  return jax.vmap(lambda t: resize_pos_grid(t, (src, src), (dst, dst), offset=0.0))(
      patches.astype(jnp.float32))


def loss(cfg: GramConfig, student_patches, teacher_patches, shards: int):
  """gram_loss over the global crops' rows (image-major; per-device local
  batch when not img_level)."""
  return L.gram_loss(student_patches, teacher_patches, normalize=cfg.normalized,
                     img_level=cfg.img_level, remove_neg=cfg.remove_neg,
                     remove_only_teacher_neg=cfg.remove_only_teacher_neg, shards=shards)
