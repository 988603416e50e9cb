"""The sweep launcher (biovfm_jax/sweep/): definitions expanded into runs and
checked before anything runs, the command lines that give the same configs,
the emitted cluster jobs, and the tiny sweep end to end on CPU, interrupted
(SIGKILL, SIGTERM) and resumed."""
import collections
import copy
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from biovfm_jax import results as results_lib
from biovfm_jax.sweep import jobs, plan
from test_entry_points import assert_no_library_noise, user_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep(name):
  return plan.load_config_file(f"configs/sweeps/{name}.py")


def _parse(args, defaults=None):
  """A config file plus --config.* flags, parsed as main.py / evaluate.py parse them."""
  argv = ["binary", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
  for name in defaults or ():
    flags.DEFINE_string(name, None, "", flag_values=fv)
  fv(argv)
  return fv


def test_the_tiny_sweep_is_the_grid_with_its_overrides_applied():
  runs = plan.expand(_sweep("tiny"), root="/r")
  # Two seeds per grid point, the whole grid at seed 0 first.
  assert [r.name for r in runs] == [f"{m}-{o}-{d}-all-s{k}" for k in (0, 1)
                                    for m in ("w32", "w96") for o in ("mae", "dinov2")
                                    for d in ("mini", "mini_mr_ct")]
  by = {r.name: r for r in runs}
  mae, dino = by["w32-mae-mini-all-s0"], by["w96-dinov2-mini_mr_ct-all-s1"]
  assert mae.config_file == "configs/quickstart.py"
  assert dino.config_file == "configs/quickstart_dinov2.py"
  assert (mae.config.objective, dino.config.objective) == ("mae", "dinov2")
  assert (mae.config.model.width, dino.config.model.width) == (32, 96)
  assert (mae.config.seed, dino.config.seed) == (0, 1)
  assert mae.config.image_size == mae.config.data.image_size == 32  # the shared reference
  assert mae.config.mae.decoder_width == 32 and dino.config.dinov2.num_prototypes == 256
  # A short run's teacher: it must move away from its initialisation in 200 steps.
  assert dino.config.dinov2.teacher_momentum == 0.9 and dino.config.num_train_steps == 200
  assert mae.config.data.mixture.weights == "" and dino.config.data.mixture.weights == "MR:1,CT:1"
  assert not mae.config.evals and not dino.config.evals  # the sweep scores the last step
  assert dino.labels == {"model_size": "w96", "objective": "dinov2",
                         "data_subset": "mini_mr_ct", "modality_subset": "all"}
  for run in (mae, dino):
    e = run.eval_config
    assert (e.protocol, e.benchmarks, e.image_size) == ("knn", "anatomy,mini", 64)
    assert (e.results.run, e.results.model_size, e.results.data_subset,
            e.results.modality_subset, e.results.finished_only) == (
                run.name, run.label("model_size"), run.label("data_subset"), "all", True)
  assert plan.paths("/r", dino)["workdir"] == "/r/runs/w96-dinov2-mini_mr_ct-all-s1"


@pytest.mark.parametrize("name", ["w32-mae-mini-all-s0", "w96-dinov2-mini_mr_ct-all-s1"])
def test_the_commands_give_the_in_process_configs(name):
  """The main.py / evaluate.py flags a run emits (subprocess mode, jobs, --dry_run)
  parse back into exactly the configs the in-process runs use."""
  (run,) = [r for r in plan.expand(_sweep("tiny"), root="/r") if r.name == name]
  train = _parse(plan.train_args("/r", run), defaults=["workdir"])
  assert train.config.to_dict() == run.config.to_dict()
  assert train.workdir == "/r/runs/" + name
  args = plan.eval_args("/r", run, "/r/results.csv")
  ev = _parse(args, defaults=["checkpoint", "out_dir", "results"])
  assert ev.config.to_dict() == run.eval_config.to_dict()
  assert (ev.checkpoint, ev.out_dir, ev.results) == (
      "/r/runs/" + name, "/r/evals/" + name, "/r/results.csv")


def test_the_study_grid_names_its_configs_and_data_under_the_data_root():
  sweep = _sweep("biovfm21m")
  with pytest.raises(plan.SweepError, match=r"uses \{data_root\}: pass --sweep.data_root=DIR"):
    plan.expand(sweep, root="/r")
  sweep.data_root = "/data/c"
  runs = plan.expand(sweep, root="/r")
  # 4 sizes x 2 objectives x (3 data x 2 mixtures - ultrasound-only balanced)
  assert len(runs) == 4 * 2 * 5 and len({r.name for r in runs}) == len(runs)
  by = {r.name: r for r in runs}
  r = by["L-dinov2-0.2M-balanced"]
  assert r.config_file == "configs/vit_l_dinov2.py" and r.config.model.size == "L"
  assert r.config.dinov2.centering == "sinkhorn_knopp"  # L's own recipe, from its file
  assert r.config.data.shards == "/data/c/subsets/0.2M.subset.json"
  assert "ultrasound:1" in r.config.data.mixture.weights
  assert by["T-mae-all-all"].config.data.shards == "/data/c"
  assert by["T-mae-all-all"].config.batch_size == 4096
  assert "T-mae-us_only-balanced" not in by
  e = r.eval_config
  assert (e.protocol, e.benchmarks, e.image_size, e.download) == ("fast", "all", 224, True)


def _tiny_with(axis, label, overrides):
  s = _sweep("tiny")
  axes = [list(a) for a in s.axes]
  for a in axes:
    if a[0] == axis:
      a[1] = dict(a[1])
      a[1][label] = {**a[1][label], **overrides}
  s.axes = tuple(tuple(a) for a in axes)
  return s


@pytest.mark.parametrize("axis, label, overrides, message", [
    ("model_size", "w32", {"model.widht": 8},
     r"sweep tiny: axis 'model_size' value 'w32' \(configs/quickstart.py\): no config key "
     r"'model.widht' \(model has no 'widht'\)"),
    ("objective", "dinov2", {"mae.mask_ratio": 0.5},
     r"axis 'objective' value 'dinov2' \(configs/quickstart_dinov2.py\): no config key "
     r"'mae.mask_ratio'$"),
    ("data_subset", "mini", {"eval.probe.epoch": 3},
     r"axis 'data_subset' value 'mini' \(evaluation config\): no config key 'probe.epoch'"),
    ("model_size", "w96", {"model.width": "wide"},
     r"axis 'model_size' value 'w96' \(configs/quickstart.py\): model.width='wide'"),
    ("objective", "mae", {"config": "configs/nope.py"}, r"no config file 'configs/nope.py'"),
    ("data_subset", "mini", {"data.shards": "{corpus}/x"}, r"\{corpus\} is not known"),
])
def test_bad_overrides_are_named_before_anything_runs(axis, label, overrides, message):
  with pytest.raises(plan.SweepError, match=message) as e:
    plan.expand(_tiny_with(axis, label, overrides), root="/r")
  assert "\n" not in str(e.value)


def test_bad_sweep_shapes_are_named():
  s = _sweep("tiny")
  s.axes = ()
  with pytest.raises(plan.SweepError, match="axes is empty"):
    plan.expand(s)
  s = _sweep("tiny")
  s.axes = s.axes + (("objective", {"x": {}}),)
  with pytest.raises(plan.SweepError, match="axis name 'objective' is not a unique word"):
    plan.expand(s)
  s = _sweep("tiny")
  s.axes = (("model_size", {"a b": {}}),)
  with pytest.raises(plan.SweepError, match="label 'a b'"):
    plan.expand(s)
  s = _sweep("tiny")
  s.exclude = ({"objective": "byol"},)
  with pytest.raises(plan.SweepError, match="exclude: no axis 'objective' with label 'byol'"):
    plan.expand(s)
  s = _sweep("tiny")
  s.overrides.optim.warmup_epoch = 0
  with pytest.raises(plan.SweepError, match=r"^sweep tiny.overrides \(configs/quickstart.py\): "
                                            r"no config key 'optim.warmup_epoch'"):
    plan.expand(s)


def test_emitted_jobs_run_main_then_evaluate_through_the_launch_scripts(tmp_path):
  sweep = _sweep("tiny")
  runs = plan.expand(sweep, root="/shared/sw")
  lines = jobs.emit(sweep, runs, "/shared/sw", "slurm", "/shared/sw/results.csv")
  assert len(lines) == 16
  cmd = shlex.split(lines[5])
  run = runs[5]
  assert cmd[:4] == ["launch/slurm.sh", f"--job-name=tiny-{run.name}",
                     "--log-dir=/shared/sw/logs", "--nodes=1"]
  # The script itself, in --dry-run, writes a batch script running both binaries.
  r = subprocess.run(["bash", cmd[0], "--dry-run", *cmd[1:]], cwd=ROOT, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  sruns = [shlex.split(l) for l in r.stdout.splitlines() if l.startswith("srun ")]
  (main_srun,), (eval_srun,) = ([s for s in sruns if b in s] for b in ("main.py", "evaluate.py"))
  assert main_srun[main_srun.index("main.py") + 1:] == plan.train_args("/shared/sw", run)
  assert eval_srun[eval_srun.index("evaluate.py") + 1:] == plan.eval_args(
      "/shared/sw", run, "/shared/sw/results.csv")
  assert "--nodes=1" in eval_srun and "--ntasks=1" in eval_srun
  assert "--config.results.finished_only=True" in eval_srun
  pod = shlex.split(jobs.emit(sweep, runs, "gs://b/sw", "tpu_pod", "unused")[7])
  assert pod[:2] == ["launch/tpu_pod.sh", "--name=tiny-w96-dinov2-mini-mr-ct-all-s0"]
  assert "--accelerator=v4-8" in pod and pod.index("--then-evaluate") > pod.index("--")
  assert "--results=gs://b/sw/evals/w96-dinov2-mini_mr_ct-all-s0/results.csv" in pod


def test_the_tpu_pod_start_command_chains_evaluate_after_main(tmp_path):
  """The remote start command with --then-evaluate, run here against a stub
  python: main.py runs, its pid file names it, then evaluate.py with its flags."""
  r = subprocess.run(
      ["bash", "launch/tpu_pod.sh", "--name=t", "--zone=z", "--skip-create", "--skip-setup",
       "--dry-run", "--", "--config=c.py", "--workdir=gs://b/r x", "--then-evaluate",
       "--config=e.py", "--results=gs://b/r x/results.csv"], cwd=ROOT, capture_output=True,
      text=True, timeout=60, check=True)
  (start,) = [shlex.split(l) for l in r.stdout.splitlines() if l]
  remote = [a for a in start if a.startswith("--command=")][0][len("--command="):]
  (tmp_path / "biovfm-jax").mkdir()
  (tmp_path / "biovfm-venv" / "bin").mkdir(parents=True)
  stub = tmp_path / "biovfm-venv" / "bin" / "python"
  stub.write_text('#!/usr/bin/env bash\necho "$$ $*" >> "$HOME/calls"\n')
  stub.chmod(0o755)
  subprocess.run(["bash", "-c", remote], env=dict(os.environ, HOME=str(tmp_path)), check=True,
                 timeout=30)
  calls = tmp_path / "calls"
  for _ in range(200):  # the chain runs in the background
    if calls.exists() and len(calls.read_text().splitlines()) == 2:
      break
    time.sleep(0.05)
  (main_call, eval_call) = calls.read_text().splitlines()
  assert main_call.split(" ", 1)[1] == "main.py --config=c.py --workdir=gs://b/r x --distributed=on"
  assert eval_call.split(" ", 1)[1] == "evaluate.py --config=e.py --results=gs://b/r x/results.csv"
  assert (tmp_path / "biovfm-logs" / "main.pid").read_text().strip() == main_call.split()[0]


def test_dry_run_prints_the_plan_and_a_bad_flag_is_one_line(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  base = [sys.executable, "-m", "biovfm_jax.sweep", "--sweep=configs/sweeps/tiny.py",
          f"--root={tmp_path / 'r'}"]
  r = subprocess.run(base + ["--dry_run", "--only=w32-mae-mini-all-s0,w96-dinov2-mini-all-s1"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  heads = [l for l in r.stdout.splitlines() if not l.startswith(" ")]
  assert heads == ["w32-mae-mini-all-s0 [pending]", "w96-dinov2-mini-all-s1 [pending]"]
  assert f"  train: python main.py --config=configs/quickstart.py --workdir={tmp_path}/r/runs/" \
         "w32-mae-mini-all-s0" in r.stdout
  assert "'--config.evals={}'" in r.stdout  # an emptied dict, as config_flags reads it back
  assert "--config.results.run=w96-dinov2-mini-all-s1" in r.stdout
  assert not (tmp_path / "r").exists()  # a plan writes nothing
  bad = subprocess.run(base + ["--dry_run", "--sweep.overrides.model.widht=3"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "widht" in bad.stderr and "Traceback" not in bad.stderr
  bad = subprocess.run(base + ["--dry_run", "--only=nope"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "--only: no run named 'nope'" in bad.stderr


@pytest.mark.slow
def test_the_tiny_sweep_survives_sigkill_and_sigterm(tiny_sweep_root):
  """Killed (SIGKILL) in its 2nd run and stopped (SIGTERM) later, the sweep
  completes: finished runs are neither redone nor rewritten, the interrupted
  ones resume, and the store has one set of rows per run."""
  root = tiny_sweep_root
  facts = json.load(open(os.path.join(os.path.dirname(root), "interruptions.json")))
  names = [r.name for r in plan.expand(_tiny_seeds(1), root=root)]
  states = {n: json.load(open(os.path.join(root, "state", f"{n}.json"))) for n in names}
  assert all(s["status"] == "done" for s in states.values())
  assert facts["done_before_kill"] == [names[0]] and facts["killed"] == [names[1]]
  assert facts["sigterm_exit"] == 143
  interrupted = set(facts["killed"]) | set(facts["stopped"])
  assert len(facts["done_before_stop"]) >= 3
  for n in names:
    assert states[n]["attempts"] == (2 if n in interrupted else 1), (n, states[n])
  # Finished before the kill: not one file of its workdir or eval rewritten.
  now = {p: os.stat(p).st_mtime_ns for p in facts["mtimes"]}
  assert now == facts["mtimes"] and any("/checkpoints/10/" in p for p in now)
  killed_log = open(states[names[1]]["log"]).read()
  assert killed_log.count(f"==== {names[1]}: attempt") == 2
  # One set of rows per run, every column filled as the store defines it.
  frame = results_lib.read(os.path.join(root, "results.csv"))
  assert open(os.path.join(root, "results.csv")).read().count("run,objective,") == 1
  counts = collections.Counter(zip(frame["run"], frame["benchmark"], frame["metric"]))
  assert counts == {(n, b, m): 1 for n in names for b in ("mni_anatomy", "mini_modality")
                    for m in ("auc", "acc")}
  row = frame[(frame["run"] == "w32-dinov2-mini_mr_ct-all") & (frame["metric"] == "auc")
              & (frame["benchmark"] == "mni_anatomy")].iloc[0]
  assert (row.objective, row.model_size, row.data_subset, row.modality_subset, row.protocol,
          row.step, row.images_seen) == (
              "dinov2", "w32", "mini_mr_ct", "all", "knn", 10, 10 * 32)
  assert row.params_total > row.params_encoder > 0 and row.train_flops > 0
  assert row.checkpoint == os.path.join(root, "runs", row.run, "checkpoints", "10")
  assert 0.5 < row.value <= 1
  report = json.load(open(os.path.join(root, "evals", row.run, "report.json")))
  assert report["results"]["mni_anatomy"]["auc"] == pytest.approx(row.value, abs=1e-12)
  mae = frame[frame["objective"] == "mae"]
  assert (mae["params_total"] > mae["params_encoder"]).all()  # the decoder counts


def test_state_progress_line_counts_and_eta(tmp_path):
  from biovfm_jax.sweep import state
  states = [state.RunState(str(tmp_path), f"r{i}") for i in range(5)]
  for st, (status, secs) in zip(states, [("done", 60), ("done", 120), ("failed", 5),
                                         ("running", 0), ("pending", 0)]):
    st.save(status=status, seconds=secs)
  line = state.progress_line([state.RunState(str(tmp_path), f"r{i}") for i in range(5)], "s")
  assert line == ("sweep s: 2/5 done, 1 running, 1 failed, 1 pending; "
                  "ETA 3m00s (1m30s per run)")


def test_a_failed_run_is_reported_and_retried_only_on_request(tmp_path, caplog):
  """In-process launcher on a plan whose runs fail at once (a missing shards
  folder): state, error line and log path; a rerun skips them, --retry_failed
  not, and counts the runs that wait their turn as pending, not failed."""
  from biovfm_jax.sweep import local
  sweep = _sweep("tiny")
  sweep.seeds = 1
  sweep.axes = (sweep.axes[1][:1] + ({"mae": sweep.axes[1][1]["mae"]},),
                ("data_subset", {"gone": {"data.shards": str(tmp_path / "gone")},
                                 "gone2": {"data.shards": str(tmp_path / "gone2")}}))
  runs = plan.expand(sweep, root=str(tmp_path))
  launcher = lambda **kw: local.Launcher("tiny", copy.deepcopy(runs), str(tmp_path / "r"),
                                         results=str(tmp_path / "r" / "results.csv"), **kw)
  assert launcher().run_all() == local.EXIT_FAILED
  st = json.load(open(tmp_path / "r" / "state" / "mae-gone.json"))
  assert (st["status"], st["attempts"]) == ("failed", 1)
  assert "config.data.shards" in st["error"] and "does not exist" in st["error"]
  assert "Traceback" in open(st["log"]).read()
  assert launcher().run_all() == local.EXIT_FAILED
  assert json.load(open(tmp_path / "r" / "state" / "mae-gone.json"))["attempts"] == 1
  caplog.set_level("INFO", logger="biovfm_jax.sweep")
  assert launcher(retry_failed=True).run_all() == local.EXIT_FAILED
  assert json.load(open(tmp_path / "r" / "state" / "mae-gone.json"))["attempts"] == 2
  progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sweep ")]
  assert progress[:2] == ["sweep tiny: 0/2 done, 0 running, 0 failed, 2 pending",
                          "sweep tiny: 0/2 done, 1 running, 0 failed, 1 pending"]
  assert progress[-1] == "sweep tiny: 0/2 done, 0 running, 2 failed, 0 pending"
  assert not (tmp_path / "r" / "results.csv").exists()


def test_one_launcher_per_root(tmp_path):
  from biovfm_jax.sweep import local
  from biovfm_jax.train import workdir_lock
  runs = plan.expand(_sweep("tiny"), root=str(tmp_path))[:1]
  with workdir_lock.held(str(tmp_path)):
    with pytest.raises(plan.SweepError, match="is held by another launcher"):
      local.Launcher("tiny", runs, str(tmp_path), results=str(tmp_path / "x.csv")).run_all()


@pytest.mark.slow
def test_isolated_runs_give_the_in_process_results(tiny_sweep_root, tmp_path):
  """--isolate runs main.py and evaluate.py with the emitted flags: the same
  run scores exactly what the in-process sweep scored."""
  env = user_env(XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                          "--xla_backend_optimization_level=0")  # as tiny_sweep_root's
  from conftest import TINY_SWEEP_FLAGS
  name = "w32-mae-mini-all"
  r = subprocess.run([sys.executable, "-m", "biovfm_jax.sweep", "--isolate", f"--only={name}",
                      "--sweep=configs/sweeps/tiny.py", f"--root={tmp_path}", *TINY_SWEEP_FLAGS],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  log = open(tmp_path / "logs" / f"{name}.log").read()
  assert_no_library_noise(r.stdout + r.stderr + log, "sweep --isolate")
  assert f"+ {sys.executable} main.py --config=configs/quickstart.py" in log
  assert f"+ {sys.executable} evaluate.py --config=configs/eval/mini.py" in log
  mine = results_lib.read(tmp_path / "results.csv", strict=True)
  theirs = results_lib.read(os.path.join(tiny_sweep_root, "results.csv"))
  theirs = theirs[theirs["run"] == name]
  assert list(mine["value"]) == list(theirs["value"])
  assert list(mine["params_total"]) == list(theirs["params_total"])
  assert json.load(open(tmp_path / "state" / f"{name}.json"))["status"] == "done"


@pytest.mark.slow
def test_the_analysis_fits_the_sweep_results(tiny_sweep_root, tmp_path, capsys):
  """`python -m biovfm_jax.analysis fit` on the tiny sweep's store: one fit per
  objective, data subset and benchmark over the two model sizes, flagged as
  such; the axis effects; the CSVs and plots. And the runs that differ only in
  their data score differently (the evaluated backbone moved, DINOv2's EMA
  teacher included: at 3 steps and momentum 0.992 they were bit-identical)."""
  import pandas as pd
  from biovfm_jax.analysis import __main__ as cli
  store = results_lib.read(os.path.join(tiny_sweep_root, "results.csv"))
  auc = store[store["metric"] == "auc"]  # (an ACC can tie: 273 of 303 right, both)
  for (objective, size, bench), g in auc.groupby(["objective", "model_size", "benchmark"]):
    values = dict(zip(g["data_subset"], g["value"]))
    assert values["mini"] != values["mini_mr_ct"], (objective, size, bench, values)
  out = tmp_path / "fit"
  cli.main(["fit", f"--results={os.path.join(tiny_sweep_root, 'results.csv')}",
            f"--out={out}"])
  printed = capsys.readouterr().out
  slopes = pd.read_csv(out / "slopes.csv", keep_default_na=False)
  assert sorted(zip(slopes["objective"], slopes["data_subset"], slopes["benchmark"])) == [
      (o, d, b) for o in ("dinov2", "mae") for d in ("mini", "mini_mr_ct")
      for b in ("mini_modality", "mni_anatomy")]
  # (no "mean" row: the mean is over MedMNIST benchmarks, and these are not)
  assert (slopes["n_points"] == 2).all()
  # Two sizes, one seed: every slope says so, none is shown as a result.
  assert all(f.startswith("fewer than 3 sizes") and "no measurable effect" in f
             for f in slopes["flag"])
  assert "warning: fewer than 3 sizes" in printed
  # A line through two points: b is their log-log slope.
  for s in slopes.itertuples():
    pts = auc[(auc["objective"] == s.objective) & (auc["data_subset"] == s.data_subset)
              & (auc["benchmark"] == s.benchmark)].sort_values("params_total")
    x, y = np.log(pts["params_total"].astype(float)), np.log(100 * pts["value"])
    assert float(s.b) == pytest.approx((y.iloc[1] - y.iloc[0]) / (x.iloc[1] - x.iloc[0]),
                                       rel=1e-6)
  effects = pd.read_csv(out / "effects.csv")
  assert set(effects["axis"]) == {"model_size", "objective", "data_subset"}
  size = effects[(effects["axis"] == "model_size") & (effects["benchmark"] == "mni_anatomy")]
  assert (size["level_a"].iloc[0], size["level_b"].iloc[0], size["n_contexts"].iloc[0]) == (
      "w32", "w96", 4)
  assert "Axis effects on AUC" in printed
  for name in ("factors.csv", "correlations.csv", "curves.png", "slopes.png"):
    assert (out / name).stat().st_size > 0, name


# --- repeated runs (seeds) ----------------------------------------------------------

def _tiny_seeds(seeds):
  sweep = _sweep("tiny")
  sweep.seeds = seeds  # whatever the definition's own default
  return sweep


def test_seeds_repeat_each_grid_point_with_its_own_seed():
  one = plan.expand(_tiny_seeds(1), root="/r")
  sweep = _tiny_seeds(3)
  runs = plan.expand(sweep, root="/r")
  assert len(runs) == 3 * len(one)
  # Seed-major: the whole grid at seed 0 first.
  assert [r.name for r in runs] == [f"{r.name}-s{k}" for k in range(3) for r in one]
  for k, base in ((0, one[0]), (2, one[-1])):
    (run,) = [r for r in runs if r.name == f"{base.name}-s{k}"]
    assert run.labels == base.labels and run.overrides == {**base.overrides, "seed": k}
    assert run.config.seed == k and run.eval_config.results.run == run.name
    assert run.eval_config.results.model_size == base.label("model_size")
    train = _parse(plan.train_args("/r", run), defaults=["workdir"])
    assert train.config.to_dict() == run.config.to_dict()
  (cmd,) = [c for c in jobs.emit(sweep, runs, "/r", "slurm", "/r/results.csv")
            if f"--config.results.run={one[1].name}-s1" in c]
  assert "--config.seed=1" in shlex.split(cmd)
  assert f"--job-name=tiny-{one[1].name}-s1" in shlex.split(cmd)
  # One seed: the grid's own names ("-".join of the labels), no seed override.
  assert [r.name for r in one] == ["-".join(r.labels.values()) for r in one]
  assert all("seed" not in r.overrides for r in one)


def test_bad_seeds_are_one_line():
  for bad in (0, -2):
    with pytest.raises(plan.SweepError, match=rf"^sweep tiny: seeds={bad}: .*positive") as e:
      plan.expand(_tiny_seeds(bad), root="/r")
    assert "\n" not in str(e.value)
  sweep = _tiny_seeds(2)
  sweep.overrides.seed = 7  # and a seed of its own: ambiguous
  with pytest.raises(plan.SweepError, match="sets seed, and seeds=2"):
    plan.expand(sweep, root="/r")


def test_dry_run_with_seeds_and_a_bad_seeds_flag(tmp_path):
  first = plan.expand(_tiny_seeds(1), root="/r")[0].name
  env = dict(os.environ, PYTHONPATH=ROOT)
  base = [sys.executable, "-m", "biovfm_jax.sweep", "--sweep=configs/sweeps/tiny.py",
          f"--root={tmp_path / 'r'}", "--dry_run"]
  r = subprocess.run(base + ["--seeds=2", f"--only={first}-s0,{first}-s1"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  heads = [l for l in r.stdout.splitlines() if not l.startswith(" ")]
  assert heads == [f"{first}-s0 [pending]", f"{first}-s1 [pending]"]
  assert "  seed = 1" in r.stdout and "--config.seed=1" in r.stdout
  assert f"--config.results.run={first}-s1" in r.stdout
  # --seeds=1 overrides the definition's seeds: the grid's names, no seed flag.
  r = subprocess.run(base + ["--seeds=1", f"--only={first}"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.splitlines()[0] == f"{first} [pending]" and "--config.seed" not in r.stdout
  bad = subprocess.run(base + ["--seeds=0"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  lines = [l for l in bad.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "--seeds=0: the number of runs per grid point" in lines[0], lines
