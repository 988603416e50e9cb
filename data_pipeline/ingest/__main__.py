"""python -m data_pipeline.ingest --spec=corpus.toml --out=/data/corpus [--workers=N]
python -m data_pipeline.ingest --catalog=biovfm21m --root=/data/public --out=/data/corpus
    [--sources=FastMRI,PadChest] [--workers=N]
python -m data_pipeline.ingest --catalog=biovfm21m --list [--root=/data/public]

Reads every source of the spec (or every catalogued source found under
--root, with its preset), writes ArrayRecord shards, manifest.json (counts per
source and modality, shard checksums), index.npz, rejects.jsonl,
duplicates.jsonl and report.md/.html with charts; from a catalog also
catalog_report.csv (per source: files found, written, rejected, duplicates,
published, written / published; absent sources with their address and access
terms). Nothing is downloaded. Run it again after an interruption and it
resumes where it stopped.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from data_pipeline.ingest import pipeline
from data_pipeline.ingest.spec import load_spec


def _catalog_run(a, p) -> dict:
  from data_pipeline.catalog import catalog, rebuild  # pylint: disable=import-outside-toplevel
  cat = catalog.load(a.catalog)
  names = [n.strip() for n in a.sources.split(",") if n.strip()] if a.sources else None
  if a.list:
    found = (rebuild.find(cat.select(names), os.path.abspath(os.path.expanduser(a.root)))
             if a.root else None)
    print(rebuild.list_table(cat, found))
    return {}
  if not a.root or not a.out:
    p.error("--catalog needs --root (where the sources are) and --out, or --list")
  output = {"resize_shorter": a.resize_shorter, "format": a.format}
  manifest, rows = rebuild.rebuild(cat, a.root, a.out, sources=names, workers=a.workers,
                                   progress=not a.quiet, overwrite=a.overwrite, output=output)
  here = [r for r in rows if r["written"] != ""]
  print(f"catalog {cat.name}: {len(here)} of {len(rows)} sources ingested; the others are "
        f"listed with their address in {os.path.join(a.out, rebuild.REPORT)}")
  return manifest


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m data_pipeline.ingest", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument("--spec", help="corpus spec (.toml or .json)")
  what.add_argument("--catalog", help="a catalog: 'biovfm21m' (shipped) or a .toml file")
  p.add_argument("--out", help="output folder for shards and reports")
  p.add_argument("--root", help="--catalog: the folder holding one folder per source")
  p.add_argument("--sources", help="--catalog: only these sources (comma-separated)")
  p.add_argument("--list", action="store_true",
                 help="--catalog: print the catalog (with --root: what is found) and stop")
  p.add_argument("--resize_shorter", type=int, default=0,
                 help="--catalog: shorter side down to this many pixels (0 keeps sizes)")
  p.add_argument("--format", choices=["png", "jpeg"], default="png",
                 help="--catalog: how images are stored in the shards")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                 help="reader processes (0: in this process); default: one per core")
  p.add_argument("--overwrite", action="store_true",
                 help="start over, replacing an earlier ingestion in --out")
  p.add_argument("--quiet", action="store_true", help="no progress line")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  if a.spec and (a.root or a.sources or a.list):
    p.error("--root, --sources and --list go with --catalog, not --spec")
  if a.spec and not a.out:
    p.error("--spec needs --out")
  try:
    if a.catalog:
      manifest = _catalog_run(a, p)
      if not manifest:
        return 0
    else:
      manifest = pipeline.ingest(load_spec(a.spec), a.out, workers=a.workers,
                                 progress=not a.quiet, overwrite=a.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"ingest: error: {e}", file=sys.stderr)
    return 2
  t = manifest["ingest"]["totals"]
  print(f"{a.out}: {manifest['num_records']} images in {manifest['num_shards']} shards; "
        f"{t['inputs']} inputs = {t['written']} written + {t['rejected']} rejected + "
        f"{t['exact_duplicates']} exact + {t['near_duplicates']} near duplicates. "
        f"Report: {os.path.join(a.out, 'report.md')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
