"""Will a config fit? Compiles the real train step for a TPU topology on this
machine (no TPU needed), or estimates GPU memory, before the hardware is booked.

  python -m biovfm_jax.aot --config=configs/vit_g_dinov2.py --topology=v5p-256 \
      --config.mesh.data=1 --config.mesh.fsdp=-1 --config.model.remat_policy=full \
      [--mfu=0.4,0.5] [--num_records=N] [--json]
  python -m biovfm_jax.aot --config=configs/vit_l_mae.py --topology=h100-64
  python -m biovfm_jax.aot --cost --config=configs/vit_b_mae.py --topology=v5p-8

--cost reports XLA's TPU cost model of the step instead of the fit: modeled
step time, TFLOP/s, MFU, HBM bytes per image and where they go (see
biovfm_jax/step_cost.py).

TPU (needs the `tpu` extra: jax[tpu], i.e. libtpu): the topology's devices come
from `jax.experimental.topologies.get_topology_desc`, `loop.build` makes the
mesh, shardings and jitted step on them, and the step is lowered with abstract
state and batch and compiled by the TPU compiler, as MaxText's train_compile
does. Nothing runs; the process itself stays on CPU (JAX_PLATFORMS=cpu).
While it works it prints progress lines on stderr (building, lowering,
compiling, a heartbeat every 20 s while XLA compiles, the fit); the report
goes to stdout.

Topologies, as users book them (verified with libtpu 0.0.42 here):
  v4-N, v5p-N           N TensorCores = N/2 chips (one megacore device per chip),
                        N/2 a power of two >= 4: a 3D torus, e.g. v5p-256 ->
                        'v5p:4x4x8'; hosts of 2x2x1 chips.
  v5e-N (v5litepod-N),  N chips in {1, 4, 8, 16, ..., 256}: a 2D torus, e.g.
  v6e-N                 v5e-4 -> 'v5e:2x2', v6e-256 -> 'v6e:16x16'; hosts of 4
                        chips (8 for the single-host v5e-8 / v6e-8).
  v5p:4x4x12, v5e:4x8   an explicit chip grid (3D for v4/v5p, 2D for v5e/v6e).
  --num_slices=S        S such slices over DCN (set --config.mesh.slices=S too).

Reported per device (one device = one chip), from the compiled step's
memory_analysis():
  peak HBM = `peak_memory_in_bytes`, the compiler's own peak of the buffers
    live at once (state and batch shards, the new state written over the
    donated old one, activations, gradients, gathered FSDP weights, code).
    Beside it, the allocations: arguments + outputs + temporaries - aliased
    (the new state aliases the donated old one, so it counts once), the sum
    MaxText prints. On TPU that sum is an upper bound, not the peak: ViT-g
    DINOv2 without remat on v5p-128 has 123.5 GiB of temporaries, and the
    compiler accepts it with a 90.7 GiB peak on a 95.7 GiB chip.
  fits: the step compiled and the peak is within the HBM the compiler lets a
    program use (TPU_USABLE_GIB, a little under the chip's). A step that does
    not fit fails to compile with RESOURCE_EXHAUSTED: that message is printed,
    exit code 3. (The compiler first rematerialises what it can to fit, at
    some compute cost, so a near miss compiles slowly and may still fit.)
  FLOPs per step: the objective's analytic flops_per_example x batch (used for
    step times), and XLA's cost analysis of the per-device program x devices.
    XLA counts a scanned loop body once, so with scan_layers=True (the
    default for L, H and g) the step is also compiled with its stacks at
    depth 1 and 2, and the figure extrapolated to the full depth
    (biovfm_jax/step_cost.py; seconds to a minute more).
  step time at MFU m = analytic FLOPs / (devices x peak bf16 TFLOP/s x m);
    run time = the run's step count (loop.build's, from --num_records) x that.

GPU (`--topology=h100-64`: a100|h100|h200|b200 and a GPU count): XLA offers no
compile for GPUs that are not attached, so memory is estimated from what
`loop.build` makes for the GPU count (an abstract mesh: no devices):
  - state, exactly: every leaf of the abstract train state (fp32 params,
    Adam's two moments, DINOv2's EMA teacher and centers) split by its
    sharding; gradients as the params.
  - FSDP gather: two blocks' parameters unsharded over fsdp, in param dtype
    (the block being computed and the next one prefetched).
  - activations saved for backward: what JAX's autodiff keeps for one
    transformer block of the config (its dtype, FFN, heads, remat policy),
    read off the real Block traced abstractly at the token counts of the
    objective's activation_plan (jax.ad_checkpoint's saved-residual
    listing: layer-norm statistics in float32, attention probabilities, FFN
    intermediates, the compute-dtype copies of the block's weights), x
    depth; with a remat policy, plus each layer's input and one layer's
    full set while it is recomputed.
    Residuals with a heads or FFN-hidden axis are divided by the tensor
    size. Tokens: MAE's visible tokens in the encoder and all in the decoder;
    DINOv2's 2 global and n local crops of the student (the teacher's
    forward keeps nothing). XLA fuses and rematerialises some of these, and
    cuDNN flash attention keeps no T x T probabilities: this side is high.
  - DINOv2 heads: float32 logits over the K prototypes for every head row
    (student and teacher; cls rows of all crops, iBOT slots of the global
    crops), 2 copies (logits and their (log-)softmax or targets), K / t per
    device.
  - the input batch shard, float32.
  Usable memory: the capacity x XLA_PYTHON_CLIENT_MEM_FRACTION (JAX
  preallocates 0.75 of it unless that is set). Not counted: cuDNN/NCCL
  workspaces, fragmentation, and XLA fusions that keep more or less than the
  formula: treat it as a planning figure, and compare it with the TPU compile
  of the same mesh (launch/AOT_RESULTS.md does).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import sys
import threading
import time

from absl import app, flags
from ml_collections import config_flags

from biovfm_jax import step_cost
from biovfm_jax.step_cost import batch_specs

GIB = 2 ** 30

# Per device (= per chip; v4 and v5p run as one megacore device per chip).
TPU_HBM_GIB = {"v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}
# What the TPU compiler lets a program use ("available HBM" in its
# out-of-memory messages, libtpu 0.0.42): the fit is judged against this.
TPU_USABLE_GIB = {"v4": 30.75, "v5p": 95.74, "v5e": 15.75, "v6e": 31.25}
# jax device_kind of each generation (keys of metrics.PEAK_TFLOPS).
TPU_DEVICE_KIND = {"v4": "TPU v4", "v5p": "TPU v5", "v5e": "TPU v5 lite",
                   "v6e": "TPU v6 lite"}
# The accelerator type Cloud TPU names a slice by (TPU_ACCELERATOR_TYPE).
_CLOUD_PREFIX = {"v4": "v4", "v5p": "v5p", "v5e": "v5litepod", "v6e": "v6e"}
# Nominal memory per GPU (the 80 GB A100), GiB.
GPU_HBM_GIB = {"a100": 80, "h100": 80, "h200": 141, "b200": 180}
GPU_DEVICE_KIND = {"a100": "NVIDIA A100", "h100": "NVIDIA H100", "h200": "NVIDIA H200",
                   "b200": "NVIDIA B200"}
JAX_GPU_MEM_FRACTION = 0.75  # JAX preallocates this much unless told otherwise

TOPOLOGY_FORMS = ("v4-N, v5p-N (N TensorCores: 8, 16, 32, ...), v5e-N / v5litepod-N, "
                  "v6e-N (N chips: 1, 4, 8, 16, ..., 256), an explicit chip grid "
                  "(v5p:4x4x12, v4:2x2x2, v5e:4x8, v6e:8x16), or a GPU count "
                  "(a100-N, h100-N, h200-N, b200-N)")


class DoesNotFit(Exception):
  """The step needs more memory per device than the target has."""

  def __init__(self, message: str, report: dict):
    super().__init__(message)
    self.report = report


class MissingLibtpu(RuntimeError):
  pass


@dataclasses.dataclass(frozen=True)
class Target:
  """Where the config is meant to run. TPU fields are get_topology_desc's."""
  name: str                   # as given, e.g. "v5p-256"
  platform: str               # "tpu" | "gpu"
  generation: str             # v4 | v5p | v5e | v6e | a100 | h100 | ...
  devices_per_slice: int
  num_slices: int = 1
  topology_name: str = ""     # e.g. "v5p:4x4x8"
  chip_config_name: str = ""  # "megacore" (v4, v5p) | "default"
  chips_per_host_bounds: tuple = ()

  @property
  def num_devices(self) -> int:
    return self.devices_per_slice * self.num_slices

  @property
  def hbm_bytes(self) -> int:
    table = TPU_HBM_GIB if self.platform == "tpu" else GPU_HBM_GIB
    return table[self.generation] * GIB

  @property
  def usable_bytes(self) -> int:
    """The compiler's limit (TPU); capacity x XLA_PYTHON_CLIENT_MEM_FRACTION (GPU)."""
    if self.platform == "tpu":
      return int(TPU_USABLE_GIB[self.generation] * GIB)
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_GPU_MEM_FRACTION))
    return int(self.hbm_bytes * fraction)

  @property
  def device_kind(self) -> str:
    table = TPU_DEVICE_KIND if self.platform == "tpu" else GPU_DEVICE_KIND
    return table[self.generation]

  @property
  def cloud_name(self) -> str:
    if self.platform != "tpu":
      return self.name
    cores = 2 if self.generation in ("v4", "v5p") else 1
    return f"{_CLOUD_PREFIX[self.generation]}-{self.devices_per_slice * cores}"


def _torus_3d(chips: int) -> tuple[int, int, int]:
  """Chips (a power of two >= 4) -> the standard v4/v5p slice shape: from 2x2x1,
  double the last axis, then always the smallest (the later one on a tie):
  8 -> 2x2x2, 64 -> 4x4x4, 128 -> 4x4x8, 256 -> 4x8x8."""
  dims = [2, 2, 1]
  while math.prod(dims) < chips:
    smallest = min(dims)
    i = max(j for j, d in enumerate(dims) if d == smallest)
    dims[i] *= 2
  return tuple(dims)


_2D_SHAPES = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}


def _host_bounds(dims: tuple[int, ...]) -> tuple[int, int, int]:
  if len(dims) == 3:
    return (2, 2, 1)
  if dims == (1, 1):
    return (1, 1, 1)
  return (2, 4, 1) if dims == (2, 4) else (2, 2, 1)  # v5e-8 / v6e-8: one 8-chip host


def parse_topology(name: str, num_slices: int = 1) -> Target:
  """A topology as users name it (see the module docstring) -> Target.

  Raises ValueError listing the supported forms for anything else."""
  name = name.strip()
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices} must be >= 1")
  bad = ValueError(f"--topology={name!r} is not supported; use {TOPOLOGY_FORMS}")
  m = re.fullmatch(r"(a100|h100|h200|b200)-(\d+)", name, re.IGNORECASE)
  if m:
    n = int(m.group(2))
    if n < 1:
      raise bad
    if num_slices != 1:
      raise ValueError("--num_slices is for TPU slices; for GPUs give the total count "
                       f"(--topology={m.group(1).lower()}-{n * num_slices})")
    return Target(name.lower(), "gpu", m.group(1).lower(), n)
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)([-:])([\dx]+)", name)
  if not m:
    raise bad
  gen = "v5e" if m.group(1) == "v5litepod" else m.group(1)
  three_d = gen in ("v4", "v5p")
  if m.group(2) == ":":  # explicit chip grid
    if not re.fullmatch(r"\d+(x\d+)+", m.group(3)):
      raise bad
    dims = tuple(int(d) for d in m.group(3).split("x"))
    if len(dims) != (3 if three_d else 2) or min(dims) < 1:
      raise ValueError(f"--topology={name!r}: {gen} grids have "
                       f"{3 if three_d else 2} axes ({TOPOLOGY_FORMS})")
  else:
    if not m.group(3).isdigit():
      raise bad
    n = int(m.group(3))
    if three_d:
      chips = n // 2
      if n % 2 or chips < 4 or chips & (chips - 1):
        raise ValueError(f"--topology={name!r}: {gen}-N counts TensorCores, N/2 chips a "
                         f"power of two >= 4 (8, 16, 32, ...); for other slices give the "
                         f"chip grid, e.g. {gen}:4x4x12")
      dims = _torus_3d(chips)
    else:
      if n not in _2D_SHAPES:
        raise ValueError(f"--topology={name!r}: {gen}-N counts chips, one of "
                         f"{sorted(_2D_SHAPES)}; or give the grid, e.g. {gen}:4x8")
      dims = _2D_SHAPES[n]
  return Target(name, "tpu", gen, math.prod(dims), num_slices,
                topology_name=f"{gen}:{'x'.join(map(str, dims))}",
                chip_config_name="megacore" if three_d else "default",
                chips_per_host_bounds=_host_bounds(dims))


@contextlib.contextmanager
def _libtpu_env(target: Target):
  """Defaults for loading libtpu only to compile. It takes a lock file
  (/tmp/libtpu_lockfile) for sole use of the chips, so a second process (a
  parallel check, a test worker) fails unless ALLOW_MULTIPLE_LIBTPU_LOAD is
  set. It looks for the TPU VM it runs on and logs alarming errors when there
  is none: naming the target's type and a local worker quiets it (the
  topology itself is passed explicitly)."""
  defaults = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_ACCELERATOR_TYPE": target.cloud_name,
              "TPU_WORKER_HOSTNAMES": "localhost"}
  saved = {k: os.environ.get(k) for k in defaults}
  for k, v in defaults.items():
    os.environ.setdefault(k, v)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)


def tpu_devices(target: Target) -> list:
  """The target's devices (not attached: for compiling only)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    with _libtpu_env(target):
      desc = topologies.get_topology_desc(
          platform="tpu", topology_name=target.topology_name,
          chip_config_name=target.chip_config_name,
          chips_per_host_bounds=target.chips_per_host_bounds,
          num_slices=target.num_slices)
  except RuntimeError as e:  # JaxRuntimeError is one too
    if not isinstance(e, jax.errors.JaxRuntimeError):
      raise MissingLibtpu(f"compiling for TPU needs libtpu: pip install -e '.[tpu]' "
                          f"({e})") from e
    raise ValueError(f"--topology={target.name!r} ({target.topology_name}): "
                     f"{str(e).splitlines()[0]}") from e
  devices = list(desc.devices)
  if len(devices) != target.num_devices:
    raise RuntimeError(f"{target.topology_name} gave {len(devices)} devices, "
                       f"expected {target.num_devices}")
  return devices


def _check_slices(config, target: Target) -> None:
  slices = int(config.mesh.slices)
  if slices != target.num_slices:
    raise ValueError(f"config.mesh.slices={slices} but the target has {target.num_slices} "
                     f"slice(s): pass --config.mesh.slices={target.num_slices}")


def _state_bytes(abstract_state) -> dict[str, int]:
  """Bytes per device of each part of the train state, from each leaf's shard."""
  import jax  # pylint: disable=import-outside-toplevel
  out = {}
  for part in ("params", "opt_state", "extra"):
    leaves = jax.tree.leaves(getattr(abstract_state, part))
    out[part] = int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                        for x in leaves))
  return out


def _flops(config, objective) -> float:
  return float(objective.flops_per_example()) * int(config.batch_size)


def _step_times(flops: float, devices: int, peak_tflops: float | None, mfus) -> dict:
  if not peak_tflops:
    return {}
  return {f"{m:g}": flops / (devices * peak_tflops * 1e12 * m) for m in mfus}


def _common(config, target: Target, s, mfus, peak: float | None) -> dict:
  """The report's fields shared by the TPU compile and the GPU estimate, from
  loop.build's Setup `s`."""
  mesh_shape = {**_mesh_shape(s.mesh), "slices": target.num_slices}
  dp = mesh_shape["data"] * mesh_shape["fsdp"]
  flops = _flops(config, s.objective)
  step_s = _step_times(flops, target.num_devices, peak, mfus)
  return {
      "topology": target.name, "platform": target.platform,
      "device_kind": target.device_kind, "num_devices": target.num_devices,
      "num_slices": target.num_slices, "mesh": mesh_shape,
      "batch_size": int(config.batch_size),
      "batch_per_device": int(config.batch_size) / dp,
      "params": s.spec.num_params(), "hbm_capacity_bytes": target.hbm_bytes,
      "usable_bytes": target.usable_bytes,
      "flops_per_step": flops, "peak_tflops_per_device": peak,
      "predicted_step_s": step_s,
      "steps_per_epoch": s.steps_per_epoch, "total_steps": s.total_steps,
      "predicted_run_s": {m: t * s.total_steps for m, t in step_s.items()},
  }


def _mesh_shape(mesh) -> dict:
  """{data, fsdp, tensor} (make_mesh folds slices into data)."""
  return {k: int(v) for k, v in mesh.shape.items()}


class _Progress:
  """Timestamped progress lines on stderr (stdout keeps the report, or its
  JSON), and a heartbeat while a long call (XLA's compile) says nothing."""

  def __init__(self, every_s: float = 20.0):
    self.t0, self.every_s = time.perf_counter(), every_s

  def __call__(self, message: str) -> None:
    print(f"[aot {time.perf_counter() - self.t0:5.0f} s] {message}", file=sys.stderr,
          flush=True)

  @contextlib.contextmanager
  def heartbeat(self, what: str):
    done, start = threading.Event(), time.perf_counter()

    def beat():
      while not done.wait(self.every_s):
        self(f"  still {what}: {time.perf_counter() - start:.0f} s")
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
      yield
    finally:
      done.set()
      thread.join()


def check_tpu(config, target: Target, *, num_records: int | None = None,
              mfus=(0.4,)) -> dict:
  """Compiles the train step for `target`; returns the report (see the module
  docstring). Raises DoesNotFit with the compiler's message when it does not
  fit, ValueError for config errors."""
  import jax  # pylint: disable=import-outside-toplevel
  from biovfm_jax.train import loop  # pylint: disable=import-outside-toplevel
  from biovfm_jax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  from biovfm_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel

  _check_slices(config, target)
  say = _Progress()
  say(f"building the run for {target.name} ({target.topology_name}, "
      f"{target.num_devices} devices)...")
  devices = tpu_devices(target)
  s = loop.build(config, num_records=_records(num_records), devices=devices,
                 evaluators=False)
  state = state_lib.abstract_state(s.spec, s.tx, s.objective, s.shardings)
  batch = batch_specs(config, s.batch_sharding)
  peak = metrics_lib.peak_tflops(config, device=devices[0])
  report = _common(config, target, s, mfus, peak)
  report["state_bytes_per_device"] = _state_bytes(state)
  vit = s.objective.encoder_config
  say(f"lowering the train step ({s.spec.num_params() / 1e6:,.1f}M params, depth "
      f"{vit.depth}, layers {'scanned' if vit.scan_layers else 'unrolled'})...")
  t0 = time.perf_counter()
  try:
    lowered = s.train_step.lower(state, batch)
    report["lower_s"] = time.perf_counter() - t0
    say(f"compiling the train step for {target.num_devices} x {target.device_kind} "
        "(XLA's TPU compiler; minutes for a large model)...")
    with say.heartbeat("compiling"):
      compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    report.update(fits=False, compile_s=time.perf_counter() - t0, error=str(e).strip())
    say("the compiler ran out of memory: does not fit")
    raise DoesNotFit(str(e).strip(), report) from e
  report["compile_s"] = time.perf_counter() - t0  # lowering and compiling
  mem = compiled.memory_analysis()
  parts = {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
           "temporaries": mem.temp_size_in_bytes, "aliased": mem.alias_size_in_bytes,
           "code": mem.generated_code_size_in_bytes,
           "xla_peak": getattr(mem, "peak_memory_in_bytes", 0)}
  # Sum of the allocations; an upper bound on TPU (see the module docstring).
  allocated = (parts["arguments"] + parts["outputs"] + parts["temporaries"]
               - parts["aliased"])
  peak_hbm = parts["xla_peak"] or allocated
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float((cost or {}).get("flops", 0.0))
  report.update(xla_flops_counted_by="the compiled step", xla_flops_as_compiled=xla_flops)
  if vit.scan_layers:
    # XLA counts a scanned loop body once: count the layers by extrapolation.
    say("counting the scanned layers' FLOPs: compiling the step at depth 1 and 2...")
    _, corrected, _ = step_cost.measure_cost(config, devices, method="extrapolate",
                                             num_records=_records(num_records),
                                             say=lambda _: None, breakdown=False)
    xla_flops = corrected["flops"]
    report.update(xla_flops_counted_by="extrapolate", xla_cost_extrapolated=corrected)
  report.update(
      memory_bytes=parts, peak_hbm_bytes=int(peak_hbm), allocated_bytes=int(allocated),
      fits=peak_hbm <= target.usable_bytes,
      xla_flops_per_device=xla_flops, xla_flops_per_step=xla_flops * target.num_devices)
  say(f"compiled in {report['compile_s']:.0f} s; peak {peak_hbm / GIB:.2f} GiB per device "
      f"of {target.usable_bytes / GIB:.2f} usable: "
      f"{'fits' if report['fits'] else 'does not fit'}")
  if not report["fits"]:
    raise DoesNotFit(f"peak HBM {peak_hbm / GIB:.2f} GiB per device exceeds the "
                     f"{target.usable_bytes / GIB:.2f} GiB usable on a {target.device_kind}",
                     report)
  return report


def cost_tpu(config, target: Target, *, method: str = "unroll",
             num_records: int | None = None) -> dict:
  """XLA's TPU cost model of the train step on `target` (biovfm_jax/step_cost.py)."""
  import jax  # pylint: disable=import-outside-toplevel
  from biovfm_jax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  if target.platform != "tpu":
    raise ValueError(f"--cost models a TPU program; --topology={target.name!r} is a GPU "
                     "(use a TPU topology, e.g. v5p-8)")
  _check_slices(config, target)
  say = _Progress()
  say(f"building the run for {target.name} ({target.topology_name}, "
      f"{target.num_devices} devices)...")
  devices = tpu_devices(target)
  try:
    with say.heartbeat("compiling"):
      s, cost, parts = step_cost.measure_cost(config, devices, method=method,
                                              num_records=_records(num_records), say=say)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise ValueError(f"the step does not fit on {target.name}, so it has no cost to model "
                     f"(try a bigger slice, FSDP or remat): {str(e).strip().splitlines()[0]}"
                     ) from e
  say("done")
  return step_cost.report(config, target, s, cost, parts, method=method,
                          peak_tflops=metrics_lib.peak_tflops(config, device=devices[0]))


def _records(num_records: int | None) -> int:
  """Only the step counts (LR schedule, run time) depend on the corpus size: it
  changes no shape, memory or FLOPs, so a nominal size is used unless given."""
  return 1_000_000 if num_records is None else int(num_records)


# --- GPU: an analytic estimate --------------------------------------------------

def _mesh_sizes(mesh_cfg: dict, n: int) -> dict:
  """sharding.mesh_sizes, imported late (jax must not load at import: see __main__)."""
  from biovfm_jax import sharding as shd  # pylint: disable=import-outside-toplevel
  return shd.mesh_sizes(mesh_cfg, n)


@functools.lru_cache(maxsize=64)
def _block_residuals(vit, tokens: int, seqs: int) -> tuple[int, int]:
  """(all, tensor-split) bytes that JAX's autodiff saves for the backward pass
  of one transformer block of `vit` over `seqs` sequences of `tokens` under
  its remat policy, arguments (the block input, its params) excluded. Traced
  abstractly with jax.ad_checkpoint's residual listing (nothing is computed).
  Tensor-split: residuals with a heads or FFN-hidden axis, which tensor
  parallelism divides."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=import-outside-toplevel
  from biovfm_jax.models import layers  # pylint: disable=import-outside-toplevel

  # cuDNN attention cannot be traced on this CPU host; XLA's keeps the T x T
  # probabilities, so the figure is high for flash attention.
  vit = dataclasses.replace(vit, attention_impl="xla")
  graphdef, params = nnx.split(nnx.eval_shape(lambda: layers.Block(vit, rngs=nnx.Rngs(0))))

  def block(params, x, key):
    y = nnx.merge(graphdef, params)(x, key, vit.drop_path_rate == 0.0)
    return y.astype(jnp.float32).sum()

  if vit.remat_policy != "none":
    block = jax.checkpoint(block, policy=layers.remat_policy(vit.remat_policy))
  x = jax.ShapeDtypeStruct((seqs, tokens, vit.width), jnp.dtype(vit.dtype))
  total = split = 0
  for aval, where in saved_residuals(block, params, x, jax.random.key(0)):
    if "argument" in where:
      continue
    size = math.prod(aval.shape) * aval.dtype.itemsize
    total += size
    if vit.num_heads in aval.shape[1:] or vit.mlp_dim in aval.shape[1:]:
      split += size
  return total, split


def stack_activation_bytes(vit, tokens: int, seqs: float, tensor: int = 1) -> float:
  """Bytes one device keeps for the backward pass of a `vit.depth`-block stack
  over `seqs` sequences of `tokens` (see the module docstring)."""
  def per_layer(v):
    # Traced at 1 and 2 sequences: what grows with the batch, and what does
    # not (the compute-dtype copies of the block's weights).
    (t1, s1), (t2, s2) = _block_residuals(v, tokens, 1), _block_residuals(v, tokens, 2)
    keep = 1 - 1 / tensor
    return ((t2 - t1) - (s2 - s1) * keep) * seqs + (2 * t1 - t2) - (2 * s1 - s2) * keep

  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  total = vit.depth * per_layer(vit)
  if vit.remat_policy != "none":
    act = seqs * tokens * vit.width * jnp.dtype(vit.dtype).itemsize
    # Each layer's input, and one layer's full set while it is recomputed.
    total += vit.depth * act + per_layer(dataclasses.replace(vit, remat_policy="none"))
  return total


def _activation_bytes(objective, b: float, tensor: int) -> dict[str, float]:
  """Saved activations (and e.g. head logits) for b images on one device, by
  the objective's activation_plan."""
  return {name: (stack_activation_bytes(*part, tensor) if isinstance(part, tuple)
                 else part / tensor)
          for name, part in objective.activation_plan(b).items()}


def _block_param_count(abstract_params, depth: int) -> int:
  """Parameters of one transformer block (the stack's params / depth)."""
  import jax  # pylint: disable=import-outside-toplevel
  total = 0
  for path, x in jax.tree_util.tree_leaves_with_path(abstract_params):
    keys = [str(getattr(k, "key", k)) for k in path]
    if "blocks" in keys or "layers" in keys:
      total += x.size
  return total // max(depth, 1)


@dataclasses.dataclass
class _Kind:
  """Stands in for a device in metrics.peak_tflops."""
  device_kind: str


def estimate_gpu(config, target: Target, *, num_records: int | None = None,
                 mfus=(0.4,)) -> dict:
  """Analytic memory per GPU (see the module docstring). Raises DoesNotFit
  when the estimate exceeds the usable memory, ValueError for config errors."""
  import jax  # pylint: disable=import-outside-toplevel
  from biovfm_jax.train import loop  # pylint: disable=import-outside-toplevel
  from biovfm_jax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  from biovfm_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel

  _check_slices(config, target)
  # What a run builds, on an abstract mesh of the target's device count.
  s = loop.build(config, num_records=_records(num_records), devices=target.num_devices,
                 evaluators=False)
  sizes, objective = _mesh_shape(s.mesh), s.objective
  state = state_lib.abstract_state(s.spec, s.tx, objective, s.shardings)
  state_bytes = _state_bytes(state)
  accum = int(config.optim.grad_accum_steps)
  dp, tensor, fsdp = sizes["data"] * sizes["fsdp"], sizes["tensor"], sizes["fsdp"]
  micro = int(config.batch_size) / dp / accum
  parts = {"params": state_bytes["params"], "opt_state": state_bytes["opt_state"],
           "extra": state_bytes["extra"],
           # gradients, and their running sum under accumulation
           "gradients": state_bytes["params"] * (2 if accum > 1 else 1)}
  if fsdp > 1:
    vit = objective.encoder_config
    pbytes = jax.numpy.dtype(vit.param_dtype).itemsize
    block = _block_param_count(s.spec.abstract_params, vit.depth)
    parts["fsdp_gather"] = 2 * block * pbytes / tensor
  acts = _activation_bytes(objective, micro, tensor)
  parts.update({f"activations_{k}": v for k, v in acts.items()})
  batch = batch_specs(config, None)
  parts["batch"] = sum(math.prod(x.shape) * x.dtype.itemsize for x in batch.values()) / dp
  parts = {k: int(v) for k, v in parts.items()}
  total = sum(parts.values())
  usable = target.usable_bytes
  fraction = usable / target.hbm_bytes
  peak = metrics_lib.peak_tflops(config, device=_Kind(target.device_kind))
  report = _common(config, target, s, mfus, peak)
  report.update(state_bytes_per_device=state_bytes, memory_bytes=parts,
                peak_hbm_bytes=total, mem_fraction=fraction,
                fits=total <= usable, estimate=True)
  if not report["fits"]:
    raise DoesNotFit(f"estimated {total / GIB:.1f} GiB per GPU exceeds the usable "
                     f"{usable / GIB:.1f} GiB ({fraction:g} x {target.hbm_bytes / GIB:.0f} GiB "
                     f"of a {target.device_kind})", report)
  return report


def check(config, target: Target, **kwargs) -> dict:
  """The TPU compile or the GPU estimate, by target."""
  fn = check_tpu if target.platform == "tpu" else estimate_gpu
  return fn(config, target, **kwargs)


# --- Command line ---------------------------------------------------------------

def format_report(r: dict, config_name: str = "") -> str:
  """The human-readable report."""
  gib = lambda x: f"{x / GIB:.2f}"  # noqa: E731
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [f"{'Estimate' if r.get('estimate') else 'AOT compile'}: {config_name} on "
           f"{r['topology']} ({r['num_devices']} x {r['device_kind']}, "
           f"{r['num_slices']} slice(s))",
           f"  mesh {mesh} | batch {r['batch_size']} ({r['batch_per_device']:g} per device) "
           f"| {r['params'] / 1e6:,.1f}M params"]
  cap = gib(r["hbm_capacity_bytes"])
  if "peak_hbm_bytes" in r:
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    usable = f" (usable {gib(r['usable_bytes'])})"
    lines.append(f"  peak memory per device  {gib(r['peak_hbm_bytes'])} GiB of {cap} GiB"
                 f"{usable} -> {verdict}")
    m = r["memory_bytes"]
    if r.get("estimate"):
      lines.append("    = " + " + ".join(f"{k} {gib(v)}" for k, v in m.items()) + " (GiB)")
    else:
      lines.append(f"    XLA's live-buffer peak; allocations: arguments {gib(m['arguments'])} + "
                   f"outputs {gib(m['outputs'])} + temporaries {gib(m['temporaries'])} - "
                   f"aliased {gib(m['aliased'])} = {gib(r['allocated_bytes'])} GiB; "
                   f"code {gib(m['code'])}")
  else:
    lines.append(f"  HBM per device {cap} GiB -> DOES NOT FIT")
  sb = r["state_bytes_per_device"]
  lines.append(f"  state per device        params {gib(sb['params'])} + optimiser "
               f"{gib(sb['opt_state'])} + extra {gib(sb['extra'])} GiB")
  by = (" (scanned layers counted by depth extrapolation)"
        if r.get("xla_flops_counted_by") == "extrapolate" else "")
  xla = (f", XLA cost analysis {r['xla_flops_per_step']:.3e}{by}"
         if r.get("xla_flops_per_step") else "")
  lines.append(f"  FLOPs per step          {r['flops_per_step']:.3e} (analytic){xla}")
  if r["predicted_step_s"]:
    times = ", ".join(f"{t:.3g} s at MFU {m}" for m, t in r["predicted_step_s"].items())
    lines.append(f"  step time               {times} "
                 f"({r['peak_tflops_per_device']:g} TFLOP/s peak per device)")
    runs = ", ".join(f"{t / 3600:.3g} h at MFU {m}" for m, t in r["predicted_run_s"].items())
    lines.append(f"  run time                {runs} ({r['total_steps']:,} steps, "
                 f"{r['steps_per_epoch']:,} per epoch)")
  if "compile_s" in r:
    lines.append(f"  compile                 {r['compile_s']:.1f} s")
  return "\n".join(lines)


def _define_flags() -> dict:
  """Only when run as a program: importing this module defines no flags."""
  return {
      "config": config_flags.DEFINE_config_file("config", None, "Config file "
                                                "(configs/*.py).", lock_config=True),
      "topology": flags.DEFINE_string("topology", None, f"Target: {TOPOLOGY_FORMS}."),
      "num_slices": flags.DEFINE_integer("num_slices", 1, "TPU slices joined over DCN "
                                         "(with --config.mesh.slices)."),
      "mfu": flags.DEFINE_list("mfu", ["0.4"], "MFU(s) for the predicted step time."),
      "num_records": flags.DEFINE_integer("num_records", None, "Corpus size, for the "
                                          "step count (LR schedule, run time) "
                                          "(default 1,000,000)."),
      "json": flags.DEFINE_bool("json", False, "Print the report as one JSON line instead."),
      "cost": flags.DEFINE_bool("cost", False, "Report XLA's TPU cost model of the step "
                                "(modeled time, MFU, HBM bytes per image, breakdown) "
                                "instead of the fit."),
      "cost_method": flags.DEFINE_enum("cost_method", "unroll", ["unroll", "extrapolate"],
                                       "How --cost counts scanned layers "
                                       "(biovfm_jax/step_cost.py)."),
  }


_FLAGS: dict = {}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = {k: v.value for k, v in _FLAGS.items()}
  name = config_flags.get_config_filename(flags.FLAGS["config"])
  try:
    mfus = [float(m) for m in f["mfu"]]
    if not all(0 < m <= 1 for m in mfus):
      raise ValueError(f"--mfu={','.join(f['mfu'])} must be in (0, 1]")
    target = parse_topology(f["topology"], f["num_slices"])
    if f["cost"]:
      report = cost_tpu(f["config"], target, method=f["cost_method"],
                        num_records=f["num_records"])
      report["config"] = name
      print(json.dumps(report) if f["json"] else step_cost.format_cost(report, name),
            flush=True)
      sys.exit(0)
    report = check(f["config"], target, num_records=f["num_records"], mfus=mfus)
    code = 0
  except DoesNotFit as e:
    report, code = e.report, 3
    report.setdefault("error", str(e))
    print(f"Does not fit: {e}", file=sys.stderr)
  except (ValueError, MissingLibtpu) as e:  # config and topology errors: one clear line
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(2)
  report["config"] = name
  print(json.dumps(report) if f["json"] else format_report(report, name), flush=True)
  sys.exit(code)


if __name__ == "__main__":
  # Before jax is imported (parsing --config imports it): this process compiles
  # for devices that are not here and never runs on any.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  _FLAGS.update(_define_flags())
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
