"""Times the train step of a config after compilation and prints one JSON line.

  python benchmarks/throughput.py --config=configs/vit_b_mae.py --config.batch_size=8

One batch from the config's input pipeline is reused for every step: this
measures the model and the update step, not the input pipeline.
Fields: img/s, img/s per device, TFLOP/s per device (analytic FLOPs, see the
objective's flops_per_example), MFU (when the device peak is known), compile
seconds, seconds per step, peak host memory, peak device memory (where the
backend reports it: GPU, TPU). --trace_dir writes a jax.profiler trace of the
timed steps (open it in TensorBoard's profile tab or Perfetto).
"""
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after the compile step.")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Write a profiler trace of the timed steps.")


def main(argv):
  del argv
  import jax
  import numpy as np

  from biovfm_jax.train import metrics as metrics_lib
  from biovfm_jax.train import state as state_lib
  from biovfm_jax.train.loop import build
  from data_pipeline import loader as loader_lib

  config = _CONFIG.value
  s = build(config, evaluators=False)  # timing the train step only
  state = state_lib.create_state(s.spec, s.tx, s.objective, s.shardings)
  size = config.image_size
  # One real batch of the config's input (single or multi-crop), reused every
  # step: the timing covers the model and update, not the input pipeline.
  local = next(loader_lib.make_pretrain_loader(
      config.data, global_batch_size=config.batch_size, seed=config.seed))
  batch = {k: jax.make_array_from_process_local_data(s.batch_sharding, np.asarray(v))
           for k, v in local.items()}

  t0 = time.perf_counter()
  compiled = s.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  state, m = compiled(state, batch)  # warm-up run
  jax.block_until_ready(m)
  if _TRACE_DIR.value:
    jax.profiler.start_trace(_TRACE_DIR.value)
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  step_s = (time.perf_counter() - t0) / _STEPS.value
  if _TRACE_DIR.value:
    jax.profiler.stop_trace()
  device_stats = jax.local_devices()[0].memory_stats() or {}

  n = jax.device_count()
  img_s = config.batch_size / step_s
  tflops = img_s * s.objective.flops_per_example() / n / 1e12
  peak = metrics_lib.peak_tflops(config)
  out = {
      "config": os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])),
      "objective": config.objective, "model_size": config.model.size,
      "image_size": size, "batch_size": config.batch_size, "params": s.spec.num_params(),
      "device": jax.devices()[0].device_kind, "num_devices": n,
      "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
      "img_per_sec": round(img_s, 2), "img_per_sec_per_device": round(img_s / n, 2),
      "tflops_per_device": round(tflops, 4),
      "mfu": round(tflops / peak, 4) if peak else None,
      "gflops_per_example": round(s.objective.flops_per_example() / 1e9, 3),
      "peak_host_mem_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
      "peak_device_mem_gb": (round(device_stats["peak_bytes_in_use"] / 2**30, 2)
                             if "peak_bytes_in_use" in device_stats else None),
      "final_loss": float(m["loss"]),
  }
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
