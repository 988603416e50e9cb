"""Multi-process training on one machine (2 processes x 4 CPU devices joined by
jax.distributed over 127.0.0.1 with gloo collectives, started by
launch/local.sh as users start it), and elastic resume across process and
device counts: the input position is global, so losses match step for step."""
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_train_e2e import TINY, checkpoint_steps, losses, run_main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config.checkpoint.every_steps=2", "--config.image_every_steps=2"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(workdir, *flags):
  cmd = ["bash", "launch/local.sh", "--processes=2", "--cpu-devices=4",
         f"--port={free_port()}", "--", f"--workdir={workdir}", *TINY["mae"], *FLAGS, *flags]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def keep_only_step(src, dst, step):
  """A copy of workdir `src` whose only checkpoint is `step` (as if stopped there)."""
  shutil.copytree(src, dst)
  for s in checkpoint_steps(dst):
    if s != step:
      shutil.rmtree(os.path.join(dst, "checkpoints", str(s)))


def assert_same_losses(got: dict, ref: dict, steps):
  for s in steps:
    np.testing.assert_allclose(got[s], ref[s], rtol=2e-5, err_msg=f"step {s}")


@pytest.mark.slow
def test_two_processes_match_one_and_resume_elastically(tmp_path):
  # Reference: 1 process x 8 devices, 4 steps, checkpoints at 2 and 4.
  ref = run_main(tmp_path / "ref", "--config.num_train_steps=4", *FLAGS, devices=8)
  assert ref.returncode == 0, ref.stderr[-3000:]
  ref_losses = losses(tmp_path / "ref")

  # 2 processes x 4 devices from scratch: the same losses; only process 0 logs.
  mp = run_two_processes(tmp_path / "mp", "--config.num_train_steps=4")
  assert mp.returncode == 0, (mp.stdout + mp.stderr)[-4000:]
  assert "2 process(es), 8 device(s)" in mp.stdout + mp.stderr
  assert_same_losses(losses(tmp_path / "mp"), ref_losses, [1, 2, 3, 4])
  assert checkpoint_steps(tmp_path / "mp") == [2, 4]
  assert len([f for f in os.listdir(tmp_path / "mp") if f.startswith("events.")]) == 1

  # Its step-2 checkpoint resumes on 1 x 8 and on 1 x 4 devices at the same global example.
  for devices in (8, 4):
    work = tmp_path / f"from_mp_{devices}"
    keep_only_step(tmp_path / "mp", work, 2)
    os.remove(work / "metrics.jsonl")
    r = run_main(work, "--config.num_train_steps=4", *FLAGS, devices=devices)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_losses(losses(work), ref_losses, [3, 4])

  # And the other way round: the 1 x 8 checkpoint of step 2 resumes on 2 x 4.
  keep_only_step(tmp_path / "ref", tmp_path / "to_mp", 2)
  os.remove(tmp_path / "to_mp" / "metrics.jsonl")
  back = run_two_processes(tmp_path / "to_mp", "--config.num_train_steps=4")
  assert back.returncode == 0, (back.stdout + back.stderr)[-4000:]
  assert "Resuming from step 2" in back.stdout + back.stderr
  assert_same_losses(losses(tmp_path / "to_mp"), ref_losses, [3, 4])
  assert checkpoint_steps(tmp_path / "to_mp") == [2, 4]
