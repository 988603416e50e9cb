"""Faults of the pretraining lifecycle, injected for real: a second run on a
busy workdir, Ctrl-C, damaged checkpoints, a full disk, a changed model, a
finished run started again (issue 12, faults 5, 6, 7, 11, 13)."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from biovfm_jax.train import checkpoint as ckpt_lib
from biovfm_jax.train import loop, workdir_lock
from data_pipeline.shards import InputDataError
from test_train_e2e import ROOT, TINY, checkpoint_steps, losses, run_main
from test_train_units import tiny_config

STEPS = 16
EVERY = 4
# The subprocess runs of main.py that use the same model and schedule as `ref`
# (8 devices as in this process: the losses then agree to the last bit).
FLAGS = [f"--config.num_train_steps={STEPS}", f"--config.checkpoint.every_steps={EVERY}",
         "--config.checkpoint.keep=4"]


def ref_config(**changes):
  c = tiny_config()
  c.num_train_steps = STEPS
  c.checkpoint.every_steps = EVERY
  c.checkpoint.keep = 4
  c.update_from_flattened_dict(changes)  # "a.b" keys, as on the command line
  return c


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """One uninterrupted run, checkpoints at 4, 8, 12, 16; tests copy its workdir."""
  work = tmp_path_factory.mktemp("ref") / "w"
  loop.train(ref_config(), str(work))
  assert checkpoint_steps(work) == [4, 8, 12, 16]
  return work


def copy_of(ref, tmp_path):
  work = tmp_path / "w"
  shutil.copytree(ref, work)
  return work


def new_rows(work, since: int) -> dict[int, float]:
  lines = (work / "metrics.jsonl").read_text().splitlines()[since:]
  return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def n_rows(work) -> int:
  return len((work / "metrics.jsonl").read_text().splitlines())


def array_files(step_dir):
  d = step_dir / "state" / "ocdbt.process_0" / "d"
  return sorted(d.iterdir(), key=lambda p: p.stat().st_size)


# --- 7. Damaged checkpoints.

def test_damaged_newest_checkpoints_fall_back_and_are_kept_aside(ref, tmp_path, caplog):
  work = copy_of(ref, tmp_path)
  ckpts = work / "checkpoints"
  # The three kinds of damage, one per step, newest first: the run must skip all.
  with open(array_files(ckpts / "16")[-1], "r+b") as f:
    f.truncate(100)
  array_files(ckpts / "12")[-1].unlink()
  (ckpts / "8" / "state" / "_METADATA").unlink()
  before = n_rows(work)
  with caplog.at_level(logging.WARNING):
    loop.train(ref_config(), str(work))
  bad = {int(r.getMessage().split()[3]): r.getMessage() for r in caplog.records
         if "is unreadable" in r.getMessage()}
  assert sorted(bad) == [8, 12, 16], caplog.text
  assert all("resuming from step 4" in m and "\n" not in m for m in bad.values())
  # Kept aside where orbax does not look, never deleted; training went on from 4.
  aside = work / ckpt_lib.UNREADABLE_DIR
  assert sorted(os.listdir(aside)) == ["12", "16", "8"]
  assert (aside / "16" / "state").is_dir() and not (aside / "8" / "state" / "_METADATA").exists()
  assert checkpoint_steps(work) == [4, 8, 12, 16]
  got, expected = new_rows(work, before), losses(ref)
  assert sorted(got) == list(range(5, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in got], [expected[s] for s in got], rtol=1e-6)


def test_no_restorable_checkpoint_is_one_error_and_moves_nothing(ref, tmp_path):
  work = copy_of(ref, tmp_path)
  for step in checkpoint_steps(work):
    (work / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
  with pytest.raises(ckpt_lib.CheckpointError, match=r"no checkpoint in .* restores") as e:
    loop.train(ref_config(), str(work))
  assert "\n" not in str(e.value) and "step 16" in str(e.value)
  assert checkpoint_steps(work) == [4, 8, 12, 16]
  assert not (work / ckpt_lib.UNREADABLE_DIR).exists()


def test_a_refused_resume_moves_no_damaged_checkpoint(ref, tmp_path):
  """A resume on another input stream (here the seed) is refused before the
  unreadable step 16 is set aside: the workdir stays as it was."""
  work = copy_of(ref, tmp_path)
  (work / "checkpoints" / "16" / "state" / "_METADATA").unlink()
  with pytest.raises(InputDataError, match="checkpoint at step 12 was trained on another"):
    loop.train(ref_config(seed=1), str(work))
  assert checkpoint_steps(work) == [4, 8, 12, 16]
  assert not (work / ckpt_lib.UNREADABLE_DIR).exists()


# --- 13. Another model or objective on the same workdir; a finished run again.

@pytest.mark.parametrize("changes,named", [
    ({"model.width": 48}, "encoder.width: checkpoint 32, config 48"),
    # Not in the recorded encoder config: the array shapes catch it.
    ({"mae.decoder_width": 48}, "params/decoder"),
])
def test_resume_with_another_model_names_the_keys(ref, tmp_path, changes, named):
  work = copy_of(ref, tmp_path)
  before = files_of(work)
  with pytest.raises(ckpt_lib.ModelMismatch) as e:
    loop.train(ref_config(**changes), str(work))
  assert named in str(e.value) and str(work / "checkpoints" / "16") in str(e.value)
  assert "\n" not in str(e.value)
  assert files_of(work) == before  # untouched (but run.lock: it names the last holder)


def files_of(work) -> dict[str, tuple[int, int]]:
  """Relative path -> (size, mtime) of every file and folder under `work`, but run.lock."""
  out = {}
  for folder, dirs, files in os.walk(work):
    for name in dirs + files:
      path = os.path.join(folder, name)
      if name != workdir_lock.LOCK_NAME:
        out[os.path.relpath(path, work)] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
  return out


# A run refused before its first step removes what it added (issue 24, item 6).
@pytest.mark.parametrize("init_from", ["missing", "another_model"])
def test_a_refused_run_leaves_the_workdir_as_it_found_it(request, tmp_path, init_from):
  # ref: a checkpoint of width 32 (made only when needed).
  source = tmp_path / "gone" if init_from == "missing" else request.getfixturevalue("ref")
  new = tmp_path / "new" / "w"  # its parent folder is new too
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("the user's")
  before = files_of(mine)
  # Without the suite's shared compilation cache: the run's own goes in the workdir.
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  for work in (new, mine):
    res = subprocess.run([sys.executable, "main.py", f"--workdir={work}", *TINY["mae"],
                          f"--config.init_from={source}", "--config.model.width=48"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"Compilation cache: {work}/compile_cache" in res.stderr
    last = [line for line in res.stderr.splitlines() if line.strip()][-1]
    assert f"config.init_from={source}" in last.replace("'", ""), res.stderr[-3000:]
    # Not orbax's "Metadata file does not exist: .../_CHECKPOINT_METADATA" either.
    assert "Traceback" not in res.stderr and "_CHECKPOINT_METADATA" not in res.stderr
  assert not (tmp_path / "new").exists()
  assert files_of(mine) == before and not (mine / workdir_lock.LOCK_NAME).exists()


def test_finished_run_says_so_and_trains_nothing(ref, tmp_path, caplog):
  work = copy_of(ref, tmp_path)
  before = n_rows(work)
  with caplog.at_level(logging.INFO):
    assert loop.train(ref_config(), str(work)) == {}
  assert f"Already finished: step 16 of 16 in {work}; nothing to do." in caplog.text
  assert "Resuming" not in caplog.text
  assert n_rows(work) == before


@pytest.mark.slow
def test_dinov2_config_on_a_mae_workdir_exits_2_with_one_line(ref, tmp_path):
  work = copy_of(ref, tmp_path)
  res = run_main(work, *FLAGS, objective="dinov2", devices=8)
  assert res.returncode == 2, res.stderr[-3000:]
  assert "objective: checkpoint 'mae', config 'dinov2'" in res.stderr
  assert "Traceback" not in res.stderr and "First step" not in res.stderr


# --- 5. One run per workdir.

def test_lock_names_the_holder_and_a_killed_holder_does_not_block(tmp_path):
  work = str(tmp_path / "w")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom biovfm_jax.train import workdir_lock\n"
       f"workdir_lock.acquire({work!r}); print('locked', flush=True); time.sleep(120)"],
      cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {holder.pid} on "):
      workdir_lock.acquire(work)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # Its lock file is still there; the kernel dropped its lock.
  assert f"pid {holder.pid}" in open(os.path.join(work, workdir_lock.LOCK_NAME)).read()
  with workdir_lock.held(work):
    assert f"pid {os.getpid()}" in open(os.path.join(work, workdir_lock.LOCK_NAME)).read()
  with workdir_lock.held(work):  # released by the block before
    pass


# --- 5 and 6 end to end: a second run is refused, Ctrl-C saves and resumes exactly.

@pytest.mark.slow
def test_second_run_refused_then_ctrl_c_saves_and_resumes_exactly(ref, tmp_path):
  work = tmp_path / "w"
  first = run_main(work, *FLAGS, devices=8, wait=False)
  try:
    deadline = time.time() + 300
    while not (work / "metrics.jsonl").exists() or not n_rows(work):
      assert first.poll() is None and time.time() < deadline, first.communicate()[0]
      time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # holds the lock, makes no progress meanwhile
    second = run_main(work, *FLAGS, devices=8)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"{work} is in use by another run (pid {first.pid} on" in second.stderr
    assert "Model:" not in second.stderr and "Traceback" not in second.stderr
    first.send_signal(signal.SIGCONT)
    first.send_signal(signal.SIGINT)
    log, _ = first.communicate(timeout=300)
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
  assert first.returncode == 130, log[-3000:]
  assert "Traceback" not in log
  stop = checkpoint_steps(work)[-1]
  assert f"Stopped by Ctrl-C at step {stop}" in log
  assert stop < STEPS and max(losses(work)) == stop

  again = run_main(work, *FLAGS, devices=8)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"Resuming from step {stop}." in again.stderr
  got, expected = losses(work), losses(ref)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in got], [expected[s] for s in got], rtol=1e-6)


# --- 11. A full disk: a real tmpfs of a few MB in a user+mount namespace.

def _can_mount_tmpfs() -> bool:
  try:
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
         "mount -t tmpfs -o size=1m tmpfs /tmp"], capture_output=True, timeout=30
    ).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no unprivileged user+mount namespaces")
def test_full_disk_stops_at_the_failed_save_and_keeps_the_earlier_ones(ref, tmp_path):
  mnt, out = tmp_path / "mnt", tmp_path / "out"
  mnt.mkdir()
  cmd = [sys.executable, "main.py", f"--workdir={mnt}/w", *TINY["mae"], *FLAGS,
         "--config.num_train_steps=24"]
  # Inside the namespace: a 16 MB tmpfs holding a copy of the finished workdir,
  # filled up to 200 KB below full (room for logs, not for a 1.2 MB checkpoint);
  # the resumed run saves at step 20. What it left is copied out to be checked.
  script = (f"mount -t tmpfs -o size=16m tmpfs {mnt} && cp -a {ref} {mnt}/w && "
            f"(dd if=/dev/zero of={mnt}/fill bs=4k 2>/dev/null; true) && "
            f"truncate -s -200k {mnt}/fill && "
            f"{{ {' '.join(cmd)} 2>{tmp_path}/log; echo $? >{tmp_path}/rc; }}; "
            f"rm {mnt}/fill; cp -a {mnt} {out}")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                 cwd=ROOT, env=env, check=True, timeout=600)
  log = (tmp_path / "log").read_text()
  assert (tmp_path / "rc").read_text().strip() == "4", log[-3000:]
  errors = [l for l in log.splitlines() if "saving the checkpoint" in l]
  assert len(errors) == 1 and f"step 20 to {mnt}/w/checkpoints/20 failed" in errors[0], log
  assert "No space left on device" in errors[0] and "Traceback" not in log
  assert max(losses(out / "w")) < 24  # stopped at the failed save, not at the end
  # The earlier checkpoints are intact: every one restores.
  assert checkpoint_steps(out / "w")[-4:] == [4, 8, 12, 16]
  for step in (4, 8, 12, 16):
    step_dir = str(out / "w" / "checkpoints" / str(step))
    tree = ckpt_lib.ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, "state"))
    assert int(tree["step"]) == step


def test_saves_write_bounded_data_files_and_older_checkpoints_still_restore(
    tmp_path, monkeypatch):
  """A save holds at most one OCDBT data file in host memory (DATA_FILE_BYTES, not
  orbax's 2 GiB), and the checkpoints written before that change (StandardSave)
  still restore, in the same Checkpointer that then saves in the new way."""
  import jax
  import jax.numpy as jnp
  ocp = ckpt_lib.ocp
  state = {"w": jax.random.normal(jax.random.key(0), (6, 1 << 20)),  # 24 MB
           "step": jnp.int32(3)}
  old = ocp.CheckpointManager(str(tmp_path / "ck"), item_names=("state", "run"),
                              options=ocp.CheckpointManagerOptions(create=True))
  old.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      run=ocp.args.JsonSave({"objective": "mae"})))
  old.wait_until_finished()
  old.close()

  monkeypatch.setattr(ckpt_lib, "DATA_FILE_BYTES", 2 << 20)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=3, async_save=True)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored, saved = ckpt.restore(abstract, {"objective": "mae"})
  assert saved == {"objective": "mae"} and int(restored["step"]) == 3
  np.testing.assert_array_equal(restored["w"], state["w"])
  ckpt.save(4, {**restored, "step": jnp.int32(4)}, {"objective": "mae"})
  ckpt.close()

  def sizes(step):
    return sorted(f.stat().st_size for f in (tmp_path / "ck" / str(step) / "state").rglob("d/*"))
  assert sizes(3)[-1] > 16e6, sizes(3)  # orbax's default: the whole array in one file
  assert sum(s > 1e6 for s in sizes(4)) >= 8 and sizes(4)[-1] <= 3 << 20, sizes(4)
  again = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=3, async_save=False)
  restored, _ = again.restore(abstract, {"objective": "mae"})
  again.close()
  assert int(restored["step"]) == 4
  np.testing.assert_array_equal(restored["w"], state["w"])
