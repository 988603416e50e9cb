"""DINOv3's high-resolution adaptation stage: several crop sizes per run (one
per step, drawn from the step alone), one compiled program per size, started
from a DINOv2 run's teacher and heads with the run itself as Gram teacher."""
import json
import logging

import numpy as np
import pytest

from biovfm_jax.train import loop
from configs import high_res_base, high_res_vit_b, high_res_vit_l, quickstart_dinov2
from data_pipeline import loader
from data_pipeline.errors import ConfigError

TINY_MODEL = dict(width=32, depth=2, num_heads=2, mlp_dim=64)


def _tiny(c):
  c.model.update(size=None, patch_size=8, layerscale_init=None, init="mae", **TINY_MODEL)
  c.dinov2.update(head_hidden=64, head_bottleneck=32, num_prototypes=128,
                  separate_ibot_head=False, centering="softmax", n_local_crops=2)
  c.image_size = 32
  c.data.update(local_crop_size=16, num_workers=0)
  c.model.dtype = "float32"
  c.batch_size = 16
  c.log_every_steps = 1
  c.image_every_steps = 0
  c.evals = {}  # the quickstart's evaluator scores step 0; its own tests run it
  return c


def test_size_groups_are_a_function_of_the_step():
  ratios = (0.3, 0.3, 0.3, 0.05, 0.05)
  draws = [loader.crop_size_group(0, s, ratios) for s in range(4000)]
  assert draws == [loader.crop_size_group(0, s, ratios) for s in range(4000)]
  freq = np.bincount(draws, minlength=5) / len(draws)
  np.testing.assert_allclose(freq, ratios, atol=0.025)
  c = high_res_vit_b.get_config()
  groups, r = loader.crop_size_groups(c.data)
  assert r == ratios and groups[0] == {"global_crop_size": 448, "local_crop_size": 96,
                                       "gram_crop_size": 672}
  # The fit check sizes memory for the largest group.
  spec = loader.batch_spec(high_res_vit_l.get_config().data, 2)
  assert spec["global_crops"][0][2] == 672 and spec["gram_crops"][0][2] == 1008
  c.data.local_crop_sizes = (96, 96)
  with pytest.raises(ConfigError, match="one entry per group"):
    loader.crop_size_groups(c.data)


@pytest.mark.slow
def test_high_res_stage_continues_a_dinov2_run_at_two_sizes(tmp_path, caplog):
  src = _tiny(quickstart_dinov2.get_config())
  src.num_train_steps = 2
  src.checkpoint.every_steps = 2
  loop.train(src, str(tmp_path / "src"))

  c = _tiny(high_res_base.get_config(None))
  c.init_from = str(tmp_path / "src")
  c.data.update(global_crop_sizes=(32, 48), local_crop_sizes=(16, 24),
                gram_crop_sizes=(48, 64), crop_size_ratios=(0.5, 0.5), gram_crop_size=48)
  c.num_train_steps = 4
  c.steps_per_epoch = 2
  c.checkpoint.every_steps = 4
  sizes = {loader.crop_size_group(c.seed, s, (0.5, 0.5)) for s in range(4)}
  assert sizes == {0, 1}, "pick a seed whose 4 steps use both groups"
  with caplog.at_level(logging.INFO):
    loop.train(c, str(tmp_path / "hr"))
  text = "\n".join(r.getMessage() for r in caplog.records)
  assert "compiling program 2 of 2" in text and "global_crops 48px" in text, text[-3000:]
  assert "Gram teacher from" in text
  init = next(line for line in text.splitlines() if "Initialised from" in line)
  assert "from it too: dino_head" in init, init
  rows = [json.loads(l) for l in (tmp_path / "hr" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) and np.isfinite(r["gram"]) for r in rows if "loss" in r)
