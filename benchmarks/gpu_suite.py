"""The GPU benchmark suite: MAE and DINOv2 at ViT-B and ViT-L on one
accelerator, in one short run (about 8 minutes on an H100/H200), one JSON line
per case and a summary line at the end.

  python benchmarks/gpu_suite.py                  # on the GPU machine
  python benchmarks/gpu_suite.py --tiny           # rehearsal on a CPU: tiny models
  python benchmarks/gpu_suite.py --only=mae_l16 --trace_dir=/tmp/trace   # profile one

Each case is benchmarks/throughput.py in its own process (a case that runs out
of memory does not take the others down; each gets a fresh peak-memory count):
bf16 compute with fp32 master weights, cuDNN attention, realistic per-device
batches, and the remat and scan variants. Cases run in order until --budget_s
is spent; those left are listed as skipped. Targets (one H100-class GPU):
MAE ViT-L/16 at 224 px >= 3,000 img/s, DINOv2 ViT-L/14 with 2 global + 8 local
crops >= 200 img/s; each line says whether its case reaches its target.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THROUGHPUT = os.path.join(ROOT, "benchmarks", "throughput.py")

# name, config, per-device batch, overrides, target img/s per device (None: none set)
CASES = (
    ("mae_b16", "vit_b_mae", 256, {}, None),
    ("mae_l16", "vit_l_mae", 256, {}, 3000.0),
    # L scans its layers by default (configs/common.py): the loop is the variant.
    ("mae_l16_loop", "vit_l_mae", 256, {"model.scan_layers": False}, 3000.0),
    ("mae_l16_remat", "vit_l_mae", 512, {"model.remat_policy": "dots_saveable"}, 3000.0),
    ("dinov2_b14", "vit_b_dinov2", 64, {}, None),
    ("dinov2_l14", "vit_l_dinov2", 32, {}, 200.0),
    ("dinov2_l14_remat", "vit_l_dinov2", 64, {"model.remat_policy": "dots_saveable"}, 200.0),
)
ACCELERATOR = {"model.dtype": "bfloat16", "model.param_dtype": "float32",
               "model.attention_impl": "cudnn", "data.shards": "mini"}
# The rehearsal: every case's code path at toy sizes, on whatever backend runs it.
TINY = {"image_size": 32, "model.patch_size": 8, "model.width": 32, "model.depth": 2,
        "model.num_heads": 2, "model.mlp_dim": 64, "model.dtype": "float32",
        "model.attention_impl": "xla", "data.shards": "mini"}
TINY_OBJECTIVE = {
    "mae": {"mae.decoder_width": 32, "mae.decoder_depth": 1, "mae.decoder_heads": 2},
    "dinov2": {"dinov2.head_hidden": 64, "dinov2.head_bottleneck": 32,
               "dinov2.num_prototypes": 128, "dinov2.n_local_crops": 2,
               "data.local_crop_size": 16}}


def command(config: str, batch: int, overrides: dict, *, tiny: bool, steps: int,
            trace_dir: str | None) -> list[str]:
  objective = "dinov2" if "dinov2" in config else "mae"
  flags = {**(TINY if tiny else ACCELERATOR), **(TINY_OBJECTIVE[objective] if tiny else {}),
           **overrides, "batch_size": 4 if tiny else batch}
  cmd = [sys.executable, THROUGHPUT, f"--config={ROOT}/configs/{config}.py",
         f"--steps={steps}", *(f"--config.{k}={v}" for k, v in flags.items())]
  return cmd + ([f"--trace_dir={trace_dir}"] if trace_dir else [])


def run_case(case, args, deadline: float) -> dict:
  name, config, batch, overrides, target = case
  left = deadline - time.monotonic()
  out = {"case": name, "config": config, "per_device_batch": batch, **overrides}
  if left < 30:
    return {**out, "status": "skipped: budget spent"}
  trace = os.path.join(args.trace_dir, name) if args.trace_dir else None
  cmd = command(config, batch, overrides, tiny=args.tiny, steps=args.steps, trace_dir=trace)
  t0 = time.monotonic()
  try:
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                         timeout=min(left, args.case_timeout_s))
  except subprocess.TimeoutExpired:
    return {**out, "status": f"timed out after {time.monotonic() - t0:.0f} s"}
  lines = [l for l in res.stdout.splitlines() if l.startswith("{")]
  if res.returncode != 0 or not lines:
    tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {**out, "status": f"failed (exit {res.returncode}): {tail[-300:]}"}
  figures = json.loads(lines[-1])
  per_device = figures["img_per_sec_per_device"]
  return {**out, **figures, "status": "ok", "wall_s": round(time.monotonic() - t0, 1),
          "target_img_per_sec": target,
          "meets_target": None if target is None or args.tiny else per_device >= target}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="toy sizes: rehearse on a CPU")
  p.add_argument("--only", default="", help="comma-separated case names")
  p.add_argument("--steps", type=int, default=10, help="timed steps per case")
  p.add_argument("--budget_s", type=float, default=450, help="the whole suite's time")
  p.add_argument("--case_timeout_s", type=float, default=180)
  p.add_argument("--trace_dir", default=None, help="a profiler trace per case, under here")
  args = p.parse_args(argv)
  names = [n for n in args.only.split(",") if n]
  unknown = sorted(set(names) - {c[0] for c in CASES})
  if unknown:
    p.error(f"--only: unknown case(s) {unknown}; known: {[c[0] for c in CASES]}")
  cases = [c for c in CASES if not names or c[0] in names]
  deadline = time.monotonic() + args.budget_s
  results = []
  for case in cases:
    results.append(run_case(case, args, deadline))
    print(json.dumps(results[-1]), flush=True)
  ok = [r for r in results if r["status"] == "ok"]
  print(json.dumps({"summary": True, "cases": len(results), "ok": len(ok),
                    "failed": [r["case"] for r in results if r["status"].startswith(("f", "t"))],
                    "skipped": [r["case"] for r in results if r["status"].startswith("s")],
                    "below_target": [r["case"] for r in ok if r.get("meets_target") is False]}))
  return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
  sys.exit(main())
