"""Fields every sweep definition has (configs/sweeps/*.py); read by the sweep
launcher, biovfm_jax/sweep/. Not run directly.

A sweep is a grid: the cartesian product of its axes, one run per point.

  axes     ((axis name, {label: overrides}), ...), in the order run names are
           built from ("T-mae-all-all"). The axes named model_size, data_subset
           and modality_subset label the results store's columns of those names.
           An axis value's overrides are pretraining config keys, dotted
           ({"model.width": 32}); keys starting "eval." set the evaluation's
           config instead ({"eval.probe.epochs": 5}); the key "config" picks the
           pretraining config file for the runs with that value.
  config   the pretraining config file (relative to the repository or the
           working directory), unless an axis value names one. "{axis}" is that
           axis's label, "{axis:lower}" lower-cased: "configs/vit_{model_size:lower}_
           {objective}.py".
  seeds    runs per grid point: with N > 1 each point runs N times, seed=0..N-1
           (names "<name>-s0".."<name>-s{N-1}"); 1 runs it once, unsuffixed.
In override values (strings), "{data_root}" is `data_root` and "{root}" the
launcher's --root.
"""
import ml_collections


def get_config():
  s = ml_collections.ConfigDict()
  s.name = ""                # the sweep's name, in its progress lines and job names
  s.config = ""              # pretraining config file (see above)
  # Overrides of every run, before the axes' (nested: {"model": {"dtype": "float32"}}).
  s.overrides = ml_collections.ConfigDict()
  s.axes = ()
  # Runs left out: ({axis: label, ...}, ...); a run matching all of one entry's items.
  s.exclude = ()
  # Runs per grid point (--seeds=N): N > 1 repeats each with the pretraining seed
  # 0..N-1, named "<name>-s<k>", so the analysis can tell seed noise from an effect.
  s.seeds = 1
  s.data_root = ""           # the corpus the data subsets live in (--sweep.data_root=DIR)
  s.eval = ml_collections.ConfigDict()
  s.eval.config = "configs/eval/medmnist_linear.py"  # evaluation config file
  s.eval.protocol = "fast"   # features once, then the head: the sweeps' default
  # Overrides of the evaluation config (nested: {"probe": {"epochs": 30}}).
  s.eval.overrides = ml_collections.ConfigDict()
  # --emit: the launch scripts' own flags, before the job's (e.g. "--nodes=1").
  s.emit = ml_collections.ConfigDict({"slurm": (), "tpu_pod": ()})
  return s
