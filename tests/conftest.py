"""Test set-up: 8 fake CPU devices, so sharding is exercised for real."""
import atexit
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# gs:// paths through epath's fsspec backend (gcsfs), which can be pointed at the
# GCS emulator of test_storage.py; TF's GCS cannot. epath decides once per process.
os.environ.setdefault("EPATH_USE_TF", "false")
# One persistent XLA compilation cache for the session, inherited by the binaries
# the tests start: the tiny models compile once, not in every test and process
# (a 4-step main.py run: 32 s -> 13 s on 2 cores). Removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="biovfm-jax-test-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

# triton (pulled in by torch, used by the interop tests' timm) segfaults when its
# native library loads after TensorFlow's (which clu and tfds bring in): load it first.
try:
  import triton  # noqa: E402,F401
except ImportError:
  pass


import numpy as np  # noqa: E402
import pytest  # noqa: E402

# pytest.ini runs the suite on pytest-xdist workers (`-n auto`). Most of a test's
# time is one-threaded (imports, tracing, XLA compiles, subprocess start-up), so
# two workers on two cores finish sooner than one. Each worker may hold a test of
# up to 8 GB, so `auto` is the core count capped by host memory / 8 GB.
_GB_PER_WORKER = 8


def pytest_xdist_auto_num_workers(config):  # pylint: disable=unused-argument
  cores = len(os.sched_getaffinity(0))
  mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return max(1, min(cores, int(mem_gb // _GB_PER_WORKER)))


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  # The tiny sweep is a session fixture of ~2 minutes: its users share one worker
  # (`--dist loadgroup`) so it runs once, not once per worker.
  for item in items:
    if "tiny_sweep_root" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.xdist_group("tiny_sweep"))


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory):
  """40 synthetic records of varied size, even indices grey (H, W), odd ones
  colour, in three ArrayRecord shards: input-pipeline tests read these."""
  from data_pipeline import records, shards
  rng = np.random.default_rng(0)
  recs = []
  for i in range(40):
    h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
    shape = (h, w, 3) if i % 2 else (h, w)
    recs.append(records.make_record(rng.integers(0, 256, shape, dtype=np.uint8),
                                    {"source": "synthetic", "modality": "CT", "index": i}))
  out = tmp_path_factory.mktemp("shards")
  shards.write_shards(recs, out, "t", records_per_shard=16)
  return str(out)


def _sweep_states(root):
  import json
  import glob
  return {os.path.basename(p)[:-5]: json.load(open(p))
          for p in glob.glob(os.path.join(root, "state", "*.json"))}


def _sweep_mtimes(root, names):
  """path -> mtime of every file the finished runs wrote (workdirs and evals)."""
  out = {}
  for name in names:
    for sub in ("runs", "evals"):
      for d, _, files in os.walk(os.path.join(root, sub, name)):
        for f in files:
          if f != "run.lock":
            out[os.path.join(d, f)] = os.stat(os.path.join(d, f)).st_mtime_ns
  return out


# The tiny sweep at test size: one seed, 10 steps a run, scored at 28 px (its 8
# grid points, its benchmarks; the README's 2 x 200 steps are measured, not tested).
TINY_SWEEP_FLAGS = ("--seeds=1", "--sweep.overrides.num_train_steps=10",
                    "--sweep.overrides.checkpoint.every_steps=10",
                    "--sweep.eval.overrides.image_size=28")


@pytest.fixture(scope="session")
def tiny_sweep_root(tmp_path_factory):
  """configs/sweeps/tiny.py (TINY_SWEEP_FLAGS) run to the end by the launcher,
  the hard way: SIGKILLed while its 2nd run trains, restarted and stopped by
  SIGTERM in a later run, restarted again. Returns the sweep root (str):
  results.csv, runs/, evals/, state/, logs/. What was seen on the way is in
  ../interruptions.json."""
  import json
  import signal
  import subprocess
  import sys
  import time
  base = tmp_path_factory.mktemp("tiny_sweep")
  root = str(base / "root")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # One device and XLA's quickest compiles: the runs are tiny, compiling is their cost.
  # As the README runs it, JAX_PLATFORMS unset (test_entry_points.py reads its logs).
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env.update(PYTHONPATH=repo, XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                                        "--xla_backend_optimization_level=0")
  cmd = [sys.executable, "-m", "biovfm_jax.sweep", "--sweep=configs/sweeps/tiny.py",
         f"--root={root}", *TINY_SWEEP_FLAGS]
  logs = []

  def launch():
    out = open(base / f"launcher{len(logs)}.log", "w")
    logs.append(out.name)
    return subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)

  def wait_until(child, predicate, what):
    end = time.time() + 400
    while time.time() < end and child.poll() is None:
      states = _sweep_states(root)
      if predicate(states):
        return states
      time.sleep(0.1)
    child.kill()
    child.wait()
    raise AssertionError(f"tiny sweep: never {what}; launcher log:\n"
                         + open(logs[-1]).read()[-3000:])

  facts = {}
  child = launch()
  try:
    # 1. SIGKILL once the first run is done and the second has trained a moment.
    states = wait_until(child, lambda s: any(v["status"] == "done" for v in s.values())
                        and any(v["status"] == "running" for v in s.values()),
                        "finished a run")
    time.sleep(1)
    child.send_signal(signal.SIGKILL)
    child.wait()
    states = _sweep_states(root)
    facts["killed"] = [n for n, v in states.items() if v["status"] == "running"]
    facts["done_before_kill"] = [n for n, v in states.items() if v["status"] == "done"]
    facts["mtimes"] = _sweep_mtimes(root, facts["done_before_kill"])
    # 2. Restarted; SIGTERM once two more runs are done.
    child = launch()
    n_done = len(facts["done_before_kill"]) + 2
    wait_until(child, lambda s: sum(v["status"] == "done" for v in s.values()) >= n_done
               and any(v["status"] == "running" for v in s.values()), "ran on")
    time.sleep(1)
    child.send_signal(signal.SIGTERM)
    facts["sigterm_exit"] = child.wait(timeout=120)
    states = _sweep_states(root)
    facts["stopped"] = [n for n, v in states.items() if v["status"] == "running"]
    facts["done_before_stop"] = [n for n, v in states.items() if v["status"] == "done"]
    # 3. Restarted to the end.
    child = launch()
    facts["final_exit"] = child.wait(timeout=600)
  finally:
    if child.poll() is None:
      child.kill()
      child.wait()
  facts["logs"] = logs
  with open(base / "interruptions.json", "w") as f:
    json.dump(facts, f, indent=1)
  assert facts["final_exit"] == 0, open(logs[-1]).read()[-3000:]
  return root
