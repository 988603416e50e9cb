"""Host memory and time of one checkpoint save, through the training
Checkpointer, at its OCDBT data-file target (checkpoint.DATA_FILE_BYTES) and
at orbax's default for local paths (2 GiB): one JSON line per save, a summary.

  python benchmarks/save_memory.py --gb=3.9 --pairs=2

The state is `--gb` of random fp32 arrays of 13 MB (about a ViT-L MAE state:
params and two Adam moments). Each save runs in its own process (a fresh
allocator), the two sides alternating; the figure is the peak RSS during the
save (sampled every 50 ms) minus the RSS before it.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from eval_memory import rss_mb  # this folder is the script's sys.path[0]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDES = {"ours": None, "orbax_default": 2 << 30}
LEAF = 3_276_800  # fp32 values per array: 13.1 MB


def rss_bytes() -> int:
  return int(rss_mb() * 2**20)


def one_save(gb: float, data_file_bytes: int | None, directory: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, ROOT)
  from biovfm_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  if data_file_bytes is not None:
    checkpoint.DATA_FILE_BYTES = data_file_bytes
  keys = jax.random.split(jax.random.key(0), max(1, int(gb * 1e9 / (4 * LEAF))))
  state = {f"w{i}": jax.random.normal(k, (LEAF,)) for i, k in enumerate(keys)}
  jax.block_until_ready(state)
  before, peak, done = rss_bytes(), [0], threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], rss_bytes())
      time.sleep(0.05)
  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  t0 = time.perf_counter()
  ckpt = checkpoint.Checkpointer(directory, keep=1, async_save=True)
  ckpt.save(1, state, {})
  ckpt.close()
  seconds = time.perf_counter() - t0
  done.set()
  sampler.join()
  return {"state_gb": round(sum(x.nbytes for x in state.values()) / 1e9, 2),
          "data_file_mib": checkpoint.DATA_FILE_BYTES >> 20,
          "rss_before_gb": round(before / 1e9, 2),
          "save_extra_gb": round((peak[0] - before) / 1e9, 2), "save_s": round(seconds, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--gb", type=float, default=3.9, help="size of the saved state")
  parser.add_argument("--pairs", type=int, default=2)
  parser.add_argument("--_side", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._side:  # the child: one save
    with tempfile.TemporaryDirectory() as tmp:
      print(json.dumps(one_save(args.gb, SIDES[args._side], os.path.join(tmp, "ck"))))
    return
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  results = {side: [] for side in SIDES}
  for _ in range(args.pairs):
    for side in SIDES:
      out = subprocess.run([sys.executable, __file__, f"--gb={args.gb}", f"--_side={side}"],
                           env=env, capture_output=True, text=True, check=True).stdout
      row = {"side": side, **json.loads(out.strip().splitlines()[-1])}
      results[side].append(row)
      print(json.dumps(row), flush=True)
  print(json.dumps({"summary": {side: [r["save_extra_gb"] for r in rows]
                                for side, rows in results.items()}}))


if __name__ == "__main__":
  main()
