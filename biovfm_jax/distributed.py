"""Multi-host start-up through JAX's own multi-controller runtime.

One process per host (per node under SLURM, per TPU VM worker on a pod) runs
the same main.py; `initialize` joins them before any device is touched:

  explicit   --coordinator_address=HOST:PORT --num_processes=N --process_id=I
             (all three; any cluster, and the local multi-process runs)
  automatic  under SLURM (SLURM_NTASKS > 1), Open MPI, or on a multi-host TPU
             slice (its TPU_* variables, or on a TPU VM the GCE metadata's
             worker list), jax.distributed.initialize() finds the peers itself;
             --distributed=on forces that call, --distributed=off skips it.

CPU runs need --cpu_collectives=gloo for collectives across processes.
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
import urllib.request

import jax

_MODES = ("auto", "on", "off")
_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips on a TPU VM's PCI bus


def _cluster_detected(env, sysfs: str = "/sys/bus/pci/devices") -> str | None:
  """What makes a no-argument jax.distributed.initialize() apt, if anything."""
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return "SLURM"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "Open MPI"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "multi-host TPU"
  if _tpu_workers_from_metadata(env, sysfs) > 1:
    return "multi-host TPU VM"
  return None


def _tpu_workers_from_metadata(env, sysfs: str) -> int:
  """Workers of this TPU slice, as the GCE metadata server lists them (0 when
  this is not a TPU VM). A TPU VM's ssh sessions set no TPU_* variables; jax
  reads the same metadata to find its peers."""
  if env.get("TPU_SKIP_MDS_QUERY") is not None or not _has_tpu_chips(sysfs):
    return 0
  host = env.get("GCE_METADATA_IP", "metadata.google.internal")
  request = urllib.request.Request(
      f"http://{host}/computeMetadata/v1/instance/attributes/worker-network-endpoints",
      headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=10) as response:
      endpoints = response.read().decode()
  except OSError as e:
    logging.warning("TPU VM without worker-network-endpoints metadata (%s): "
                    "starting as a single process; --distributed=on forces the join.", e)
    return 0
  return len([w for w in endpoints.split(",") if w.strip()])


def _has_tpu_chips(sysfs: str) -> bool:
  for vendor in glob.glob(os.path.join(sysfs, "*", "vendor")):
    with open(vendor) as f:
      if f.read().strip() == _GOOGLE_PCI_VENDOR:
        return True
  return False


def skip_absent_tpu(env=None, sysfs: str = "/sys/bus/pci/devices") -> bool:
  """Keeps jax off the TPU backend where no TPU chip is on the PCI bus.

  With libtpu installed (jax[tpu], the test extra) jax tries TPU first on every
  machine: libtpu prints initialisation errors ("unexpected worker hostname",
  "sudo rm /tmp/libtpu_lockfile") and takes a lock file in /tmp. `import
  biovfm_jax` calls this, so every entry point and the library itself get it
  before any device is touched; a JAX_PLATFORMS the user set is left alone.
  Returns whether the TPU backend was turned off. AOT compiles for TPU
  topologies still work: they load libtpu themselves."""
  env = os.environ if env is None else env
  if env.get("JAX_PLATFORMS") is not None or _has_tpu_chips(sysfs):
    return False
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if jax.config.jax_platforms or xla_bridge.backends_are_initialized():
    return False
  tpu = xla_bridge._backend_factories.get("tpu")  # pylint: disable=protected-access
  if tpu is None or tpu.factory is _no_tpu_chip:
    return False
  # No public way to exclude one platform (jax_platforms lists those to
  # require, and a GPU run must keep its CUDA plugin). The registration stays,
  # so "tpu" remains a known platform (orbax's checkify registers TPU lowering
  # rules): only its factory fails, quietly, as it would with no libtpu.
  xla_bridge._backend_factories["tpu"] = dataclasses.replace(tpu, factory=_no_tpu_chip)  # pylint: disable=protected-access
  return True


def _no_tpu_chip():
  raise RuntimeError("no TPU chip on this machine's PCI bus (biovfm_jax.distributed."
                     "skip_absent_tpu); set JAX_PLATFORMS to choose platforms yourself")


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, mode: str = "auto",
               cpu_collectives: str | None = None, env=None) -> str:
  """Joins this process to its peers; returns how ("single process", ...)."""
  env = os.environ if env is None else env
  skip_absent_tpu(env)
  if mode not in _MODES:
    raise ValueError(f"--distributed={mode!r}: one of {_MODES}")
  explicit = (coordinator_address, num_processes, process_id)
  if any(x is not None for x in explicit) and not all(x is not None for x in explicit):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together "
                     "(give all three, or none for automatic detection)")
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if mode == "off":
    return "single process"
  if coordinator_address is not None:
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                       f"{num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    how = f"process {process_id} of {num_processes} via {coordinator_address}"
  elif mode == "on" or _cluster_detected(env):
    jax.distributed.initialize()
    how = f"auto ({_cluster_detected(env) or 'forced'})"
  else:
    return "single process"
  logging.info("Distributed: %s; %d processes, %d devices in all, %d here.", how,
               jax.process_count(), jax.device_count(), jax.local_device_count())
  return how
