"""Ingestion: every input file of a corpus spec -> ArrayRecord shards.

Worker processes read, transform, encode and hash one file each; the parent
takes their results strictly in input order, drops exact and near duplicates,
and appends records to shards that close at `output.shard_mb`. The output is
therefore a pure function of the spec and the files, whatever the number of
workers.

Nothing is silently lost. Per source, inputs (images read, plus files that
could not be read at all) = written + rejected + exact + near duplicates,
checked at the end and recorded in the manifest. A file that fails to read
is rejected whole (`rejects.jsonl` says why); every dropped duplicate is
listed in `duplicates.jsonl`. (Slices a reader skips as empty, e.g. NIfTI
background, are not inputs.)

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
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from typing import Any, Iterator

import numpy as np
from PIL import Image

from data_pipeline import records, shards
from data_pipeline.ingest import dedup as dedup_lib
from data_pipeline.ingest import readers
from data_pipeline.ingest.spec import Spec, as_dict
from data_pipeline.sources.images import ReaderError

PREFIX = "corpus"
STATE_DIR = ".ingest"
COUNTERS = ("inputs", "written", "rejected", "exact_duplicates", "near_duplicates")


class Interrupted(RuntimeError):
  """Raised by the `stop_after_shards` test hook, as a kill would stop a run."""


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
  images = []
  try:
    for pixels, meta in readers.READERS[source["reader"]](path, source["options"]):
      pixels, note = resize_shorter(pixels, int(output["resize_shorter"]))
      header = {"source": source["name"],
                "modality": source["modality"] or meta.get("modality") or "unknown",
                "anatomy": source["anatomy"] or meta.get("anatomy"),
                "path": meta.get("path", path), "index": meta.get("index"),
                "orig_size": meta.get("orig_size", list(pixels.shape[:2])),
                "transform": "; ".join(t for t in (meta.get("transform"), note) if t)}
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
  return {"images": images}


# --- Parent side.

def list_inputs(spec: Spec) -> list[tuple[int, str]]:
  """(source number, file) for every input, in spec order then file order."""
  items = []
  for i, s in enumerate(spec.sources):
    items.extend((i, f) for f in readers.files_for(s.path, s.reader, s.options))
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
  sources = [{"name": s.name, "reader": s.reader, "modality": s.modality,
              "anatomy": s.anatomy, "options": s.options} for s in spec.sources]
  task = lambda k: (sources[items[k][0]], items[k][1], spec.output)  # noqa: E731
  if workers <= 0:
    for k in range(start, len(items)):
      yield k, process_file(task(k))
    return
  ctx = multiprocessing.get_context("spawn")  # safe beside threads (jax, grain)
  with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
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


def ingest(spec: Spec, out_dir: str, *, workers: int = 0, progress: bool = True,
           overwrite: bool = False, stop_after_shards: int | None = None) -> dict[str, Any]:
  """Runs (or resumes) the ingestion of `spec` into `out_dir`; returns the manifest."""
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  state_dir = os.path.join(out_dir, STATE_DIR)
  manifest_path = os.path.join(out_dir, shards.MANIFEST)
  if os.path.exists(manifest_path) and not overwrite:
    manifest = shards.read_manifest(out_dir)
    if manifest.get("ingest", {}).get("spec_fingerprint") == spec.fingerprint():
      logging.info("%s is complete (manifest.json); nothing to do", out_dir)
      return manifest
    raise FileExistsError(f"{out_dir} already holds a finished corpus from another spec; "
                          "choose a new --out or pass --overwrite")
  if overwrite:
    _clear(out_dir)
  os.makedirs(state_dir, exist_ok=True)

  items = list_inputs(spec)
  state = _load_state(state_dir)
  if state and (state["spec_fingerprint"] != spec.fingerprint()
                or state["inputs_digest"] != _digest(items)):
    raise ValueError(f"{out_dir} holds an interrupted ingestion of a different spec or input "
                     "list; resume with the same spec, or pass --overwrite to start over")
  if state is None:
    _clear(out_dir)
    os.makedirs(state_dir, exist_ok=True)
    state = {"spec_fingerprint": spec.fingerprint(), "inputs_digest": _digest(items),
             "next_item": 0, "next_image": 0, "shards": [], "logs": {},
             "counts": {s.name: dict.fromkeys(COUNTERS, 0) for s in spec.sources},
             "modalities": {}}
  else:
    logging.info("Resuming %s at input %d of %d (%d shards kept)", out_dir,
                 state["next_item"], len(items), len(state["shards"]))
  for stale in glob.glob(os.path.join(glob.escape(out_dir), f"*{shards.SHARD_SUFFIX}.tmp-*")):
    os.remove(stale)  # the shard that was open when the last run stopped

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
    state["shards"].append(entry)
    path = os.path.join(state_dir, f"shard-{len(state['shards']) - 1:05d}.npz")
    np.savez(path + ".tmp.npz", source=np.asarray(writer.sources, str),
             modality=np.asarray(writer.modalities, str),
             exact=np.asarray(kept_exact, "S32"), phash=np.asarray(kept_phash, np.uint64))
    os.replace(path + ".tmp.npz", path)
    kept_exact.clear()
    kept_phash.clear()
    state.update(next_item=item, next_image=image, logs=logs.offsets(), counts=counts,
                 modalities=dict(modalities))
    shards.write_json_atomic(os.path.join(state_dir, "state.json"), state)
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
          mode = spec.sources[src].dedup
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
  return _finish(spec, out_dir, state, counts)


def _finish(spec: Spec, out_dir: str, state: dict, counts: dict) -> dict[str, Any]:
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
  shards.write_index(out_dir, shard_of, sources, modalities)
  manifest = {
      "prefix": PREFIX, "num_records": len(sources), "num_shards": len(state["shards"]),
      "shards": state["shards"], **shards.manifest_counts(sources, modalities),
      "ingest": {"spec": as_dict(spec), "spec_fingerprint": spec.fingerprint(),
                 "inputs_digest": state["inputs_digest"], "per_source": counts,
                 "reconciled": True,
                 "totals": {k: sum(c[k] for c in counts.values()) for k in COUNTERS}}}
  from data_pipeline.ingest import report  # pylint: disable=import-outside-toplevel
  report.write_report(_summary(manifest, out_dir), _samples(out_dir, manifest), out_dir)
  shards.write_json_atomic(os.path.join(out_dir, shards.MANIFEST), manifest)
  return manifest


def _summary(manifest: dict, out_dir: str) -> dict[str, Any]:
  spec_sources = {s["name"]: s for s in manifest["ingest"]["spec"]["sources"]}
  sources = {}
  for name, c in manifest["ingest"]["per_source"].items():
    sources[name] = {**c, "modality": spec_sources[name]["modality"] or
                     ", ".join(manifest["by_source"].get(name, {})) or "unknown"}
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


def _clear(out_dir: str) -> None:
  """Removes what an ingestion writes (only that) from `out_dir`."""
  patterns = [f"{PREFIX}-*{shards.SHARD_SUFFIX}*", shards.MANIFEST, shards.INDEX,
              "rejects.jsonl", "duplicates.jsonl", "report.*", "*.png",
              os.path.join(STATE_DIR, "*")]
  for pattern in patterns:
    for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
      os.remove(path)
