"""XLA's TPU cost model of the train step, per config and topology, before and
after a change: one `python -m biovfm_jax.aot --cost --json` process per case
(each compile holds 5 to 12 GB of host memory, freed when it exits), one JSON
line per case on stdout, then a markdown table for benchmarks/RESULTS.md.

  python benchmarks/tpu_cost.py                                 # the 8 cases of RESULTS.md
  python benchmarks/tpu_cost.py --cases=vit_b_mae:v5p-8 --vs=model.attention_recompute_from=None
  python benchmarks/tpu_cost.py --set=model.remat_policy=full   # every case with a config change

--vs=KEY=VALUE,... runs every case a second time with those config values
(the "before" side) and adds the ratio. Minutes per case on 2 CPU cores
(ViT-L DINOv2: about 8).
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("vit_b_mae:v5p-8", "vit_b_dinov2:v5p-8", "vit_l_mae:v5p-8", "vit_l_dinov2:v5p-32",
         "vit_b_mae:v5p-128", "vit_b_dinov2:v5p-128", "vit_l_mae:v5p-128",
         "vit_l_dinov2:v5p-128")


def cost(case: str, settings: list[str]) -> dict:
  config, topology = case.split(":")
  cmd = [sys.executable, "-m", "biovfm_jax.aot", "--cost", "--json",
         f"--config=configs/{config}.py", f"--topology={topology}"]
  cmd += [f"--config.{s}" for s in settings]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if out.returncode:
    tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"case": case, "settings": settings, "error": tail}
  r = json.loads(out.stdout)
  r.update(case=case, settings=settings)
  return r


def row(r: dict) -> str:
  if "error" in r:
    return f"| {r['case']} | {' '.join(r['settings'])} | error: {r['error']} |"
  return (f"| {r['case']} | {' '.join(r['settings']) or 'as configured'} "
          f"| {r['modeled_step_s'] * 1e3:,.0f} | {r['xla_tflop']:.1f} "
          f"| {100 * r['mfu_analytic']:.1f}% | {r['hbm_gb']:,.0f} "
          f"| {r['hbm_mb_per_image']:,.0f} | {r['images_per_s_per_chip']:,.0f} |")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cases", default=",".join(CASES), help="config:topology,...")
  p.add_argument("--set", default="", help="KEY=VALUE,... for every run")
  p.add_argument("--vs", default="", help="KEY=VALUE,... of a second run per case")
  a = p.parse_args()
  settings = [s for s in a.set.split(",") if s]
  rows = []
  for case in a.cases.split(","):
    sides = [settings + [s for s in a.vs.split(",") if s]] if a.vs else []
    for side in sides + [settings]:
      r = cost(case, side)
      print(json.dumps({k: v for k, v in r.items() if k != "breakdown"}), flush=True)
      rows.append(r)
    if a.vs and "error" not in rows[-1] and "error" not in rows[-2]:
      before, after = rows[-2], rows[-1]
      print(json.dumps({"case": case, "step_time_ratio":
                        after["modeled_step_s"] / before["modeled_step_s"],
                        "hbm_bytes_ratio": after["hbm_gb"] / before["hbm_gb"]}), flush=True)
  print("\n| case | settings | modeled ms/step | XLA TFLOP/chip | MFU (analytic) "
        "| HBM GB/chip | HBM MB/image | images/s/chip |\n|---|---|---|---|---|---|---|---|")
  print("\n".join(row(r) for r in rows))


if __name__ == "__main__":
  main()
