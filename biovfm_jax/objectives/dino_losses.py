"""DINOv2 loss maths as pure functions of arrays (float32 throughout).

Conventions: logits/probabilities have prototypes on the last axis; leading
axes are rows. Crop-indexed inputs are (crops, batch, K). Inputs may be
bf16: everything is cast to float32 first. In a multi-device jit the arrays
are global, so every sum/mean here is over the global batch (the reference's
all_reduce calls are implicit), except where a function takes `shards` or
`group_size`: the reference computes those terms on each GPU's local batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import entr

__all__ = ["softmax_center_teacher", "update_center", "sinkhorn_knopp",
           "dino_cross_entropy", "dino_loss_terms", "ibot_patch_loss", "koleo",
           "gram_loss", "teacher_entropy", "teacher_temperature", "teacher_momentum", "ema_update"]


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _rows(x) -> jax.Array:
  """(..., K) -> (rows, K) float32."""
  x = _f32(x)
  return x.reshape(-1, x.shape[-1])


# --- teacher targets -------------------------------------------------------------

def softmax_center_teacher(teacher_logits, center, temp) -> jax.Array:
  """softmax((t - c) / temp) over prototypes; same shape as teacher_logits."""
  return jax.nn.softmax((_f32(teacher_logits) - _f32(center)) / temp, axis=-1)


def update_center(center, teacher_logits, momentum, weights=None, shards: int = 1) -> jax.Array:
  """center * m + mean_rows(t) * (1 - m); (1, K).

  `weights` (rows,), 0/1: only rows with weight count in the mean (iBOT's
  padded patch rows). With no counted row the center is kept. `shards`: the
  rows are that many equal consecutive blocks (one per device); the mean is
  then each block's own weighted mean, averaged over the blocks that have a
  counted row (the reference's iBOT center: each GPU's mean over its masked
  patches, all-reduced; a GPU without one would make the reference's center
  NaN, here it is left out). Without weights the blocks are equal, so the
  mean is the global one either way. The caller uses the *old* center for
  this step's targets and stores the new one for the next step: the
  reference applies each update one step late.
  """
  t = _rows(teacher_logits)
  if weights is None:
    mean = t.mean(axis=0, keepdims=True)
    return _f32(center) * momentum + mean * (1 - momentum)
  if t.shape[0] % shards:
    raise ValueError(f"{t.shape[0]} center rows do not split into {shards} shards")
  w = _f32(weights).reshape(shards, -1, 1)
  t = t.reshape(shards, -1, t.shape[-1])
  count = w.sum(axis=(1, 2))                                         # (shards,)
  means = (w * t).sum(axis=1) / jnp.maximum(count, 1.0)[:, None]     # (shards, K)
  has = (count > 0).astype(jnp.float32)
  mean = (has[:, None] * means).sum(axis=0, keepdims=True) / jnp.maximum(has.sum(), 1.0)
  new = _f32(center) * momentum + mean * (1 - momentum)
  return jnp.where(has.sum() > 0, new, _f32(center))


def sinkhorn_knopp(teacher_logits, temp, n_iterations: int = 3, weights=None) -> jax.Array:
  """Sinkhorn-Knopp targets on exp(t / temp), as the reference (in its K x B
  notation: scale Q to total 1; then n times: each prototype's total to
  1/K, each sample's total to 1/B; finally x B so each sample sums to 1).

  teacher_logits (..., K); `weights` (rows,) 0/1 marks rows that take part
  (iBOT's padded rows get weight 0 and an all-zero output row); B is the
  number of counted rows. Returns probabilities shaped like teacher_logits:
  every counted row sums to 1, every prototype's total is about B/K.
  """
  shape = jnp.shape(teacher_logits)
  t = _rows(teacher_logits)
  k = t.shape[-1]
  w = jnp.ones((t.shape[0], 1), jnp.float32) if weights is None else \
      _f32(weights).reshape(-1, 1)
  n = w.sum()
  # A constant shift of t/temp cancels in the first normalisation; the max
  # over counted rows keeps exp() from overflowing.
  top = jnp.max(jnp.where(w > 0, t, -jnp.inf))
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  q = jnp.exp((t - top) / temp) * w
  tiny = jnp.finfo(jnp.float32).tiny
  q = q / jnp.maximum(q.sum(), tiny)
  for _ in range(n_iterations):
    q = q / jnp.maximum(q.sum(axis=0, keepdims=True), tiny) / k
    q = q / jnp.maximum(q.sum(axis=1, keepdims=True), tiny) / n
  return (q * n).reshape(shape)


def teacher_entropy(probs, weights=None) -> jax.Array:
  """Mean over rows of -sum_k p log p (the collapse watch: ~0 = one
  prototype wins, log K = uniform). `weights` (rows,) as in update_center."""
  h = entr(_rows(probs)).sum(axis=-1)
  if weights is None:
    return h.mean()
  w = _f32(weights).reshape(-1)
  return (w * h).sum() / jnp.maximum(w.sum(), 1.0)


# --- losses ----------------------------------------------------------------------

def dino_cross_entropy(student_logits, teacher_probs, student_temp) -> jax.Array:
  """mean over rows of -sum_k p_teacher * log_softmax(s / student_temp)."""
  lsm = jax.nn.log_softmax(_f32(student_logits) / student_temp, axis=-1)
  return -(_f32(teacher_probs) * lsm).sum(axis=-1).mean()


def dino_loss_terms(student_global, student_local, teacher_probs, student_temp):
  """(local term, global term) of the DINO cls loss, as the reference.

  student_global (G, B, K) and teacher_probs (G, B, K): crop c of every
  image, teacher targets in the teacher's own crop order (the swap is done
  here); student_local (L, B, K), L may be 0. With T = G(G-1) + max(G*L, 1)
  (the reference's count; with no local crops it is 3, not 2):
    local  = sum_l sum_g CE(s_l, p_g) / T
    global = CE(stack(s_0, s_1), stack(p_1, p_0)) * 2 / T
           = (CE(s_0, p_1) + CE(s_1, p_0)) / T   (each CE a mean over B rows)
  Each CE is a mean over rows, so the reference's per-GPU means, averaged
  over GPUs by its gradient all-reduce, are this global mean.
  """
  g = student_global.shape[0]
  if g != 2 or teacher_probs.shape[0] != 2:
    raise ValueError("DINOv2's loss swaps exactly 2 global crops, got "
                     f"{student_global.shape[0]} student / {teacher_probs.shape[0]} teacher")
  n_local = student_local.shape[0]
  n_terms = g * (g - 1) + max(g * n_local, 1)
  p = _f32(teacher_probs)
  if n_local:
    # CE is linear in the target: sum_g CE(s_l, p_g) = CE(s_l, sum_g p_g), so
    # each local crop's log-softmax is computed once.
    local = dino_cross_entropy(student_local, jnp.broadcast_to(p.sum(0), student_local.shape),
                               student_temp) * n_local
  else:
    local = jnp.zeros((), jnp.float32)
  swapped = p[::-1]
  glob = dino_cross_entropy(student_global, swapped, student_temp) * 2
  return local / n_terms, glob / n_terms


def ibot_patch_loss(student_patch_logits, teacher_patch_probs, masks, student_temp,
                    n_masked=None, n_global_crops: int = 2) -> jax.Array:
  """iBOT masked-patch cross-entropy, weighted as the reference.

  student_patch_logits, teacher_patch_probs (I, n, K): I = G*B global-crop
  images, n patch slots each; `masks` (I, n): 1 where the slot is a masked
  patch (0 for unmasked or padding slots); n_masked (I,): masked patches per
  image (default masks.sum(-1); pass the true count when slots were capped).
  Each patch weighs 1/n_masked of its image; the sum is divided by I, then
  multiplied by 2 and by 1/G. Net factor 2/(G*I): for G=2 the loss is the
  mean over all 2B global-crop images of each image's mean masked-patch CE
  (images without masked patches count as 0).
  """
  lsm = jax.nn.log_softmax(_f32(student_patch_logits) / student_temp, axis=-1)
  ce = -(_f32(teacher_patch_probs) * lsm).sum(axis=-1)           # (I, n)
  m = _f32(masks)
  count = m.sum(axis=-1) if n_masked is None else _f32(n_masked)
  weight = m / jnp.maximum(count, 1.0)[:, None]
  n_images = m.shape[0]
  return (ce * weight).sum() / n_images * 2.0 / n_global_crops


def koleo(x, eps: float = 1e-8, group_size: int | None = None) -> jax.Array:
  """KoLeo regulariser: -mean(log(d_nn + eps)) over the L2-normalised rows of
  x (n, D), d_nn the distance to the nearest *other* row (largest dot).

  The distance is |x_i - x_nn + eps| (eps added to every component), as
  torch's PairwiseDistance(eps=1e-8) in the reference: for a duplicate row
  it is eps*sqrt(D), with a finite gradient (the plain norm's is not).
  group_size: KoLeo within consecutive groups of rows, averaged over groups
  (the reference works on each GPU's local batch); None = all rows.
  """
  x = _f32(x)
  if group_size is not None and group_size < x.shape[0]:
    if x.shape[0] % group_size:
      raise ValueError(f"koleo group size {group_size} does not divide {x.shape[0]} rows")
    groups = x.reshape(-1, group_size, x.shape[-1])
    return jax.vmap(lambda g: koleo(g, eps))(groups).mean()
  n = x.shape[0]
  x = x / jnp.sqrt(jnp.maximum((x * x).sum(-1, keepdims=True), eps * eps))
  sim = x @ x.T
  sim = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, sim)  # never pick oneself
  nn_idx = jnp.argmax(sim, axis=1)
  diff = x - x[nn_idx] + eps
  d = jnp.sqrt((diff * diff).sum(-1))
  return -jnp.log(d + eps).mean()


def _l2_normalize(x, eps: float = 1e-12) -> jax.Array:
  """x / max(|x|, eps) over the last axis (torch's F.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def gram_loss(student_patches, teacher_patches, *, normalize: bool = True,
              img_level: bool = True, remove_neg: bool = False,
              remove_only_teacher_neg: bool = False, shards: int = 1) -> jax.Array:
  """DINOv3's Gram anchoring: the MSE between the patch-similarity (Gram)
  matrices of the student's and the Gram teacher's patch features (B, N, D).

  normalize: L2-normalise each patch first (cosine similarities).
  img_level: one N x N matrix per image; else one (B*N) x (B*N) matrix over
  the local batch: with `shards` > 1 the batch is that many consecutive
  equal blocks (one per device), each its own matrix, and the loss is their
  mean (the reference's per-GPU losses, averaged by its gradient all-reduce).
  remove_neg clips negative similarities of both matrices to 0.
  remove_only_teacher_neg clips the teacher's; the reference then clips the
  student's where the teacher's *clipped* matrix is negative, which is
  nowhere, so the student's stay as they are: kept exactly so here.
  """
  if remove_neg and remove_only_teacher_neg:
    raise ValueError("gram: remove_neg and remove_only_teacher_neg are exclusive")
  s, t = _f32(student_patches), _f32(teacher_patches)
  if s.ndim != 3 or s.shape != t.shape:
    raise ValueError(f"gram_loss takes (B, N, D) student and teacher patches of one "
                     f"shape, got {s.shape} and {t.shape}")
  if normalize:
    s, t = _l2_normalize(s), _l2_normalize(t)
  if not img_level:
    b, n, d = s.shape
    if b % shards:
      raise ValueError(f"gram: {b} images do not split into {shards} shards")
    s, t = s.reshape(shards, b // shards * n, d), t.reshape(shards, b // shards * n, d)
  gram = lambda x: jnp.einsum("bnd,bmd->bnm", x, x, precision="highest")
  gs, gt = gram(s), gram(t)
  if remove_neg:
    gs, gt = jnp.maximum(gs, 0.0), jnp.maximum(gt, 0.0)
  elif remove_only_teacher_neg:
    gt = jnp.maximum(gt, 0.0)
  return jnp.mean(jnp.square(gs - gt))


# --- schedules and EMA -------------------------------------------------------------

def teacher_temperature(step, warmup_temp: float, temp: float, warmup_steps: int):
  """np.linspace(warmup_temp, temp, warmup_steps)[step] during the warmup
  (reaching `temp` at step warmup_steps - 1), then `temp`."""
  step = _f32(step)
  frac = jnp.minimum(step / max(warmup_steps - 1, 1), 1.0)
  return jnp.where(step < warmup_steps, warmup_temp + (temp - warmup_temp) * frac,
                   jnp.float32(temp))


def teacher_momentum(step, base: float, final: float, total_steps: int):
  """Cosine from `base` at step 0 to `final` at total_steps (and after):
  final + (base - final) * (1 + cos(pi * step / total)) / 2."""
  s = jnp.minimum(_f32(step), float(total_steps)) / max(total_steps, 1)
  return final + 0.5 * (base - final) * (1.0 + jnp.cos(jnp.pi * s))


def ema_update(teacher, params, momentum):
  """teacher * m + params * (1 - m), leaf by leaf, in float32 (cast back to
  each teacher leaf's dtype)."""
  m = _f32(momentum)
  return jax.tree.map(
      lambda t, p: (m * _f32(t) + (1.0 - m) * _f32(p)).astype(jnp.asarray(t).dtype),
      teacher, params)
