"""python -m data_pipeline.ingest --spec=corpus.toml --out=/data/corpus [--workers=N]

Reads every source of the spec, writes ArrayRecord shards, manifest.json
(counts per source and modality, shard checksums), index.npz, rejects.jsonl,
duplicates.jsonl and report.md/.html with charts. Run it again after an
interruption and it resumes where it stopped.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from data_pipeline.ingest import pipeline
from data_pipeline.ingest.spec import load_spec


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m data_pipeline.ingest", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--spec", required=True, help="corpus spec (.toml or .json)")
  p.add_argument("--out", required=True, help="output folder for shards and reports")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                 help="reader processes (0: in this process); default: one per core")
  p.add_argument("--overwrite", action="store_true",
                 help="start over, replacing an earlier ingestion in --out")
  p.add_argument("--quiet", action="store_true", help="no progress line")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  try:
    spec = load_spec(a.spec)
    manifest = pipeline.ingest(spec, a.out, workers=a.workers, progress=not a.quiet,
                               overwrite=a.overwrite)
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
