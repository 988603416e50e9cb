"""Host memory (RSS) across repeated in-training evaluations, as main.py runs
them: each one wraps the current weights in a new Encoder and scores the
quickstart's kNN evaluator on the mini corpus. Prints one JSON line.

  python benchmarks/eval_memory.py --evals=8

Fields: RSS in MB after each evaluation, and the growth from the second to
the last one (the first pays for compilation and the dataset load once).
"""
import json
import os
import resource
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_EVALS = flags.DEFINE_integer("evals", 8, "Evaluations to run.")
_CACHE = flags.DEFINE_string("cache", None, "Cache dir (mini corpus, tfds); default: a "
                             "temporary one.")


def rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(evals: int, cache: str) -> dict:
  import jax
  from flax import nnx

  from biovfm_jax.evaluate.during_training import Evaluator
  from biovfm_jax.evaluate.encoder import Encoder, default_mesh
  from biovfm_jax.models.vit import VisionTransformer, vit_config
  from configs import quickstart

  config = quickstart.get_config()
  entry = config.evals.knn_mini
  entry.data_dir = os.path.join(cache, "tfds")
  evaluator = Evaluator("knn_mini", entry)
  vit = vit_config_of(config, vit_config)
  params = nnx.to_pure_dict(nnx.split(VisionTransformer(vit, rngs=nnx.Rngs(0)),
                                      nnx.Param, ...)[1])
  mesh = default_mesh()
  rss = []
  for i in range(evals):
    # New weights each time, as after more training steps; a new Encoder, as
    # during_training.backbone_encoder builds one per evaluation.
    params = jax.tree.map(lambda x: x * 1.001, params)
    evaluator.run(Encoder(vit, params, mesh=mesh), step=i)
    rss.append(round(rss_mb(), 1))
  return {"evals": evals, "rss_mb": rss, "growth_mb": round(rss[-1] - rss[1], 1),
          "growth_per_eval_mb": round((rss[-1] - rss[1]) / max(1, evals - 2), 1)}


def vit_config_of(config, vit_config):
  m = config.model
  return vit_config(None, image_size=config.image_size, patch_size=m.patch_size,
                    width=m.width, depth=m.depth, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
                    dtype=m.dtype)


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    cache = _CACHE.value or tmp
    os.environ.setdefault("BIOVFM_CACHE", cache)
    print(json.dumps(measure(_EVALS.value, cache)))


if __name__ == "__main__":
  app.run(main)
