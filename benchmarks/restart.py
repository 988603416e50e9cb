"""Restart-to-first-step time of main.py with the persistent compilation cache
on (config.compile_cache_dir="", i.e. <workdir>/compile_cache) and off
("none"): prints one JSON line per run and a summary line.

  python benchmarks/restart.py --config=configs/quickstart.py
  python benchmarks/restart.py --config=configs/vit_t_mae.py --set=batch_size=8

Each trial: a run starts in a fresh workdir, is stopped by SIGTERM after its
first step (it saves a checkpoint and exits, as on a preemption), and the same
command starts again: the figure is the seconds from that restart's launch to
its "First step" log line (process start, restore, compile or cache read, one
step). The two sides alternate (--pairs of them): these machines are noisy.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDES = {"cache": "", "no_cache": "none"}


def first_step(cmd, env) -> tuple[float, str]:
  """Starts `cmd`, returns (seconds to its 'First step' line, that line), then
  stops it with SIGTERM (it checkpoints and exits)."""
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if "First step (compile + run)" in line:
      elapsed = time.perf_counter() - t0
      proc.send_signal(signal.SIGTERM)
      proc.communicate(timeout=600)
      return elapsed, line.strip().split("] ", 1)[-1]
  proc.wait()
  raise SystemExit(f"{cmd} ended (rc {proc.returncode}) before its first step:\n"
                   + "".join(seen[-30:]))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/quickstart.py")
  ap.add_argument("--set", action="append", default=[],
                  help="config override KEY=VALUE (repeatable), e.g. batch_size=8")
  ap.add_argument("--pairs", type=int, default=2)
  args = ap.parse_args()
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")
         and k != "JAX_COMPILATION_CACHE_DIR"}  # the config key decides
  env.setdefault("JAX_PLATFORMS", "cpu")
  results = {side: [] for side in SIDES}
  for _ in range(args.pairs):
    for side, value in SIDES.items():
      with tempfile.TemporaryDirectory(prefix="restart-bench-") as work:
        cmd = [sys.executable, "main.py", f"--config={args.config}", f"--workdir={work}",
               "--config.num_train_steps=100000", f"--config.compile_cache_dir={value}",
               *[f"--config.{s}" for s in args.set]]
        cold_s, _ = first_step(cmd, env)
        restart_s, line = first_step(cmd, env)
        row = {"side": side, "config": args.config, "set": args.set,
               "cold_start_s": round(cold_s, 2), "restart_to_first_step_s": round(restart_s, 2),
               "restart_log": line}
        print(json.dumps(row), flush=True)
        results[side].append(restart_s)
  med = {side: statistics.median(v) for side, v in results.items()}
  print(json.dumps({"summary": args.config, "set": args.set, "pairs": args.pairs,
                    "median_restart_s": {k: round(v, 2) for k, v in med.items()},
                    "ratio_cache_over_no_cache": round(med["cache"] / med["no_cache"], 3)}))


if __name__ == "__main__":
  main()
