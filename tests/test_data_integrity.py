"""Input data integrity: bit rot in a shard, shards missing from or resized
against their manifest, and a resume on a changed input stream."""
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from biovfm_jax.train import checkpoint as ckpt_lib
from configs import mae_base
from data_pipeline import loader, shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROTTEN = "t-00001.array_record"


def _copy(shard_dir, dst):
  shutil.copytree(shard_dir, dst)
  return str(dst)


def _rot(path, at: float = 0.5, n: int = 16) -> None:
  """Flips `n` bytes at fraction `at` of the file: inside one record's chunk."""
  data = bytearray(open(path, "rb").read())
  start = int(len(data) * at)
  for i in range(start, start + n):
    data[i] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))


@pytest.fixture
def rotten_dir(shard_dir, tmp_path):
  d = _copy(shard_dir, tmp_path / "rotten")
  _rot(os.path.join(d, ROTTEN), at=1 / 3)   # inside one record of shard 1
  return d


def _where(d) -> str:
  """'record K of <d>/t-00001.array_record': the one record the rot took."""
  bad = _bad_records(loader.make_example(cfg(d), seed=0))
  shard, pos = loader.make_example(cfg(d), seed=0).locate(bad[0])
  return f"record {pos} of {shard}"


def cfg(spec, **kw):
  c = mae_base.get_config(None).data
  c.update(dict(shards=spec, image_size=16, num_workers=0, read_threads=1,
                max_skipped_fraction=0.1), **kw)
  return c


def _bad_records(example) -> list[int]:
  bad = []
  for i in range(example.num_records):
    try:
      example.load(i)
    except loader.CorruptRecordError:
      bad.append(i)
  return bad


def test_rotten_chunk_is_skipped_named_and_costs_only_its_record(rotten_dir, caplog):
  example = loader.make_example(cfg(rotten_dir), seed=0)
  bad = _bad_records(example)
  # group_size:1 shards: the flipped bytes take exactly one record, not its neighbours.
  assert len(bad) == 1 and example.locate(bad[0])[0] == os.path.join(rotten_dir, ROTTEN)
  with caplog.at_level(logging.WARNING):
    it = loader.make_pretrain_loader(cfg(rotten_dir), global_batch_size=8, seed=0,
                                     process_index=0, process_count=1)
    batches = [next(it) for _ in range(10)]   # 80 examples: two epochs of 40
  assert "_bad_records" not in batches[0]
  assert sum(int(b["skipped"].sum()) for b in batches) == 2   # once per epoch
  assert list(it.bad) == bad
  named = [r.getMessage() for r in caplog.records if ROTTEN in r.getMessage()]
  assert len(named) == 1, named   # one line per bad record, not per read
  assert _where(rotten_dir) in named[0] and "hash mismatch" in named[0]


def test_too_many_bad_records_stop_with_one_line_naming_the_shard(rotten_dir):
  it = loader.make_pretrain_loader(cfg(rotten_dir, max_skipped_fraction=0.001),
                                   global_batch_size=8, seed=0, process_index=0,
                                   process_count=1)
  with pytest.raises(loader.CorruptDataError) as err:
    for _ in range(5):
      next(it)
  msg = str(err.value)
  assert "\n" not in msg and "config.data.max_skipped_fraction=0.001" in msg
  assert f"1 in {os.path.join(rotten_dir, ROTTEN)}" in msg and _where(rotten_dir) in msg


def test_rotten_chunk_with_worker_processes(rotten_dir, tmp_path):
  """The bad record is found in a worker; the calling process counts and names it."""
  script = tmp_path / "mp.py"
  script.write_text(textwrap.dedent(f"""
      from configs import mae_base
      from data_pipeline import loader

      if __name__ == "__main__":
        c = mae_base.get_config(None).data
        c.update(dict(shards={rotten_dir!r}, image_size=16, num_workers=2, read_threads=1,
                      max_skipped_fraction=0.1))
        it = loader.make_pretrain_loader(c, global_batch_size=8, seed=0,
                                         process_index=0, process_count=1)
        skipped = sum(int(next(it)["skipped"].sum()) for _ in range(5))
        it.close()
        print("RESULT", skipped, list(it.bad.values()))
  """))
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       env=env, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))
  assert line.startswith("RESULT 1 ") and _where(rotten_dir) in line
  assert f"Skipping bad {_where(rotten_dir)}" in out.stderr


def test_training_on_a_rotten_shard_continues_and_shows_the_count(rotten_dir, tmp_path, caplog):
  from biovfm_jax.train import loop
  from test_train_units import tiny_config
  c = tiny_config()
  c.data.shards = rotten_dir
  c.data.max_skipped_fraction = 0.1   # 1 of 40 is 2.5%: over the default 1%
  c.num_train_steps = 3     # 48 examples: all 40 records once
  c.checkpoint.every_steps = 3
  with caplog.at_level(logging.INFO):
    out = loop.train(c, str(tmp_path / "work"))
  assert out["skipped_records_total"] == 1
  text = "\n".join(r.getMessage() for r in caplog.records)
  assert f"Skipping bad {_where(rotten_dir)}" in text
  assert "step 3/3 |" in text and "| 1 bad records" in text
  rows = [json.loads(l) for l in open(tmp_path / "work" / "metrics.jsonl")]
  assert sum(r["skipped_records"] for r in rows) == 1


def test_manifest_check_names_a_missing_resized_or_unlisted_shard(shard_dir, tmp_path):
  d = _copy(shard_dir, tmp_path / "s")
  assert loader.resolve(cfg(d)).num_records == 40
  os.rename(os.path.join(d, "t-00002.array_record"), tmp_path / "aside")
  with pytest.raises(ValueError, match=r"manifest\.json does not match .*t-00002\.array_record "
                                       r"missing \(listed with 8 records\).*config\.data\.shards"):
    loader.resolve(cfg(d))
  os.rename(tmp_path / "aside", os.path.join(d, "t-00002.array_record"))
  with open(os.path.join(d, "t-00000.array_record"), "ab") as f:
    f.write(b"\0" * 10)
  with pytest.raises(ValueError, match=r"t-00000\.array_record is \d+ bytes, listed as \d+"):
    loader.make_pretrain_loader(cfg(d), global_batch_size=8, seed=0, process_index=0,
                                process_count=1)
  d2 = _copy(shard_dir, tmp_path / "s2")
  shutil.copy(os.path.join(d2, "t-00000.array_record"), os.path.join(d2, "u-00000.array_record"))
  with pytest.raises(ValueError, match=r"u-00000\.array_record is not listed"):
    loader.resolve(cfg(d2))
  # A glob picks shards by name: no manifest is consulted.
  assert loader.resolve(cfg(os.path.join(d2, "t-*.array_record"))).num_records == 40


@pytest.mark.slow
def test_resume_on_a_changed_shard_set_is_refused_unless_allowed(shard_dir, tmp_path):
  from biovfm_jax.train import loop
  from test_train_units import tiny_config
  d = _copy(shard_dir, tmp_path / "s")
  c = tiny_config()
  c.data.shards = os.path.join(d, "*.array_record")
  c.num_train_steps = 2
  c.checkpoint.every_steps = 2
  work = str(tmp_path / "work")
  loop.train(c, work)
  os.remove(os.path.join(d, "t-00002.array_record"))
  c.num_train_steps = 3
  with pytest.raises(ValueError) as err:
    loop.train(c, work)
  msg = str(err.value)
  assert "\n" not in msg and "step 2" in msg
  assert "shard t-00002.array_record missing" in msg and "records 40 -> 32" in msg
  assert "--config.data.allow_input_change=True" in msg
  c.data.allow_input_change = True
  out = loop.train(c, work)
  assert np.isfinite(out["loss"])
  # The new checkpoint records the new input: a plain resume now agrees with it.
  run = ckpt_lib.read_run(ckpt_lib.find_step_dir(work))
  assert run["num_records"] == 32
  # ... and what export --format=hf writes into the model card and configs.
  assert run["data_mean"] == list(c.data.mean) and run["data_std"] == list(c.data.std)
  assert run["mae"] == {"mask_ratio": c.mae.mask_ratio, "norm_pix_loss": c.mae.norm_pix_loss,
                        "decoder_heads": c.mae.decoder_heads}


def test_checkpoints_without_the_new_facts_still_resume():
  old = {"seed": 0, "batch_size": 16, "data_shards": "mini"}
  now = {**old, "num_records": 2035, "shards": [["mini-00000.array_record", 100]],
         "allow_input_change": False}
  ckpt_lib.check_input_facts(old, now, step=5)   # no error
  with pytest.raises(ValueError, match=r"shard mini-00000\.array_record 90 -> 100 bytes"):
    ckpt_lib.check_input_facts({**now, "shards": [["mini-00000.array_record", 90]]}, now, 5)
  # allow_input_change covers the data, not the seed or batch size.
  with pytest.raises(ValueError, match=r"seed 1 -> 0") as err:
    ckpt_lib.check_input_facts({**now, "seed": 1}, {**now, "allow_input_change": True}, 5)
  assert "allow_input_change" not in str(err.value)


@pytest.mark.slow
def test_main_stops_on_too_many_bad_records_with_one_line(rotten_dir, tmp_path):
  from test_train_e2e import run_main
  out = run_main(tmp_path / "work", f"--config.data.shards={rotten_dir}",
                 "--config.num_train_steps=3", "--config.data.max_skipped_fraction=0.001")
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert "max_skipped_fraction=0.001" in last and f"1 in {rotten_dir}/{ROTTEN}" in last
