"""launch/*.sh: every script in --dry-run mode (the commands it prints), its
errors for missing arguments, and the parts that run locally for real: the
multi-process orchestration of local.sh, the remote start command of
tpu_pod.sh and the batch script of slurm.sh, each against stub programs."""
import os
import pathlib
import re
import shlex
import signal
import stat
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = ["local.sh", "tpu_pod.sh", "slurm.sh"]
# main.py flags with characters a shell would split or expand.
MAIN_ARGS = ["--config=configs/vit_l_mae.py", "--workdir=gs://bkt/runs/vit l",
             "--config.mesh.fsdp=16", "--config.data.shards=/data/$corpus's"]


def launch(script, *args, env=None, check=True):
  full_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  full_env.update(env or {})
  r = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                     env=full_env, timeout=60, cwd="/")
  if check:
    assert r.returncode == 0, r.stderr
  return r


def commands(stdout):
  """The printed commands, each split as the shell would."""
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def flag(cmd, name):
  values = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
  assert len(values) == 1, (name, cmd)
  return values[0]


def stub(path, body):
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return path


def in_git_checkout():
  return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                        capture_output=True).returncode == 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_have_help(script):
  assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0
  r = launch(script, "--help")
  assert f"launch/{script}" in r.stdout and "--dry-run" in r.stdout
  assert os.access(LAUNCH / script, os.X_OK)
  assert "set -euo pipefail" in (LAUNCH / script).read_text()


# --- local.sh -------------------------------------------------------------------------

def test_local_one_process():
  (cmd,) = commands(launch("local.sh", "--cpu-devices=8", "--dry-run", "--", *MAIN_ARGS).stdout)
  assert cmd[:3] == ["env", "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=8"]
  assert cmd[3:5] == ["python", "main.py"] and cmd[5:] == MAIN_ARGS
  (plain,) = commands(launch("local.sh", "--dry-run", "--", *MAIN_ARGS).stdout)
  assert plain == ["python", "main.py", *MAIN_ARGS]
  # Inherited XLA_FLAGS are kept, less a device count of their own.
  (cmd,) = commands(launch("local.sh", "--cpu-devices=4", "--dry-run", "--", *MAIN_ARGS, env={
      "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d"}).stdout)
  assert cmd[2] == "XLA_FLAGS=--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4"


def test_local_multi_process_commands():
  out = launch("local.sh", "--processes=3", "--cpu-devices=4", "--port=23456", "--dry-run",
               "--", *MAIN_ARGS).stdout
  cmds = commands(out)
  assert len(cmds) == 3
  for i, cmd in enumerate(cmds):
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=4" in cmd
    start = cmd.index("main.py")
    assert cmd[start + 1:start + 1 + len(MAIN_ARGS)] == MAIN_ARGS
    assert flag(cmd, "--coordinator_address") == "127.0.0.1:23456"
    assert flag(cmd, "--num_processes") == "3"
    assert flag(cmd, "--process_id") == str(i)
    assert flag(cmd, "--cpu_collectives") == "gloo"


def test_local_picks_one_free_port():
  cmds = commands(launch("local.sh", "--processes=2", "--cpu-devices=4", "--dry-run",
                         "--", *MAIN_ARGS).stdout)
  ports = {flag(c, "--coordinator_address") for c in cmds}
  assert len(ports) == 1 and re.fullmatch(r"127\.0\.0\.1:\d+", ports.pop())


@pytest.mark.parametrize("args, message", [
    (["--processes=2"], "needs --cpu-devices"),
    (["--processes=0", "--cpu-devices=2"], "--processes=0"),
    (["--cpu-devices=two"], "--cpu-devices=two"),
    (["--port=80"], "--port is for multi-process"),
    (["--processes=2", "--cpu-devices=2", "--port=99999"], "--port=99999"),
])
def test_local_rejects(args, message):
  r = launch("local.sh", *args, "--dry-run", "--", *MAIN_ARGS, check=False)
  assert r.returncode == 2 and message in r.stderr and not r.stdout


def test_local_runs_processes_prefixes_output_and_propagates_failure(tmp_path):
  """The real orchestration, with a stub interpreter in place of python."""
  python = stub(tmp_path / "python", """
for a; do case $a in --process_id=*) id=${a#*=} ;; esac; done
echo "out $id $#"; echo "err $id" >&2
if [[ -n "${FAIL_ID:-}" ]]; then
  [[ $id == "$FAIL_ID" ]] && { sleep 0.5; exit 7; }
  sleep 30 >/dev/null 2>&1 &
  trap 'kill $!; echo "stopped $id"; exit 143' TERM
  wait
fi
""")
  args = ["--processes=3", "--cpu-devices=2", "--", *MAIN_ARGS]
  ok = launch("local.sh", *args, env={"PYTHON": str(python)})
  n = len(MAIN_ARGS) + 5  # main.py, the flags, and the four it adds
  assert sorted(ok.stdout.splitlines()) == sorted(
      [f"[{i}] out {i} {n}" for i in range(3)] + [f"[{i}] err {i}" for i in range(3)])
  bad = launch("local.sh", *args, env={"PYTHON": str(python), "FAIL_ID": "1"}, check=False)
  assert bad.returncode == 7
  assert "process 1 exited with status 7" in bad.stderr
  assert "[0] stopped 0" in bad.stdout and "[2] stopped 2" in bad.stdout


# --- tpu_pod.sh -----------------------------------------------------------------------

POD = ["--name=vitl", "--zone=us-east5-a", "--accelerator=v5p-128"]


def remote(cmd):
  return flag(cmd, "--command")


@pytest.mark.skipif(not in_git_checkout(), reason="tpu_pod.sh ships git HEAD")
def test_tpu_pod_create_sync_start_tail():
  r = launch("tpu_pod.sh", *POD, "--spot", "--tail", "--dry-run", "--", *MAIN_ARGS)
  cmds = commands(r.stdout)
  describe, create, wait, archive, scp, setup, start, tail = cmds
  qr = ["gcloud", "compute", "tpus", "queued-resources"]
  assert describe[:6] == qr + ["describe", "vitl"] and wait == describe
  assert flag(describe, "--format") == "value(state.state)"
  assert create[:6] == qr + ["create", "vitl"]
  assert flag(create, "--node-id") == "vitl" and flag(create, "--zone") == "us-east5-a"
  assert flag(create, "--accelerator-type") == "v5p-128"
  assert flag(create, "--runtime-version") == "v2-alpha-tpuv5"
  assert "--spot" in create and "--reserved" not in create
  assert archive[:2] == ["git", "archive"] and archive[-1] == "HEAD"
  tarball = archive[archive.index("-o") + 1]
  vm = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert scp[:5] == vm + ["scp"] and tarball in scp and "vitl:biovfm-jax.tar.gz" in scp
  assert "--worker=all" in scp and flag(scp, "--zone") == "us-east5-a"
  for cmd in (setup, start):
    assert cmd[:6] == vm + ["ssh", "vitl"] and "--worker=all" in cmd
    assert flag(cmd, "--zone") == "us-east5-a"
    assert subprocess.run(["bash", "-n", "-c", remote(cmd)]).returncode == 0
  assert "tar -xzf ~/biovfm-jax.tar.gz" in remote(setup)
  assert "pip install" in remote(setup) and "-e '.[tpu]'" in remote(setup)
  assert "nohup ~/biovfm-venv/bin/python main.py --config=configs/vit_l_mae.py " in remote(start)
  assert tail[:6] == vm + ["ssh", "vitl"] and "--worker=0" in tail
  assert remote(tail).startswith("tail ") and "latest.log" in remote(tail)
  assert "not a gs:// path" not in r.stderr


def test_tpu_pod_start_command_runs_main_with_the_flags(tmp_path):
  """The remote start command, run here with HOME in a temporary folder and a
  stub venv python: main.py gets exactly the flags, in the background, with a
  pid file and a log per run."""
  r = launch("tpu_pod.sh", *POD, "--skip-create", "--skip-setup", "--dry-run", "--", *MAIN_ARGS)
  (start,) = commands(r.stdout)
  (tmp_path / "biovfm-jax").mkdir()
  (tmp_path / "biovfm-venv" / "bin").mkdir(parents=True)
  stub(tmp_path / "biovfm-venv" / "bin" / "python",
       'printf "%s\\n" "$PWD" "$@" > "$HOME/argv.tmp"; mv "$HOME/argv.tmp" "$HOME/argv"; exec sleep 30\n')
  env = dict(os.environ, HOME=str(tmp_path))
  subprocess.run(["bash", "-c", remote(start)], env=env, check=True, timeout=30)
  logs = tmp_path / "biovfm-logs"
  pid = int((logs / "main.pid").read_text())
  assert re.fullmatch(r"main-\d{8}-\d{6}\.log", os.readlink(logs / "latest.log"))
  try:
    for _ in range(200):  # the stub writes its argv in the background
      if (tmp_path / "argv").exists():
        break
      time.sleep(0.05)
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv == [str(tmp_path / "biovfm-jax"), "main.py", *MAIN_ARGS, "--distributed=on"]
    # A second start while that run lives is refused.
    again = subprocess.run(["bash", "-c", remote(start)], env=env, capture_output=True, text=True)
    assert again.returncode == 1 and "main.py is running" in again.stderr
  finally:
    os.kill(pid, signal.SIGKILL)


def test_tpu_pod_multislice():
  r = launch("tpu_pod.sh", *POD, "--slices=2", "--reserved", "--project=proj", "--skip-setup",
             "--dry-run", "--", *MAIN_ARGS)
  describe, create, _, start = commands(r.stdout)
  assert flag(create, "--node-count") == "2" and not any(a.startswith("--node-id") for a in create)
  assert "--reserved" in create and flag(create, "--project") == "proj"
  assert start[:6] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "vitl"]
  assert "--node=all" in start and "--worker=all" in start
  assert "--config.mesh.slices=2" in remote(start)
  bad = launch("tpu_pod.sh", *POD, "--slices=2", "--dry-run", "--", *MAIN_ARGS,
               "--config.mesh.slices=4", check=False)
  assert bad.returncode == 2 and "--config.mesh.slices=4" in bad.stderr


def test_tpu_pod_reuse_stage_and_actions():
  r = launch("tpu_pod.sh", "--name=vitl", "--zone=z", "--skip-create", "--skip-setup",
             "--stage-shards=gs://bkt/corpus:/tmp/shards", "--dry-run", "--",
             "--config=configs/vit_l_mae.py", "--workdir=/tmp/run")
  stage, start = commands(r.stdout)
  assert "--worker=all" in stage
  assert remote(stage) == "mkdir -p /tmp/shards && gcloud storage rsync --recursive gs://bkt/corpus /tmp/shards"
  assert "warning: --workdir=/tmp/run is not a gs:// path" in r.stderr
  home = launch("tpu_pod.sh", "--name=vitl", "--zone=z", "--skip-create", "--skip-setup",
                "--stage-shards=gs://bkt/corpus:~/my shards", "--dry-run", "--", *MAIN_ARGS)
  stage = commands(home.stdout)[0]
  assert remote(stage) == r"mkdir -p ~/my\ shards && gcloud storage rsync --recursive gs://bkt/corpus ~/my\ shards"
  (logs,) = commands(launch("tpu_pod.sh", "--name=vitl", "--zone=z", "--logs", "--dry-run").stdout)
  assert "--worker=0" in logs and remote(logs).startswith("tail ")
  (stop,) = commands(launch("tpu_pod.sh", "--name=vitl", "--zone=z", "--stop", "--dry-run").stdout)
  assert "--worker=all" in stop and "kill -TERM" in remote(stop)
  (delete,) = commands(launch("tpu_pod.sh", "--name=vitl", "--zone=z", "--delete",
                              "--dry-run").stdout)
  assert delete[4:6] == ["delete", "vitl"] and "--force" in delete


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "--accelerator=v5p-128"], "--name=NAME is required"),
    (["--name=n", "--accelerator=v5p-128"], "--zone=ZONE is required"),
    (["--name=n", "--zone=z"], "--accelerator=TYPE is required"),
    (["--name=n", "--zone=z", "--accelerator=v9x-8"], "--runtime=VERSION"),
    (["--name=n", "--zone=z", "--spot", "--reserved"], "exclude each other"),
    (["--name=n", "--zone=z", "--slices=0"], "--slices=0"),
    (["--name=n", "--zone=z", "--bogus"], "unknown flag --bogus"),
    (["--name=n", "--zone=z", "--skip-create", "--stage-shards=gs://b/c"], "--stage-shards"),
    (["--name=n", "--zone=z", "--skip-create", "--stage-shards=gs://b/c:data"], "--stage-shards"),
])
def test_tpu_pod_rejects(args, message):
  r = launch("tpu_pod.sh", *args, "--dry-run", "--", *MAIN_ARGS, check=False)
  assert r.returncode == 2 and message in r.stderr and not r.stdout


@pytest.mark.parametrize("main_args, message", [
    (["--workdir=gs://b/r"], "main.py needs --config"),
    (["--config=configs/vit_l_mae.py"], "main.py needs --workdir"),
])
def test_tpu_pod_needs_main_flags(main_args, message):
  r = launch("tpu_pod.sh", *POD, "--dry-run", "--", *main_args, check=False)
  assert r.returncode == 2 and message in r.stderr and not r.stdout


# --- slurm.sh -------------------------------------------------------------------------

def slurm_script(stdout):
  """(the batch script, the path in its header, the sbatch command)."""
  lines = stdout.splitlines()
  assert lines[0].startswith("# ") and lines[-2] == f"# end of {lines[0][2:]}"
  return "\n".join(lines[1:-2]) + "\n", lines[0][2:], shlex.split(lines[-1])


def test_slurm_batch_script():
  r = launch("slurm.sh", "--nodes=4", "--gpus-per-node=8", "--partition=gpu", "--time=2-00:00:00",
             "--account=lab", "--sbatch-arg=--qos=high", "--dry-run", "--", *MAIN_ARGS)
  script, path, submit = slurm_script(r.stdout)
  assert submit == ["sbatch", "--parsable", path] and path.endswith(".sbatch")
  directives = [l.split(" ", 1)[1] for l in script.splitlines() if l.startswith("#SBATCH ")]
  for d in ["--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64",
            "--partition=gpu", "--time=2-00:00:00", "--account=lab", "--qos=high",
            "--signal=TERM@300", "--requeue"]:
    assert d in directives, d
  assert "export JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-0,1,2,3,4,5,6,7}" in script
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION" in script and "NCCL_DEBUG" in script
  (srun,) = [shlex.split(l) for l in script.splitlines() if l.startswith("srun ")]
  assert "--ntasks-per-node=1" in srun and "--gpus-per-node=8" in srun
  assert srun[srun.index("main.py") - 1] == "python"
  assert srun[srun.index("main.py") + 1:] == MAIN_ARGS
  assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
  defaults = slurm_script(launch("slurm.sh", "--nodes=2", "--gpus-per-node=4", "--dry-run",
                                 "--", *MAIN_ARGS).stdout)[0]
  assert "#SBATCH --cpus-per-task=32" in defaults and "--partition" not in defaults


def test_slurm_script_runs_srun_python_with_the_flags(tmp_path):
  """The batch script, run here with stub srun and python on PATH."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  stub(bin_dir / "srun", 'while [[ $1 == --* ]]; do echo "$1" >> "$LOG/srun"; shift; done; exec "$@"\n')
  stub(bin_dir / "python", 'printf "%s\\n" "$JAX_LOCAL_DEVICE_IDS" "$@" > "$LOG/python"\n')
  stub(bin_dir / "rsync", 'echo "$@" > "$LOG/rsync"\n')
  r = launch("slurm.sh", "--nodes=2", "--gpus-per-node=2", f"--stage-shards=/lustre/c:{tmp_path}/s",
             "--dry-run", "--", *MAIN_ARGS)
  script = slurm_script(r.stdout)[0]
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", LOG=str(tmp_path),
             SLURM_JOB_ID="1", SLURM_NNODES="2", SLURM_JOB_NODELIST="n[1-2]")
  env.pop("JAX_LOCAL_DEVICE_IDS", None)
  subprocess.run(["bash", "-c", script], env=env, check=True, timeout=30)
  assert (tmp_path / "python").read_text().splitlines() == ["0,1", "main.py", *MAIN_ARGS]
  assert (tmp_path / "rsync").read_text().split() == ["-a", "/lustre/c/", f"{tmp_path}/s/"]
  assert (tmp_path / "s").is_dir()
  assert "--gpus-per-node=2" in (tmp_path / "srun").read_text().split()


@pytest.mark.parametrize("args, main_args, message", [
    (["--gpus-per-node=8"], MAIN_ARGS, "--nodes=N is required"),
    (["--nodes=two"], MAIN_ARGS, "--nodes=two"),
    (["--nodes=2", "--gpus-per-node=0"], MAIN_ARGS, "--gpus-per-node=0"),
    (["--nodes=2"], ["--config=configs/vit_l_mae.py"], "main.py needs --workdir"),
    (["--nodes=2"], ["--workdir=/shared/r"], "main.py needs --config"),
    (["--nodes=2", "--stage-shards=/lustre/c"], MAIN_ARGS, "--stage-shards"),
])
def test_slurm_rejects(args, main_args, message):
  r = launch("slurm.sh", *args, "--dry-run", "--", *main_args, check=False)
  assert r.returncode == 2 and message in r.stderr and not r.stdout
