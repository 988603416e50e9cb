"""Shards, subsets, checkpoints and metrics in a bucket: gs:// paths, served by
a GCS emulator on 127.0.0.1 (gcp-storage-emulator). The same clients real runs
use talk to it: ArrayRecord's C++ GCS reader, tensorstore (orbax's arrays) and
epath (with fsspec's gcsfs underneath here, tf.io.gfile on a real pod)."""
import json
import os
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biovfm_jax.train import checkpoint as ckpt_lib
from biovfm_jax.train import metrics as metrics_lib
from configs import mae_base
from data_pipeline import loader, records, selection, shards, storage

BUCKET = "biovfm-test"


@pytest.fixture(scope="module")
def gcs():
  """A GCS emulator; the clients find it through their usual variables."""
  from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url,            # gcsfs (epath)
         "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # ArrayRecord's GCS client
         "TENSORSTORE_GCS_HTTP_URL": url,         # orbax's array store
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "none"}
  # epath prefers tf.io.gfile, whose GCS has no emulator setting; conftest.py
  # turns that off before epath first decides (it caches the choice).
  assert os.environ.get("EPATH_USE_TF") == "false"
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield f"gs://{BUCKET}"
  finally:
    server.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


LAYOUT = [("A", "s1")] * 12 + [("B", "s2")] * 28


@pytest.fixture(scope="module")
def corpus(gcs, tmp_path_factory):
  """The same shards on local disk and in the bucket (uploaded as gsutil would)."""
  local = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  recs = [records.make_record(rng.integers(0, 256, (24 + i % 5, 30, 3), dtype=np.uint8),
                              {"modality": m, "source": s, "index": i})
          for i, (m, s) in enumerate(LAYOUT)]
  shards.write_shards(recs, local, "c", records_per_shard=16)
  remote = f"{gcs}/corpus"
  for name in sorted(os.listdir(local)):
    storage.as_path(f"{remote}/{name}").write_bytes((local / name).read_bytes())
  return str(local), remote


def test_paths_keep_the_scheme():
  assert storage.join("gs://b/x/subsets", "..", "c-00000.array_record") == "gs://b/x/c-00000.array_record"
  assert storage.dirname("gs://b/x/y.npz") == "gs://b/x"
  assert storage.join("/a/b", "../c") == "/a/c"
  assert not storage.is_remote("/data/gs:/x") and storage.is_remote("s3://b/k")


def test_a_failed_local_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
  path = tmp_path / "report.json"
  storage.write_bytes_atomic(path, b"old")
  with pytest.raises(TypeError):
    storage.write_bytes_atomic(path, "not bytes")  # fails mid-write
  assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["report.json"]
  storage.write_bytes_atomic(path, b"new")
  assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["report.json"]
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # readable by others, as open() makes it


def test_shard_specs_resolve_in_a_bucket(corpus):
  local, remote = corpus
  names = ["c-00000.array_record", "c-00001.array_record", "c-00002.array_record"]
  assert shards.resolve_shards(remote) == [f"{remote}/{n}" for n in names]
  assert shards.resolve_shards(f"{remote}/c-0000[02].array_record") == [
      f"{remote}/{names[0]}", f"{remote}/{names[2]}"]
  assert shards.resolve_shards(f"gs://{BUCKET}/*/c-*.array_record") == [
      f"{remote}/{n}" for n in names]
  both = shards.resolve_shards(f"{remote}/{names[1]},{local}")
  assert both[0] == f"{remote}/{names[1]}" and len(both) == 4
  with pytest.raises(FileNotFoundError, match="matches no"):
    shards.resolve_shards(f"{remote}/nothing-*.array_record")
  assert shards.read_manifest(remote) == shards.read_manifest(local)
  for key, value in shards.read_index(local).items():
    np.testing.assert_array_equal(shards.read_index(remote)[key], value)


def test_the_loader_reads_the_same_batches_from_a_bucket(corpus):
  """ArrayRecord reads gs:// shards itself: grain's data source gets the URIs."""
  local, remote = corpus
  batches = {}
  for where, spec in (("local", local), ("remote", remote)):
    cfg = {"shards": spec, "image_size": 16, "read_threads": 2}
    it = loader.make_pretrain_loader(_Cfg(cfg), global_batch_size=8, seed=3, start_step=2,
                                     process_index=1, process_count=2)
    batches[where] = [next(it)["image"] for _ in range(3)]
  for a, b in zip(batches["local"], batches["remote"]):
    assert a.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(a, b)


def test_subsets_and_mixtures_in_a_bucket(corpus):
  local, remote = corpus
  path = selection.make_subset(remote, "a_half", modalities=["A"], count="0.5")
  assert path == f"{remote}/subsets/a_half.subset.json"
  data = selection.resolve(path, None)
  paths, chosen = data.paths, data.chosen
  assert paths == shards.resolve_shards(remote) and chosen.size == 6
  local_path = selection.make_subset(local, "a_half", modalities=["A"], count="0.5")
  local_chosen = selection.resolve(local_path, None).chosen
  np.testing.assert_array_equal(chosen.ids, local_chosen.ids)
  mixed = selection.resolve(remote, None, {"by": "source", "weights": "s2:1"}).chosen
  assert {LAYOUT[mixed.record(e, 0, 0)][1] for e in range(100)} == {"s2"}


def test_checkpoints_in_a_bucket_resume_and_are_found(gcs):
  """Orbax writes through tensorstore; a step counts once commit_success.txt is there."""
  workdir = f"{gcs}/run"
  state = {"w": jnp.arange(8.0).reshape(2, 4), "step": jnp.int32(5)}
  ckpt = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", keep=2, async_save=False)
  try:
    ckpt.save(5, state, {"seed": 0})
    assert ckpt.latest_step() == 5
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, _ = ckpt.restore(abstract, {"seed": 0})
  finally:
    ckpt.close()
  np.testing.assert_array_equal(restored["w"], state["w"])
  step_dir = ckpt_lib.find_step_dir(workdir)
  assert step_dir == f"{workdir}/checkpoints/5"
  assert ckpt_lib.read_run(step_dir) == {"seed": 0}
  # A step folder without the marker is a write that never finished.
  storage.as_path(f"{workdir}/checkpoints/9/state/x").write_text("partial")
  storage.as_path(f"{workdir}/checkpoints/9/run/x").write_text("partial")
  assert ckpt_lib.find_step_dir(workdir) == step_dir
  with pytest.raises(ValueError, match="holds steps \\[5\\]"):
    ckpt_lib.find_step_dir(workdir, step=9)


def test_metrics_jsonl_in_a_bucket_is_uploaded_whole(gcs):
  path = f"{gcs}/run2/metrics.jsonl"
  log = metrics_lib.JsonlLog(path)
  log.write({"step": 1, "loss": 2.0})
  assert not storage.as_path(path).exists()   # nothing uploaded before a sync
  log.sync()
  log.write({"step": 2, "loss": 1.5})
  log.close()
  # A resumed run keeps what is there and adds to it.
  log = metrics_lib.JsonlLog(path)
  log.write({"step": 3, "loss": 1.0})
  log.close()
  lines = storage.as_path(path).read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def _Cfg(d):
  """A pretraining data config with the test's values."""
  c = mae_base.get_config(None).data
  c.update(d)
  return c
