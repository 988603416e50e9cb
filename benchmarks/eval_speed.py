"""Times the `biovfm` linear probe against the `fast` one on the same data and
encoder, side by side in one process, and prints one JSON line.

  python benchmarks/eval_speed.py --benchmark=dermamnist --epochs=10
  python benchmarks/eval_speed.py --checkpoint=/tmp/quickstart --npz_dir=~/medmnist --size=64

Without --npz_dir it generates a MedMNIST-format npz of the benchmark (at
--train/--val/--test examples); without --checkpoint it scores a random ViT
(--width, --depth, patch 4 at 28 px, else patch 8). Fields: seconds per
protocol (feature extraction, compilation and head training: what a user
waits for), their ratio, and both AUCs.
"""
import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_BENCHMARK = flags.DEFINE_string("benchmark", "dermamnist", "MedMNIST flag.")
_SIZE = flags.DEFINE_integer("size", 28, "MedMNIST+ image size.")
_NPZ_DIR = flags.DEFINE_string("npz_dir", None, "Real MedMNIST npz files (else generated).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Encoder checkpoint (else random ViT).")
_WIDTH = flags.DEFINE_integer("width", 192, "Random ViT width.")
_DEPTH = flags.DEFINE_integer("depth", 4, "Random ViT depth.")
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Probe epochs (the reference uses 100).")
_COUNTS = flags.DEFINE_list("counts", ["2000", "300", "500"], "Generated train,val,test.")


def main(argv):
  del argv
  import jax
  from flax import nnx

  from biovfm_jax.evaluate import runner as evaluate_bin
  from biovfm_jax.models.vit import VisionTransformer, vit_config
  from biovfm_jax.train import checkpoint as ckpt_lib
  from configs.eval import common
  from data_pipeline.readers import medmnist

  work = tempfile.mkdtemp(prefix="eval_speed_")
  npz_dir = os.path.expanduser(_NPZ_DIR.value) if _NPZ_DIR.value else os.path.join(work, "npz")
  if not _NPZ_DIR.value:
    medmnist.make_synthetic_npz(medmnist.npz_path(npz_dir, _BENCHMARK.value, _SIZE.value),
                                _BENCHMARK.value, _SIZE.value,
                                counts=tuple(int(c) for c in _COUNTS.value), seed=0)
  checkpoint = _CHECKPOINT.value
  if not checkpoint:
    patch = 4 if _SIZE.value == 28 else 8
    cfg = vit_config(None, width=_WIDTH.value, depth=_DEPTH.value,
                     num_heads=max(1, _WIDTH.value // 64), patch_size=patch,
                     image_size=_SIZE.value)
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    checkpoint = os.path.join(work, "encoder")
    ckpt_lib.save_params(checkpoint, nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1]),
                         {"objective": "random", "backbone": "params",
                          "encoder": dataclasses.asdict(cfg)})

  out = {"benchmark": _BENCHMARK.value, "size": _SIZE.value, "epochs": _EPOCHS.value,
         "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind}
  for protocol in ("biovfm", "fast"):
    c = common.get_config(protocol)
    c.benchmarks, c.image_size, c.npz_dir = _BENCHMARK.value, _SIZE.value, npz_dir
    c.data_dir = os.path.join(work, "tfds")
    c.probe.epochs = _EPOCHS.value
    c = evaluate_bin.resolve_config(c, checkpoint=checkpoint,
                                    out_dir=os.path.join(work, protocol))
    if protocol == "biovfm":  # build the tfds data outside the timed region
      from biovfm_jax.evaluate.protocols import load_splits
      splits = load_splits(_BENCHMARK.value, c)
      out["train_examples"] = splits["train"].num_examples
    t0 = time.perf_counter()
    result = evaluate_bin.run(c)[_BENCHMARK.value]
    out[f"{protocol}_s"] = round(time.perf_counter() - t0, 2)
    out[f"{protocol}_auc"] = round(float(result["auc"]), 4)
  out["speedup_fast_vs_biovfm"] = round(out["biovfm_s"] / out["fast_s"], 2)
  out["auc_gap"] = round(abs(out["biovfm_auc"] - out["fast_auc"]), 4)
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
