"""python -m biovfm_jax.sweep: see biovfm_jax/sweep/__init__.py for the flags."""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_SWEEP = config_flags.DEFINE_config_file("sweep", None, "Sweep definition "
                                         "(configs/sweeps/*.py).", lock_config=True)
_ROOT = flags.DEFINE_string("root", None, "Where the sweep's runs, evaluations, state "
                            "and results go.")
_RESULTS = flags.DEFINE_string("results", None, "Results store (default <root>/results.csv).")
_ONLY = flags.DEFINE_list("only", None, "Only these runs (comma-separated names).")
_RETRY = flags.DEFINE_bool("retry_failed", False, "Run failed runs again.")
_ISOLATE = flags.DEFINE_bool("isolate", False, "Each run as main.py and evaluate.py "
                             "subprocesses instead of in this process.")
_CACHE = flags.DEFINE_string("compilation_cache", "<root>/compilation_cache", "jax's "
                             "persistent compilation cache for the local runs; '' disables.")
_SEEDS = flags.DEFINE_integer("seeds", None, "Runs per grid point, with the pretraining "
                              "seed 0..N-1 (overrides the sweep's `seeds`).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the plan and run nothing.")
_EMIT = flags.DEFINE_enum("emit", None, ["slurm", "tpu_pod"], "Print one job command per "
                          "run for launch/slurm.sh or launch/tpu_pod.sh; run nothing.")
flags.mark_flags_as_required(["sweep", "root"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from biovfm_jax import console
  console.start_binary()  # before jax and TensorFlow load
  from biovfm_jax.sweep import jobs, local, plan
  from data_pipeline import storage
  sweep = _SWEEP.value
  # Paths as the user gave them, expanded once, here.
  root = storage.expand(_ROOT.value)
  results = storage.expand(_RESULTS.value) or storage.join(root, "results.csv")
  sweep.data_root = storage.expand(sweep.data_root)
  try:
    if _SEEDS.value is not None:
      if _SEEDS.value < 1:
        raise plan.SweepError(f"--seeds={_SEEDS.value}: the number of runs per grid point "
                              "must be 1 or more")
      with sweep.unlocked():  # a definition not built on configs/sweeps/common.py
        sweep.seeds = _SEEDS.value
    runs = plan.expand(sweep, root=root,
                       sweep_file=config_flags.get_config_filename(flags.FLAGS["sweep"]))
    if _ONLY.value:
      names = {r.name for r in runs}
      unknown = [n for n in _ONLY.value if n not in names]
      if unknown:
        raise plan.SweepError(f"--only: no run named {unknown[0]!r}; the runs: "
                              f"{', '.join(sorted(names))}")
      runs = [r for r in runs if r.name in _ONLY.value]
    if _DRY_RUN.value or _EMIT.value:
      print(jobs.describe(runs, root, results) if _DRY_RUN.value and not _EMIT.value
            else "\n".join(jobs.emit(sweep, runs, root, _EMIT.value, results)))
      return
    cache = storage.expand(_CACHE.value.replace("<root>", root))
    code = local.Launcher(sweep.name or "sweep", runs, root, results=results,
                          retry_failed=_RETRY.value, isolate=_ISOLATE.value,
                          compilation_cache=cache).run_all()
  except plan.SweepError as e:
    logging.error("%s", e)
    sys.exit(2)
  except local.Stopped as e:  # SIGTERM between runs
    sys.exit(e.code)
  except KeyboardInterrupt:  # Ctrl-C between runs
    sys.exit(local.EXIT_SIGINT)
  sys.exit(code)


if __name__ == "__main__":
  from biovfm_jax.train.validate import parse_flags
  app.run(main, flags_parser=parse_flags)
