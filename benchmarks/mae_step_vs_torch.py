"""Our MAE train step against the official MAE code's (facebookresearch/mae,
PyTorch) on CPU: same model size, batch, precision (fp32), masking (75%),
optimizer (AdamW, betas (0.9, 0.95), wd 0.05, no decay on biases and 1-D
tensors) and thread count. Prints one JSON line per size and a summary.

  python benchmarks/mae_step_vs_torch.py --mae_repo=/path/to/mae --sizes=S,B

Ours is the real step (biovfm_jax.train.loop.build -> build_train_step, from
configs/mae_base.py at the size, model.dtype=float32). The peer is
models_mae.MaskedAutoencoderViT imported from --mae_repo (a local clone; it is
not installed or vendored here), trained with torch.optim.AdamW as its
main_pretrain.py does. Both see the same random images (NHWC for us, NCHW
for it). After a warm-up, the sides alternate over --rounds rounds of --steps
steps each, so a change of load hits both; the ratio is ours / peer
(s/step; below 1 is faster). Without --mae_repo only our side is timed.
"""
import ast
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_MAE_REPO = flags.DEFINE_string("mae_repo", None, "Local clone of facebookresearch/mae.")
_SIZES = flags.DEFINE_list("sizes", ["S", "B"], "ViT sizes (configs/mae_base.py).")
_BATCH = flags.DEFINE_integer("batch", 8, "Images per step.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating rounds.")
_STEPS = flags.DEFINE_integer("steps", 2, "Timed steps per side per round.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per side first.")
_THREADS = flags.DEFINE_integer("threads", None, "Threads per side (default: the CPUs "
                                "this process may use; XLA's CPU client uses them all).")
_OVERRIDES = flags.DEFINE_multi_string(
    "set", [], "Config override key=value on our side, e.g. --set=model.scan_layers=True.")

_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


def _ours(size: str, batch: int, images_nhwc, overrides):
  """(step(), describe) for our real train step at `size`."""
  import jax
  import numpy as np

  from biovfm_jax.train import state as state_lib
  from biovfm_jax.train.loop import build
  from configs import mae_base

  config = mae_base.get_config(size)
  config.model.dtype = "float32"
  config.batch_size = batch
  config.num_train_steps = 1000  # a warmup to cut inside; the value is timing-neutral
  for item in overrides:  # key.path=value, value a Python literal or a string
    key, value = item.split("=", 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  s = build(config, num_records=100 * batch, evaluators=False)  # no data read
  state = state_lib.create_state(s.spec, s.tx, s.objective, s.shardings)
  batch_arr = {"image": jax.device_put(np.asarray(images_nhwc), s.batch_sharding)}
  t0 = time.perf_counter()
  compiled = s.train_step.lower(state, batch_arr).compile()
  compile_s = time.perf_counter() - t0
  holder = [state]

  def step():
    holder[0], m = compiled(holder[0], batch_arr)
    jax.block_until_ready(m["loss"])
    return float(m["loss"])

  return step, {"compile_s": round(compile_s, 2), "params": s.spec.num_params()}


@contextlib.contextmanager
def _timm_0_3_shims():
  """models_mae.py was written for timm 0.3.2 and numpy < 1.24. With timm >= 1.0
  its `Block(..., qk_scale=None, ...)` fails (the argument is gone; None was its
  default, i.e. head_dim ** -0.5, which timm 1.0 always uses), and its
  pos_embed.py uses the removed alias np.float (= float). For the duration of
  the import and model construction only: timm's Block accepts and drops
  qk_scale=None, and np.float is float. Nothing of the reference is copied."""
  import numpy as np
  import timm.models.vision_transformer as tvt

  base = tvt.Block

  class Block(base):
    def __init__(self, *args, qk_scale=None, **kwargs):
      if qk_scale is not None:
        raise ValueError("qk_scale other than None is not supported by the shim")
      super().__init__(*args, **kwargs)

  tvt.Block = Block
  had_float = hasattr(np, "float")
  if not had_float:
    np.float = float
  try:
    yield
  finally:
    tvt.Block = base
    if not had_float:
      del np.float


def _peer(repo: str, size: str, batch: int, images_nchw, threads: int):
  """(step(), describe) for the official MAE model + AdamW at `size`."""
  import functools

  import torch
  from torch import nn

  from biovfm_jax.models.vit import VIT_SIZES

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  sys.path.insert(0, os.path.abspath(repo))
  dims = VIT_SIZES[size]
  with _timm_0_3_shims():
    import models_mae  # noqa: PLC0415  (from --mae_repo)
    model = models_mae.MaskedAutoencoderViT(
        img_size=224, patch_size=16, embed_dim=dims["width"], depth=dims["depth"],
        num_heads=dims["num_heads"], mlp_ratio=dims["mlp_dim"] / dims["width"],
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=True,
        **_DECODER)
  model.train()
  # main_pretrain.py's groups (timm add_weight_decay): no decay on 1-D tensors
  # and biases; its AdamW betas.
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if p.requires_grad:
      (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
  opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                           {"params": decay, "weight_decay": 0.05}],
                          lr=1.5e-4 * batch / 256, betas=(0.9, 0.95))
  imgs = torch.from_numpy(images_nchw)

  def step():
    opt.zero_grad(set_to_none=True)
    loss, _, _ = model(imgs, mask_ratio=0.75)
    loss.backward()
    opt.step()
    return loss.item()

  n = sum(p.numel() for p in model.parameters() if p.requires_grad)
  return step, {"params": n, "torch": torch.__version__,
                "torch_threads": torch.get_num_threads()}


def _timed(step, steps: int) -> tuple[float, float]:
  """(wall s, process CPU s) per step. CPU seconds move less than wall time
  when other jobs share the cores (spin-waiting threads still count)."""
  c0, t0 = time.process_time(), time.perf_counter()
  for _ in range(steps):
    step()
  return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def main(argv):
  del argv
  if _MAE_REPO.value:
    # torch and timm first: loading triton (via torchvision) after jaxlib and
    # TensorFlow are in the process crashes (segfault in its extension module).
    import timm.models.vision_transformer  # noqa: F401
    import torch  # noqa: F401
  import jax
  import numpy as np

  threads = _THREADS.value or len(os.sched_getaffinity(0))
  repo = _MAE_REPO.value
  if repo is None:
    print("mae_step_vs_torch: no --mae_repo given: timing our step only (clone "
          "https://github.com/facebookresearch/mae and pass its path for the peer).",
          file=sys.stderr)
  elif not os.path.isfile(os.path.join(repo, "models_mae.py")):
    raise SystemExit(f"--mae_repo={repo}: no models_mae.py there")
  rows = []
  for size in _SIZES.value:
    rng = np.random.default_rng(0)
    nhwc = rng.standard_normal((_BATCH.value, 224, 224, 3), dtype=np.float32)
    ours, ours_info = _ours(size, _BATCH.value, nhwc, _OVERRIDES.value)
    peer = peer_info = None
    if repo:
      peer, peer_info = _peer(repo, size, _BATCH.value,
                              np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)), threads)
    for _ in range(_WARMUP.value):
      ours()
      if peer:
        peer()
    t_ours, t_peer, c_ours, c_peer = [], [], [], []
    load = [os.getloadavg()[0]]
    for _ in range(_ROUNDS.value):
      wall, cpu = _timed(ours, _STEPS.value)
      t_ours.append(wall)
      c_ours.append(cpu)
      if peer:
        wall, cpu = _timed(peer, _STEPS.value)
        t_peer.append(wall)
        c_peer.append(cpu)
      load.append(os.getloadavg()[0])
    row = {"bench": "mae_step_vs_torch", "model": f"ViT-{size}/16 MAE (dec 512x8)",
           "batch": _BATCH.value, "precision": "float32", "mask_ratio": 0.75,
           "threads": threads, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "overrides": _OVERRIDES.value, "jax": jax.__version__,
           "ours_s_per_step": round(statistics.median(t_ours), 4),
           "ours_rounds": [round(t, 4) for t in t_ours],
           "ours_cpu_s_per_step": round(statistics.median(c_ours), 4), "ours": ours_info,
           "load_avg_1min": [round(x, 2) for x in load]}
    if peer:
      ratios = [a / b for a, b in zip(t_ours, t_peer)]
      row.update({"peer_s_per_step": round(statistics.median(t_peer), 4),
                  "peer_rounds": [round(t, 4) for t in t_peer], "peer": peer_info,
                  "ratio_ours_over_peer": round(statistics.median(ratios), 3),
                  "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
                  "peer_cpu_s_per_step": round(statistics.median(c_peer), 4),
                  "cpu_ratio_ours_over_peer": round(statistics.median(
                      [a / b for a, b in zip(c_ours, c_peer)]), 3)})
    print(json.dumps(row), flush=True)
    rows.append(row)
  for r in rows:
    line = f"{r['model']}, batch {r['batch']}, fp32, {r['threads']} threads: ours {r['ours_s_per_step']} s/step"
    if "peer_s_per_step" in r:
      line += (f", official MAE {r['peer_s_per_step']} s/step, ours/peer "
               f"{r['ratio_ours_over_peer']} ({r['ratio_range'][0]}-{r['ratio_range'][1]}); "
               f"CPU s ours/peer {r['cpu_ratio_ours_over_peer']}")
    line += f"; 1-min load {min(r['load_avg_1min'])}-{max(r['load_avg_1min'])}"
    print(line, file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
