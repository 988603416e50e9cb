"""Throughput, MFU, ETA and the console progress line."""
from __future__ import annotations

import json
import time

import jax

from data_pipeline import storage

# Dense bf16 peak TFLOP/s per device, for MFU. A config can override it with
# `peak_tflops_per_device`; unknown devices (CPU) report MFU against None.
PEAK_TFLOPS = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
    "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0,
    "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0,
    "NVIDIA B200": 2250.0,
}


def peak_tflops(config=None, device=None) -> float | None:
  if config is not None and config.peak_tflops_per_device:
    return float(config.peak_tflops_per_device)
  kind = (device or jax.devices()[0]).device_kind
  for prefix, peak in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(prefix):
      return peak
  return None


def format_seconds(s: float) -> str:
  s = int(max(s, 0))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


class Throughput:
  """Measures img/s, TFLOP/s per device, MFU and ETA between log steps.

  TFLOP/s per device = flops_per_example * examples / seconds / devices / 1e12
  MFU = TFLOP/s per device / peak TFLOP/s per device.
  """

  def __init__(self, *, total_steps: int, batch_size: int, flops_per_example: float,
               num_devices: int, peak: float | None, start_step: int = 0):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.flops_per_example = flops_per_example
    self.num_devices = num_devices
    self.peak = peak
    self._t = time.perf_counter()
    self._step = start_step

  def restart(self, step: int):
    """Starts a new measuring window at `step` (e.g. after the compile step)."""
    self._t, self._step = time.perf_counter(), step

  def pause(self):
    """Excludes time spent outside training (checkpoint waits, image logs)."""
    self._paused = time.perf_counter()

  def resume(self):
    self._t += time.perf_counter() - getattr(self, "_paused", time.perf_counter())

  def measure(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    dt, steps = now - self._t, step - self._step
    self._t, self._step = now, step
    if steps <= 0 or dt <= 0:
      return {}
    img_s = steps * self.batch_size / dt
    tflops = img_s * self.flops_per_example / self.num_devices / 1e12
    out = {"img_per_sec": img_s, "img_per_sec_per_device": img_s / self.num_devices,
           "tflops_per_device": tflops, "sec_per_step": dt / steps,
           "eta_seconds": (self.total_steps - step) * dt / steps}
    if self.peak:
      out["mfu"] = tflops / self.peak
    return out


def progress_line(step: int, total: int, scalars: dict[str, float]) -> str:
  parts = [f"step {step}/{total}"]
  for key, fmt in (("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"),
                   ("param_norm", "pnorm {:.4g}"), ("img_per_sec", "{:.1f} img/s"),
                   ("mfu", "MFU {:.1%}")):
    if key in scalars:
      parts.append(fmt.format(scalars[key]))
  # Run totals, shown once there is something to see.
  for key, what in (("skipped_records_total", "bad records"),
                    ("skipped_updates_total", "skipped updates")):
    if scalars.get(key):
      parts.append(f"{int(scalars[key])} {what}")
  if "eta_seconds" in scalars:
    parts.append("ETA " + format_seconds(scalars["eta_seconds"]))
  return " | ".join(parts)


def scalars_at(path: str, step: int) -> dict:
  """The metrics.jsonl rows of `step` merged, the first value of each key
  kept ({} if none, or no file). A line cut short by a crash is skipped."""
  p = storage.as_path(path)
  out = {}
  if p.exists():
    for line in p.read_text().splitlines():
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and row.get("step") == step:
        out = {**row, **out}
  return out


class JsonlLog:
  """`metrics.jsonl`: one JSON object per logged step (and per evaluation).

  A local file is appended to and flushed line by line. Object stores (gs://)
  cannot append, so there the file is read once, kept in memory and uploaded
  whole by `sync()` (at every checkpoint and at the end): lines after the last
  checkpoint are lost only with the steps a resume redoes anyway.
  """

  def __init__(self, path: str):
    self.path = path
    self.remote = storage.is_remote(path)
    if self.remote:
      p = storage.as_path(path)
      self._text = p.read_text() if p.exists() else ""
      self._dirty = False
    else:
      self._file = open(path, "a")

  def write(self, row: dict) -> None:
    line = json.dumps(row) + "\n"
    if self.remote:
      self._text += line
      self._dirty = True
    else:
      self._file.write(line)
      self._file.flush()

  def sync(self) -> None:
    if self.remote and self._dirty:
      storage.write_bytes_atomic(self.path, self._text.encode())
      self._dirty = False

  def close(self) -> None:
    self.sync()
    if not self.remote:
      self._file.close()
