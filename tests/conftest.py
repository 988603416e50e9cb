"""Test set-up: 8 fake CPU devices, so sharding is exercised for real."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# gs:// paths through epath's fsspec backend (gcsfs), which can be pointed at the
# GCS emulator of test_storage.py; TF's GCS cannot. epath decides once per process.
os.environ.setdefault("EPATH_USE_TF", "false")

# triton (pulled in by torch, used by the interop tests' timm) segfaults when its
# native library loads after TensorFlow's (which clu and tfds bring in): load it first.
try:
  import triton  # noqa: E402,F401
except ImportError:
  pass


import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory):
  """40 synthetic records of varied size, even indices grey (H, W), odd ones
  colour, in three ArrayRecord shards: input-pipeline tests read these."""
  from data_pipeline import records, shards
  rng = np.random.default_rng(0)
  recs = []
  for i in range(40):
    h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
    shape = (h, w, 3) if i % 2 else (h, w)
    recs.append(records.make_record(rng.integers(0, 256, shape, dtype=np.uint8),
                                    {"source": "synthetic", "modality": "CT", "index": i}))
  out = tmp_path_factory.mktemp("shards")
  shards.write_shards(recs, out, "t", records_per_shard=16)
  return str(out)
