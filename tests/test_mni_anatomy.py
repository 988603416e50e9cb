"""The built-in mni_anatomy benchmark (data_pipeline/anatomy.py): how it is
built, and that pretraining must earn it: a short quickstart run scores above
random weights by more than 3 seed standard deviations."""
import collections
import json
import os

import jax
import numpy as np
import pytest

from data_pipeline import eval_loader, tfds_builders


def test_mni_anatomy_builds_labelled_views_in_block_splits(tmp_path):
  """mni_anatomy: 9 classes (plane x level) in every split; a slice's views
  share its split, neighbouring slices theirs (blocks of 4); the views are the
  same crops in every build, and not the whole slice (random weights would
  match neighbours pixel for pixel)."""
  from data_pipeline import anatomy
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  items = list(anatomy.slices())
  assert len(items) > 300
  for split, label, ident, pixels in items:
    k = int(ident[1:])
    assert split == anatomy.SPLIT_CYCLE[k // 4 % 5] and pixels.dtype == np.uint8
    assert anatomy.PLANES[label // 3][0] == ident[0]
  # Levels within a plane follow the slice position (sagittal: from the midline).
  for plane, axis in (("coronal", 1), ("axial", 2)):
    ks = [(int(i[1:]), lab % 3) for _, lab, i, _ in items if i[0] == plane[0]]
    assert [lab for _, lab in sorted(ks)] == sorted(lab for _, lab in ks), plane
  sag = {int(i[1:]): lab % 3 for _, lab, i, _ in items if i[0] == "s"}
  mid = (min(sag) + max(sag)) / 2
  assert sag[int(mid)] == 0 and sag[min(sag)] == 2 and sag[max(sag)] == 2

  b = tfds_builders.prepare("mni_anatomy", size=28, data_dir=tmp_path)
  assert b.data_dir == os.path.join(str(tmp_path), "mni_anatomy", "28px", "1.0.0")
  views = list(anatomy.examples(28))
  assert len(views) == anatomy.VIEWS * len(items)
  for split in tfds_builders.SPLITS:
    source = b.as_data_source(split)
    exs = [source[i] for i in range(len(source))]
    mine = [v for v in views if v[0] == split]
    assert len(exs) == len(mine)
    assert collections.Counter(int(ex["label"][0]) for ex in exs).keys() == set(range(9))
    for ex, (_, label, image) in list(zip(exs, mine))[::37]:
      assert int(ex["label"][0]) == label
      np.testing.assert_array_equal(ex["image"], image)  # PNG is lossless
  # Two views of one slice are different crops of it.
  first, second = views[0][2], views[1][2]
  assert first.shape == (28, 28, 3) and not np.array_equal(first, second)
  split = eval_loader.EvalSplit("mni_anatomy", "test", b)
  assert (split.task, split.num_classes, split.classes[0]) == ("multi-class", 9, "sagittal medial")


@pytest.mark.slow
def test_a_short_pretraining_beats_random_weights_by_3_seed_sds(tmp_path):
  """The quickstart's MAE at test size (its model and lr, trained at 32 px:
  300 steps of 32 images, a quarter of its pixels) against the same encoder
  at 3 random initialisations (the run's step 0, and seeds 1 and 2), by kNN ACC on
  mni_anatomy at 64 px, as the in-training evaluator scores them."""
  import ml_collections
  from configs import common, quickstart
  from biovfm_jax.evaluate import protocols
  from biovfm_jax.evaluate.encoder import Encoder, load_encoder
  from biovfm_jax.models.vit import VisionTransformer
  from biovfm_jax.train import loop
  from biovfm_jax.train.state import ModelSpec
  c = quickstart.get_config()
  c.update(image_size=32, batch_size=32, num_train_steps=300, log_every_steps=100,
           image_every_steps=0)
  c.checkpoint.every_steps = 300
  c.optim.base_lr *= 2  # the quickstart's lr at half its batch
  entry = common.eval_entry("knn", every_steps=300, benchmarks="anatomy", image_size=64)
  entry.data_dir = str(tmp_path / "data")
  c.evals = ml_collections.ConfigDict({"anatomy": entry})
  loop.train(c, str(tmp_path / "run"))
  # The run's own scores: step 0 is its random initialisation, step 300 trained.
  rows = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))
          if "eval/anatomy/mni_anatomy/acc" in r]
  assert [r["step"] for r in rows] == [0, 300]
  randoms = [100 * rows[0]["eval/anatomy/mni_anatomy/acc"]]
  got = 100 * rows[1]["eval/anatomy/mni_anatomy/acc"]
  # Two more random initialisations of the same encoder, scored the same way.
  trained = load_encoder(str(tmp_path / "run"))
  splits = protocols.load_splits("mni_anatomy", entry)
  for seed in (1, 2):
    spec = ModelSpec(lambda rngs: VisionTransformer(trained.config, rngs=rngs), seed,
                     trained.mesh, trained.rules)
    random = Encoder(trained.config, jax.jit(spec.init_params)(), mesh=trained.mesh)
    randoms.append(100 * protocols.run_protocol(random, splits, entry)["acc"])
  mean, sd = float(np.mean(randoms)), float(np.std(randoms, ddof=1))
  print(f"mni_anatomy kNN ACC: random {mean:.1f} +- {sd:.1f} (3 inits), trained {got:.1f}")
  assert got - mean > 3 * max(sd, 0.5), (randoms, got)
