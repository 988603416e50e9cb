"""Runs a sweep's grid on this machine, one run after another: each pretrains
into <root>/runs/<name>, then its final checkpoint is evaluated into
<root>/evals/<name> and appended to the results store; state files and the
progress line say where the grid stands.

In-process by default (the train loop and the eval runner called directly, no
interpreter and TensorFlow start per run); isolate=True runs main.py and
evaluate.py as subprocesses instead. Either way a run's output goes to
<root>/logs/<name>.log.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import shlex
import signal
import subprocess
import sys
import traceback

from biovfm_jax import console
from biovfm_jax import results as results_lib
from biovfm_jax.sweep import plan as plan_lib
from biovfm_jax.sweep import state as state_lib
from data_pipeline import storage

log = logging.getLogger("biovfm_jax.sweep")
EXIT_FAILED, EXIT_SIGINT, EXIT_SIGTERM = 1, 130, 143


class Stopped(Exception):
  """Ctrl-C or SIGTERM: the current run stopped at a step boundary (or its
  evaluation was cut short); it stays "running", to resume."""

  def __init__(self, code: int):
    super().__init__(code)
    self.code = code


class RunFailed(Exception):
  """One run failed; the message is its one line."""


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _finished(workdir: str) -> tuple[str, int, int | None]:
  """(latest step dir, its step, the run's total steps)."""
  from biovfm_jax.train import checkpoint as ckpt_lib
  step_dir = ckpt_lib.find_step_dir(workdir)
  step, total = ckpt_lib.progress(step_dir)
  return step_dir, step, total


def _has_rows(results: str, run: str, checkpoint: str) -> bool:
  """The results store already holds this run's rows for this checkpoint (its
  evaluation finished, but the launcher stopped before noting it)."""
  if not os.path.exists(results) or not os.path.getsize(results):
    return False
  frame = results_lib.read(results)
  return bool(((frame["run"] == run) & (frame["checkpoint"] == checkpoint)).any())


class _RunLog:
  """A run's log file: its log records (and stdout, e.g. the report table) go
  there; the console keeps the sweep's lines and the runs' warnings."""

  def __init__(self, path: str):
    self.path = path

  def __enter__(self):
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    self.file = open(self.path, "a", buffering=1)
    root = logging.getLogger()
    self.handler = logging.StreamHandler(self.file)
    self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s",
                                                "%H:%M:%S"))
    self.handler.addFilter(console.quiet_libraries)  # orbax's thread joins and the like
    self.level = root.level
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    root.addHandler(self.handler)
    self.console = [h for h in root.handlers if h is not self.handler]
    for h in self.console:
      h.addFilter(_console_filter)
    self.stdout = contextlib.redirect_stdout(self.file)
    self.stdout.__enter__()
    return self

  def __exit__(self, *exc):
    self.stdout.__exit__(*exc)
    root = logging.getLogger()
    root.removeHandler(self.handler)
    root.setLevel(self.level)
    for h in self.console:
      h.removeFilter(_console_filter)
    self.file.close()
    return False


def _console_filter(record) -> bool:
  return record.levelno >= logging.WARNING or record.name == log.name


class Launcher:
  """The local mode of the launcher (biovfm_jax/sweep/__main__.py)."""

  def __init__(self, sweep_name: str, runs: list[plan_lib.Run], root: str, *,
               results: str, retry_failed: bool = False, isolate: bool = False,
               compilation_cache: str = ""):
    self.sweep, self.runs, self.root = sweep_name, runs, root
    self.results, self.retry_failed, self.isolate = results, retry_failed, isolate
    # Runs that differ only in their data (the data and modality axes) compile the
    # same programs: jax's persistent cache compiles each once.
    self.compilation_cache = compilation_cache
    self.states = {r.name: state_lib.RunState(root, r.name) for r in runs}

  def progress(self) -> None:
    log.info("%s", state_lib.progress_line(list(self.states.values()), self.sweep))

  def run_all(self) -> int:
    """Runs every run not done; returns the exit code (0: all done, 1: some
    failed, 130/143: stopped by Ctrl-C/SIGTERM, resumable)."""
    from biovfm_jax.train import workdir_lock
    if storage.is_remote(self.root):
      raise plan_lib.SweepError(f"--root={self.root}: the local mode needs a local root "
                                "(state files and results store); --emit for clusters")
    try:
      with workdir_lock.held(self.root), _sigterm_raises():
        return self._run_all()
    except workdir_lock.WorkdirBusy as e:
      raise plan_lib.SweepError(f"sweep root {self.root} is held by another launcher: "
                                f"{e}") from None

  def _run_all(self) -> int:
    if self.compilation_cache:
      import jax
      jax.config.update("jax_compilation_cache_dir", self.compilation_cache)
    for st in self.states.values():
      if not os.path.exists(st.path):
        st.save()  # pending
    failed_before = [n for n, st in self.states.items() if st.status == "failed"]
    if self.retry_failed:  # queued again: pending until their turn, not failed
      for name in failed_before:
        self.states[name].save(status="pending")
    skipped = [] if self.retry_failed else failed_before
    for name in skipped:
      st = self.states[name]
      log.info("%s failed before (%s; log %s): skipped, --retry_failed reruns it", name,
               st.doc["error"], st.log)
    self.progress()
    for run in self.runs:
      st = self.states[run.name]
      if st.status == "done" or run.name in skipped:
        continue
      try:
        self._attempt(run, st)
      except Stopped as e:
        self.progress()
        log.info("Stopped; %s stays resumable: run the same command again.", run.name)
        return e.code
      self.progress()
    failed = [st for st in self.states.values() if st.status == "failed"]
    for st in failed:
      log.info("FAILED %s: %s (log %s)", st.name, st.doc["error"], st.log)
    return EXIT_FAILED if failed else 0

  def _attempt(self, run: plan_lib.Run, st: state_lib.RunState) -> None:
    st.start()
    log.info("%s: attempt %d (log %s)", run.name, st.doc["attempts"], st.log)
    self.progress()
    with _RunLog(st.log) as run_log:
      print(f"==== {run.name}: attempt {st.doc['attempts']} at {results_lib.now()} ====")
      try:
        if self.isolate:
          self._subprocesses(run, run_log)
        else:
          self._in_process(run)
      except Stopped:
        st.stopped()
        raise
      except KeyboardInterrupt:
        st.stopped()
        raise Stopped(EXIT_SIGINT) from None
      except Exception as e:  # pylint: disable=broad-exception-caught
        error = str(e) if isinstance(e, RunFailed) else _one_line(e)
        traceback.print_exc(file=run_log.file)
        st.failed(error)
        log.warning("%s failed: %s (log %s)", run.name, error, st.log)
        return
    st.done()
    log.info("%s: done in %.0f s", run.name, st.doc["seconds"])

  # --- In-process: the train loop and the eval runner, called directly.

  def _in_process(self, run: plan_lib.Run) -> None:
    import jax
    from biovfm_jax.evaluate import runner
    from biovfm_jax.train import loop, validate
    p = plan_lib.paths(self.root, run)
    config = copy.deepcopy(run.config)
    validate.expand_paths(config)
    try:
      loop.train(config, p["workdir"])
      step_dir, step, total = _finished(p["workdir"])
      if total is not None and step < total:  # SIGTERM: saved at that step, returned
        raise Stopped(EXIT_SIGTERM)
      if not _has_rows(self.results, run.name, step_dir):
        eval_config = copy.deepcopy(run.eval_config)
        runner.resolve_config(eval_config, checkpoint=p["workdir"], out_dir=p["eval_dir"],
                              results=self.results)
        runner.run(eval_config)
    except loop.Interrupted:
      raise Stopped(EXIT_SIGINT) from None
    finally:
      jax.clear_caches()  # the next run compiles its own model; free this one's

  # --- Subprocesses: main.py, then evaluate.py, as a job would run them.

  def _subprocesses(self, run: plan_lib.Run, run_log: _RunLog) -> None:
    p = plan_lib.paths(self.root, run)
    self._call(["main.py", *plan_lib.train_args(self.root, run)], run_log)
    step_dir, step, total = _finished(p["workdir"])
    if total is not None and step < total:
      raise Stopped(EXIT_SIGTERM)
    if not _has_rows(self.results, run.name, step_dir):
      self._call(["evaluate.py", *plan_lib.eval_args(self.root, run, self.results)], run_log)

  def _call(self, argv: list[str], run_log: _RunLog) -> None:
    print("+", shlex.join([sys.executable, *argv]), flush=True)
    env = dict(os.environ)
    if self.compilation_cache:
      env["JAX_COMPILATION_CACHE_DIR"] = self.compilation_cache
    child = subprocess.Popen([sys.executable, *argv], cwd=plan_lib.REPO, env=env,
                             stdout=run_log.file, stderr=subprocess.STDOUT)
    stop = None
    while True:
      try:
        code = child.wait()
        break
      except (KeyboardInterrupt, Stopped) as e:
        # The child checkpoints at its next step on SIGTERM (a terminal's Ctrl-C
        # reached it already; a second SIGINT would abort it).
        stop = EXIT_SIGINT if isinstance(e, KeyboardInterrupt) else e.code
        child.send_signal(signal.SIGTERM)
    if stop is not None or code == EXIT_SIGINT:
      raise Stopped(stop or EXIT_SIGINT)
    if code != 0:
      raise RunFailed(f"{argv[0]} exited with {code}: {_last_error(run_log.path)}")


def _last_error(path: str) -> str:
  """The log's last line: the binaries end a failure with their one error line."""
  with open(path, errors="replace") as f:
    lines = [l.strip() for l in f.readlines()[-50:] if l.strip()]
  return lines[-1][-300:] if lines else "no output"


@contextlib.contextmanager
def _sigterm_raises():
  """SIGTERM outside a training run (the train loop installs its own handler,
  which checkpoints) stops the sweep as Ctrl-C does."""
  def handler(signum, frame):
    del signum, frame
    raise Stopped(EXIT_SIGTERM)
  try:
    previous = signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
