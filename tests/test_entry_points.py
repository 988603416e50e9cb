"""Every entry point as a user runs it: the test extra installed (libtpu
included), no TPU chip, JAX_PLATFORMS unset. Each works and prints nothing
from the libraries the user did not ask for (libtpu's probe, TensorFlow's
start-up lines, orbax's and jax's INFO chatter)."""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lines seen on a fresh install before they were silenced (issue: the first hour).
LIBRARY_NOISE = (
    "libtpu", "TPU_WORKER", "host bounds", "TPU accelerator", "Unable to initialize backend",
    "oneDNN", "absl::InitializeLog", "InitGoogle", "Resetting cache",
    "_SignalingThread", "Save Finalize thread", "polynomial schedule", "_CHECKPOINT_METADATA",
    "Variant folder", "Load dataset info", "Generating splits", "Downloading and preparing",
    "Subsequent calls will reuse",
)
_OUR_LINE = re.compile(r"\d\d:\d\d:\d\d \S")  # the console's format (biovfm_jax/console.py)


def user_env(**extra) -> dict:
  """The test process's environment as a user's shell has it: no JAX_PLATFORMS
  (tests/conftest.py sets it for the in-process tests)."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
  return {**env, **extra}


def assert_no_library_noise(text: str, what: str) -> None:
  found = [line for line in text.splitlines()
           if any(n.lower() in line.lower() for n in LIBRARY_NOISE)]
  assert not found, f"{what} printed library noise:\n" + "\n".join(found[:10])


def run(argv, **kw):
  r = subprocess.run(argv, cwd=ROOT, env=user_env(**kw.pop("env", {})), capture_output=True,
                     text=True, timeout=600, **kw)
  assert r.returncode == 0, f"{argv}: exit {r.returncode}\n{r.stderr[-3000:]}"
  assert_no_library_noise(r.stdout + r.stderr, " ".join(map(str, argv[:3])))
  return r


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
  """The quickstart's first 10 steps: (workdir, its console output)."""
  workdir = str(tmp_path_factory.mktemp("entry") / "quickstart")
  r = run([sys.executable, "main.py", "--config=configs/quickstart.py", f"--workdir={workdir}",
           "--config.num_train_steps=10", "--config.log_every_steps=5"],
          env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  return workdir, r.stdout + r.stderr


def test_main_first_lines_are_ours(quickstart):
  """A log budget: the quickstart's first 20 lines are all the console's own."""
  _, out = quickstart
  lines = [line for line in out.splitlines() if line.strip()][:20]
  assert len(lines) >= 5, out
  assert all(_OUR_LINE.match(line) for line in lines), "\n".join(lines)
  assert any("step 10/10" in line for line in out.splitlines()), out[-2000:]


def test_evaluate(quickstart, tmp_path):
  workdir, _ = quickstart
  r = run([sys.executable, "evaluate.py", "--config=configs/eval/mini.py",
           f"--checkpoint={workdir}", f"--out_dir={tmp_path / 'eval'}",
           "--config.benchmarks=mini"],
          env={"BIOVFM_DATA": str(tmp_path / "data")})  # the benchmark built afresh
  assert "Building mini_modality/64px once" in r.stderr
  assert (tmp_path / "eval" / "report.json").exists(), r.stderr[-2000:]


def test_load_encoder_in_plain_python(quickstart):
  workdir, _ = quickstart
  code = ("import numpy as np, biovfm_jax\n"
          f"enc = biovfm_jax.load_encoder({workdir!r})\n"
          "out = enc(np.zeros((8, 64, 64, 3), np.float32))\n"
          "print(out['cls'].shape, out['patch_tokens'].shape)\n")
  r = run([sys.executable, "-c", code])
  assert r.stdout.split("\n")[-2] == "(8, 128) (8, 64, 128)", r.stdout


def test_interop_export(quickstart, tmp_path):
  workdir, _ = quickstart
  out = tmp_path / "encoder.safetensors"
  run([sys.executable, "-m", "biovfm_jax.interop", "export", "--format=timm",
       f"--src={workdir}", f"--out={out}"])
  assert out.stat().st_size > 1e6


def test_analysis_fit(tmp_path):
  r = run([sys.executable, "-m", "biovfm_jax.analysis", "fit", f"--out={tmp_path}"],
          env={"MPLCONFIGDIR": str(tmp_path / "mpl")})
  assert (tmp_path / "slopes.csv").exists(), r.stdout


def test_ingest(tmp_path):
  import numpy as np
  from PIL import Image
  from skimage import data as skdata
  (tmp_path / "in").mkdir()
  Image.fromarray(skdata.cell()).save(tmp_path / "in" / "cell.png")
  Image.fromarray(np.asarray(skdata.retina())).save(tmp_path / "in" / "retina.png")
  (tmp_path / "corpus.toml").write_text(
      f'[[sources]]\nname = "photos"\npath = "{tmp_path / "in"}"\nreader = "image"\n'
      'modality = "microscopy"\n')
  run([sys.executable, "-m", "data_pipeline.ingest", f"--spec={tmp_path / 'corpus.toml'}",
       f"--out={tmp_path / 'out'}", "--workers=1"],
      env={"MPLCONFIGDIR": str(tmp_path / "mpl")})
  assert (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_the_tiny_sweep_logs_are_quiet(tiny_sweep_root):
  """tests/conftest.py's tiny sweep runs as the README gives it (no
  JAX_PLATFORMS): neither the launcher nor a run's log holds library noise."""
  base = os.path.dirname(tiny_sweep_root)
  logs = (glob.glob(os.path.join(tiny_sweep_root, "logs", "*.log"))
          + glob.glob(os.path.join(base, "launcher*.log")))
  assert len(logs) >= 8 + 3, logs  # every run's, and the three launches'
  for path in logs:
    assert_no_library_noise(open(path, errors="replace").read(), path)
