"""Input pipeline speed, side by side with the PyTorch peers, in one run.

  python benchmarks/input_speed.py --dinov2_repo=/path/to/dinov2   # a local clone

The same generated PNG images (--images of them, 256 to 512 px, half grey and
half RGB, smooth fields with noise like many scans) are read by both sides:
by the peer from the PNG folder (torchvision ImageFolder, PIL), by ours from
ArrayRecord shards that the project's ingestion wrote from that folder.

  mae:       RandomResizedCrop(224, scale=(0.2, 1), bicubic) + flip + ToTensor
             + Normalize in a torch DataLoader, vs make_pretrain_loader
             (crops "single"); batch 64.
  multicrop: dinov2's own DataAugmentationDINO (2 x 224 + 8 x 96) and its
             collate with iBOT masks, vs make_pretrain_loader (crops
             "multicrop"); batch 64. Needs --dinov2_repo (the repository
             root: the folder holding dinov2/); skipped without it.

Each case runs at each --workers count (DataLoader num_workers and
config.data.num_workers alike), --pairs times, the sides alternating which
goes first. A side's figure is images (examples) per second over --batches
batches after warm-up batches; start-up is not counted. Ours runs with the
config's read_threads (--read_threads; "auto" = the default config's choice).
One JSON line per case, then a summary line.
"""
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_IMAGES = flags.DEFINE_integer("images", 192, "Generated PNG images.")
_BATCH = flags.DEFINE_integer("batch", 64, "Batch size, both sides.")
_BATCHES = flags.DEFINE_integer("batches", 12, "Timed batches per side and pair.")
_PAIRS = flags.DEFINE_integer("pairs", 3, "Pairs per case.")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "Worker process counts.")
_CASES = flags.DEFINE_list("cases", ["mae", "multicrop"], "mae and/or multicrop.")
_DINOV2 = flags.DEFINE_string("dinov2_repo", None,
                              "A local clone of facebookresearch/dinov2 (for multicrop).")
_THREADS = flags.DEFINE_string("read_threads", "auto",
                               "Ours: config.data.read_threads ('auto': the config's default).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the images and shards go (a temp dir).")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_images(folder: str, n: int) -> None:
  """n PNGs in folder/all/ (ImageFolder wants a class folder)."""
  import numpy as np
  from PIL import Image
  from scipy.ndimage import gaussian_filter
  os.makedirs(os.path.join(folder, "all"), exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    h, w = (int(x) for x in rng.integers(256, 513, 2))
    c = 3 if i % 2 else 1
    field = gaussian_filter(rng.normal(size=(h, w, c)), sigma=(10, 10, 0))
    img = 110 + 50 * field / field.std() + rng.normal(0, 5, field.shape)
    yy, xx = np.mgrid[:h, :w]
    img[((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 > 1] = 0  # a body
    img = np.clip(img, 0, 255).astype(np.uint8)
    Image.fromarray(img[..., 0] if c == 1 else img).save(
        os.path.join(folder, "all", f"{i:05d}.png"))


def ingest(folder: str, out: str) -> int:
  from data_pipeline.ingest import pipeline
  from data_pipeline.ingest.spec import parse_spec
  doc = {"output": {"resize_shorter": 0, "shard_mb": 64},
         "dedup": {"exact": True},
         "sources": [{"name": "bench", "path": folder, "reader": "image", "modality": "CT"}]}
  return pipeline.ingest(parse_spec(doc), out, workers=0, progress=False)["num_records"]


def our_config(case: str, shards: str, workers: int):
  from configs import dinov2_base, mae_base
  if case == "mae":
    c = mae_base.get_config(None).data
  else:
    c = dinov2_base.get_config(None).data
    c.update(global_crop_size=224, local_crop_size=96, num_local_crops=8, patch_size=16)
  c.update(shards=shards, image_size=224, num_workers=workers)
  if _THREADS.value != "auto":
    c.read_threads = int(_THREADS.value)
  return c


def ours(case: str, shards: str, workers: int):
  """An iterator of batches, and its close."""
  from data_pipeline import loader
  it = loader.make_pretrain_loader(our_config(case, shards, workers),
                                   global_batch_size=_BATCH.value, seed=0,
                                   process_index=0, process_count=1)
  return it, it.close


def peer(case: str, folder: str, workers: int):
  import functools
  import torch
  from torchvision import datasets, transforms
  if case == "mae":  # the MAE repository's main_pretrain.py recipe
    tf = transforms.Compose([
        transforms.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=3),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(mean=MEAN, std=STD)])
    collate = None
  else:  # dinov2/train/train.py's set-up, with its crops and masks
    from dinov2.data import DataAugmentationDINO, MaskingGenerator, collate_data_and_cast
    tf = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 8, global_crops_size=224,
                              local_crops_size=96)
    grid = 224 // 16
    collate = functools.partial(
        collate_data_and_cast, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5,
        n_tokens=grid * grid, dtype=torch.float32,
        mask_generator=MaskingGenerator(input_size=(grid, grid),
                                        max_num_patches=0.5 * grid * grid))
  ds = datasets.ImageFolder(folder, transform=tf)
  sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=1 << 30)
  dl = torch.utils.data.DataLoader(ds, batch_size=_BATCH.value, sampler=sampler,
                                   num_workers=workers, collate_fn=collate, drop_last=True)
  it = iter(dl)

  def close():
    nonlocal it
    del it  # shuts its workers down
  return it, close


def rate(make, warm: int) -> float:
  """Images/s over _BATCHES batches after `warm` batches (start-up excluded)."""
  it, close = make()
  try:
    for _ in range(warm):
      next(it)
    t0 = time.perf_counter()
    for _ in range(_BATCHES.value):
      next(it)
    return _BATCHES.value * _BATCH.value / (time.perf_counter() - t0)
  finally:
    close()


def main(argv):
  del argv
  import logging
  logging.getLogger("dinov2").setLevel(logging.WARNING)
  cases = list(_CASES.value)
  if "multicrop" in cases:
    if not _DINOV2.value:
      print("input_speed: multicrop skipped: pass --dinov2_repo=PATH, a local clone of "
            "facebookresearch/dinov2 (its root, holding dinov2/)", file=sys.stderr)
      cases.remove("multicrop")
    else:
      sys.path.insert(0, os.path.abspath(os.path.expanduser(_DINOV2.value)))
  work = _WORKDIR.value or tempfile.mkdtemp(prefix="input_speed_")
  folder, shards = os.path.join(work, "png"), os.path.join(work, "shards")
  if not os.path.isdir(folder):
    make_images(folder, _IMAGES.value)
  records = ingest(folder, shards)
  summary = []
  for case in cases:
    for workers in (int(w) for w in _WORKERS.value):
      from data_pipeline import loader
      threads = loader.input_parallelism(our_config(case, shards, workers))[1]
      # Past the batches made side by side at the start (each worker or read
      # thread makes whole batches; DataLoader workers prefetch two each):
      # from there on a batch arrives at the pipeline's steady rate.
      warm = 2 + 2 * max(workers, 1) * max(threads, 1)
      sides = {"ours": lambda: ours(case, shards, workers),
               "peer": lambda: peer(case, folder, workers)}
      got = {"ours": [], "peer": []}
      for pair in range(_PAIRS.value):
        order = ("ours", "peer") if pair % 2 == 0 else ("peer", "ours")
        for side in order:
          got[side].append(rate(sides[side], warm))
      ratios = [o / p for o, p in zip(got["ours"], got["peer"])]
      row = {"case": case, "workers": workers, "batch": _BATCH.value, "pairs": _PAIRS.value,
             "ours_read_threads": threads, "warmup_batches": warm,
             "ours_img_s": [round(x, 1) for x in got["ours"]],
             "peer_img_s": [round(x, 1) for x in got["peer"]],
             "ratio": [round(r, 3) for r in ratios],
             "ratio_median": round(statistics.median(ratios), 3),
             "images": records, "cpus": len(os.sched_getaffinity(0)),
             "load_1min": round(os.getloadavg()[0], 2)}
      print(json.dumps(row), flush=True)
      summary.append(f"{case}@{workers}w: {row['ratio_median']:.2f}")
  print(json.dumps({"summary": "ours/peer median ratio: " + ", ".join(summary)}))


if __name__ == "__main__":
  app.run(main)
