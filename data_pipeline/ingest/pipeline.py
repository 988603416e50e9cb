"""Ingestion: every input file of a corpus spec -> ArrayRecord shards.

Worker processes read, transform, encode and hash one file each; the parent
takes their results strictly in input order, drops exact and near duplicates,
and appends records to shards that close at `output.shard_mb`. The output is
therefore a pure function of the spec and the files, whatever the number of
workers. An input is a file, or a part of a big HDF5 or .npy stack (1,024
images, `readers.inputs_for`), so that a worker never holds a whole
PatchCamelyon file's records.

Nothing is silently lost. Per source, inputs (images read, plus files that
could not be read at all) = written + rejected + exact + near duplicates,
checked at the end and recorded in the manifest. A file that fails to read
is rejected whole (`rejects.jsonl` says why); every dropped duplicate is
listed in `duplicates.jsonl`. (Slices a reader skips as empty, e.g. NIfTI
background, are not inputs; a file that yields no image at all is a reject.)

Ownership. Every file a run writes is listed in `.ingest/state.json` before
it is written, and in the manifest's `ingest.files`; a fresh run or
`--overwrite` removes those files only. An --out that holds inputs, lies inside
a source, or holds files no ingestion wrote is refused before anything is
written or deleted.

Resuming. After each shard closes, the position (input file and image within
it), the counters, the log lengths and the hashes kept since the last shard
are saved in `<out>/.ingest/`. A re-run with the same spec continues from
there: finished shards are kept, the open one is redone, and the result is
byte-identical to an uninterrupted run. Memory is bounded: a few files in
flight, the open shard's index, and 24 bytes of hashes per kept image.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import ctypes
import fnmatch
import glob
import hashlib
import io
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from data_pipeline import records, shards, storage
from data_pipeline.ingest import dedup as dedup_lib
from data_pipeline.readers import registry as readers
from data_pipeline.ingest.spec import Spec, as_dict
from data_pipeline.readers import arrays
from data_pipeline.readers.common import ReaderError

PREFIX = "corpus"
STATE_DIR = ".ingest"
STATE = os.path.join(STATE_DIR, "state.json")
LOGS = ("rejects.jsonl", "duplicates.jsonl")
COUNTERS = ("inputs", "written", "rejected", "exact_duplicates", "near_duplicates")


class Interrupted(RuntimeError):
  """Raised by the `stop_after_shards` test hook, as a kill would stop a run."""


class OutputFolderError(ValueError):
  """--out cannot be used as it is; the message names the folder and what to do."""


# --- Worker side: one file -> encoded records and hashes.

def resize_shorter(pixels: np.ndarray, target: int) -> tuple[np.ndarray, str | None]:
  """Shorter side down to `target` (bicubic, aspect kept); never upscales."""
  h, w = pixels.shape[:2]
  if not target or min(h, w) <= target:
    return pixels, None
  scale = target / min(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  out = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC))
  return out, f"shorter side {min(h, w)} -> {target} px (bicubic)"


def process_file(task: tuple) -> dict[str, Any]:
  """(source fields, path, output options) -> {"images": [...]} or {"reject": reason}.
  Each image: record bytes, exact hash, perceptual hash, its meta."""
  source, path, output = task
  modality = source["modality"](path) if callable(source["modality"]) else source["modality"]
  images = []
  try:
    for pixels, meta in readers.READERS[source["reader"]](path, source["options"]):
      pixels, note = resize_shorter(pixels, int(output["resize_shorter"]))
      header = records.header(source["name"], meta, pixels, modality=modality,
                              anatomy=source["anatomy"], note=note)
      raw = records.make_record(pixels, header, output["format"], int(output["jpeg_quality"]))
      images.append({"raw": raw, "exact": dedup_lib.pixel_hash(pixels),
                     "phash": dedup_lib.perceptual_hash(pixels),
                     "index": header["index"], "modality": header["modality"]})
  except ReaderError as e:
    return {"reject": str(e)}
  except MemoryError:
    return {"reject": f"{path}: out of memory while reading"}
  except Exception as e:  # a reader bug must not stop a 21M-image run: reject, say why
    return {"reject": f"{path}: unexpected {type(e).__name__}: {e}"}
  if not images:  # counted as an input all the same, so the counts reconcile
    return {"reject": f"{path}: the file holds no image"}
  return {"images": images}


def _die_with_parent(parent: int) -> None:
  """Worker initializer: a worker exits when the ingestion that started it dies,
  even by SIGKILL (which runs no cleanup in the parent)."""
  if sys.platform.startswith("linux"):
    try:  # the kernel sends SIGKILL to this process when its parent dies
      ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
      pass

  def watch():  # elsewhere (and as a fallback): poll; orphans are re-parented
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(1)

  if os.getppid() != parent:  # it died before prctl took effect
    os._exit(1)
  threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


# --- Parent side.

def list_inputs(spec: Spec) -> list[tuple[int, str]]:
  """(source number, file) for every input, in spec order then file order."""
  items = []
  for i, s in enumerate(spec.sources):
    items.extend((i, f) for f in readers.inputs_for(s.path, s.reader, s.options)
                 if not s.excluded(f))
  return items


def _digest(items) -> str:
  h = hashlib.sha256()
  for i, f in items:
    h.update(f"{i}\t{f}\n".encode())
  return h.hexdigest()[:16]


class _Progress:
  def __init__(self, total: int, done: int, enabled: bool):
    self.total, self.start_done, self.enabled = total, done, enabled
    self.t0 = self.last = time.perf_counter()

  def update(self, done: int, written: int, final: bool = False) -> None:
    now = time.perf_counter()
    if not self.enabled or (now - self.last < 2.0 and not final):
      return
    self.last = now
    rate = (done - self.start_done) / max(now - self.t0, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else float("inf")
    eta_text = f"{int(eta // 60)}m{int(eta % 60):02d}s" if np.isfinite(eta) else "?"
    print(f"\ringest: {done}/{self.total} files ({rate:.1f} files/s), {written} images "
          f"written, ETA {eta_text}   ", end="\n" if final else "", file=sys.stderr,
          flush=True)


def _results(items, spec: Spec, start: int, workers: int) -> Iterator[tuple[int, dict]]:
  """(item number, process_file result) from `start` on, in order; at most
  2 x workers files in flight, so memory stays bounded."""
  sources = [{"name": s.name, "reader": s.reader,
              "modality": s.modality_of if s.modality_by_path else s.modality,
              "anatomy": s.anatomy, "options": s.options} for s in spec.sources]
  task = lambda k: (sources[items[k][0]], items[k][1], spec.output)  # noqa: E731
  if workers <= 0:
    for k in range(start, len(items)):
      yield k, process_file(task(k))
    return
  ctx = multiprocessing.get_context("spawn")  # safe beside threads (jax, grain)
  with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_die_with_parent,
                              initargs=(os.getpid(),)) as pool:
    pending: collections.deque = collections.deque()
    nxt = start
    while nxt < len(items) or pending:
      while nxt < len(items) and len(pending) < 2 * workers:
        pending.append((nxt, pool.submit(process_file, task(nxt))))
        nxt += 1
      k, fut = pending.popleft()
      yield k, fut.result()


class _Logs:
  """rejects.jsonl / duplicates.jsonl, truncated back to the last checkpoint on resume."""

  def __init__(self, out_dir: str, offsets: dict[str, int] | None):
    self.files = {}
    for name in ("rejects", "duplicates"):
      path = os.path.join(out_dir, f"{name}.jsonl")
      f = open(path, "a+b")
      f.truncate((offsets or {}).get(name, 0))
      f.seek(0, os.SEEK_END)
      self.files[name] = f

  def write(self, name: str, row: dict) -> None:
    self.files[name].write((json.dumps(row) + "\n").encode())

  def offsets(self) -> dict[str, int]:
    for f in self.files.values():
      f.flush()
      os.fsync(f.fileno())
    return {n: f.tell() for n, f in self.files.items()}

  def close(self) -> None:
    for f in self.files.values():
      f.close()


ReportExtra = Callable[[dict], dict]


def ingest(spec: Spec, out_dir: str, *, workers: int = 0, progress: bool = True,
           overwrite: bool = False, stop_after_shards: int | None = None,
           report_extra: ReportExtra | None = None) -> dict[str, Any]:
  """Runs (or resumes) the ingestion of `spec` into `out_dir`; returns the manifest.

  `report_extra(manifest)`, when given, returns {"tables": [...], "files": {name:
  bytes}}: tables for the report (see report.write_report) and files to write
  beside it, owned by the ingestion like every other file it writes."""
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  state_dir = os.path.join(out_dir, STATE_DIR)
  ours = "files" in _load_manifest(out_dir).get("ingest", {})
  if ours and not overwrite:
    manifest = shards.read_manifest(out_dir)
    if manifest["ingest"]["spec_fingerprint"] == spec.fingerprint():
      logging.info("%s is complete (manifest.json); nothing to do", out_dir)
      return manifest
    raise FileExistsError(f"{out_dir} already holds a finished corpus from another spec; "
                          "choose a new --out or pass --overwrite")

  items = list_inputs(spec)
  owned = _check_out(spec, items, out_dir)  # before anything is written or deleted
  state = None if overwrite else _load_state(state_dir)
  if state and (state["spec_fingerprint"] != spec.fingerprint()
                or state["inputs_digest"] != _digest(items)):
    raise ValueError(f"{out_dir} holds an interrupted ingestion of a different spec or input "
                     "list; resume with the same spec, or pass --overwrite to start over")
  if state is None:
    _clear(out_dir, owned or [])
    os.makedirs(state_dir, exist_ok=True)
    # Every file this run writes is listed here before it is written (shards
    # and their hash files: once closed; see _owned_files), so a later run
    # removes those and only those.
    state = {"spec_fingerprint": spec.fingerprint(), "inputs_digest": _digest(items),
             "next_item": 0, "next_image": 0, "shards": [], "logs": {},
             "counts": {s.name: dict.fromkeys(COUNTERS, 0) for s in spec.sources},
             "modalities": {}, "files": [STATE, *LOGS]}
    shards.write_json_atomic(os.path.join(out_dir, STATE), state)
  else:
    logging.info("Resuming %s at input %d of %d (%d shards kept)", out_dir,
                 state["next_item"], len(items), len(state["shards"]))
  for stale in _pending_files(out_dir, len(state["shards"])):
    _remove_with_temps(stale)  # the shard that was open when the last run stopped
  modes = [spec.sources[src].dedup_mode(path) for src, path in items]

  use_dedup = spec.dedup["exact"] or spec.dedup["near_threshold"] is not None
  dedup = dedup_lib.Deduplicator(spec.dedup["near_threshold"])
  for exact, phash in _saved_hashes(state_dir, len(state["shards"])):
    # Re-remember, in order, what the finished shards' images made it remember.
    if dedup.check_hashes(exact, phash, near=False) is not None:
      raise RuntimeError(f"{state_dir} is inconsistent (a kept image repeats); "
                         "pass --overwrite to start over")
  logs = _Logs(out_dir, state["logs"])
  writer = shards.ShardWriter(out_dir, PREFIX, max_bytes=int(spec.output["shard_mb"] * 2**20),
                              first_shard=len(state["shards"]))
  counts = {k: dict(v) for k, v in state["counts"].items()}
  modalities = collections.Counter(state["modalities"])
  kept_exact, kept_phash = [], []
  names = [s.name for s in spec.sources]
  bar = _Progress(len(items), state["next_item"], progress)
  done = state["next_item"]

  def checkpoint(entry: dict, item: int, image: int) -> None:
    shard_file, hashes_file = _pending_files("", len(state["shards"]))
    state["shards"].append(entry)
    state["files"] += [shard_file, hashes_file]
    buf = io.BytesIO()
    np.savez(buf, source=np.asarray(writer.sources, str),
             modality=np.asarray(writer.modalities, str),
             exact=np.asarray(kept_exact, "S32"), phash=np.asarray(kept_phash, np.uint64))
    storage.write_bytes_atomic(os.path.join(out_dir, hashes_file), buf.getvalue())
    kept_exact.clear()
    kept_phash.clear()
    state.update(next_item=item, next_image=image, logs=logs.offsets(), counts=counts,
                 modalities=dict(modalities))
    shards.write_json_atomic(os.path.join(out_dir, STATE), state)
    if stop_after_shards is not None and len(state["shards"]) >= stop_after_shards:
      raise Interrupted(f"stopped after {len(state['shards'])} shards (test hook)")

  try:
    for k, result in _results(items, spec, state["next_item"], workers):
      src, path = items[k]
      c = counts[names[src]]
      skip = state["next_image"] if k == state["next_item"] else 0
      if "reject" in result:
        if not skip:
          c["inputs"] += 1
          c["rejected"] += 1
          logs.write("rejects", {"source": names[src], "path": path, "reason": result["reject"]})
      else:
        for j, img in enumerate(result["images"]):
          if j < skip:
            continue
          c["inputs"] += 1
          exact = img["exact"][:32]
          mode = modes[k][0]
          reason = (dedup.check_hashes(exact, img["phash"], near=mode == "all")
                    if use_dedup and mode != "none" else None)
          if reason == dedup_lib.EXACT and not spec.dedup["exact"]:
            reason = "near duplicate (distance 0)"  # exact check off: identical is nearest
          if reason:
            key = "exact_duplicates" if reason == dedup_lib.EXACT else "near_duplicates"
            c[key] += 1
            logs.write("duplicates", {"source": names[src], "path": path,
                                      "index": img["index"], "reason": reason})
            continue
          c["written"] += 1
          modalities[img["modality"]] += 1
          if use_dedup and mode != "none":  # what the deduplicator remembered
            kept_exact.append(exact)
            kept_phash.append(img["phash"])
          entry = writer.write(img["raw"])
          if entry:
            last = j + 1 == len(result["images"])
            checkpoint(entry, k + 1 if last else k, 0 if last else j + 1)
      done = k + 1
      bar.update(done, sum(v["written"] for v in counts.values()))
    entry = writer.close()
    if entry:
      checkpoint(entry, len(items), 0)
  except BaseException:
    writer.abort()
    logs.close()
    raise
  bar.update(done, sum(v["written"] for v in counts.values()), final=True)
  logs.offsets()
  logs.close()
  files = collections.Counter(spec.sources[src].name for src, path in items
                               if arrays.split_part(path)[1] in (None, 0))
  return _finish(spec, out_dir, state, counts, _dedup_used(spec, items, modes),
                 {s.name: files[s.name] for s in spec.sources}, report_extra)


def _dedup_used(spec: Spec, items, modes) -> dict[str, str]:
  """Per source, which dedup its files got and why (for the manifest and report)."""
  t = spec.dedup["near_threshold"]
  off = not spec.dedup["exact"] and t is None
  what = {"none": "none", "exact": "exact only",
          "all": "exact only (no near_threshold)" if t is None else
                 f"exact + near (pHash within {t} bits)"}
  per = {s.name: collections.Counter() for s in spec.sources}
  for (src, _), (mode, why) in zip(items, modes):
    per[spec.sources[src].name]["none (dedup off)" if off else f"{what[mode]}, {why}"] += 1
  return {name: "; ".join(text if len(c) == 1 else f"{text} ({n} files)"
                          for text, n in sorted(c.items()))
          for name, c in per.items()}


def _finish(spec: Spec, out_dir: str, state: dict, counts: dict, dedup_used: dict[str, str],
            files: dict[str, int], report_extra: ReportExtra | None) -> dict[str, Any]:
  """Checks the counts reconcile, writes index.npz, manifest.json and the report."""
  state_dir = os.path.join(out_dir, STATE_DIR)
  for name, c in counts.items():
    if c["inputs"] != c["written"] + c["rejected"] + c["exact_duplicates"] + c["near_duplicates"]:
      raise AssertionError(f"source {name}: counts do not reconcile: {c}")
  sources, modalities, shard_of = [], [], []
  for k in range(len(state["shards"])):
    with np.load(os.path.join(state_dir, f"shard-{k:05d}.npz")) as z:
      sources += [str(x) for x in z["source"]]
      modalities += [str(x) for x in z["modality"]]
      shard_of += [k] * len(z["source"])
  if not state["shards"]:
    raise ValueError(f"{spec.path}: no image was written (see {out_dir}/rejects.jsonl)")
  from data_pipeline.ingest import report  # pylint: disable=import-outside-toplevel
  manifest = {
      "prefix": PREFIX, "num_records": len(sources), "num_shards": len(state["shards"]),
      "shards": state["shards"], **shards.manifest_counts(sources, modalities),
      "ingest": {"spec": as_dict(spec), "spec_fingerprint": spec.fingerprint(),
                 "inputs_digest": state["inputs_digest"], "per_source": counts,
                 "files_per_source": files, "reconciled": True, "dedup_used": dedup_used,
                 "files": state["files"],
                 "totals": {k: sum(c[k] for c in counts.values()) for k in COUNTERS}}}
  extra = report_extra(manifest) if report_extra else {}
  last = [shards.INDEX, *report.file_names([s.name for s in spec.sources]).values(),
          *extra.get("files", {}), shards.MANIFEST]
  state["files"] += [f for f in last if f not in state["files"]]
  shards.write_json_atomic(os.path.join(out_dir, STATE), state)  # listed, then written
  shards.write_index(out_dir, shard_of, sources, modalities)
  for name, data in extra.get("files", {}).items():
    storage.write_bytes_atomic(os.path.join(out_dir, name), data)
  summary = {**_summary(manifest, out_dir), "tables": extra.get("tables", [])}
  report.write_report(summary, _samples(out_dir, manifest), out_dir)
  shards.write_json_atomic(os.path.join(out_dir, shards.MANIFEST), manifest)
  return manifest


def _summary(manifest: dict, out_dir: str) -> dict[str, Any]:
  spec_sources = {s["name"]: s for s in manifest["ingest"]["spec"]["sources"]}
  sources = {}
  for name, c in manifest["ingest"]["per_source"].items():
    sources[name] = {**c, "modality": spec_sources[name]["modality"] or
                     ", ".join(manifest["by_source"].get(name, {})) or "unknown",
                     "dedup": manifest["ingest"]["dedup_used"][name]}
  rejects = []
  with open(os.path.join(out_dir, "rejects.jsonl")) as f:
    for line in f:
      rejects.append(json.loads(line))
  return {"sources": sources, "modalities": manifest["modalities"], "rejects": rejects,
          "shards": {"count": manifest["num_shards"],
                     "bytes": sum(s["bytes"] for s in manifest["shards"])}}


def _samples(out_dir: str, manifest: dict, per_source: int = 16) -> dict[str, list]:
  """Up to `per_source` images per source, evenly spread, read back from the shards."""
  import grain  # pylint: disable=import-outside-toplevel
  index = shards.read_index(out_dir)
  paths = [os.path.join(out_dir, s["file"]) for s in manifest["shards"]]
  data = grain.sources.ArrayRecordDataSource(paths)
  out = {}
  for sid, name in enumerate(index["source_names"]):
    ids = np.flatnonzero(index["source"] == sid)
    pick = ids[np.linspace(0, len(ids) - 1, min(per_source, len(ids))).astype(int)]
    out[str(name)] = [records.read_record(data[int(i)])[0] for i in pick]
  return out


def _load_state(state_dir: str) -> dict | None:
  path = os.path.join(state_dir, "state.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _saved_hashes(state_dir: str, num_shards: int) -> Iterator[tuple[str, int]]:
  for k in range(num_shards):
    with np.load(os.path.join(state_dir, f"shard-{k:05d}.npz")) as z:
      for exact, phash in zip(z["exact"], z["phash"]):
        yield exact.decode(), int(phash)


def _load_manifest(out_dir: str) -> dict:
  try:
    return shards.read_manifest(out_dir)
  except (OSError, ValueError):  # none, or not ours to read
    return {}


def _pending_files(out_dir: str, n: int) -> list[str]:
  """Shard `n` and its hash file: written before the state that lists them."""
  return [os.path.join(out_dir, f"{PREFIX}-{n:05d}{shards.SHARD_SUFFIX}"),
          os.path.join(out_dir, STATE_DIR, f"shard-{n:05d}.npz")]


def _owned_files(out_dir: str) -> list[str] | None:
  """The files (relative to `out_dir`) an earlier ingestion there wrote, as its
  own state and manifest list them; None when no ingestion wrote there."""
  try:
    state = _load_state(os.path.join(out_dir, STATE_DIR)) or {}
  except (OSError, ValueError):
    state = {}
  manifest = _load_manifest(out_dir).get("ingest", {})
  if "files" not in state and "files" not in manifest:
    return None
  files = set(state.get("files", [])) | set(manifest.get("files", []))
  files.update(_pending_files("", len(state.get("shards", []))))
  # Only plain names below out_dir: a hand-edited list must not reach outside.
  return sorted(f for f in files if f == os.path.normpath(f) and not os.path.isabs(f)
                and not f.startswith(".." + os.sep) and f != "..")


def _within(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _glob_matches(pattern: list[str], parts: list[str]) -> bool:
  """Path components against glob components; "**" spans any number of them."""
  if not pattern:
    return not parts
  if pattern[0] == "**":
    return any(_glob_matches(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
  return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_matches(
      pattern[1:], parts[1:])


def _reads_into(source_path: str, out_dir: str) -> bool:
  """Whether the source, read again, would take files written into `out_dir`."""
  if not any(c in source_path for c in "*?["):
    return os.path.isdir(source_path) and _within(os.path.realpath(out_dir),
                                                  os.path.realpath(source_path))
  pattern = os.path.abspath(source_path).split(os.sep)
  target = out_dir.split(os.sep)
  # A matched folder is walked whole; a matched file is read.
  return any(_glob_matches(pattern, target[:i]) for i in range(2, len(target) + 1)) or any(
      _glob_matches(pattern, target + [f]) for f in ("modalities.png", "report.md", LOGS[0]))


def _check_out(spec: Spec, items, out_dir: str) -> list[str] | None:
  """Refuses an --out that would mix with the inputs, or that holds files no
  ingestion wrote; returns the files an earlier ingestion wrote there."""
  real = os.path.realpath(out_dir)
  for src, path in items:
    if _within(os.path.realpath(path), real):
      raise OutputFolderError(
          f"--out {out_dir} holds input {path} of source {spec.sources[src].name!r}: outputs "
          "would mix with the inputs; choose an --out outside every source (nothing deleted)")
  for s in spec.sources:
    if any(_reads_into(p, out_dir) for p in s.paths):
      raise OutputFolderError(
          f"--out {out_dir} lies inside source {s.name!r} ({s.path}): a later run would read "
          "the outputs as inputs; choose an --out outside it (nothing deleted)")
  owned = _owned_files(out_dir)
  if owned is None and os.path.isdir(out_dir) and os.listdir(out_dir):
    raise OutputFolderError(
        f"--out {out_dir} is not empty and no ingestion wrote it (no manifest.json or "
        f"{STATE} of one); choose an empty or new folder (nothing deleted)")
  return owned


def _remove_with_temps(path: str) -> None:
  for p in [path] + glob.glob(glob.escape(path) + ".tmp-*"):
    if os.path.isfile(p):
      os.remove(p)


def _clear(out_dir: str, files: list[str]) -> None:
  """Removes the files an earlier ingestion wrote (`_owned_files`), and their
  half-written temporaries; anything else in `out_dir` stays."""
  for f in files:
    _remove_with_temps(os.path.join(out_dir, f))
  if os.path.isdir(os.path.join(out_dir, STATE_DIR)) and not os.listdir(
      os.path.join(out_dir, STATE_DIR)):
    os.rmdir(os.path.join(out_dir, STATE_DIR))
