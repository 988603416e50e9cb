"""The pretraining loop, in labelled sections: config checks, mesh, input,
model and sharding, update step, checkpoint, logging, loop.

Objective-agnostic: everything specific to MAE (or DINOv2) sits behind
`objective.init_model / loss / flops_per_example / visualize`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metric_writers
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from biovfm_jax import sharding as shd
from biovfm_jax.evaluate import during_training
from biovfm_jax.objectives import get_objective
from biovfm_jax.train import checkpoint as ckpt_lib
from biovfm_jax.train import compile_cache
from biovfm_jax.train import device_input
from biovfm_jax.train import init_from
from biovfm_jax.train import metrics as metrics_lib
from biovfm_jax.train import optim
from biovfm_jax.train import state as state_lib
from biovfm_jax.train import workdir_lock
from biovfm_jax.train.validate import validate_config
from data_pipeline import loader as loader_lib
from data_pipeline import selection
from data_pipeline import storage


class NonFiniteLossError(FloatingPointError):
  pass


class Interrupted(Exception):
  """Ctrl-C: the run saved its checkpoint at `step` and stopped."""


def _run_facts(config, data) -> dict:
  """Facts that define the input stream (the records and shards too: a shard
  deleted between runs changes it); checked on resume, see
  checkpoint.check_input_facts. `data`: the run's resolved input (Setup.data)."""
  return {"seed": int(config.seed), "batch_size": int(config.batch_size),
          "data_shards": str(config.data.shards), **data.facts(),
          "allow_input_change": bool(config.data.allow_input_change)}


def build_train_step(config, spec: state_lib.ModelSpec, objective, tx, schedule,
                     shardings: state_lib.TrainState, batch_sharding, mesh, rules):
  """Returns the jitted update: (state, batch) -> (state, metrics)."""
  accum = int(config.optim.grad_accum_steps)
  skip_nonfinite = bool(config.optim.skip_nonfinite)
  base_key = jax.random.key(config.seed)
  constants = spec.constants()
  mean, std = tuple(config.data.mean), tuple(config.data.std)

  def loss_fn(params, batch, rng, step, extra):
    model = spec.merge(params, constants)
    loss, aux, new_extra = objective.loss(model, batch, rng, step, extra)
    return loss, (aux, new_extra)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step_fn(state: state_lib.TrainState, batch):
    # All randomness comes from (seed, step): a resumed run draws the same.
    rng = jax.random.fold_in(base_key, state.step)
    batch = device_input.normalize(batch, mean, std)  # uint8 pixels arrive
    with shd.use_mesh(mesh, rules):
      if accum == 1:
        (loss, (aux, extra)), grads = grad_fn(state.params, batch, rng, state.step, state.extra)
      else:
        # Micro-batch j takes examples j, j+accum, ...: every device keeps a share.
        micro = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1),
            batch)
        micro = jax.tree.map(lambda x: shd.constrain(x, (None, "batch") + (None,) * (x.ndim - 2)),
                             micro)

        # The objective's state (e.g. DINOv2 centers) is threaded through the
        # micro-batches in order, as consecutive small steps would update it.
        def body(carry, xs):
          sums, ex = carry
          j, mb = xs
          (l, (a, ex)), g = grad_fn(state.params, mb, jax.random.fold_in(rng, j),
                                    state.step, ex)
          return (jax.tree.map(jnp.add, sums, (l, a, g)), ex), None

        out = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro),
                             rng, state.step, state.extra)
        zero = jax.tree.map(jnp.zeros_like, (out[0][0], out[0][1][0], out[1]))
        ((loss, aux, grads), extra), _ = jax.lax.scan(
            body, (zero, state.extra), (jnp.arange(accum), micro))
        loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))
      grads = jax.lax.with_sharding_constraint(grads, shardings.params)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      extra = objective.after_update(params, extra, state.step)  # e.g. the EMA teacher
    grad_norm = optax.global_norm(grads)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), **aux}
    if skip_nonfinite:
      # A non-finite step changes nothing but the step count (fp16-style skipping).
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      params, opt_state, extra = jax.tree.map(
          lambda new, old: jnp.where(ok, new, old), (params, opt_state, extra),
          (state.params, state.opt_state, state.extra))
      metrics["update_skipped"] = (~ok).astype(jnp.int32)
    # Of the params the step leaves: what a checkpoint of this step holds.
    metrics["param_norm"] = optax.global_norm(params)
    if "skipped" in batch:
      metrics["skipped_records"] = jnp.sum(batch["skipped"])
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              extra=extra)
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=(0,))


# A checkpoint is "sane" when its loss and param norm were finite and the norm
# is within this factor of the first step's: a run whose learning rate blew the
# params up (norm 1e7, loss still finite) is not a place to resume from.
SANE_PARAM_NORM_FACTOR = 10.0


class _StepGuard:
  """Checks each step's scalars on the host, in step order.

  Stops (NonFiniteLossError) at a non-finite loss or gradient, or, with
  config.optim.skip_nonfinite, after more than max_consecutive_skips skipped
  updates in a row; the message says what is known of every kept checkpoint
  and names the newest sane one. Adds the run's totals of skipped records and
  updates to the scalars, and keeps in `run_info` (saved with each checkpoint)
  the loss and param norm of the step a checkpoint would hold.
  """

  def __init__(self, config, ckpt, workdir: str, run_info: dict, restored_run: dict):
    self.skip = bool(config.optim.skip_nonfinite)
    self.max_consecutive = int(config.optim.max_consecutive_skips)
    self.ckpt, self.workdir, self.run_info = ckpt, workdir, run_info
    self.consecutive = self.skipped_updates = self.skipped_records = 0
    if "param_norm_first" in restored_run:  # carried on from the resumed checkpoint
      run_info["param_norm_first"] = restored_run["param_norm_first"]

  def __call__(self, step: int, host: dict) -> None:
    finite = bool(np.isfinite(host["loss"]) and np.isfinite(host["grad_norm"]))
    if host.get("update_skipped"):
      self.consecutive += 1
      self.skipped_updates += 1
      logging.warning("Step %d: loss=%s grad_norm=%s, update skipped (%d in a row).", step,
                      host["loss"], host["grad_norm"], self.consecutive)
      if self.consecutive > self.max_consecutive:
        raise NonFiniteLossError(
            f"{self.consecutive} non-finite updates in a row (steps {step - self.consecutive + 1}"
            f"-{step}) exceed config.optim.max_consecutive_skips={self.max_consecutive}: "
            f"stopping. {self.checkpoints()}")
    elif not finite:
      raise NonFiniteLossError(f"loss={host['loss']} grad_norm={host['grad_norm']} at step "
                               f"{step}: stopping. {self.checkpoints()}")
    else:
      self.consecutive = 0
      self.run_info["loss"] = host["loss"]
      self.run_info["param_norm"] = host["param_norm"]
      self.run_info.setdefault("param_norm_first", host["param_norm"])
    self.skipped_records += int(host.get("skipped_records", 0))
    host["skipped_records_total"] = self.skipped_records
    if self.skip:
      host["skipped_updates_total"] = self.skipped_updates

  def checkpoints(self) -> str:
    """What is known of each kept checkpoint, and which one to resume from."""
    self.ckpt.wait()
    ref = self.run_info.get("param_norm_first")
    known = []
    for step in self.ckpt.manager.all_steps():
      try:
        run = ckpt_lib.read_run(ckpt_lib.find_step_dir(self.workdir, step))
      except (OSError, ValueError):
        run = {}
      ref = run.get("param_norm_first", ref)
      known.append((step, run.get("loss"), run.get("param_norm")))
    if not known:
      return f"No checkpoint is kept in {self.workdir}."
    if ref is None:  # checkpoints of older runs: compare with the earliest kept
      ref = next((n for _, _, n in known if n is not None), None)

    def sane(loss, norm):
      return (loss is not None and norm is not None and np.isfinite(loss)
              and np.isfinite(norm) and norm <= SANE_PARAM_NORM_FACTOR * ref)
    facts = ", ".join(
        f"step {st} (unknown: saved before param norms were recorded)" if norm is None else
        f"step {st} (loss {loss:.4g}, param norm {norm:.4g}{'' if sane(loss, norm) else ': not sane'})"
        for st, loss, norm in known)
    good = [st for st, loss, norm in known if sane(loss, norm)]
    criterion = (f"sane: finite loss and param norm within {SANE_PARAM_NORM_FACTOR:g}x the "
                 f"first step's {ref:.4g}" if ref is not None else "no param norm recorded")
    if not good:
      return f"Kept checkpoints: {facts}; none is sane ({criterion}): start a new --workdir."
    later = [st for st, _, _ in known if st > good[-1]]
    how = (f"; move steps {later} out of {os.path.join(self.workdir, 'checkpoints')} to resume "
           f"from it" if later else "")
    return (f"Kept checkpoints: {facts}. The last good checkpoint ({criterion}) is step "
            f"{good[-1]}{how}.")


class _Preemption:
  """SIGTERM (preemption notice) or a first Ctrl-C -> save at the next step
  boundary and exit; a second Ctrl-C aborts at once.

  One process: Python signal handlers, restored when the run ends. Several: the
  notice may reach the hosts at different steps (or only some of them), and a
  host that stops to save alone deadlocks the others in the next collective.
  jax.distributed's preemption service catches SIGTERM on any host and has all
  of them agree on one step to stop at, so no handler of ours replaces its own;
  a Ctrl-C is passed on to it as a SIGTERM to this process.
  """

  def __init__(self):
    self.requested = False
    self.by_user = False  # Ctrl-C rather than SIGTERM
    self.multi_process = jax.process_count() > 1
    self._previous = {}

  def __enter__(self):
    wanted = [signal.SIGINT] + ([] if self.multi_process else [signal.SIGTERM])
    for sig in wanted:
      try:
        self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not in the main thread (e.g. inside some test runners)
        pass
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handler(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      # The default action from now on: a second Ctrl-C ends the process at
      # once, even inside a long compile, without a traceback.
      signal.signal(signal.SIGINT, signal.SIG_DFL)
      logging.warning("Ctrl-C: checkpointing at the next step, then exiting (exit code "
                      "130). Ctrl-C again aborts at once, losing the steps since the "
                      "last checkpoint.")
      self.by_user = True
      if self.multi_process:
        os.kill(os.getpid(), signal.SIGTERM)  # all hosts agree on the stop step
        return
    else:
      logging.warning("SIGTERM received: checkpointing at the next step, then exiting.")
    self.requested = True

  def reached(self, step: int) -> bool:
    if self.multi_process:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      if multihost_utils.reached_preemption_sync_point(step):
        logging.warning("Preemption notice on some host: all stop at step %d.", step)
        return True
      return False
    return self.requested


@dataclasses.dataclass
class Setup:
  """Everything built from a config before the first step (also used by benchmarks)."""
  mesh: Mesh  # an AbstractMesh when built for a device count
  rules: tuple
  objective: object
  spec: state_lib.ModelSpec
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  shardings: state_lib.TrainState
  batch_sharding: NamedSharding
  train_step: object
  total_steps: int
  steps_per_epoch: int
  num_records: int
  evaluators: list
  data: selection.Resolved | None = None  # config.data resolved once; None if num_records given


def step_counts(config, num_records: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps) of a run over `num_records` records."""
  steps_per_epoch = config.steps_per_epoch or max(1, num_records // config.batch_size)
  total_steps = config.num_train_steps or int(config.total_epochs * steps_per_epoch)
  return steps_per_epoch, total_steps


def build(config, num_records: int | None = None, devices=None, *,
          evaluators: bool = True) -> Setup:
  """Checks the config and builds mesh, model spec, optimiser and the jitted step.

  Everything that can be wrong with a config fails here, before compiling.
  `devices`: this run's (default), those of a TPU topology that is not
  attached, or a device count (an abstract mesh: shapes and shardings only),
  for the fit check (biovfm_jax/aot.py); nothing runs here. With
  `num_records` given no data is read; evaluators=False builds none.
  """
  mesh = (shd.abstract_mesh(dict(config.mesh), devices) if isinstance(devices, int)
          else shd.make_mesh(dict(config.mesh), devices))
  rules = shd.rules_from_config(config.sharding_rules)
  validate_config(config, mesh)
  evals = during_training.build_evaluators(config) if evaluators else []
  # The input is resolved (and opened) here, once: steps, resume facts and loader use it.
  data = loader_lib.resolve(config.data) if num_records is None else None
  if num_records is None:
    num_records = data.num_records
  steps_per_epoch, total_steps = step_counts(config, num_records)
  objective = get_objective(config, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  spec = state_lib.ModelSpec(objective.init_model, config.seed, mesh, rules)
  schedule = optim.lr_schedule(config, total_steps, steps_per_epoch)
  tx = optim.make_optimizer(config, schedule, spec.decay_mask, params=spec.abstract_params,
                            depth=objective.encoder_config.depth,
                            total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  shardings = state_lib.state_shardings(spec, tx, objective)
  batch_sharding = shd.named_sharding(("batch",), mesh, rules)
  train_step = build_train_step(config, spec, objective, tx, schedule, shardings,
                                batch_sharding, mesh, rules)
  return Setup(mesh, rules, objective, spec, tx, schedule, shardings, batch_sharding,
               train_step, total_steps, steps_per_epoch, num_records, evals, data)


def train(config, workdir: str) -> dict:
  """Pretrains per `config`, resuming from `workdir` when it holds a checkpoint.

  Returns the last logged scalars. Holds the workdir's lock throughout
  (workdir_lock.WorkdirBusy if another run has it); raises Interrupted after
  saving when stopped by Ctrl-C, checkpoint.CheckpointError when a save fails
  or no checkpoint restores, checkpoint.ModelMismatch when the workdir was
  trained with another model or objective. A run refused before its first
  step (any of these errors, a ConfigError ...) removes what it added to the
  workdir, the lock file included: the workdir is left as it was found.
  """
  compile_cache.enable(config, workdir)  # before the first compile
  chief = jax.process_index() == 0
  added = workdir_lock.Added(workdir)  # before the lock creates anything
  # Process 0 locks for all: the others may share an NFS workdir.
  with workdir_lock.held(workdir, enabled=chief), _Preemption() as preemption:
    try:
      return _train(config, workdir, preemption, started=added.keep)
    except BaseException:
      if chief:  # still holding the lock: no other run is in the workdir
        added.undo()
      raise


def _train(config, workdir: str, preemption: _Preemption, started) -> dict:
  """The run; calls `started()` as the first step begins."""
  s = build(config)
  spec, tx, shardings, objective = s.spec, s.tx, s.shardings, s.objective
  total_steps, batch_sharding, train_step = s.total_steps, s.batch_sharding, s.train_step
  is_chief = jax.process_index() == 0
  storage.makedirs(workdir)  # gs://: orbax, clu and JsonlLog write there themselves
  logging.info("Model: %s parameters; mesh %s; %d records, %d steps/epoch, %d steps.",
               f"{spec.num_params():,}", dict(s.mesh.shape), s.num_records,
               s.steps_per_epoch, total_steps)

  # --- Checkpoint: restore the latest, or initialise.
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               keep=config.checkpoint.keep,
                               async_save=config.checkpoint.async_save)
  facts = _run_facts(config, s.data)
  # Not checked on resume: tells evaluation and export which weights are the backbone.
  run_info = {**facts, "objective": config.objective,
              "backbone": "/".join(objective.backbone_path),
              "encoder": dataclasses.asdict(objective.encoder_config),
              # For the results store (biovfm_jax/results.py): what the run is, in
              # the study's terms, and where it was to end.
              "model_size": config.model.size or "", "params_total": spec.num_params(),
              "flops_per_example": float(objective.flops_per_example()),
              "data_mixture": _mixture_text(config.data.mixture.weights),
              "total_steps": int(total_steps),
              # For export (interop export --format=hf): the normalisation the
              # encoder was trained with, and MAE's decoder facts no shape shows.
              "data_mean": [float(x) for x in config.data.mean],
              "data_std": [float(x) for x in config.data.std]}
  if config.objective == "mae":
    run_info["mae"] = {"mask_ratio": float(config.mae.mask_ratio),
                       "norm_pix_loss": bool(config.mae.norm_pix_loss),
                       "decoder_heads": int(config.mae.decoder_heads)}
  writer = jsonl = batches = None  # closed by the finally below, once open
  try:
    if ckpt.latest_step() is not None:
      state, restored_run = ckpt.restore(
          state_lib.abstract_state(spec, tx, objective, shardings), run_info)
    else:
      restored_run = {}
      state = state_lib.create_state(spec, tx, objective, shardings,
                                     params=init_from.initial_params(config, spec, objective))
      # e.g. a Gram teacher read from disk
      state = state.replace(extra=init_from.initial_extra(objective, spec, state.extra))
    start_step = int(state.step)
    if start_step >= total_steps:  # before any compile or input worker starts
      logging.info("Already finished: step %d of %d in %s; nothing to do.", start_step,
                   total_steps, workdir)
      return {}
    if start_step:
      logging.info("Resuming from step %d.", start_step)

    # --- Logging.
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief,
                                                  asynchronous=True)
    if start_step == 0:
      writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()
                            if isinstance(v, (int, float, str, bool))})
    jsonl = metrics_lib.JsonlLog(storage.join(workdir, "metrics.jsonl")) if is_chief else None
    chrono = metrics_lib.Throughput(
        total_steps=total_steps, batch_size=config.batch_size,
        flops_per_example=objective.flops_per_example(), num_devices=jax.device_count(),
        peak=metrics_lib.peak_tflops(config), start_step=start_step)
    last: dict = {}

    guard = _StepGuard(config, ckpt, workdir, run_info, restored_run)

    def check_and_log(step: int, metrics) -> None:
      nonlocal last
      host = {k: float(v) for k, v in jax.device_get(metrics).items()}
      guard(step, host)  # raises NonFiniteLossError
      if step % config.log_every_steps and step != total_steps and step != start_step + 1:
        return
      host.update(chrono.measure(step))
      last = host
      writer.write_scalars(step, host)
      if jsonl:
        jsonl.write({"step": step, **host})
      if is_chief:  # one progress line per run, not one per process
        logging.info(metrics_lib.progress_line(step, total_steps, host))

    def evaluate(step: int, state) -> None:
      due = [e for e in s.evaluators if e.due(step)]
      if due:  # every process takes part: feature extraction is sharded
        chrono.pause()
        encoder = during_training.backbone_encoder(objective, state, s.mesh, s.rules)
        for evaluator in due:
          scores = evaluator.run(encoder, step)
          writer.write_scalars(step, scores)
          if jsonl:
            jsonl.write({"step": step, **scores})
        chrono.resume()

    if start_step == 0:
      evaluate(0, state)  # the starting weights: what later scores gained over
    elif s.evaluators:
      row = metrics_lib.scalars_at(storage.join(workdir, "metrics.jsonl"), step=0)
      for evaluator in s.evaluators:
        evaluator.restore_init(row)

    # --- The loop. Metrics of step s are fetched after step s+1 is dispatched, so
    # the host never stalls the device; before a save they are checked at once.
    # The devices the batch is split over: iBOT masks are stratified per such shard
    # (config.data.mask_sampling), as the reference's collate per GPU.
    batch_shards = shd.batch_shards(s.mesh, s.rules)
    batches = device_input.Prefetch(loader_lib.make_pretrain_loader(
        config.data, global_batch_size=config.batch_size, seed=config.seed,
        start_step=start_step, data=s.data, batch_shards=batch_shards), batch_sharding,
        config.data.device_prefetch)
    pending = None
    step = start_step
    t0 = time.perf_counter()
    started()  # training begins: from here what the run wrote is kept, whatever happens
    programs = _Programs(config.data)
    while step < total_steps:
      batch = next(batches)  # on the device already: its transfer went ahead
      programs.see(batch, step)
      state, metrics = train_step(state, batch)
      step += 1
      if step == start_step + 1:
        jax.block_until_ready(metrics)
        logging.info("First step (compile + run) took %.1f s%s.", time.perf_counter() - t0,
                     compile_cache.hits_note())
        chrono.restart(step)
      if pending is not None:
        check_and_log(*pending)
      pending = (step, metrics)
      stop = preemption.reached(step)
      ckpt.check()  # a failed async save stops the run now, not at the next save
      if step % config.checkpoint.every_steps == 0 or step == total_steps or stop:
        check_and_log(*pending)
        pending = None
        ckpt.save(step, state, run_info)
        if jsonl:
          jsonl.sync()
      if config.image_every_steps and step % config.image_every_steps == 0:
        chrono.pause()  # every process computes (the model spans them all); the chief writes
        grid = objective.visualize(spec.merge(state.params),
                                   device_input.normalize(batch, config.data.mean, config.data.std),
                                   jax.random.fold_in(jax.random.key(config.seed), step),
                                   state.extra)
        if is_chief:
          writer.write_images(step, {f"{config.objective}/samples": grid})
        chrono.resume()
      evaluate(step, state)
      if stop:
        ckpt.wait()  # the stop step's checkpoint is on disk before we say so
        if preemption.by_user:
          raise Interrupted(f"Stopped by Ctrl-C at step {step}; its checkpoint is saved "
                            f"in {workdir}: the same command resumes.")
        logging.warning("Stopped for preemption at step %d (checkpoint saved).", step)
        break
    if pending is not None:
      check_and_log(*pending)
  finally:
    # A failed error path must not hide the first error (a full disk fails the
    # summary writer too): closing then only logs.
    failing = sys.exc_info()[0] is not None
    try:
      # Waits for async saves: a finished save is never lost. A failed one is
      # the error to report, even over one already on its way (often its effect).
      ckpt.close()
    finally:
      for close in (writer and writer.flush, writer and writer.close, jsonl and jsonl.close,
                    batches and batches.close):
        try:
          if close:
            close()
        except Exception as e:  # pylint: disable=broad-exception-caught
          if not failing:
            raise
          logging.warning("While stopping: %s", ckpt_lib.one_line(e))
  return last


class _Programs:
  """Counts the compiled step programs: one per set of batch shapes (several
  crop sizes compile once each), and logs each new one."""

  def __init__(self, data_cfg):
    groups = (loader_lib.crop_size_groups(data_cfg)[0]
              if data_cfg.crops == "multicrop" else [])
    self.expected = len(groups) or 1
    self.seen: set = set()

  def see(self, batch, step: int) -> None:
    shapes = tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))
    if shapes in self.seen:
      return
    self.seen.add(shapes)
    if self.expected > 1:
      sizes = ", ".join(f"{k} {s[2]}px" for k, s in shapes if k.endswith("crops"))
      logging.info("Step %d: new crop sizes (%s): compiling program %d of %d.", step, sizes,
                   len(self.seen), self.expected)


def _mixture_text(weights) -> str:
  """config.data.mixture.weights as text ("CT:0.4,MR:0.6"), "" for none."""
  if not isinstance(weights, str):
    weights = ",".join(f"{k}:{float(v):g}" for k, v in sorted(dict(weights).items()))
  return weights


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
