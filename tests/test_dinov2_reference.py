"""Checks of tests/dinov2_reference.py: its transcription against dinov2's own code
(DINOV2_REPO naming a facebookresearch/dinov2 clone, skipped otherwise) and the
ReferenceStep's basic behaviour."""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dinov2_reference as R  # noqa: E402

B, N_LOCAL, G, L, PATCH, D, DEPTH, HEADS, K = 4, 2, 32, 16, 8, 32, 2, 2, 64
N = (G // PATCH) ** 2
VIT = dict(img_size=G, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=4.0,
           init_values=1e-5, block_chunks=0)
HEAD = dict(in_dim=D, out_dim=K, nlayers=3, hidden_dim=48, bottleneck_dim=16)
TOL = dict(atol=1e-6, rtol=1e-6)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
  """Tiny ops: one intra-op thread is ~50x faster than 2 contended ones."""
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


def _repo_ns():
  repo = os.environ.get("DINOV2_REPO")
  if not repo:
    pytest.skip("DINOV2_REPO does not name a facebookresearch/dinov2 clone")
  return R.modules(repo)


def _student(ns, seed=0, separate_ibot_head=False):
  out = {"backbone": R.randomize(ns.DinoVisionTransformer(**VIT), seed),
         "dino_head": R.randomize(ns.DINOHead(**HEAD), seed + 1)}
  if separate_ibot_head:
    out["ibot_head"] = R.randomize(ns.DINOHead(**{**HEAD, "out_dim": K // 2}), seed + 2)
  return out


def _copy_into(ns, student):
  """The same student built from `ns`, weights loaded by state_dict (strict)."""
  other = _student(ns, seed=99, separate_ibot_head="ibot_head" in student)
  for k, m in student.items():
    other[k].load_state_dict(m.state_dict())
  return other


def _masks(rng):
  masks = np.zeros((2 * B, N), bool)
  for i in rng.permutation(2 * B)[:B]:
    masks[i, rng.permutation(N)[:max(1, int(N * rng.uniform(0.1, 0.5)))]] = True
  return masks


def _batch(seed, upperbound=None):
  rng = np.random.default_rng(seed)
  return R.collate(rng.normal(size=(B, 2, 3, G, G)), rng.normal(size=(B, N_LOCAL, 3, L, L)), _masks(rng),
                   upperbound=upperbound)


STEP = dict(n_local_crops=N_LOCAL, lr=0.05, epoch_length=2, epochs=3, warmup_epochs=1,
            freeze_last_layer_epochs=1, warmup_teacher_temp_epochs=2, clip_grad=0.5)


# ---------------------------------------------------------------- (a) against dinov2's code


def test_backbone_and_head_match_dinov2():
  ns = _repo_ns()
  theirs = _student(ns)
  ours = _copy_into(R.modules(), theirs)
  for k in theirs:
    assert [(n, v.shape) for n, v in theirs[k].state_dict().items()] == \
        [(n, v.shape) for n, v in ours[k].state_dict().items()]
  rng = np.random.default_rng(0)
  x = torch.as_tensor(rng.normal(size=(2 * B, 3, G, G)), dtype=torch.float32)
  x_local = torch.as_tensor(rng.normal(size=(B, 3, L, L)), dtype=torch.float32)
  masks = torch.as_tensor(_masks(rng))
  results = []
  for s in (theirs, ours):
    g = s["backbone"](x, masks=masks, is_training=True)
    loc = s["backbone"](x_local, is_training=True)  # pos_embed interpolated to 2 x 2
    h = s["dino_head"](torch.cat([g["x_norm_patchtokens"].flatten(0, 1), loc["x_norm_clstoken"]]))
    (h.square().mean() + g["x_prenorm"].mean()).backward()
    results.append([g["x_norm_clstoken"], g["x_norm_patchtokens"], g["x_prenorm"], loc["x_norm_clstoken"],
                    loc["x_norm_patchtokens"], h] +
                   [p.grad for k in s for p in s[k].parameters()])
  for a, b in zip(*results):
    torch.testing.assert_close(b, a, **TOL)


def test_losses_match_dinov2(monkeypatch):
  ns, mine = _repo_ns(), R.modules()
  gen = torch.Generator().manual_seed(0)
  t1, t2 = torch.randn(2 * B, K, generator=gen), torch.randn(2 * B, K, generator=gen)
  s = torch.randn(2 * B, K, generator=gen, requires_grad=True)
  patches = torch.randn(7, K, generator=gen)
  s_patch = torch.randn(7, K, generator=gen, requires_grad=True)
  masks = torch.as_tensor(_masks(np.random.default_rng(1)))
  masks[:, :] = False
  masks.view(-1)[torch.randperm(masks.numel(), generator=gen)[:7]] = True
  weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
  feats = torch.randn(B, D, generator=gen, requires_grad=True)
  monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: None)  # dinov2 iBOT sinkhorn, 1 process
  outs = []
  for m in (ns, mine):
    dino, ibot = m.DINOLoss(K, student_temp=0.1, center_momentum=0.8), m.iBOTPatchLoss(K)
    res = [dino.softmax_center_teacher(t1, 0.05)]
    dino.update_center(t1)
    res.append(dino.softmax_center_teacher(t2, 0.05))  # folds in t1's batch center
    dino.update_center(t2)
    dino.apply_center_update()
    res += [dino.center, dino.sinkhorn_knopp_teacher(t1, 0.06)]
    t = res[1].view(2, B, K)
    loss = dino(list(s.chunk(2)), t) + dino([s], [t.flatten(0, 1)])
    res += [ibot.softmax_center_teacher(patches[None], 0.05)[0]]
    ibot.update_center(patches[None])
    res += [ibot.softmax_center_teacher(patches[None], 0.05)[0], ibot.center]
    ibot_t = ibot.sinkhorn_knopp_teacher(patches, 0.06, n_masked_patches_tensor=torch.tensor([7]))
    loss = loss + ibot.forward_masked(s_patch, ibot_t, student_masks_flat=masks, n_masked_patches=7,
                                      masks_weight=weight)
    loss = loss + ibot.forward_masked(s_patch, res[-2], student_masks_flat=masks)  # weights derived
    loss = loss + m.KoLeoLoss()(feats)
    s.grad = s_patch.grad = feats.grad = None
    loss.backward()
    outs.append(res + [ibot_t, loss.detach(), s.grad, s_patch.grad, feats.grad])
  for a, b in zip(*outs):
    torch.testing.assert_close(b, a, **TOL)


def test_param_groups_and_schedulers_match_dinov2():
  ns, mine = _repo_ns(), R.modules()
  for theirs, ours in zip(_student(ns, separate_ibot_head=True).values(),
                          _student(mine, separate_ibot_head=True).values()):
    for decay, mult in ((0.9, 0.2), (1.0, 1.0)):
      a = ns.get_params_groups_with_decay(theirs, lr_decay_rate=decay, patch_embed_lr_mult=mult)
      b = mine.get_params_groups_with_decay(ours, lr_decay_rate=decay, patch_embed_lr_mult=mult)
      fields = ("name", "lr_multiplier", "wd_multiplier", "is_last_layer")
      assert [tuple(d[f] for f in fields) for d in a] == [tuple(d[f] for f in fields) for d in b]
      name = {id(d["params"]): d["name"] for d in a + b}
      fa, fb = ns.fuse_params_groups(a), mine.fuse_params_groups(b)
      assert [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"], [name[id(p)] for p in g["params"]])
              for g in fa] == \
          [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"], [name[id(p)] for p in g["params"]])
           for g in fb]
  for kw in (dict(base_value=0.05, final_value=1e-6, total_iters=12, warmup_iters=4, start_warmup_value=0),
             dict(base_value=0.992, final_value=1.0, total_iters=12),
             dict(base_value=0.07, final_value=0.07, total_iters=8, warmup_iters=8, start_warmup_value=0.04),
             dict(base_value=1.0, final_value=0.1, total_iters=10, warmup_iters=3, freeze_iters=2)):
    a, b = ns.CosineScheduler(**kw), mine.CosineScheduler(**kw)
    np.testing.assert_array_equal(a.schedule, b.schedule)
    assert [a[i] for i in range(kw["total_iters"] + 2)] == [b[i] for i in range(kw["total_iters"] + 2)]


@pytest.mark.parametrize("centering,separate", [("centering", False), ("sinkhorn_knopp", True)])
def test_step_with_dinov2_modules_matches_transcription(centering, separate):
  ns = _repo_ns()
  theirs = _student(ns, separate_ibot_head=separate)
  ours = _copy_into(R.modules(), theirs)
  kw = dict(STEP, centering=centering, separate_ibot_head=separate)
  steps = [R.ReferenceStep(ns, theirs, **kw), R.ReferenceStep(R.modules(), ours, **kw)]
  for it in range(3):
    batch = _batch(it)
    la, lb = [s.step(it, batch) for s in steps]
    assert la.keys() == lb.keys()
    np.testing.assert_allclose([lb[k] for k in la], [la[k] for k in la], rtol=1e-5, atol=1e-6)
  a, b = steps
  for k, v in a.centers().items():
    torch.testing.assert_close(b.centers()[k], v, **TOL)
  for net in ("student", "teacher"):
    for (na, pa), (nb, pb) in zip(getattr(a, net).named_parameters(), getattr(b, net).named_parameters()):
      assert na == nb
      if na.endswith("attn.qkv.bias"):  # the key bias has no effect (a softmax shift): its zero
        pa, pb = (torch.cat([p[:D], p[2 * D:]]) for p in (pa, pb))  # gradient's rounding -> Adam noise
      torch.testing.assert_close(pb, pa, atol=1e-5, rtol=1e-4)


# dinov2's own SSLMetaArch.forward_backward / update_teacher and train.py's
# build_optimizer / build_schedulers / apply_optim_scheduler, run on CPU in a
# subprocess (the stubs below are process-wide): xFormers' BlockDiagonalMask as a
# cat / split, the nested-tensor backbone call per crop group, FSDP as plain
# modules (per-module clip_grad_norm_), .cuda() and all_reduce as identities.
_SSL_META_ARCH = r"""
import ast, logging, sys, types
import torch
torch.set_num_threads(1)
REPO = sys.argv[1]
sys.path.insert(0, REPO)

class BlockDiagonalMask:
    def __init__(self, sizes):
        self.sizes = sizes
    @classmethod
    def from_tensor_list(cls, ts):
        return cls([t.shape[1] for t in ts]), torch.cat(ts, dim=1)
    def split(self, x):
        return list(x.split(self.sizes, dim=1))
xops = types.ModuleType("xformers.ops")
xops.fmha = types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask)
fsdp = types.ModuleType("dinov2.fsdp")
fsdp.get_fsdp_wrapper = fsdp.ShardedGradScaler = None
fsdp.get_fsdp_modules = lambda m: [types.SimpleNamespace(params=list(m.parameters()))]
fsdp.reshard_fsdp_model = lambda m: None
train_pkg = types.ModuleType("dinov2.train")  # its __init__ imports train.py (fvcore, omegaconf)
train_pkg.__path__ = [REPO + "/dinov2/train"]
sys.modules.update({"xformers": types.ModuleType("xformers"), "xformers.ops": xops, "dinov2.fsdp": fsdp,
                    "dinov2.train": train_pkg})
torch.Tensor.cuda = lambda self, *a, **k: self
torch.distributed.all_reduce = lambda *a, **k: None

import dinov2_reference as R
import test_dinov2_reference as T
from dinov2.models import vision_transformer as vt
from dinov2.train import ssl_meta_arch as sma
from dinov2.utils.utils import CosineScheduler
sma.SSLMetaArch.fsdp_synchronize_streams = lambda self: None
vt.DinoVisionTransformer.forward_features_list = lambda self, xs, ms: [
    self.forward_features(x, m) for x, m in zip(xs, ms)]
train_py = {"CosineScheduler": CosineScheduler, "torch": torch, "logger": logging.getLogger("dinov2")}
for node in ast.parse(open(REPO + "/dinov2/train/train.py").read()).body:
    if getattr(node, "name", "") in ("build_optimizer", "build_schedulers", "apply_optim_scheduler"):
        exec(compile(ast.Module([node], []), "train.py", "exec"), train_py)

class C(dict):
    __getattr__ = dict.__getitem__

def cfg(centering, separate, S=T.STEP):
    head = dict(head_bottleneck_dim=16, head_nlayers=3, head_hidden_dim=48)
    return C(compute_precision=C(grad_scaler=False), student=C(pretrained_weights="", arch="tiny"),
             dino=C(loss_weight=1.0, head_n_prototypes=T.K, koleo_loss_weight=0.1, **head),
             ibot=C(loss_weight=1.0, mask_sample_probability=0.5, mask_ratio_min_max=(0.1, 0.5),
                    separate_head=separate, head_n_prototypes=T.K // 2, **head),
             crops=C(local_crops_number=T.N_LOCAL), train=C(centering=centering, OFFICIAL_EPOCH_LENGTH=S["epoch_length"]),
             optim=C(layerwise_decay=0.9, patch_embed_lr_mult=0.2, adamw_beta1=0.9, adamw_beta2=0.999, lr=S["lr"],
                     min_lr=1e-6, epochs=S["epochs"], warmup_epochs=S["warmup_epochs"], weight_decay=0.04,
                     weight_decay_end=0.4, freeze_last_layer_epochs=S["freeze_last_layer_epochs"],
                     clip_grad=S["clip_grad"]),
             teacher=C(momentum_teacher=0.992, final_momentum_teacher=1.0, teacher_temp=0.07,
                       warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=S["warmup_teacher_temp_epochs"]))

def rel(a, b):
    return float((a - b).norm() / a.norm().clamp(min=1e-12))

def keyless(name, p):  # the key bias: no effect, zero gradient up to rounding (Adam noise)
    return torch.cat([p[:T.D], p[2 * T.D:]]) if name.endswith("attn.qkv.bias") else p

for centering, separate in (("centering", False), ("centering", True), ("sinkhorn_knopp", False),
                            ("sinkhorn_knopp", True)):
    c = cfg(centering, separate)
    student = T._student(R.modules(), separate_ibot_head=separate)
    sma.build_model_from_cfg = lambda c: (vt.DinoVisionTransformer(**T.VIT), vt.DinoVisionTransformer(**T.VIT), T.D)
    model = sma.SSLMetaArch(c)
    for k in model.student:
        model.student[k].load_state_dict(student[k].state_dict())
        model.teacher[k].load_state_dict(student[k].state_dict())
    model.train()
    opt = train_py["build_optimizer"](c, model.get_params_groups())
    lr, wd, mom, temp, last_lr = train_py["build_schedulers"](c)
    ref = R.ReferenceStep(R.modules(), student, centering=centering, separate_ibot_head=separate, **T.STEP)
    worst = {}
    for it in range(4):
        batch = T._batch(it, upperbound=R.dinov2_upperbound(T.N, 2 * T.B))
        train_py["apply_optim_scheduler"](opt, lr[it], wd[it], last_lr[it])
        opt.zero_grad(set_to_none=True)
        theirs = {k: v.item() for k, v in model.forward_backward(batch, teacher_temp=temp[it]).items()}
        for v in model.student.values():
            torch.nn.utils.clip_grad_norm_(v.parameters(), c.optim.clip_grad)
        opt.step()
        model.update_teacher(mom[it])
        ours = ref.step(it, batch)
        errs = [abs(theirs[k] - ours[k]) / abs(theirs[k]) for k in theirs]
        model.dino_loss.apply_center_update()
        model.ibot_patch_loss.apply_center_update()
        centers = ref.centers()
        errs += [float((model.dino_loss.center - centers["dino"]).abs().max()),
                 float((model.ibot_patch_loss.center - centers["ibot"]).abs().max())]
        for net in ("student", "teacher"):
            for (n, a), (m, b) in zip(getattr(model, net).named_parameters(), getattr(ref, net).named_parameters()):
                assert n == m, (n, m)
                errs.append(rel(keyless(n, a), keyless(n, b)))
        worst[it] = max(errs)
        assert sorted(theirs) == sorted(k for k in ours if k.endswith("_loss") and k not in ("total_loss", "backprop_loss"))
    print(centering, separate, worst)
    assert max(worst.values()) < 1e-5, worst
"""


def test_step_matches_dinov2_ssl_meta_arch():
  repo = _repo_ns().source
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
             PYTHONWARNINGS="ignore")
  run = subprocess.run([sys.executable, "-c", _SSL_META_ARCH, repo], env=env, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr
  print(run.stdout)


# ---------------------------------------------------------------- (b) the step's behaviour


def test_reference_step_sanity():
  ref = R.ReferenceStep(R.modules(), _student(R.modules()), koleo_loss_weight=0.1, **STEP)
  last = [p for k in ("dino_head",) for p in ref.student[k].last_layer.parameters()]
  before = [p.detach().clone() for p in last]
  for it in range(3):
    out = ref.step(it, _batch(it))
    assert set(out) >= {"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss",
                        "total_loss", "backprop_loss"}
    assert all(np.isfinite(v) for v in out.values()), out
    assert (out["last_layer_lr"] == 0.0) == (it < 2)  # frozen for 1 epoch = 2 iterations
    assert (out["lr"] == 0.0) == (it == 0)  # warmup from 0
    if it == 1:  # last layer still frozen: unmoved, but Adam's moments accumulate
      for p, p0 in zip(last, before):
        torch.testing.assert_close(p.detach(), p0, atol=0, rtol=0)
        assert ref.optimizer.state[p]["exp_avg"].abs().max() > 0
    for k, m in ref.student.items():  # grads left after the step are the clipped ones
      norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters()]))
      assert norm <= STEP["clip_grad"] * (1 + 1e-5), (k, float(norm))
    assert max(ref.grad_norms.values()) > STEP["clip_grad"]  # clipping was active
  # iteration 2: last_layer_lr > 0 after freeze_last_layer_epochs * epoch_length = 2 iterations
  assert ref.last_layer_lr_schedule[2] > 0
  assert any((p.detach() - p0).abs().max() > 0 for p, p0 in zip(last, before))
  # teacher EMA: the teacher moved, towards (not onto) the student
  t, s = ref.teacher["backbone"].pos_embed, ref.student["backbone"].pos_embed
  assert not torch.equal(t, s)


def test_upperbound_only_pads():
  """Any upperbound >= n_masked_patches gives the same losses and gradients."""
  mine = R.modules()
  student = _student(mine)
  results = []
  for upperbound in (None, 2 * B * N):
    ref = R.ReferenceStep(mine, {k: m for k, m in _copy_into(mine, student).items()}, **STEP)
    out = ref.forward_backward(_batch(5, upperbound), teacher_temp=0.05)
    results.append([out["backprop_loss"]] + [p.grad for p in ref.student.parameters()])
  assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
  for a, b in zip(results[0][1:], results[1][1:]):
    torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-5)
