"""JAX's persistent compilation cache for a run, so that a restart (after a
preemption, a crash, a resume) reads the compiled train step instead of
compiling it again (ViT-L: minutes on a TPU pod).

config.compile_cache_dir: "" (default) -> <workdir>/compile_cache; "none" ->
off; else a directory (local or gs://; '~' and relative paths are expanded
where the config enters). A cache directory set before the run, by
JAX_COMPILATION_CACHE_DIR (JAX reads it at import: a cluster-wide cache, the
test suite's session cache) or jax.config, wins over the config key.

JAX writes entries from process 0 only (the others read), and keeps those
that took at least jax_persistent_cache_min_compile_time_secs to compile (1 s
unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise: the train
step and the state init, not every small jit). On several hosts, a workdir
all of them see (gs://, NFS) lets every host's restart hit.
"""
from __future__ import annotations

import jax
from absl import logging
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from data_pipeline import storage

OFF = "none"
_HITS_EVENT = "/jax/compilation_cache/cache_hits"
_state = {"ours": None, "listening": False, "hits": 0}


def cache_dir(config, workdir: str) -> str | None:
  """The directory config.compile_cache_dir names for `workdir` (None: off)."""
  value = str(config.compile_cache_dir or "")
  if value.lower() == OFF:
    return None
  return value or storage.join(workdir, "compile_cache")


def enable(config, workdir: str) -> str | None:
  """Points JAX's persistent cache at the run's directory (before the first
  compile); returns the directory in use, None when off."""
  current = jax.config.jax_compilation_cache_dir
  if current and current != _state["ours"]:  # set outside this module: it wins
    logging.info("Compilation cache: %s (set before the run, e.g. by "
                 "JAX_COMPILATION_CACHE_DIR; config.compile_cache_dir not used).", current)
    _listen()
    return current
  path = cache_dir(config, workdir)
  if path != current or (path and not storage.as_path(path).exists()):
    jax.config.update("jax_compilation_cache_dir", path)
    # JAX opens its cache (and makes its folder) once per process: a second run
    # in this process (a notebook, a test) must not keep writing into the first
    # one's, nor into a folder that a refused run removed (train.loop).
    jax_cache.reset_cache()
    _state["ours"] = path
  if path is None:
    logging.info("Compilation cache: off (config.compile_cache_dir=%r).", OFF)
    return None
  logging.info("Compilation cache: %s (config.compile_cache_dir; a restart skips "
               "compiles cached there).", path)
  _listen()
  return path


def hits_note() -> str:
  """"; N compiled programs read from the cache" since the process started
  ("" for none), for the first step's log line (JAX logs hits at DEBUG)."""
  n = _state["hits"]
  return f"; {n} compiled program(s) read from the compilation cache" if n else ""


def _listen() -> None:
  if _state["listening"]:
    return
  _state["listening"] = True

  def on_event(event: str, **_):
    if event == _HITS_EVENT:
      _state["hits"] += 1
  jax.monitoring.register_event_listener(on_event)
