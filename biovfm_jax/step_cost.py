"""What XLA's TPU cost model says of the compiled train step, on this machine.

  python -m biovfm_jax.aot --cost --config=configs/vit_b_mae.py --topology=v5p-8

For every program it compiles, the TPU compiler (libtpu, no TPU needed)
reports `flops`, `bytes accessed` (HBM traffic) and `optimal_seconds` (its
cost model's time for the program). From them, per chip and step:

  modeled step time    optimal_seconds
  modeled TFLOP/s      XLA's flops / optimal_seconds (recomputation counts)
  modeled MFU          analytic FLOPs (the objective's flops_per_example, what
                       the run's progress line uses) / optimal_seconds / peak,
                       so recomputation cannot raise it; beside it XLA's
  HBM bytes per image  bytes accessed x chips / global batch
  intensity            XLA's flops / bytes accessed, against the chip's ridge
                       point (peak / HBM bandwidth): below it, memory-bound
  images/s per chip    global batch / chips / optimal_seconds

It is a model, not a stopwatch, but of our real program: a change that cuts
bytes or FLOPs without changing the maths is a gain on the chip.

Scanned layers: XLA's cost analysis counts a loop body once (ViT-L scanned
reports a tenth of its FLOPs). Two ways to count right:
  unroll (default)  compile the step with scan_layers=False: the program as
                    it runs unrolled, and the breakdown of every layer.
  extrapolate       compile with every block stack at depth 1, then each
                    stack at depth 2 (one more compile per stack: the MAE
                    decoder is a second), and scale: cost(depth D) =
                    cost(1) + (D - 1) x (cost(2) - cost(1)). Small programs:
                    for ViT-H/g, whose unrolled compile takes long.
tests/test_step_cost.py checks the two agree on a small model.

The breakdown attributes each instruction of the optimised program (a fusion,
a copy, a collective) to a part of the step by the Python stack XLA keeps for
it (the HLO's stack frames: Attention.__call__ inside
MaskedAutoencoder.decode is the decoder's attention) and whether it is the
forward or the backward pass (its op name holds transpose(...)). Per part:
its share of the cost model's estimated cycles (each instruction's
`estimated_cycles`, scaled to optimal_seconds) and its HBM bytes counted as
its operands plus its outputs. That count is below XLA's `bytes accessed`,
which also counts an operand each time a fusion re-reads it; the report
gives both totals.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import re


# HBM bandwidth per chip, TB/s (Cloud TPU system architecture pages).
HBM_TB_S = {"v4": 1.2, "v5p": 2.765, "v5e": 0.819, "v6e": 1.64}

METHODS = ("unroll", "extrapolate")

# Ops that move no HBM bytes themselves (views, bookkeeping, control flow
# whose bodies are counted instruction by instruction).
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast",
               "after-all", "partition-id", "replica-id", "copy-done", "while", "call",
               "conditional", "all-reduce-done", "all-gather-done",
               "collective-permute-done", "send-done", "recv-done", "opt-barrier"}
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1,
                "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")


def _array_bytes(type_text: str) -> float:
  """Bytes of every array in an HLO type (a tuple's members summed)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(type_text):
    if dtype in _DTYPE_BYTES:
      n = 1
      for d in dims.split(","):
        if d:
          n *= int(d)
      total += n * _DTYPE_BYTES[dtype]
  return total


def _table(text: str, name: str) -> dict[int, str]:
  m = re.search(rf"^{name}\n((?:\d+ .*\n)+)", text, re.M)
  if not m:
    return {}
  return {int(k): v for k, v in (line.split(" ", 1) for line in m.group(1).splitlines())}


class _Stacks:
  """The HLO module's stack-frame tables: frame id -> [(file, function)],
  innermost first."""

  def __init__(self, text: str):
    unquote = lambda d: {k: v.strip('"') for k, v in d.items()}  # noqa: E731
    files, functions = unquote(_table(text, "FileNames")), unquote(_table(text, "FunctionNames"))
    fields = lambda v: {k: int(x) for k, x in re.findall(r"(\w+)=(\d+)", v)}  # noqa: E731
    self.locations = {k: (files.get(f["file_name_id"], ""),
                          functions.get(f["function_name_id"], ""))
                      for k, f in ((k, fields(v)) for k, v in
                                   _table(text, "FileLocations").items())}
    # A frame's parent_frame_id is one more than the parent's id (0: none).
    self.frames = {k: (f["file_location_id"], f["parent_frame_id"] - 1)
                   for k, f in ((k, fields(v)) for k, v in _table(text, "StackFrames").items())}
    self._cache: dict[int, tuple] = {}

  def __call__(self, frame: int) -> tuple:
    if frame not in self._cache:
      out, seen, f = [], set(), frame
      while f in self.frames and f not in seen:
        seen.add(f)
        loc, f = self.frames[f]
        out.append(self.locations.get(loc, ("", "")))
      self._cache[frame] = tuple(out)
    return self._cache[frame]


def classify(stack: tuple) -> str:
  """A part of the train step from an instruction's Python stack (innermost
  first): '<component>' or '<component>/<sublayer>'."""
  functions = [fn for _, fn in stack]
  files = [f for f, _ in stack]
  has = lambda *names: any(fn.split(".<locals>")[0] in names for fn in functions)  # noqa: E731
  if any("optax" in f or f.endswith("train/optim.py") for f in files):
    return "optimizer update"
  if has("MaskedAutoencoder.decode"):
    component = "decoder"
  elif any(fn.startswith(("DINOHead.", "IBOTHead.")) for fn in functions):
    return "heads"
  elif has("BlockStack.__call__"):
    component = "encoder blocks"
  elif has("VisionTransformer.embed_patches", "patchify", "PatchEmbed.__call__"):
    return "patch embedding"
  elif any("/objectives/" in f and not fn.endswith("Objective.loss") for f, fn in stack):
    return "loss and targets"  # not the objective's loss() that wraps the whole step
  else:
    return "other"
  core = ("softmax_attention", "attention_recompute", "_attention_forward",
          "_attention_backward", "_logits")
  for fn in functions:  # innermost first
    if fn in core:
      return f"{component}/attention softmax(qk)v"
    if fn.startswith("Attention.__call__"):
      return f"{component}/attention qkv, proj"
    if fn.startswith(("Mlp.", "SwiGLU.")):
      return f"{component}/mlp"
    if fn.startswith("LayerNorm."):
      return f"{component}/norm"
  return f"{component}/other"


@dataclasses.dataclass
class Part:
  cycles: float = 0.0        # estimated_cycles, times a loop's trip count
  bytes: float = 0.0         # operands + outputs
  backward_cycles: float = 0.0

  def add(self, other: "Part", scale: float = 1.0) -> None:
    for f in dataclasses.fields(self):
      setattr(self, f.name, getattr(self, f.name) + scale * getattr(other, f.name))


def parse_hlo(text: str) -> tuple[str, dict[str, list]]:
  """(entry name, {computation: [(name, type, op, rest of line)]}) of an HLO
  module's text."""
  computations: dict[str, list] = {}
  entry, current = None, None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = computations.setdefault(m.group(1), [])
      entry = m.group(1) if line.startswith("ENTRY") else entry
      continue
    if line.startswith("}"):
      current = None
      continue
    if current is not None:
      m = _INSTRUCTION.match(line)
      if m:
        current.append(m.groups())
  if entry is None:
    raise ValueError("not an HLO module: no ENTRY computation")
  return entry, computations


def hlo_breakdown(text: str) -> dict[str, Part]:
  """Parts of an optimised HLO module (compiled.as_text()) -> Part. Walks the
  entry computation and what it runs (while bodies times their known trip
  count, called computations), not fusion internals."""
  entry, computations = parse_hlo(text)
  shapes = {name: typ for insts in computations.values() for name, typ, _, _ in insts}
  stacks = _Stacks(text)
  parts: dict[str, Part] = collections.defaultdict(Part)

  def walk(computation: str, times: float, depth: int = 0):
    if depth > 32:
      raise ValueError("HLO computations nest too deeply")
    for name, typ, op, rest in computations.get(computation, []):
      if op == "while":
        body = re.search(r"body=%([\w.\-]+)", rest)
        if body:
          walk(body.group(1), times * _trip_count(rest, computations), depth + 1)
        continue
      if op in ("call", "conditional", "async-start"):
        for callee in re.findall(r"(?:to_apply|calls|branch_computations=\{|, )%([\w.\-]+)",
                                 rest.split("metadata=")[0]):
          walk(callee, times, depth + 1)
        continue
      frame = re.search(r"stack_frame_id=(\d+)", rest)
      part = classify(stacks(int(frame.group(1)))) if frame else "other"
      cycles = re.search(r'"estimated_cycles":"(\d+)"', rest)
      p = Part(cycles=float(cycles.group(1)) if cycles else 0.0)
      if op not in _NO_TRAFFIC:
        operands = rest.split(")", 1)[0]
        moved = [_array_bytes(shapes.get(a, "")) for a in re.findall(r"%([\w.\-]+)", operands)]
        # copy-start's output is a (destination, source, context) tuple.
        p.bytes = 2 * sum(moved) if op == "copy-start" else _array_bytes(typ) + sum(moved)
      op_name = re.search(r'op_name="([^"]*)"', rest)
      if op_name and "transpose(" in op_name.group(1):
        p.backward_cycles = p.cycles
      parts[part].add(p, times)

  walk(entry, 1.0)
  return dict(parts)


def _trip_count(while_rest: str, computations: dict) -> int:
  """A while loop's trip count: XLA's known_trip_count when it kept one, else
  the bound of a scan's condition (counter < constant, from 0)."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_rest)
  if known:
    return int(known.group(1))
  cond = re.search(r"condition=%([\w.\-]+)", while_rest)
  insts = computations.get(cond.group(1), []) if cond else []
  constants = {name: rest for name, _, op, rest in insts if op == "constant"}
  for _, _, op, rest in insts:
    if op == "compare" and "direction=LT" in rest:
      for operand in re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0]):
        bound = re.match(r"(\d+)\)", constants.get(operand, ""))
        if bound:
          return int(bound.group(1))
  return 1


def xla_cost(compiled) -> dict:
  """flops, bytes accessed, optimal_seconds of a compiled TPU program."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes": float(cost.get("bytes accessed", 0.0)),
          "seconds": float(cost.get("optimal_seconds", 0.0))}


# --- Compiling the variants --------------------------------------------------

def depth_keys(config, objective) -> dict[str, int]:
  """The config keys of the step's block stacks -> their depths."""
  keys = {"model.depth": int(objective.encoder_config.depth)}
  if config.objective == "mae":
    keys["mae.decoder_depth"] = int(config.mae.decoder_depth)
  return keys


def _with(config, **changes):
  """A copy of `config` with dotted keys set."""
  c = copy.deepcopy(config)
  with c.unlocked():
    for key, value in changes.items():
      *path, leaf = key.split(".")
      node = c
      for p in path:
        node = node[p]
      node[leaf] = value
  return c


def batch_specs(config, sharding) -> dict:
  """Abstract global batch (data_pipeline/loader.py's batch_spec), placed with
  `sharding`."""
  import jax  # pylint: disable=import-outside-toplevel
  from data_pipeline import loader  # pylint: disable=import-outside-toplevel
  return {k: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
          for k, (shape, dt) in loader.batch_spec(config.data, config.batch_size).items()}


def _compile(config, devices, num_records: int, s=None):
  """The compiled train step of `config` for `devices` (a TPU topology's);
  `s`: loop.build's Setup of that config when the caller has built it."""
  from biovfm_jax.train import loop  # pylint: disable=import-outside-toplevel
  from biovfm_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  if s is None:
    s = loop.build(config, num_records=num_records, devices=devices, evaluators=False)
  state = state_lib.abstract_state(s.spec, s.tx, s.objective, s.shardings)
  batch = batch_specs(config, s.batch_sharding)
  return s.train_step.lower(state, batch).compile()


def _combine(base, variants: list, depths: list[int]):
  """base + sum (D - 1) x (variant - base), for dicts of numbers or of Parts."""
  if isinstance(base, dict) and base and isinstance(next(iter(base.values())), Part):
    out = collections.defaultdict(Part)
    for k, v in base.items():
      out[k].add(v)
    for variant, d in zip(variants, depths):
      for k in set(variant) | set(base):
        out[k].add(variant.get(k, Part()), d - 1)
        out[k].add(base.get(k, Part()), -(d - 1))
    return dict(out)
  return {k: base[k] + sum((d - 1) * (v[k] - base[k]) for v, d in zip(variants, depths))
          for k in base}


def measure_cost(config, devices, *, method: str = "unroll", num_records: int = 1_000_000,
                 say=print, breakdown: bool = True) -> tuple[object, dict, dict[str, Part]]:
  """(Setup, XLA's cost {flops, bytes, seconds} per chip, breakdown) of the
  train step of `config` on `devices`, scanned stacks counted right
  (breakdown=False: {} for the breakdown, the HLO is not read)."""
  from biovfm_jax.train import loop  # pylint: disable=import-outside-toplevel
  if method not in METHODS:
    raise ValueError(f"--cost_method={method!r}: use one of {METHODS}")
  config = _with(config, **{"model.scan_layers": False})
  s = loop.build(config, num_records=num_records, devices=devices, evaluators=False)
  if method == "unroll":
    say("compiling the step with its layers unrolled (XLA's TPU compiler; minutes "
        "for ViT-L)...")
    compiled = _compile(config, devices, num_records, s)
    return s, xla_cost(compiled), hlo_breakdown(compiled.as_text()) if breakdown else {}
  keys = depth_keys(config, s.objective)
  ones = {k: 1 for k in keys}
  say(f"compiling the step at depth 1, then each of {', '.join(keys)} at 2...")
  base = _compile(_with(config, **ones), devices, num_records)
  variants = [_compile(_with(config, **{**ones, k: 2}), devices, num_records) for k in keys]
  depths = list(keys.values())
  cost = _combine(xla_cost(base), [xla_cost(v) for v in variants], depths)
  if not breakdown:
    return s, cost, {}
  parts = _combine(hlo_breakdown(base.as_text()),
                   [hlo_breakdown(v.as_text()) for v in variants], depths)
  return s, cost, parts


# --- The report ---------------------------------------------------------------

def report(config, target, s, cost: dict, parts: dict[str, Part], *, method: str,
           peak_tflops: float | None) -> dict:
  """The cost report's fields (per chip per step unless named otherwise)."""
  chips = target.num_devices
  batch = int(config.batch_size)
  images = batch / chips
  seconds = cost["seconds"]
  analytic = float(s.objective.flops_per_example()) * batch / chips
  bandwidth = HBM_TB_S.get(target.generation)
  out = {
      "config_batch": batch, "topology": target.name, "chips": chips,
      "device_kind": target.device_kind, "method": method,
      "mesh": {k: int(v) for k, v in s.mesh.shape.items()},
      "images_per_chip": images,
      "modeled_step_s": seconds,
      "xla_tflop": cost["flops"] / 1e12, "analytic_tflop": analytic / 1e12,
      "hbm_gb": cost["bytes"] / 1e9,
      "modeled_tflops": cost["flops"] / seconds / 1e12 if seconds else None,
      "peak_tflops": peak_tflops,
      "mfu_analytic": analytic / seconds / (peak_tflops * 1e12) if seconds and peak_tflops
      else None,
      "mfu_xla": cost["flops"] / seconds / (peak_tflops * 1e12) if seconds and peak_tflops
      else None,
      "hbm_mb_per_image": cost["bytes"] / images / 1e6,
      "intensity_flop_per_byte": cost["flops"] / cost["bytes"] if cost["bytes"] else None,
      "ridge_flop_per_byte": peak_tflops / bandwidth if peak_tflops and bandwidth else None,
      "hbm_tb_s_at_model": cost["bytes"] / seconds / 1e12 if seconds else None,
      "images_per_s_per_chip": images / seconds if seconds else None,
  }
  total_cycles = sum(p.cycles for p in parts.values()) or 1.0
  counted = sum(p.bytes for p in parts.values())
  out["breakdown_bytes_counted_gb"] = counted / 1e9
  out["breakdown"] = {
      name: {"time_share": p.cycles / total_cycles,
             "modeled_ms": 1e3 * seconds * p.cycles / total_cycles,
             "backward_share": p.backward_cycles / p.cycles if p.cycles else 0.0,
             "gb": p.bytes / 1e9, "mb_per_image": p.bytes / images / 1e6}
      for name, p in sorted(parts.items(), key=lambda kv: -kv[1].cycles)}
  return out


def format_cost(r: dict, config_name: str = "") -> str:
  """The human-readable cost report."""
  pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [
      f"XLA TPU cost model: {config_name} on {r['topology']} ({r['chips']} x "
      f"{r['device_kind']}), layers counted by {r['method']}",
      f"  mesh {mesh} | batch {r['config_batch']} ({r['images_per_chip']:g} per chip)",
      f"  modeled step time     {r['modeled_step_s'] * 1e3:,.1f} ms per step "
      f"({r['images_per_s_per_chip']:,.0f} images/s per chip)",
      f"  FLOPs per chip        {r['xla_tflop']:.4g} TFLOP (XLA), "
      f"{r['analytic_tflop']:.4g} TFLOP (analytic)",
      f"  modeled TFLOP/s       {r['modeled_tflops']:.0f} (XLA's FLOPs); MFU "
      f"{pct(r['mfu_analytic'])} analytic, {pct(r['mfu_xla'])} XLA "
      f"(peak {r['peak_tflops']:g})",
      f"  HBM traffic           {r['hbm_gb']:,.1f} GB per chip, "
      f"{r['hbm_mb_per_image']:,.1f} MB per image, {r['hbm_tb_s_at_model']:.2f} TB/s "
      "at the modeled time",
  ]
  if r["ridge_flop_per_byte"]:
    bound = "memory" if r["intensity_flop_per_byte"] < r["ridge_flop_per_byte"] else "compute"
    lines.append(f"  intensity             {r['intensity_flop_per_byte']:.0f} FLOP/byte "
                 f"(ridge {r['ridge_flop_per_byte']:.0f}: {bound}-bound on average)")
  lines.append(f"  where the time and bytes go (bytes as operands + outputs: "
               f"{r['breakdown_bytes_counted_gb']:,.1f} GB of XLA's {r['hbm_gb']:,.1f}):")
  lines.append(f"    {'part':40s} {'time':>7s} {'ms':>8s} {'bwd':>5s} {'GB':>8s} "
               f"{'MB/img':>8s}")
  for name, p in r["breakdown"].items():
    if p["time_share"] < 0.001 and p["gb"] < 0.1:
      continue
    lines.append(f"    {name:40s} {pct(p['time_share']):>7s} {p['modeled_ms']:8.1f} "
                 f"{100 * p['backward_share']:4.0f}% {p['gb']:8.1f} {p['mb_per_image']:8.1f}")
  return "\n".join(lines)
