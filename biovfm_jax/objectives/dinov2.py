"""DINOv2 objective (Oquab et al. 2023): self-distillation from an EMA teacher
with a DINO cls loss on multi-crops, an iBOT masked-patch loss and KoLeo.

The loss maths live in dino_losses (pure functions); `DINOv2Objective`
binds them to a config, the student model and the non-trainable state
(`extra`: EMA teacher parameters and the two centers) for the trainer.
Each step is assembled as PAPER.md ("How the reference DINOv2 assembles its
loss each step") describes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from biovfm_jax import sharding as shd
from biovfm_jax.evaluate.pca_map import pca_rgb
from biovfm_jax.models.dino_head import DINOv2Model
from biovfm_jax.models.vit import ViTConfig, vit_config_from
from biovfm_jax.objectives import dino_losses as L
from biovfm_jax.objectives import gram as gram_lib
from biovfm_jax.objectives.mae import _block_flops, _to_uint8
from data_pipeline import loader as loader_lib
from data_pipeline.errors import ConfigError

__all__ = ["DINOv2Objective", "dinov2_flops"]

_CENTERINGS = ("softmax", "sinkhorn_knopp")

_SCOPES = ("shard", "global")


def _batch_shards() -> int:
  """shd.batch_shards of the active mesh; 1 without a mesh."""
  ctx = shd.active_mesh()
  return 1 if ctx is None else shd.batch_shards(*ctx)


def _vit_forward_flops(vit: ViTConfig, image_size: int) -> float:
  n = (image_size // vit.patch_size) ** 2
  t = vit.num_prefix_tokens + n
  return 2.0 * n * vit.patch_size ** 2 * vit.in_channels * vit.width + \
      vit.depth * _block_flops(t, vit.width, vit.mlp_dim, vit.ffn)


def dinov2_flops(vit: ViTConfig, *, global_size: int, local_size: int, n_local: int,
                 head_dims: list[int], num_prototypes: int, patch_prototypes: int,
                 patch_rows: int) -> float:
  """Training FLOPs per image; see DINOv2Objective.flops_per_example."""
  head_mlp = sum(2.0 * a * b for a, b in zip(head_dims[:-1], head_dims[1:]))
  head = lambda rows, k: rows * (head_mlp + 2.0 * head_dims[-1] * k)  # noqa: E731
  backbone_g = _vit_forward_flops(vit, global_size)
  student = (2 * backbone_g + n_local * _vit_forward_flops(vit, local_size)
             + head(2 + n_local, num_prototypes) + head(patch_rows, patch_prototypes))
  teacher = 2 * backbone_g + head(2, num_prototypes) + head(patch_rows, patch_prototypes)
  return 3.0 * student + teacher


class DINOv2Objective:
  """DINOv2 for the generic trainer.

  config.model: the backbone (see models.vit.vit_config_from); the objective
  always adds the iBOT mask token, and uses DINOv2's init unless
  config.model.init says otherwise. config.dinov2: see configs/dinov2_base.py.
  config.data: mean/std (visualize), global_crop_size (= model.image_size),
  local_crop_size, mask_ratio (only its upper end, for the iBOT slot count).

  extra = {"teacher": params-shaped EMA, "center": (1, K), "patch_center":
  (1, K_patch)}, float32 centers. Batches: global_crops (B, 2, G, G, C),
  local_crops (B, L, l, l, C), masks (B, 2, (G/p)^2) bool, True = masked.

  Several devices. The reference computes each term on every GPU's local
  batch and averages gradients over GPUs; its "GPU" is here a shard of the
  batch axis (the mesh's data x fsdp devices; within a gradient-accumulation
  micro-batch, that micro-batch's shard). Means over rows (DINO CE, iBOT,
  the DINO center, Sinkhorn-Knopp, whose sums the reference all-reduces)
  are therefore global. Two terms are not, and follow the reference by
  default:
    - KoLeo (koleo_scope="shard"): nearest neighbours within each shard's
      images, averaged over shards. "global": within the whole batch (a
      better density estimate, and independent of the device count).
      koleo_group_size=n: within groups of n consecutive images instead (the
      reference's run with n images per GPU); must divide the scope's batch.
      A shard of one image has no neighbour: its KoLeo is a constant without
      gradient, as on a reference GPU with one image.
    - The iBOT patch center (ibot_center_scope="shard"): each shard's mean
      over its masked patches, averaged over the shards that have any.
      "global": one mean over all masked patches (each patch weighs the same).
  Also as the reference: with no local crops the DINO terms are divided by
  3 (its max(2L, 1) + 2 term count), not 2; KoLeo's distance is |a - b + eps|.

  Logged values: dino_local, dino_global, ibot and koleo are the terms of
  loss = dino_weight * (dino_local + dino_global) + koleo_weight * koleo
  + ibot_weight * ibot, koleo unweighted. The reference's logs show halves:
  its koleo_loss = koleo_weight * koleo / 2 and ibot_loss = ibot / 2 (its
  dino_*_crops_loss are ours).
  """

  # Where the backbone to evaluate and export lives in the train state: the
  # EMA teacher's, as in the reference. Recorded in every checkpoint.
  backbone_path = ("extra", "teacher", "backbone")

  def __init__(self, config, *, total_steps: int, steps_per_epoch: int):
    self.config = config
    model = dict(config.model.to_dict(), mask_token=True)
    self.vit = vit_config_from(model)
    if not self.vit.class_token:
      raise ConfigError("config.model.class_token must be True for DINOv2 (cls loss)")
    d = config.dinov2
    self.head_hidden = int(d.head_hidden)
    self.head_bottleneck = int(d.head_bottleneck)
    self.head_layers = int(d.head_layers)
    self.num_prototypes = int(d.num_prototypes)
    self.separate_ibot_head = bool(d.separate_ibot_head)
    self.patch_prototypes = (int(d.ibot_num_prototypes or self.num_prototypes)
                             if self.separate_ibot_head else self.num_prototypes)
    self.student_temp = float(d.student_temp)
    self.teacher_temp = float(d.teacher_temp)
    self.warmup_teacher_temp = float(d.warmup_teacher_temp)
    self.warmup_temp_steps = int(float(d.warmup_teacher_temp_epochs) * steps_per_epoch)
    self.centering = str(d.centering)
    self.center_momentum = float(d.center_momentum)
    self.sinkhorn_iterations = int(d.sinkhorn_iterations)
    self.koleo_weight = float(d.koleo_weight)
    self.dino_weight = float(d.dino_weight)
    self.ibot_weight = float(d.ibot_weight)
    self.momentum_base = float(d.teacher_momentum)
    self.momentum_end = float(d.teacher_momentum_end)
    self.n_local_crops = int(d.n_local_crops)
    self.koleo_group_size = d.koleo_group_size
    self.koleo_scope = str(d.koleo_scope)
    self.ibot_center_scope = str(d.ibot_center_scope)
    for key in ("koleo_scope", "ibot_center_scope"):
      if getattr(self, key) not in _SCOPES:
        raise ConfigError(f"config.dinov2.{key}={getattr(self, key)!r} must be one of "
                          f"{_SCOPES}")
    self.total_steps = int(total_steps)
    self.steps_per_epoch = int(steps_per_epoch)
    if self.centering not in _CENTERINGS:
      raise ConfigError(f"config.dinov2.centering={self.centering!r} must be one of "
                       f"{_CENTERINGS}")
    data = config.data
    frac = d.ibot_max_masked_fraction
    frac = float(max(data.mask_ratio) if frac is None else frac)
    if not 0.0 < frac <= 1.0:
      raise ConfigError(f"config.dinov2.ibot_max_masked_fraction={frac} must be in (0, 1]")
    n = self.vit.num_patches
    # iBOT slots per global-crop image: masked patches are gathered into a
    # fixed n_max slots (static shape), so the head runs on n_max rows per
    # image instead of all N; +1 covers int() rounding of the mask size.
    self.ibot_frac = frac
    self.ibot_slots = min(n, int(frac * n) + 1)
    self.global_size = int(data.global_crop_size)
    self.local_size = int(data.local_crop_size)
    if self.global_size != self.vit.image_size:
      raise ConfigError(f"config.data.global_crop_size={self.global_size} must equal "
                       f"config.model.image_size={self.vit.image_size} (the learned "
                       "position table is sized for the global crops)")
    # Several crop sizes (a high-resolution stage): a learned table is resized
    # to each grid at run time; the iBOT slots follow each grid.
    groups, _ = loader_lib.crop_size_groups(data)
    sizes = [("global_crop_size", self.global_size), ("local_crop_size", self.local_size)]
    sizes += [(f"{k}s", v) for g in groups for k, v in g.items() if k != "gram_crop_size"]
    for key, size in sizes:
      if size % self.vit.patch_size:
        raise ConfigError(f"config.data.{key}={size} is not divisible by "
                         f"config.model.patch_size={self.vit.patch_size}")
    self.mean, self.std = tuple(data.mean), tuple(data.std)
    self.gram = gram_lib.from_config(config, total_steps=self.total_steps,
                                     steps_per_epoch=self.steps_per_epoch)

  # --- model and state ---------------------------------------------------------

  def init_model(self, rngs: nnx.Rngs) -> DINOv2Model:
    return DINOv2Model(
        self.vit, num_prototypes=self.num_prototypes, hidden_dim=self.head_hidden,
        bottleneck_dim=self.head_bottleneck, nlayers=self.head_layers,
        separate_ibot_head=self.separate_ibot_head,
        ibot_num_prototypes=self.patch_prototypes, rngs=rngs)

  def init_extra(self, params) -> dict:
    """{"teacher": a copy of the student params, "center": (1, K) zeros,
    "patch_center": (1, K_patch) zeros}, and with Gram anchoring "gram": the
    Gram teacher's backbone (a copy of the student's until it is loaded)."""
    params = _pure(params)
    extra = {"teacher": jax.tree.map(jnp.copy, params),
             "center": jnp.zeros((1, self.num_prototypes), jnp.float32),
             "patch_center": jnp.zeros((1, self.patch_prototypes), jnp.float32)}
    if gram_lib.keeps_copy(self.gram):
      extra["gram"] = jax.tree.map(jnp.copy, params["backbone"])
    return extra

  def extra_from_checkpoints(self) -> dict[str, tuple[str, str, str]]:
    """{extra key: (checkpoint, config key, what it is)}: the parts of extra a fresh run
    reads from a checkpoint's backbone (train/init_from.initial_extra): the
    Gram teacher, when config.dinov2.gram.ckpt names one."""
    if gram_lib.keeps_copy(self.gram) and self.gram.ckpt:
      return {"gram": (self.gram.ckpt, "config.dinov2.gram.ckpt", "Gram teacher")}
    return {}

  def teacher_temperature(self, step):
    return L.teacher_temperature(step, self.warmup_teacher_temp, self.teacher_temp,
                                 self.warmup_temp_steps)

  def teacher_momentum(self, step):
    return L.teacher_momentum(step, self.momentum_base, self.momentum_end,
                              self.total_steps)

  def after_update(self, params, extra, step) -> dict:
    """EMA teacher = m * teacher + (1 - m) * params, m = teacher_momentum(step)
    with `step` the index of the update just applied (0 for the first)."""
    teacher = L.ema_update(extra["teacher"], _pure(params), self.teacher_momentum(step))
    extra = {**extra, "teacher": teacher}
    if gram_lib.keeps_copy(self.gram) and self.gram.rep_update:
      # The reference refreshes the Gram teacher after the EMA update.
      extra["gram"] = gram_lib.select(gram_lib.refreshes_after(self.gram, step),
                                      teacher["backbone"], extra["gram"])
    return extra

  def teacher(self, model: DINOv2Model, extra) -> DINOv2Model:
    """The student's module structure with the EMA parameters."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, nnx.State(extra["teacher"]), rest)

  # --- loss --------------------------------------------------------------------

  def _ibot_slots(self, masks):
    """masks (I, N) bool -> slot patch indices (I, n_max), slot validity
    (I, n_max) and masked count (I,). Masked patches come first, in patch
    order; slots past the count are padding (weight 0)."""
    n = masks.shape[1]
    slots = min(n, int(self.ibot_frac * n) + 1)  # this grid's (several crop sizes)
    order = jnp.argsort((~masks).astype(jnp.int32), axis=1, stable=True)
    idx = order[:, :slots]
    count = masks.sum(axis=1).astype(jnp.int32)
    valid = jnp.arange(slots)[None, :] < count[:, None]
    return idx, valid, count

  def loss(self, model: DINOv2Model, batch, rng: jax.Array, step, extra):
    """(loss, aux, new_extra). Drop path uses fold_in(rng, 0) (global crops)
    and fold_in(rng, 1) (local crops); the teacher is deterministic."""
    gc, lc = batch["global_crops"], batch["local_crops"]
    b, n_global = gc.shape[:2]
    n_local = lc.shape[1]
    if n_global != 2:
      raise ValueError(f"DINOv2 needs 2 global crops, the batch has {n_global}")
    # Image-major rows (row = image * crops + crop): merging the sharded batch
    # axis with the crop axis keeps every row on its device.
    xg = gc.reshape((b * n_global,) + gc.shape[2:])
    xl = lc.reshape((b * n_local,) + lc.shape[2:])
    masks = batch.get("masks")
    if masks is None:
      masks = jnp.zeros((b, n_global, (gc.shape[2] // self.vit.patch_size) *
                         (gc.shape[3] // self.vit.patch_size)), bool)
    masks = masks.astype(bool).reshape(b * n_global, -1)
    idx, valid, count = self._ibot_slots(masks)
    shards = _batch_shards()
    if b % shards:
      raise ValueError(f"DINOv2: the batch of {b} images does not split over {shards} "
                       "batch shards")
    do_ibot = self.ibot_weight > 0
    temp = self.teacher_temperature(step)
    crops_first = lambda x, n: jnp.swapaxes(x.reshape((b, n) + x.shape[1:]), 0, 1)  # noqa: E731

    # Teacher: global crops, unmasked, no drop path; no gradient.
    teacher = self.teacher(model, extra)
    t_cls, t_patch = teacher.encode(xg)
    t_logits = jax.lax.stop_gradient(teacher.dino_head(t_cls))            # (2B, K)
    new_extra = dict(extra)
    if self.centering == "softmax":
      t_probs = L.softmax_center_teacher(t_logits, extra["center"], temp)
      new_extra["center"] = L.update_center(extra["center"], t_logits, self.center_momentum)
    else:
      t_probs = L.sinkhorn_knopp(t_logits, temp, self.sinkhorn_iterations)
    if do_ibot:
      t_sel = jnp.take_along_axis(t_patch, idx[..., None], axis=1)
      t_patch_logits = jax.lax.stop_gradient(teacher.patch_head()(t_sel))  # (2B, n_max, K')
      if self.centering == "softmax":
        t_patch_probs = L.softmax_center_teacher(t_patch_logits, extra["patch_center"], temp)
        new_extra["patch_center"] = L.update_center(
            extra["patch_center"], t_patch_logits, self.center_momentum,
            weights=valid.reshape(-1),
            shards=shards if self.ibot_center_scope == "shard" else 1)
      else:
        t_patch_probs = L.sinkhorn_knopp(t_patch_logits, temp, self.sinkhorn_iterations,
                                         weights=valid.reshape(-1))
      t_patch_probs = jax.lax.stop_gradient(t_patch_probs)
    t_probs = jax.lax.stop_gradient(t_probs)

    # Student: masked global crops and local crops, with drop path.
    s_cls, s_patch = model.encode(xg, masks=masks, rng=jax.random.fold_in(rng, 0),
                                  deterministic=False)
    s_global = model.dino_head(s_cls)
    if n_local:
      s_local_cls, _ = model.encode(xl, rng=jax.random.fold_in(rng, 1), deterministic=False)
      s_local = crops_first(model.dino_head(s_local_cls), n_local)
    else:
      s_local = jnp.zeros((0, b, self.num_prototypes), jnp.float32)
    dino_local, dino_global = L.dino_loss_terms(
        crops_first(s_global, n_global), s_local, crops_first(t_probs, n_global),
        self.student_temp)

    # KoLeo on each global crop's backbone cls tokens, summed over the crops.
    cls_by_crop = crops_first(s_cls, n_global)
    koleo = sum(L.koleo(cls_by_crop[c], group_size=self._koleo_group(b, shards))
                for c in range(n_global))

    if do_ibot:
      s_sel = jnp.take_along_axis(s_patch, idx[..., None], axis=1)
      ibot = L.ibot_patch_loss(model.patch_head()(s_sel), t_patch_probs, valid,
                               self.student_temp, n_masked=count, n_global_crops=n_global)
    else:
      ibot = jnp.zeros((), jnp.float32)
    # Share of masked patches beyond the slots (left out of iBOT): should be 0;
    # if not, raise config.dinov2.ibot_max_masked_fraction.
    truncated = (jnp.maximum(count - idx.shape[1], 0).sum()
                 / jnp.maximum(count.sum(), 1)).astype(jnp.float32)

    loss = (self.dino_weight * (dino_local + dino_global) + self.koleo_weight * koleo
            + self.ibot_weight * ibot)
    if self.gram is not None:
      g_loss, g_weight = self._gram_term(model, batch, s_patch, t_patch, step, extra,
                                         new_extra, shards)
      loss = loss + g_weight * g_loss
    aux = dict(
        ibot_truncated=truncated, dino_local=dino_local, dino_global=dino_global, koleo=koleo, ibot=ibot,
        teacher_entropy=L.teacher_entropy(t_probs),
        center_norm=jnp.linalg.norm(new_extra["center"]),
        teacher_temp=jnp.asarray(temp, jnp.float32),
        teacher_momentum=jnp.asarray(self.teacher_momentum(step), jnp.float32),
        ibot_masked_fraction=masks.mean(dtype=jnp.float32))
    if self.gram is not None:
      aux.update(gram=g_loss, gram_weight=g_weight)
    return loss, aux, new_extra

  def _gram_term(self, model, batch, s_patch, t_patch, step, extra, new_extra, shards):
    """(Gram loss, its weight) on the student's global-crop patch tokens; puts
    the Gram teacher this step used into new_extra."""
    cfg = self.gram
    if cfg.ema_teacher:
      targets = t_patch
    else:
      params = extra["gram"]
      if not cfg.ckpt:  # copied from the EMA teacher before step it_load_ema_teacher
        params = gram_lib.select(step == cfg.it_load_ema_teacher,
                                 extra["teacher"]["backbone"], params)
      new_extra["gram"] = params
      graphdef, _, rest = nnx.split(model.backbone, nnx.Param, ...)
      backbone = nnx.merge(graphdef, nnx.State(params), rest)
      crops = batch["gram_crops"]
      crops = crops.reshape((-1,) + crops.shape[2:])                     # (2B, R, R, C)
      tokens = backbone(crops)[:, backbone.num_prefix_tokens:]
      p = self.vit.patch_size
      targets = gram_lib.to_grid(tokens, crops.shape[1] // p,
                                 batch["global_crops"].shape[2] // p)
    g_loss = gram_lib.loss(cfg, s_patch, jax.lax.stop_gradient(targets), shards)
    return g_loss, gram_lib.weight(cfg, step)

  def _koleo_group(self, b: int, shards: int) -> int:
    """Images per KoLeo group for a batch of b split over `shards` devices."""
    scope = b // shards if self.koleo_scope == "shard" else b
    if self.koleo_group_size is None:
      return scope
    group = int(self.koleo_group_size)
    if group < 2 or scope % group:
      raise ConfigError(f"config.dinov2.koleo_group_size={group} must be at least 2 and "
                        f"divide the {scope} images of a KoLeo scope "
                        f"(config.dinov2.koleo_scope={self.koleo_scope!r})")
    return group

  # --- reporting ---------------------------------------------------------------

  @property
  def encoder_config(self) -> ViTConfig:
    """The backbone's config (with its iBOT mask token), as checkpoints record it."""
    return self.vit

  def activation_plan(self, images: float) -> dict:
    """What backward keeps for `images` images (see objectives.get_objective):
    the student's global and local crops (the teacher's forward keeps
    nothing), and the heads' float32 logits over the prototypes: per image the
    cls rows of the student's crops and the teacher's globals, the iBOT slots
    of both models' globals, two copies of each (logits, their softmax)."""
    p, prefix = self.vit.patch_size, self.vit.num_prefix_tokens
    plan = {"global_crops": (self.vit, prefix + (self.global_size // p) ** 2, 2 * images)}
    if self.n_local_crops:
      plan["local_crops"] = (self.vit, prefix + (self.local_size // p) ** 2,
                             self.n_local_crops * images)
    rows_cls = 2 + self.n_local_crops + 2
    rows_patch = 2 * 2 * self.ibot_slots if self.ibot_weight > 0 else 0
    plan["heads"] = 2 * 4 * images * (rows_cls * self.num_prototypes
                                      + rows_patch * self.patch_prototypes)
    return plan

  def flops_per_example(self) -> float:
    """Analytic training FLOPs per image (2*m*n*k per matmul; norms, softmax,
    GELU, the losses ignored):

      backbone(S) = 2*n*P*D + depth*block(prefix + n, D, M), n = (S/p)^2,
        P = p*p*C, block as in MAEObjective.flops_per_example
      head(r, K) = r * (2*sum_i d_i*d_{i+1} over the MLP + 2*bottleneck*K)
      student = 2*backbone(G) + L*backbone(l) + head(2 + L, K) + head(2*n_max, K')
      teacher = 2*backbone(G) + head(2, K) + head(2*n_max, K')
      total   = 3 * student (forward + backward) + teacher (forward only)

    n_max = iBOT slots per global crop (the head runs on all of them; 0 when
    ibot_weight is 0).
    """
    dims = [self.vit.width] + [self.head_hidden] * (self.head_layers - 1) + \
        [self.head_bottleneck]
    return dinov2_flops(
        self.vit, global_size=self.global_size, local_size=self.local_size,
        n_local=self.n_local_crops, head_dims=dims, num_prototypes=self.num_prototypes,
        patch_prototypes=self.patch_prototypes,
        patch_rows=2 * self.ibot_slots if self.ibot_weight > 0 else 0)

  def visualize(self, model: DINOv2Model, batch, rng: jax.Array, extra=None,
                n: int = 4) -> np.ndarray:
    """uint8 (n, H, 2*W, 3): [first global crop | first 3 PCA components of the
    teacher's patch features (fitted jointly over the n images), each scaled
    to [0, 1], upsampled to the image]. Uses the student without `extra`."""
    del rng
    images = jnp.asarray(batch["global_crops"][:n, 0], jnp.float32)
    net = model if extra is None else self.teacher(model, extra)
    _, patches = net.encode(images)
    p = self.vit.patch_size
    pca = pca_rgb(shd.to_host(patches), (images.shape[1] // p, images.shape[2] // p),
                  upsample=p)
    inputs = _to_uint8(shd.to_host(images), self.mean, self.std)
    return np.concatenate([inputs, pca], axis=2)


def _pure(params):
  """Params as a pure dict of arrays (accepts an nnx.State)."""
  return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
