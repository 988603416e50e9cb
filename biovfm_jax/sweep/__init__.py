"""The sweep launcher: a grid of pretraining runs, each evaluated into the
results store (biovfm_jax/results.py).

  python -m biovfm_jax.sweep --sweep=configs/sweeps/tiny.py --root=/tmp/sweep_tiny
  python -m biovfm_jax.sweep --sweep=configs/sweeps/biovfm21m.py --root=/runs/study \
      --sweep.data_root=/data/biovfm21m --dry_run

A sweep definition (configs/sweeps/*.py, fields in configs/sweeps/common.py)
names a pretraining config, axes of labelled overrides, and the evaluation;
its runs are the cartesian product of the axes, named by their labels joined
with "-" (e.g. "w16-mae-mini-all"). Every run's overrides are applied and
checked before anything runs: an unknown key stops the launcher with one line
naming the sweep, the axis, the label and the key (exit code 2).

Repeated runs: with seeds = N > 1 (the sweep's `seeds`, or --seeds=N) every
grid point runs N times, as "<name>-s0" .. "<name>-s{N-1}" with the
pretraining config's seed 0 .. N-1 (--config.seed=K in the commands; seed 0
of every point first). Their results rows share the labels, which is how
`python -m biovfm_jax.analysis fit` measures seed noise and flags slopes and
effects within it. seeds = 1 (the default) runs each point once, unsuffixed.

Local mode (the default) runs the grid one run after another on this machine:
  <root>/runs/<name>/       the run's main.py workdir (checkpoints, metrics)
  <root>/evals/<name>/      evaluate.py's report of its final checkpoint
  <root>/results.csv        the results store: one row per benchmark and metric
  <root>/state/<name>.json  pending | running | done | failed, attempts, error,
                            seconds, log path
  <root>/logs/<name>.log    the run's output, every attempt appended
It is resumable: run the same command again and finished runs are skipped, an
interrupted run resumes from its last checkpoint (main.py's resume), and a
failed run is listed with its error and log and retried only with
--retry_failed. A progress line (done / running / failed / pending, ETA from
the finished runs' durations) is printed at each change. Ctrl-C or SIGTERM
stops the current run at its next step, checkpointed, and the launcher exits
(130 / 143) with that run still "running", to resume. One launcher holds a
root at a time (an flock on <root>/run.lock).

Flags:
  --sweep=FILE        the sweep definition; --sweep.KEY=VALUE overrides its fields
                      (--sweep.data_root=DIR: where its data subsets live)
  --root=DIR          where the sweep writes (local or shared file system; for
                      --emit also gs://)
  --results=FILE      the results store (default <root>/results.csv)
  --only=A,B          only these runs (names as --dry_run lists them)
  --seeds=N           run each grid point N times with seed 0..N-1 (default: the
                      sweep's `seeds`, 1: one run, named as above, no seed override)
  --retry_failed      run failed runs again (else they are reported and skipped)
  --isolate           each run as main.py and evaluate.py subprocesses, as a job
                      runs them (default: in this process, much faster to start)
  --compilation_cache=DIR  jax's persistent compilation cache for local runs
                      (default <root>/compilation_cache; '' disables): runs that
                      differ only in their data compile once
  --dry_run           print the plan: each run's state, overrides and its
                      main.py / evaluate.py commands; run nothing
  --emit=slurm|tpu_pod  print one job command per run for launch/slurm.sh or
                      launch/tpu_pod.sh (their flags from the sweep's emit.slurm /
                      emit.tpu_pod), each running main.py then evaluate.py
                      --results; run nothing. slurm jobs append to the shared
                      store; pod jobs, which write to a bucket, each to
                      <root>/evals/<name>/results.csv (read them back with
                      biovfm_jax.results.read("<root>/evals/*/results.csv")).
Exit codes: 0 all runs done (or nothing to do), 1 some run failed, 2 a bad
sweep or flag, 130 / 143 stopped by Ctrl-C / SIGTERM (resumable).
"""
