"""User paths are expanded once, where flags and config fields enter: no './~'
folder, a relative --workdir trains, saves and resumes, and a run writes only
into its workdir and the documented cache directory."""
import os
import subprocess
import sys

import pytest

from biovfm_jax.evaluate import runner
from configs import quickstart
from configs.eval import common as eval_common
from data_pipeline import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_expand(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  assert storage.expand("~/.cache/x") == f"{tmp_path}/home/.cache/x"
  assert storage.expand("runs/exp1") == f"{tmp_path}/runs/exp1"
  assert storage.expand("gs://bucket/~/run") == "gs://bucket/~/run"
  assert storage.expand("") == "" and storage.expand(None) is None
  assert storage.expand_list("mini, a/*.array_record,gs://b/s") == (
      f"mini,{tmp_path}/a/*.array_record,gs://b/s")


def test_configs_expand_their_path_fields(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.delenv("BIOVFM_DATA", raising=False)
  monkeypatch.chdir(tmp_path)
  c = quickstart.get_config()
  c.lock()  # as main.py gets it from config_flags
  c.init_from, c.data.cache_dir, c.data.shards = "~/imported", "cache", "mini,shards/"
  from configs import common
  common.expand_paths(c)
  assert c.init_from == f"{tmp_path}/home/imported"
  assert c.data.cache_dir == f"{tmp_path}/cache"
  assert c.data.shards == f"mini,{tmp_path}/shards"
  e = eval_common.get_config("knn")
  e.checkpoint, e.out_dir = "run", "~/eval"
  runner.expand_paths(e)
  assert e.data_dir == f"{tmp_path}/home/.cache/biovfm_jax/tfds"  # was a literal '~/...'
  assert e.npz_dir == f"{tmp_path}/home/.cache/biovfm_jax/medmnist"
  assert (e.checkpoint, e.out_dir) == (f"{tmp_path}/run", f"{tmp_path}/home/eval")
  from biovfm_jax.evaluate.during_training import Evaluator
  ev = Evaluator("knn_mini", c.evals.knn_mini)
  assert ev.config.data_dir == f"{tmp_path}/home/.cache/biovfm_jax/tfds"


def _tree(root) -> set[str]:
  return {os.path.relpath(os.path.join(d, n), root)
          for d, dirs, files in os.walk(root) for n in dirs + files}


@pytest.mark.slow
def test_quickstart_from_an_empty_cwd_with_a_relative_workdir(tmp_path):
  """cwd stays empty (the in-training evaluator's cache went to './~' before);
  a relative --workdir (orbax refused it at the first save) trains, saves, resumes;
  nothing is written outside the workdir and ~/.cache/biovfm_jax."""
  sys.path.insert(0, os.path.dirname(__file__))
  from test_train_e2e import NO_EVALS, TINY
  cwd, home, tmp = tmp_path / "cwd", tmp_path / "home", tmp_path / "tmp"
  for d in (cwd, home, tmp):
    d.mkdir()
  env = {k: v for k, v in os.environ.items() if not k.startswith("BIOVFM_")}
  env.update(HOME=str(home), TMPDIR=str(tmp), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")

  def run(steps):
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--workdir=../work",
           f"--config={ROOT}/configs/quickstart.py", *[f for f in TINY["mae"][1:] if f != NO_EVALS],
           f"--config.num_train_steps={steps}",
           "--config.checkpoint.every_steps=2", "--config.evals.knn_mini.every_steps=2",
           "--config.evals.knn_mini.image_size=28", "--config.evals.knn_mini.benchmarks=mini",
           "--config.evals.knn_mini.at_start=False"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)

  r = run(2)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "eval knn_mini" in r.stderr
  assert os.listdir(cwd) == []
  assert sorted(os.listdir(tmp_path)) == ["cwd", "home", "tmp", "work"]
  assert {p.split(os.sep)[0] for p in _tree(home)} == {".cache"}
  assert os.listdir(home / ".cache") == ["biovfm_jax"]
  assert sorted(os.listdir(tmp_path / "work" / "checkpoints")) == ["2"]
  r = run(4)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Resuming from step 2" in r.stderr
  assert sorted(os.listdir(tmp_path / "work" / "checkpoints")) == ["2", "4"]
  assert os.listdir(cwd) == []
