"""What a sweep would run, as text: the plan (--dry_run) and one cluster job
per run (--emit=slurm|tpu_pod), each job running main.py then evaluate.py
--results through launch/slurm.sh or launch/tpu_pod.sh."""
from __future__ import annotations

import re
import shlex

from biovfm_jax.sweep import plan as plan_lib
from biovfm_jax.sweep import state as state_lib
from data_pipeline import storage

SCRIPTS = {"slurm": "launch/slurm.sh", "tpu_pod": "launch/tpu_pod.sh"}


def describe(runs: list[plan_lib.Run], root: str, results: str) -> str:
  """Each run's state, config file, overrides and its two commands."""
  lines = []
  for run in runs:
    status = "pending" if storage.is_remote(root) else state_lib.RunState(root, run.name).status
    lines.append(f"{run.name} [{status}]")
    lines.append(f"  config: {run.config_file}   eval config: {run.eval_file}")
    lines += [f"  {k} = {v!r}" for k, v in run.overrides.items()]
    lines += [f"  eval.{k} = {v!r}" for k, v in run.eval_overrides.items()]
    lines.append("  train: " + shlex.join(["python", "main.py",
                                           *plan_lib.train_args(root, run)]))
    lines.append("  eval:  " + shlex.join(["python", "evaluate.py",
                                           *plan_lib.eval_args(root, run, results)]))
  return "\n".join(lines)


def job_name(sweep: str, run: plan_lib.Run, kind: str) -> str:
  """A name the scheduler takes: TPU names are lower-case letters, digits, '-'."""
  name = f"{sweep}-{run.name}" if sweep else run.name
  if kind == "tpu_pod":
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:60]
  return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def results_path(root: str, run: plan_lib.Run, kind: str, results: str) -> str:
  """slurm jobs share the store (a shared file system has flock); a pod's
  workers write to a bucket, which has no locks: one store per run there
  (results.read takes the glob <root>/evals/*/results.csv)."""
  if kind == "tpu_pod":
    return storage.join(plan_lib.paths(root, run)["eval_dir"], "results.csv")
  return results


def emit(sweep, runs: list[plan_lib.Run], root: str, kind: str, results: str) -> list[str]:
  """One shell command per run."""
  extra = list(sweep.emit[kind])
  out = []
  for run in runs:
    head = [SCRIPTS[kind]]
    if kind == "slurm":
      head.append(f"--job-name={job_name(sweep.name, run, kind)}")
      if not any(a.startswith("--log-dir=") for a in extra):
        head.append(f"--log-dir={storage.join(root, 'logs')}")
    else:
      head.append(f"--name={job_name(sweep.name, run, kind)}")
    out.append(shlex.join(
        head + extra + ["--", *plan_lib.train_args(root, run), "--then-evaluate",
                        *plan_lib.eval_args(root, run, results_path(root, run, kind, results))]))
  return out
