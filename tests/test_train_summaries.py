"""Reading back the images a run logged (biovfm_jax/train/summaries.py),
written by clu's writer exactly as the train loop writes its sample grids."""
import numpy as np
import pytest
from clu import metric_writers

from biovfm_jax.train.summaries import logged_images


def test_logged_images_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  grids = {step: rng.integers(0, 256, (3, 8, 24, 3), dtype=np.uint8) for step in (5, 10)}
  grey = rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
  writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=True)
  for step in (10, 5):  # out of order: returned by step
    writer.write_images(step, {"mae/samples": grids[step]})
    writer.write_scalars(step, {"loss": 1.0})
  writer.write_images(5, {"grey": grey})
  writer.close()
  out = logged_images(str(tmp_path), "mae/samples")
  assert list(out) == [5, 10]
  for step, grid in grids.items():
    np.testing.assert_array_equal(out[step], grid)  # PNG: lossless
  np.testing.assert_array_equal(logged_images(str(tmp_path), "grey")[5], grey)
  for absent in ("dinov2/samples", "loss"):  # a scalar is no image
    with pytest.raises(ValueError, match=rf"no image summary '{absent}'; its image "
                                         r"summaries: \['grey', 'mae/samples'\]"):
      logged_images(str(tmp_path), absent)
