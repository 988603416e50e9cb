"""DINOv2 through the real trainer: every config compiles, a short run stays healthy."""
import json
import math

import jax
import numpy as np
import pytest

from biovfm_jax.train import loop
from biovfm_jax.train import state as state_lib
from configs import quickstart_dinov2
from data_pipeline import loader as loader_lib


@pytest.mark.slow
@pytest.mark.parametrize("size", ["t", "s", "b", "l", "h", "g"])
def test_every_dinov2_config_compiles_sharded(size):
  """The real config (224 px, full heads and prototypes), batch 8 over an
  8-device FSDP mesh, layers scanned to keep compile time short on CPU.
  S, B and H are T's and L's blocks at other widths: lowered (shapes, dtypes,
  shardings) but not compiled, to save the suite a minute; T, L and g (SwiGLU)
  go through the SPMD partitioner too."""
  config = __import__(f"configs.vit_{size}_dinov2", fromlist=["x"]).get_config()
  config.batch_size = 8
  config.mesh.update(data=1, fsdp=-1)
  config.model.scan_layers = True
  s = loop.build(config, num_records=1000)
  shardings = s.shardings
  abstract = state_lib.abstract_state(s.spec, s.tx, s.objective, shardings)
  local = next(loader_lib.make_pretrain_loader(config.data, global_batch_size=8, seed=0))
  batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=s.batch_sharding)
           for k, v in local.items()}
  assert batch["global_crops"].shape == (8, 2, 224, 224, 3)
  lowered = s.train_step.lower(abstract, batch)
  if size in ("t", "l", "g"):
    assert lowered.compile() is not None
  # The teacher is a full copy of the student, sharded the same way.
  teacher = shardings.extra["teacher"]
  assert jax.tree.structure(teacher) == jax.tree.structure(shardings.params)


@pytest.mark.slow
def test_quickstart_dinov2_trains_without_nan_or_collapse(tmp_path):
  c = quickstart_dinov2.get_config()
  # The quickstart's schedules at 3/5 scale (epochs of 30 steps: lr warmup to
  # step 30, teacher temperature warmup to 60), past both warmups.
  c.steps_per_epoch = 30
  c.num_train_steps = 90
  c.image_every_steps = 45
  c.checkpoint.every_steps = 45
  c.evals = {}  # the evaluator has its own tests
  out = loop.train(c, str(tmp_path))
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["step"] == 90 and all(np.isfinite(r["loss"]) for r in rows)
  log_k = math.log(c.dinov2.num_prototypes)
  late = [r["teacher_entropy"] for r in rows if r["step"] >= 45]
  # Collapse shows as entropy -> 0 (one prototype) or -> log K (uniform).
  assert all(0.05 * log_k < h < 0.98 * log_k for h in late), (late, log_k)
  assert out["loss"] < rows[0]["loss"]
  # The checkpoint says which weights are the backbone to evaluate: the teacher's.
  run = json.loads((tmp_path / "checkpoints" / "90" / "run" / "metadata").read_text())
  assert run["backbone"] == "extra/teacher/backbone" and run["objective"] == "dinov2"
  s = loop.build(c)
  node = state_lib.abstract_state(s.spec, s.tx, s.objective, s.shardings)
  for part in run["backbone"].split("/"):
    node = getattr(node, part) if hasattr(node, part) else node[part]
  assert "blocks" in node and "patch_embed" in node
