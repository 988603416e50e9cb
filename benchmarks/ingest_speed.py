"""Ingestion speed: images/s, and per core, for 1..N worker processes on the
same generated corpus, side by side in one run; prints one JSON line.

  python benchmarks/ingest_speed.py --images=400 --size=512 --workers=1,2

The corpus is --images PNG files (grey, --size px, textured so PNG has real
work to do), ingested with resize_shorter=256, PNG output and exact + near
deduplication: decode, resize, hash, encode and write, as a real run does.
"""
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_IMAGES = flags.DEFINE_integer("images", 400, "Generated input files.")
_SIZE = flags.DEFINE_integer("size", 512, "Their side in pixels.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Worker counts to time.")


def main(argv):
  del argv
  import numpy as np
  from PIL import Image

  from data_pipeline.ingest import pipeline
  from data_pipeline.ingest.spec import parse_spec

  work = tempfile.mkdtemp(prefix="ingest_speed_")
  src = os.path.join(work, "images")
  os.makedirs(src)
  rng = np.random.default_rng(0)
  from scipy.ndimage import gaussian_filter
  for i in range(_IMAGES.value):
    # A smooth random field (distinct per image, so none is a near duplicate) plus noise.
    field = gaussian_filter(rng.normal(size=(_SIZE.value, _SIZE.value)), sigma=12)
    img = 127 + 60 * field / field.std() + rng.normal(0, 6, field.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(src, f"{i:05d}.png"))
  doc = {"output": {"resize_shorter": 256, "shard_mb": 64},
         "dedup": {"exact": True, "near_threshold": 4},
         "sources": [{"name": "bench", "path": src, "reader": "image", "modality": "CT"}]}
  out = {"images": _IMAGES.value, "size": _SIZE.value, "cpu_count": os.cpu_count()}
  for w in (int(x) for x in _WORKERS.value):
    t0 = time.perf_counter()
    manifest = pipeline.ingest(parse_spec(doc), os.path.join(work, f"out_{w}"), workers=w,
                               progress=False)
    seconds = time.perf_counter() - t0
    out[f"workers_{w}"] = {"seconds": round(seconds, 2),
                           "images_per_s": round(_IMAGES.value / seconds, 1),
                           "images_per_s_per_core": round(_IMAGES.value / seconds / max(w, 1), 1),
                           "written": manifest["num_records"]}
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
