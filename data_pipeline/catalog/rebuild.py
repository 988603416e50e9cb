"""Rebuild a catalogued corpus, or any part of it, from the sources a user has.

`find` looks for each source in its folder under the root (`<root>/<folder>`)
by the preset's own patterns; `to_spec` turns what was found into an ingestion
spec; `rebuild` ingests it (resumable, as every ingestion is) and writes
`catalog_report.csv` with one row per catalogued source, found or not: files
found, images written, rejected, duplicates, the published count and the
ratio written / published. Absent sources are listed with their address and
access terms. Nothing is downloaded.
"""
from __future__ import annotations

import csv
import dataclasses
import fnmatch
import glob
import io
import os
from typing import Any

from data_pipeline.catalog.catalog import ACCESS, Catalog, Entry
from data_pipeline.ingest import pipeline
from data_pipeline.ingest.spec import Spec, parse_spec
from data_pipeline.readers import registry as readers

REPORT = "catalog_report.csv"
COLUMNS = ("source", "status", "modality", "anatomy", "files_found", "written", "rejected",
           "duplicates", "published", "ratio", "missing_patterns", "access", "url", "preset")


@dataclasses.dataclass(frozen=True)
class Found:
  """What of one source is under the root."""
  entry: Entry
  folder: str
  files: int                      # input files the preset's patterns find
  missing: tuple[str, ...]        # patterns that find no file

  @property
  def status(self) -> str:
    if not os.path.isdir(self.folder):
      return "absent"
    if not self.files:
      return "no files"
    return "partial" if self.missing else "present"


def _glob(folder: str, pattern: str) -> str:
  return os.path.join(glob.escape(folder), pattern)


def find(entries: list[Entry], root: str) -> list[Found]:
  """Each entry's presence under `root` (a walk of the folders that exist only)."""
  out = []
  for e in entries:
    folder = os.path.join(root, e.folder)
    files, missing = 0, []
    if os.path.isdir(folder):
      excluded = [os.path.join(folder, p) for p in e.exclude]
      for pattern in e.patterns:
        try:
          found = readers.files_for(_glob(folder, pattern), e.reader)
        except FileNotFoundError:
          found = []
        found = [f for f in found if not any(fnmatch.fnmatchcase(f, x) for x in excluded)]
        if not found:
          missing.append(pattern)
        files += len(found)
    out.append(Found(e, folder, files, tuple(missing)))
  return out


def to_spec(found: list[Found], output: dict | None = None,
            dedup: dict | None = None, where: str = "catalog") -> Spec:
  """The ingestion spec of the sources that were found (one source each)."""
  sources = []
  for f in found:
    if not f.files:
      continue
    e = f.entry
    globs = [_glob(f.folder, p) for p in e.patterns if p not in f.missing]
    source = {"name": e.key, "path": globs, "reader": e.reader,
              "anatomy": e.anatomy or None, "options": dict(e.options),
              "exclude": [os.path.join(f.folder, p) for p in e.exclude]}
    if len(e.modality) == 1:
      source["modality"] = e.modality[0]
    if e.modality_by_path:
      source["modality_by_path"] = {os.path.join(f.folder, p): m
                                    for p, m in e.modality_by_path}
    sources.append(source)
  if not sources:
    raise ValueError(f"{where}: none of the sources asked for is under the root")
  return parse_spec({"output": output or {}, "dedup": dedup or {}, "sources": sources}, where)


def rows(found: list[Found], manifest: dict | None) -> list[dict[str, Any]]:
  """One report row per source (see COLUMNS)."""
  per = (manifest or {}).get("ingest", {}).get("per_source", {})
  files = (manifest or {}).get("ingest", {}).get("files_per_source", {})
  out = []
  for f in found:
    e, c = f.entry, per.get(f.entry.key)
    row = {"source": e.name, "status": f.status, "modality": ", ".join(e.modality),
           "anatomy": e.anatomy, "files_found": files.get(e.key, f.files),
           "published": e.images, "missing_patterns": "; ".join(f.missing),
           "access": e.access, "url": e.url, "preset": e.preset,
           "written": "", "rejected": "", "duplicates": "", "ratio": ""}
    if c is not None:
      row.update(written=c["written"], rejected=c["rejected"],
                 duplicates=c["exact_duplicates"] + c["near_duplicates"],
                 ratio=f"{c['written'] / e.images:.4f}")
    out.append(row)
  return out


def csv_bytes(table: list[dict[str, Any]]) -> bytes:
  buf = io.StringIO()
  w = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
  w.writeheader()
  w.writerows(table)
  return buf.getvalue().encode()


def report_tables(table: list[dict[str, Any]], catalog: Catalog) -> list[dict]:
  """The catalog tables of the ingestion report: the sources found, then the absent."""
  here = [r for r in table if r["written"] != ""]
  gone = [r for r in table if r["written"] == ""]
  published = sum(r["published"] for r in here)
  written = sum(r["written"] for r in here)
  out = [{"title": f"Catalog {catalog.name}: sources found",
          "note": f"{len(here)} of {len(catalog.entries)} sources found: {written:,} images "
                  f"written of the {published:,} they published "
                  f"({written / max(published, 1):.1%}); the whole catalog published "
                  f"{catalog.total_images:,}.",
          "header": ["Source", "Status", "Files", "Written", "Rejected", "Duplicates",
                     "Published", "Written / published"],
          "rows": [[r["source"], r["status"], f"{r['files_found']:,}", f"{r['written']:,}",
                    f"{r['rejected']:,}", f"{r['duplicates']:,}", f"{r['published']:,}",
                    f"{float(r['ratio']):.2%}"] for r in here],
          "align": "llrrrrrr"}]
  if gone:
    out.append({"title": f"Catalog {catalog.name}: sources not ingested",
                "note": "Not found under the root (or not asked for); obtain them from the "
                        "address, on the terms given. Nothing is downloaded for you.",
                "header": ["Source", "Status", "Published", "Access", "Address"],
                "rows": [[r["source"], r["status"], f"{r['published']:,}",
                          ACCESS[r["access"]], r["url"]] for r in gone],
                "align": "llrll"})
  return out


def rebuild(catalog: Catalog, root: str, out_dir: str, *, sources: list[str] | None = None,
            workers: int = 0, progress: bool = True, overwrite: bool = False,
            output: dict | None = None, dedup: dict | None = None,
            stop_after_shards: int | None = None) -> tuple[dict, list[dict]]:
  """Ingests the catalogued sources found under `root` into `out_dir`; returns
  (manifest, report rows). Sources not found are reported, not fatal."""
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--root {root}: no such folder")
  found = find(catalog.select(sources), root)
  spec = to_spec(found, output, dedup, f"catalog {catalog.name} under {root}")

  def extra(manifest: dict) -> dict:
    table = rows(found, manifest)
    return {"tables": report_tables(table, catalog), "files": {REPORT: csv_bytes(table)}}

  manifest = pipeline.ingest(spec, out_dir, workers=workers, progress=progress,
                             overwrite=overwrite, stop_after_shards=stop_after_shards,
                             report_extra=extra)
  return manifest, rows(found, manifest)


def list_table(catalog: Catalog, found: list[Found] | None = None) -> str:
  """The catalog as a plain-text table (`--list`); with `found`, what is under the root."""
  head = ["Source", "Modality", "Year", "Published", "Access", "Reader", "Preset", "Policy"]
  body = [[e.name, ", ".join(e.modality), str(e.year), f"{e.images:,}", e.access, e.reader,
           e.preset, e.policy()] for e in catalog.entries]
  if found is not None:
    status = {f.entry.name: f for f in found}
    head[1:1] = ["Status", "Files"]
    body = [[r[0], status[r[0]].status, f"{status[r[0]].files:,}", *r[1:]]
            for r in body if r[0] in status]
  right = {head.index(c) for c in ("Published", "Files") if c in head}
  widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
  fmt = lambda r: "  ".join(c.rjust(w) if i in right else c.ljust(w)  # noqa: E731
                            for i, (c, w) in enumerate(zip(r, widths))).rstrip()
  lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)]
  lines.append(f"{len(body)} of {len(catalog.entries)} sources, "
               f"{sum(e.images for e in catalog.entries if e.name in {r[0] for r in body}):,} "
               f"images published ({catalog.path})")
  return "\n".join(lines)
