"""Reading back the images a run logged to TensorBoard (the train loop's
sample grids: MAE reconstructions, DINOv2 PCA maps), for notebooks and
reports that show them without a TensorBoard server.

    grids = logged_images("/tmp/quickstart", "mae/samples")  # {step: uint8 (N, H, W, 3)}
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def logged_images(workdir: str, tag: str) -> dict[int, np.ndarray]:
  """{step: uint8 (N, H, W, C)} of every image summary `tag` in the event
  files directly in `workdir`, oldest step first (a resumed run's later write
  of a step wins). ValueError naming the tags there when `tag` is absent."""
  # Imported here: the event reader pulls in TensorBoard's TF stubs.
  from tensorboard.backend.event_processing import event_accumulator as ea
  acc = ea.EventAccumulator(workdir, size_guidance={ea.TENSORS: 0})
  acc.Reload()
  images = sorted(t for t in acc.Tags()["tensors"]
                  if acc.SummaryMetadata(t).plugin_data.plugin_name == "images")
  if tag not in images:
    raise ValueError(f"{workdir}: no image summary {tag!r}; its image summaries: {images}")
  out = {}
  for event in acc.Tensors(tag):
    # tf.summary.image stores [width, height, PNG of each image] as strings.
    pngs = event.tensor_proto.string_val[2:]
    decoded = [np.asarray(Image.open(io.BytesIO(b))) for b in pngs]
    out[int(event.step)] = np.stack([a[..., None] if a.ndim == 2 else a for a in decoded])
  return dict(sorted(out.items()))
