"""Speed of the linear segmentation probe on mni_tissue: feature extraction
(images/s) and head training on cached features (epochs/s), for a random
ViT of the given size at the given image size, one JSON line.

  python benchmarks/seg_probe_speed.py                      # ViT-S/16, 224 px
  python benchmarks/seg_probe_speed.py --size=T --image_size=64 --epochs=5

The first extraction batch compiles (feature_compile_s, apart); the head's
epochs/s is the difference between 1 and 1 + N epochs (each run compiles).
"""
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_SIZE = flags.DEFINE_string("size", "S", "ViT size (patch 16).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Mask and input size.")
_EPOCHS = flags.DEFINE_integer("epochs", 5, "Head epochs timed (after one to compile).")
_LAYERS = flags.DEFINE_string("layers", "last", "'last' or 'last4'.")


def main(argv):
  del argv
  import json

  import jax
  import numpy as np
  from flax import nnx

  from biovfm_jax.evaluate import encoder as encoder_lib
  from biovfm_jax.evaluate import segmentation
  from biovfm_jax.models.vit import VisionTransformer, vit_config
  from configs.eval import segmentation_linear
  from data_pipeline import seg_benchmarks

  work = tempfile.mkdtemp(prefix="seg_speed_")
  size = _IMAGE_SIZE.value
  splits = {s: seg_benchmarks.load_split("mni_tissue", s, size=size,
                                         data_dir=os.path.join(work, "data"))
            for s in ("train", "val")}
  cfg = vit_config(_SIZE.value, patch_size=16, image_size=size)
  model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
  enc = encoder_lib.Encoder(cfg, nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1]))

  images = splits["train"].images
  t0 = time.perf_counter()
  segmentation.extract(enc, images[:64], layers=_LAYERS.value, input_size=size, batch_size=64)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  train = segmentation.extract(enc, images, layers=_LAYERS.value, input_size=size,
                               batch_size=64)
  feat_s = time.perf_counter() - t0
  val = segmentation.extract(enc, splits["val"].images, layers=_LAYERS.value,
                             input_size=size, batch_size=64)

  # Each call compiles its own epoch program: time 1 epoch and 1 + N epochs,
  # the difference is N epochs of training (and validation).
  head_cfg = segmentation_linear.get_config().head
  head_cfg.warmup_epochs = 0
  times = []
  for epochs in (1, 1 + _EPOCHS.value):
    head_cfg.epochs = epochs
    t0 = time.perf_counter()
    segmentation.train_fast(train, splits["train"].masks, val, splits["val"].masks, 3,
                            head_cfg)
    times.append(time.perf_counter() - t0)
  first_epoch_s, head_s = times[0], times[1] - times[0]
  print(json.dumps({
      "benchmark": "mni_tissue", "model": f"ViT-{_SIZE.value}/16", "image_size": size,
      "layers": _LAYERS.value, "train_images": len(images),
      "features_per_s": round(len(images) / feat_s, 1),
      "feature_compile_s": round(compile_s, 1),
      "head_epochs_per_s": round(_EPOCHS.value / head_s, 3),
      "head_first_epoch_s": round(first_epoch_s, 1),
      "head_train_pixels_per_epoch": int(np.prod(splits["train"].masks.shape)),
      "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind}))


if __name__ == "__main__":
  app.run(main)
