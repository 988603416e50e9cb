"""Multi-process training on one machine (2 processes x 4 CPU devices joined by
jax.distributed over 127.0.0.1 with gloo collectives, started by
launch/local.sh as users start it), and elastic resume across process and
device counts: the input position is global, so losses match step for step."""
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

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


@pytest.mark.slow
def test_a_preemption_notice_to_one_process_stops_all_at_one_step(tmp_path):
  # launch/local.sh's own commands, started here so that only process 1 gets SIGTERM:
  # a host that stopped to save alone would hang the other in its next collective.
  work = tmp_path / "w"
  plan = subprocess.run(
      ["bash", "launch/local.sh", "--processes=2", "--cpu-devices=4", f"--port={free_port()}",
       "--dry-run", "--", f"--workdir={work}", *TINY["mae"], "--config.num_train_steps=100000",
       "--config.checkpoint.every_steps=100000"],
      cwd=ROOT, env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True,
      check=True)
  logs = [open(tmp_path / f"process{i}.log", "w") for i in range(2)]  # pylint: disable=consider-using-with
  procs = [subprocess.Popen(shlex.split(line), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)  # pylint: disable=consider-using-with
           for line, log in zip(plan.stdout.splitlines(), logs)]
  try:
    deadline = time.time() + 300
    while not (work / "metrics.jsonl").exists() or len(losses(work)) < 2:
      assert time.time() < deadline and all(p.poll() is None for p in procs), "no steps"
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=180) for p in procs]
  finally:
    for p in procs:
      p.kill()
    for log in logs:
      log.close()
  outputs = [(tmp_path / f"process{i}.log").read_text() for i in range(2)]
  assert codes == [0, 0], outputs[1][-3000:]
  stops = [re.findall(r"all stop at step (\d+)", out) for out in outputs]
  assert stops[0] == stops[1] and len(stops[0]) == 1, stops
  step = int(stops[0][0])
  assert checkpoint_steps(work) == [step] and max(losses(work)) == step
  # The checkpoint is whole: one process with all 8 devices takes it up.
  r = run_main(work, f"--config.num_train_steps={step + 1}", devices=8)
  assert r.returncode == 0 and f"Resuming from step {step}" in r.stderr, r.stderr[-3000:]
  assert max(losses(work)) == step + 1


# --- How main.py decides to join peers (no processes started).

class _Metadata:
  """A GCE metadata server on 127.0.0.1 (jax and we read GCE_METADATA_IP)."""

  def __init__(self, workers: str | None):
    import http.server  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel
    outer, self.requests = self, []

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802
        outer.requests.append((self.path, self.headers.get("Metadata-Flavor")))
        ok = workers is not None and self.path.endswith("/attributes/worker-network-endpoints")
        body = (workers or "not found").encode()
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=self.server.serve_forever, daemon=True).start()
    self.env = {"GCE_METADATA_IP": f"127.0.0.1:{self.server.server_address[1]}"}

  def close(self):
    self.server.shutdown()
    self.server.server_close()


def _pci(tmp_path, vendor):
  dev = tmp_path / "pci" / "0000:00:04.0"
  dev.mkdir(parents=True)
  (dev / "vendor").write_text(vendor + "\n")
  return str(tmp_path / "pci")


@pytest.mark.parametrize("workers,vendor,expected", [
    ("10.0.0.1:8470,10.0.0.2:8470,10.0.0.3:8470,10.0.0.4:8470", "0x1ae0", "multi-host TPU VM"),
    ("10.0.0.1:8470", "0x1ae0", None),        # a single-host slice (v5e-8, v4-8)
    (None, "0x1ae0", None),                   # no worker list: stay single, with a warning
    ("10.0.0.1:8470,10.0.0.2:8470", "0x10de", None),  # an NVIDIA machine: never asked
])
def test_a_tpu_vm_finds_its_peers_in_the_gce_metadata(tmp_path, workers, vendor, expected):
  from biovfm_jax import distributed  # pylint: disable=import-outside-toplevel
  metadata = _Metadata(workers)
  try:
    assert distributed._cluster_detected(metadata.env, sysfs=_pci(tmp_path, vendor)) == expected
  finally:
    metadata.close()
  if vendor == "0x1ae0":
    assert metadata.requests == [
        ("/computeMetadata/v1/instance/attributes/worker-network-endpoints", "Google")]
  else:
    assert metadata.requests == []
  # TPU_SKIP_MDS_QUERY (set by jax where no chips are found) silences the query.
  env = {**metadata.env, "TPU_SKIP_MDS_QUERY": "1"}
  assert distributed._cluster_detected(env, sysfs=_pci(tmp_path / "x", "0x1ae0")) is None


def test_schedulers_are_detected_from_their_variables(tmp_path):
  from biovfm_jax import distributed  # pylint: disable=import-outside-toplevel
  none = str(tmp_path)  # no PCI devices
  assert distributed._cluster_detected({"SLURM_NTASKS": "8"}, sysfs=none) == "SLURM"
  assert distributed._cluster_detected({"SLURM_NTASKS": "1"}, sysfs=none) is None
  assert distributed._cluster_detected({"OMPI_COMM_WORLD_SIZE": "4"}, sysfs=none) == "Open MPI"
  assert distributed._cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b"}, sysfs=none) == "multi-host TPU"
  assert distributed._cluster_detected({}, sysfs=none) is None
  with pytest.raises(ValueError, match="go together"):
    distributed.initialize(coordinator_address="127.0.0.1:1", mode="auto", env={})
  with pytest.raises(ValueError, match="--distributed='maybe'"):
    distributed.initialize(mode="maybe", env={})
  assert distributed.initialize(mode="auto", env={"SLURM_NTASKS": "1"}) == "single process"
