"""DINOv2 loss maths against numpy transcriptions of the reference's
formulas (facebookresearch/dinov2: dinov2/loss/*.py and
train/ssl_meta_arch.py), each on one GPU's inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biovfm_jax.objectives import dino_losses as L

K = 32


def rand(shape, seed=0, scale=1.0):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


# --- numpy references (float64) --------------------------------------------------

def ref_softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def ref_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ref_cost(s, p, student_temp=0.1):
  """Mean over rows of -sum_k p * log_softmax(s / 0.1)."""
  return np.mean(-(p * ref_log_softmax(s / student_temp)).sum(-1))


def ref_sinkhorn(t, temp, n_iterations=3):
  """The reference's loop, in its K x B notation."""
  q = np.exp(t.astype(np.float64) / temp).T
  b, k = q.shape[1], q.shape[0]
  q /= q.sum()
  for _ in range(n_iterations):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  q *= b
  return q.T


def ref_dino(student_global, student_local, teacher_probs):
  """student_global (2B, K) crop-major (crop 0 of all images, then crop 1),
  student_local: list of (B, K), teacher_probs (2B, K) in the teacher's crop
  order. Swap, then the loops of the reference DINOLoss."""
  b = teacher_probs.shape[0] // 2
  swapped = np.concatenate([teacher_probs[b:], teacher_probs[:b]])
  targets = [swapped[:b], swapped[b:]]
  n_terms = 2 * 1 + max(2 * len(student_local), 1)   # the reference's max(., 1)
  local = 0.0
  for s in student_local:
    for t in targets:
      local += ref_cost(s, t)
  glob = ref_cost(student_global, swapped) * 2
  return local / n_terms, glob / n_terms


def ref_ibot(student, teacher, masks, n_global=2):
  """student/teacher (I, N, K) for all patches, masks (I, N) bool."""
  total = 0.0
  for i in range(masks.shape[0]):
    c = masks[i].sum()
    for j in np.flatnonzero(masks[i]):
      ce = -(teacher[i, j] * ref_log_softmax(student[i, j] / 0.1)).sum()
      total += ce / c
  return total / masks.shape[0] * 2 / n_global


def ref_koleo(x, eps=1e-8):
  """KoLeoLoss on one GPU's rows: normalise (norm floored at eps), nearest
  neighbour = largest dot product with the diagonal set to -1, distance as
  torch's PairwiseDistance(eps): |a - b + eps|, then -mean(log(d + eps))."""
  x = x.astype(np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
  dots = x @ x.T
  np.fill_diagonal(dots, -1.0)
  nn = dots.argmax(1)
  d = np.linalg.norm(x - x[nn] + eps, axis=1)
  return np.mean(-np.log(d + eps))


# --- teacher targets -------------------------------------------------------------

def test_softmax_centering_and_lazy_center_update():
  t = rand((6, K), 1)
  c = rand((1, K), 2, 0.1)
  got = L.softmax_center_teacher(t, c, 0.04)
  np.testing.assert_allclose(got, ref_softmax((t - c) / 0.04), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, rtol=1e-6)
  new = L.update_center(c, t, 0.9)
  assert new.shape == (1, K) and new.dtype == jnp.float32
  np.testing.assert_allclose(new, 0.9 * c + 0.1 * t.mean(0, keepdims=True), rtol=1e-6)
  # bf16 logits are promoted to float32.
  assert L.softmax_center_teacher(jnp.asarray(t, jnp.bfloat16), c, 0.04).dtype == jnp.float32
  # Weighted (iBOT padded rows): only counted rows enter the mean; none -> kept.
  w = np.array([1, 0, 1, 1, 0, 0], np.float32)
  np.testing.assert_allclose(L.update_center(c, t, 0.9, weights=w),
                             0.9 * c + 0.1 * t[w > 0].mean(0, keepdims=True), rtol=1e-6)
  np.testing.assert_array_equal(L.update_center(c, t, 0.9, weights=np.zeros(6)), c)
  # Per shard (the reference's iBOT center): the mean of each block's own
  # mean; a block without counted rows is left out.
  w = np.array([1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 0, 1], np.float32)
  t = rand((12, K), 3)
  blocks = [t[i:i + 3][w[i:i + 3] > 0].mean(0) for i in (0, 3, 9)]   # block 2 is empty
  np.testing.assert_allclose(L.update_center(c, t, 0.9, weights=w, shards=4),
                             0.9 * c + 0.1 * np.mean(blocks, 0, keepdims=True), rtol=1e-5)
  assert abs(np.mean(blocks, 0) - t[w > 0].mean(0)).max() > 1e-2   # differs from global
  np.testing.assert_allclose(L.update_center(c, t, 0.9, weights=w, shards=1),
                             0.9 * c + 0.1 * t[w > 0].mean(0, keepdims=True), rtol=1e-5)


def test_sinkhorn_knopp_matches_reference():
  t = rand((12, K), 3, 0.3)
  got = np.asarray(L.sinkhorn_knopp(t, 0.05, 3))
  want = ref_sinkhorn(t, 0.05, 3)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
  # The last step normalises each sample: rows sum to 1 (exactly, up to fp32).
  np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)
  # Prototype totals approach B/K (uniform use of the prototypes): after 3
  # iterations roughly, far more than a plain softmax; converged after many.
  t, b, k = rand((64, 16), 3, 0.3), 64, 16
  cols = np.asarray(L.sinkhorn_knopp(t, 0.1, 3)).sum(0)
  plain = ref_softmax(t / 0.1).sum(0)
  np.testing.assert_allclose(cols, b / k, rtol=0.25)
  assert np.abs(cols - b / k).max() < 0.5 * np.abs(plain - b / k).max()
  many = np.asarray(L.sinkhorn_knopp(t, 0.1, 200))
  np.testing.assert_allclose(many.sum(0), b / k, rtol=1e-3)
  np.testing.assert_allclose(many.sum(1), 1.0, rtol=1e-5)
  # Large logits / small temperatures do not overflow (max subtracted).
  assert np.isfinite(np.asarray(L.sinkhorn_knopp(t * 100, 0.04))).all()


def test_sinkhorn_knopp_with_padded_rows():
  t = rand((10, K), 4, 0.3)
  w = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], np.float32)
  got = np.asarray(L.sinkhorn_knopp(t, 0.07, 3, weights=w))
  np.testing.assert_allclose(got[w > 0], ref_sinkhorn(t[w > 0], 0.07, 3), rtol=2e-5,
                             atol=1e-7)
  np.testing.assert_array_equal(got[w == 0], 0.0)
  # Any leading shape; sums stay global.
  got3 = L.sinkhorn_knopp(t.reshape(2, 5, K), 0.07, 3, weights=w.reshape(2, 5))
  np.testing.assert_allclose(np.asarray(got3).reshape(10, K), got, rtol=1e-6)


def test_teacher_entropy():
  p = ref_softmax(rand((5, K), 5))
  want = np.mean(-(p * np.log(p)).sum(-1))
  np.testing.assert_allclose(L.teacher_entropy(p), want, rtol=1e-5)
  np.testing.assert_allclose(L.teacher_entropy(np.full((3, K), 1 / K)), np.log(K), rtol=1e-6)
  onehot = np.eye(K)[:4]
  assert float(L.teacher_entropy(onehot)) == 0.0


# --- losses ----------------------------------------------------------------------

def test_dino_cross_entropy():
  s, p = rand((7, K), 6), ref_softmax(rand((7, K), 7))
  np.testing.assert_allclose(L.dino_cross_entropy(s, p, 0.1), ref_cost(s, p), rtol=1e-5)
  assert L.dino_cross_entropy(jnp.asarray(s, jnp.bfloat16), p, 0.1).dtype == jnp.float32


@pytest.mark.parametrize("n_local", [3, 0])
def test_dino_loss_terms_swap_and_scaling(n_local):
  b = 4
  s_global = rand((2 * b, K), 8)                      # crop-major rows
  s_local = [rand((b, K), 9 + i) for i in range(n_local)]
  t_probs = ref_softmax(rand((2 * b, K), 20) / 0.07)  # teacher crop order
  want_local, want_global = ref_dino(s_global, s_local, t_probs)
  local, glob = L.dino_loss_terms(
      s_global.reshape(2, b, K),
      np.stack(s_local) if n_local else np.zeros((0, b, K), np.float32),
      t_probs.reshape(2, b, K), 0.1)
  np.testing.assert_allclose(glob, want_global, rtol=1e-5)
  np.testing.assert_allclose(local, want_local, rtol=1e-5, atol=1e-7)
  # Student crop c is paired with teacher crop 1-c (never with its own crop).
  # With no local crops the reference still counts one local term: T = 3.
  t = 2 + max(2 * n_local, 1)
  direct = (ref_cost(s_global[:b], t_probs[b:]) + ref_cost(s_global[b:], t_probs[:b])) / t
  own = (ref_cost(s_global[:b], t_probs[:b]) + ref_cost(s_global[b:], t_probs[b:])) / t
  np.testing.assert_allclose(glob, direct, rtol=1e-5)
  assert abs(own - direct) > 1e-3


def test_ibot_patch_loss_weighting():
  n_img, n, b = 6, 9, 3   # I = 2B global-crop images
  s = rand((n_img, n, K), 30)
  t = ref_softmax(rand((n_img, n, K), 31) / 0.07)
  masks = np.random.default_rng(32).uniform(size=(n_img, n)) < 0.4
  masks[1] = False        # an image without masked patches counts as 0
  masks[2, :] = True
  want = ref_ibot(s, t, masks)
  got = L.ibot_patch_loss(s, t, masks, 0.1)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Net factor 2/(G*I) = 1/(2B) for G=2: the mean over the 2B images of the
  # per-image mean masked-patch CE.
  ce = -(t * ref_log_softmax(s / 0.1)).sum(-1)
  per_image = [ce[i][masks[i]].mean() if masks[i].any() else 0.0 for i in range(n_img)]
  np.testing.assert_allclose(got, np.sum(per_image) / (2 * b), rtol=1e-5)
  # Gathered slots (masked first, zero-weight padding) with the true counts.
  slots = 5
  idx = np.argsort(~masks, axis=1, kind="stable")[:, :slots]
  count = masks.sum(1)
  valid = np.arange(slots)[None] < np.minimum(count, slots)[:, None]
  got_slots = L.ibot_patch_loss(np.take_along_axis(s, idx[..., None], 1),
                                np.take_along_axis(t, idx[..., None], 1), valid, 0.1,
                                n_masked=count)
  # Image 2 has 9 masked patches but only 5 slots: the others drop out.
  keep = masks.copy()
  keep[2, 5:] = False
  want_trunc = sum(ce[i][keep[i]].sum() / max(count[i], 1) for i in range(n_img)) / n_img
  np.testing.assert_allclose(got_slots, want_trunc, rtol=1e-5)


def test_koleo_matches_reference():
  x = rand((9, 16), 40)
  np.testing.assert_allclose(L.koleo(x), ref_koleo(x), rtol=1e-5)
  assert L.koleo(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.float32
  # Groups: the mean of KoLeo within each group of consecutive rows.
  x = rand((12, 16), 41)
  np.testing.assert_allclose(L.koleo(x, group_size=4),
                             np.mean([ref_koleo(x[i:i + 4]) for i in (0, 4, 8)]),
                             rtol=1e-5)


def test_koleo_is_finite_on_duplicates_with_finite_gradient():
  x = rand((6, 16), 42)
  x[3] = x[1]             # a duplicate image
  # The reference's distance |a - b + eps| = 4e-8 here, not sqrt(0 + eps^2).
  np.testing.assert_allclose(L.koleo(x), ref_koleo(x), rtol=1e-5)
  x[5] = 2.0 * x[0]       # same direction: duplicate after normalisation
  val, grad = jax.value_and_grad(L.koleo)(jnp.asarray(x))
  np.testing.assert_allclose(val, ref_koleo(x), rtol=1e-5)
  assert np.isfinite(float(val)) and np.isfinite(np.asarray(grad)).all()
  # Duplicates contribute -log(d + eps) with d ~ eps, a large but finite term.
  assert float(val) > 0.5 * -np.log(2e-8) * 4 / 6
  allsame = np.ones((4, 8), np.float32)
  val, grad = jax.value_and_grad(L.koleo)(jnp.asarray(allsame))
  assert np.isfinite(float(val)) and np.isfinite(np.asarray(grad)).all()
  zeros = np.zeros((3, 8), np.float32)
  val, grad = jax.value_and_grad(L.koleo)(jnp.asarray(zeros))
  assert np.isfinite(float(val)) and np.isfinite(np.asarray(grad)).all()


# --- schedules and EMA -------------------------------------------------------------

def test_teacher_temperature_schedule():
  w = 30 * 10
  ref = np.concatenate([np.linspace(0.04, 0.07, w), np.full(100, 0.07)])
  steps = np.array([0, 1, 150, w - 1, w, w + 99])
  got = np.asarray([float(L.teacher_temperature(s, 0.04, 0.07, w)) for s in steps])
  np.testing.assert_allclose(got, ref[steps], rtol=1e-6)
  assert float(L.teacher_temperature(0, 0.04, 0.07, 0)) == pytest.approx(0.07)
  # Traced steps work (it runs inside the jitted step).
  assert float(jax.jit(lambda s: L.teacher_temperature(s, 0.04, 0.07, w))(
      jnp.int32(w // 2))) == pytest.approx(ref[w // 2], rel=1e-6)


def test_teacher_momentum_schedule():
  total = 1000
  got = lambda s: float(L.teacher_momentum(s, 0.992, 1.0, total))  # noqa: E731
  assert got(0) == pytest.approx(0.992, abs=1e-7)
  assert got(total) == 1.0 and got(total + 5) == 1.0
  assert got(total // 2) == pytest.approx(0.996, abs=1e-7)
  ref = 1.0 + 0.5 * (0.994 - 1.0) * (1 + np.cos(np.pi * np.arange(total) / total))
  np.testing.assert_allclose([float(L.teacher_momentum(s, 0.994, 1.0, total))
                              for s in (0, 10, 700, 999)], ref[[0, 10, 700, 999]],
                             rtol=1e-7)
  vals = [got(s) for s in range(0, total + 1, 50)]
  assert all(a <= b for a, b in zip(vals, vals[1:]))


def test_ema_update():
  teacher = {"a": rand((3, 4), 50), "b": {"c": rand((5,), 51)}}
  params = {"a": rand((3, 4), 52), "b": {"c": rand((5,), 53)}}
  new = L.ema_update(teacher, params, 0.992)
  for path in (("a",), ("b", "c")):
    t, p, n = teacher, params, new
    for k in path:
      t, p, n = t[k], p[k], n[k]
    np.testing.assert_allclose(n, 0.992 * t + 0.008 * p, rtol=1e-6)
  same = L.ema_update(teacher, params, 1.0)
  np.testing.assert_array_equal(same["a"], teacher["a"])


# --- Gram anchoring (DINOv3) ---------------------------------------------------------

def ref_gram_loss(out, tgt, apply_norm, img_level, remove_neg, remove_only_teacher_neg):
  """dinov3/loss/gram_loss.py's GramLoss.forward on one GPU's batch, in numpy:
  in-place clipping order kept, so remove_only_teacher_neg's student mask
  reads the already-clipped teacher matrix."""
  out, tgt = out.astype(np.float64), tgt.astype(np.float64)
  norm = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  if apply_norm:
    tgt = norm(tgt)
  if not img_level:
    tgt = tgt.reshape(-1, tgt.shape[-1])
  target_sim = tgt @ np.swapaxes(tgt, -1, -2)
  if apply_norm:
    out = norm(out)
  if not img_level:
    out = out.reshape(-1, out.shape[-1])
  student_sim = out @ np.swapaxes(out, -1, -2)
  if remove_neg:
    target_sim[target_sim < 0] = 0.0
    student_sim[student_sim < 0] = 0.0
  elif remove_only_teacher_neg:
    target_sim[target_sim < 0] = 0.0
    student_sim[(student_sim < 0) & (target_sim < 0)] = 0.0
  return np.mean((student_sim - target_sim) ** 2)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("neg", ["keep", "remove_neg", "remove_only_teacher_neg"])
# shards only split the batch-level matrix (one per device's local batch).
@pytest.mark.parametrize("img_level,shards", [(True, 1), (False, 1), (False, 2)])
def test_gram_loss_matches_reference(normalize, img_level, neg, shards):
  s, t = rand((4, 6, 8), seed=1), rand((4, 6, 8), seed=2)
  opts = dict(remove_neg=neg == "remove_neg",
              remove_only_teacher_neg=neg == "remove_only_teacher_neg")
  got = L.gram_loss(s, t, normalize=normalize, img_level=img_level, shards=shards, **opts)
  # Each device's local batch is its own reference call; gradients average them.
  want = np.mean([ref_gram_loss(sb, tb, normalize, img_level, **opts)
                  for sb, tb in zip(np.split(s, shards), np.split(t, shards))])
  np.testing.assert_allclose(float(got), want, rtol=2e-6)


def test_gram_loss_clipping_changes_the_loss():
  """The options are not no-ops on these inputs (so the parity above is meaningful)."""
  s, t = rand((2, 5, 4), seed=3), rand((2, 5, 4), seed=4)
  losses = {neg: float(L.gram_loss(s, t, remove_neg=neg == "remove_neg",
                                   remove_only_teacher_neg=neg == "only"))
            for neg in ("keep", "remove_neg", "only")}
  assert len({round(v, 6) for v in losses.values()}) == 3, losses
  assert float(L.gram_loss(s, s)) == 0.0
  with pytest.raises(ValueError, match="exclusive"):
    L.gram_loss(s, t, remove_neg=True, remove_only_teacher_neg=True)
