"""XLA's TPU cost model of the train step (biovfm_jax/step_cost.py,
`python -m biovfm_jax.aot --cost`): compiled for v5p-8 by libtpu on this CPU,
nothing runs. A tiny MAE (4-layer encoder, 3-layer decoder) keeps each
compile to seconds."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from biovfm_jax import aot, step_cost
from biovfm_jax.models import layers
from configs import quickstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(scan: bool):
  c = quickstart.get_config()
  c.model.scan_layers = scan
  c.mae.decoder_depth = 3
  c.batch_size = 32
  return c


# Session fixtures: a worker compiles the shared step once (a module fixture is set
# up again when xdist interleaves another module's tests).


@pytest.fixture(scope="session")
def v5p8():
  target = aot.parse_topology("v5p-8")
  return target, aot.tpu_devices(target)


@pytest.fixture(scope="session")
def unrolled(v5p8):
  """(XLA's cost, breakdown) of the tiny step, layers unrolled."""
  _, devices = v5p8
  _, cost, parts = step_cost.measure_cost(_tiny(scan=True), devices, method="unroll",
                                          say=lambda _: None)
  return cost, parts


def test_unroll_and_depth_extrapolation_agree_where_the_scanned_count_is_low(v5p8, unrolled):
  """The two ways of counting scanned layers agree (the fit check counts its
  "XLA cost analysis" line by extrapolation); XLA's own count of the scanned
  program, the trap, is far below both."""
  target, _ = v5p8
  cost, _ = unrolled
  fit = aot.check_tpu(_tiny(scan=True), target, num_records=1000)
  assert fit["xla_flops_counted_by"] == "extrapolate"
  for key in ("flops", "bytes", "seconds"):
    assert fit["xla_cost_extrapolated"][key] == pytest.approx(cost[key], rel=0.03), key
  assert fit["xla_flops_per_step"] == pytest.approx(cost["flops"] * 4, rel=0.03)
  assert fit["xla_flops_as_compiled"] < 0.7 * cost["flops"]
  assert "scanned layers counted by depth extrapolation" in aot.format_report(fit)


def test_breakdown_names_the_parts_and_accounts_for_the_traffic(unrolled):
  cost, parts = unrolled
  for name in ("patch embedding", "encoder blocks/attention softmax(qk)v",
               "encoder blocks/attention qkv, proj", "encoder blocks/mlp",
               "encoder blocks/norm", "decoder/attention softmax(qk)v", "decoder/mlp",
               "loss and targets", "optimizer update"):
    assert parts[name].cycles > 0 and parts[name].bytes > 0, name
  # Forward and backward of a block; the optimiser has no backward pass.
  mlp = parts["encoder blocks/mlp"]
  assert 0.3 < mlp.backward_cycles / mlp.cycles < 0.9
  assert parts["optimizer update"].backward_cycles == 0
  # Operands + outputs: much of XLA's bytes accessed (which counts re-reads), never more.
  counted = sum(p.bytes for p in parts.values())
  assert 0.3 * cost["bytes"] < counted <= cost["bytes"]


def test_scanned_program_breakdown_counts_each_layer(v5p8):
  """The breakdown walks a while loop's body times its trip count, read off
  the scan's condition in the compiler's output: the encoder's 4 layers and
  the decoder's 3, forward and backward."""
  _, devices = v5p8
  text = step_cost._compile(_tiny(scan=True), devices, 1000).as_text()
  entry, computations = step_cost.parse_hlo(text)
  loops = [rest for _, _, op, rest in computations[entry] if op == "while"]
  assert sorted(step_cost._trip_count(rest, computations) for rest in loops) == [3, 3, 4, 4]
  once = step_cost.hlo_breakdown(text.replace("direction=LT", "direction=NE"))
  counted = step_cost.hlo_breakdown(text)
  # Without the bound every body counts once.
  assert counted["encoder blocks/mlp"].cycles > 2.5 * once["encoder blocks/mlp"].cycles


def test_cost_cli_prints_json_and_a_table(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "biovfm_jax.aot", "--cost", "--config=configs/quickstart.py",
         "--topology=v5p-8"]
  out = subprocess.run(cmd + ["--json", "--cost_method=extrapolate"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600, check=True)
  r = json.loads(out.stdout)
  assert r["method"] == "extrapolate" and r["chips"] == 4 and r["images_per_chip"] == 16
  assert 0 < r["mfu_analytic"] < 1 and r["modeled_step_s"] > 0
  assert r["hbm_mb_per_image"] == pytest.approx(r["hbm_gb"] * 1e3 / 16)
  assert r["images_per_s_per_chip"] == pytest.approx(16 / r["modeled_step_s"])
  assert sum(p["time_share"] for p in r["breakdown"].values()) == pytest.approx(1.0)
  text = step_cost.format_cost(r, "configs/quickstart.py")
  assert "decoder/attention softmax(qk)v" in text and "MB per image" in text
  # A GPU target: one line, no traceback.
  bad = subprocess.run(cmd[:-1] + ["--topology=h100-8"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert "--cost models a TPU program" in bad.stderr


def _attention_cost(v5p8, fn, tokens: int) -> dict:
  _, devices = v5p8
  x = jax.ShapeDtypeStruct((128, tokens, 16, 32), jnp.bfloat16,
                           sharding=jax.sharding.SingleDeviceSharding(devices[0]))
  grad = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(),
                          argnums=(0, 1, 2)))
  return step_cost.xla_cost(grad.lower(x, x, x).compile())


def test_recomputed_softmax_cuts_modeled_traffic_at_long_sequences(v5p8):
  """What configs/common.py's attention_recompute_from rests on: the MAE
  decoder's attention (197 tokens, heads of 32) at 128 images moves fewer
  bytes in less modeled time when its backward recomputes the softmax."""
  jax_attention = lambda q, k, v: jax.nn.dot_product_attention(q, k, v)  # noqa: E731
  theirs = _attention_cost(v5p8, jax_attention, 197)
  ours = _attention_cost(v5p8, layers.attention_recompute, 197)
  assert ours["bytes"] < 0.85 * theirs["bytes"]
  assert ours["seconds"] < 0.85 * theirs["seconds"]
  assert ours["flops"] > theirs["flops"]  # q.k^T once more
