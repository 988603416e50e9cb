"""Non-finite losses: the stop names a checkpoint that is really sane, and the
optional skip policy leaves the state unchanged for a non-finite step."""
import os
import re
import shutil

import jax
import numpy as np
import pytest

from biovfm_jax.train import checkpoint as ckpt_lib
from biovfm_jax.train import loop
from biovfm_jax.train import state as state_lib
from test_train_units import tiny_config


def _exploding_config():
  """Warm-up from lr 0 to a huge rate: step 1 barely moves the params, step 2
  blows them up while the loss stays finite, a few steps later it is NaN."""
  c = tiny_config()
  c.num_train_steps = 12
  c.steps_per_epoch = 10
  c.optim.base_lr = 1e4
  c.checkpoint.every_steps = 1
  c.checkpoint.keep = 20
  c.checkpoint.async_save = False
  return c


@pytest.mark.slow
def test_nonfinite_stop_points_to_a_checkpoint_that_resumes(tmp_path):
  work = str(tmp_path)
  with pytest.raises(loop.NonFiniteLossError) as err:
    loop.train(_exploding_config(), work)
  msg = str(err.value)
  assert "\n" not in msg
  bad_step = int(re.search(r"at step (\d+): stopping", msg).group(1))
  good = int(re.search(r"last good checkpoint \(.*\) is step (\d+)", msg).group(1))
  kept = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
  assert kept == list(range(1, bad_step)) and good < kept[-1]
  norms = {s: ckpt_lib.read_run(ckpt_lib.find_step_dir(work, s))["param_norm"] for s in kept}
  first = norms[1]
  assert norms[good] <= 10 * first and norms[kept[-1]] > 1000 * first   # 8e7-style params
  assert f"step {kept[-1]} (loss" in msg and ": not sane" in msg
  assert f"move steps {[s for s in kept if s > good]} out of" in msg

  # Do what the message says; at a sane rate the run then trains on finitely.
  aside = tmp_path / "aside"
  aside.mkdir()
  for s in kept:
    if s > good:
      shutil.move(str(tmp_path / "checkpoints" / str(s)), aside / str(s))
  c = _exploding_config()
  c.optim.base_lr = 1e-3
  c.num_train_steps = bad_step + 1
  out = loop.train(c, work)
  assert np.isfinite(out["loss"]) and out["param_norm"] < 10 * first


def _one_step_setup():
  c = tiny_config()
  c.num_train_steps = 10
  c.optim.skip_nonfinite = True
  s = loop.build(c, num_records=100)
  state = state_lib.create_state(s.spec, s.tx, s.objective, s.shardings)
  rng = np.random.default_rng(0)

  def batch(value=None):
    image = rng.standard_normal((16, 32, 32, 3)).astype(np.float32)
    if value is not None:
      image[3] = value   # one example of extreme values poisons the batch's loss
    return {"image": jax.device_put(image, s.batch_sharding),
            "skipped": jax.device_put(np.zeros(16, np.int32), s.batch_sharding)}
  return s, state, batch


def test_skip_policy_leaves_the_state_unchanged_for_a_nan_step():
  s, state, batch = _one_step_setup()
  state, m = s.train_step(state, batch())
  assert int(m["update_skipped"]) == 0
  before = jax.device_get((state.params, state.opt_state, state.extra))
  state, m = s.train_step(state, batch(np.nan))
  assert not np.isfinite(float(m["loss"])) and int(m["update_skipped"]) == 1
  assert int(state.step) == 2
  after = jax.device_get((state.params, state.opt_state, state.extra))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  state, m = s.train_step(state, batch())   # and the next good step trains on
  assert int(m["update_skipped"]) == 0 and np.isfinite(float(m["loss"]))
  moved = jax.device_get(state.params)
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(before[0]), jax.tree.leaves(moved)))


@pytest.mark.slow
def test_skip_policy_stops_after_too_many_skips_in_a_row(tmp_path):
  from test_train_e2e import run_main
  out = run_main(tmp_path / "work", "--config.num_train_steps=20", "--config.steps_per_epoch=10",
                 "--config.optim.base_lr=1e4", "--config.checkpoint.every_steps=1",
                 "--config.optim.skip_nonfinite=True", "--config.optim.max_consecutive_skips=2")
  assert out.returncode == 3, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  m = re.search(r"3 non-finite updates in a row \(steps (\d+)-(\d+)\) exceed "
                r"config\.optim\.max_consecutive_skips=2: stopping\.", last)
  assert m and int(m.group(2)) == int(m.group(1)) + 2, last
  assert "update skipped (1 in a row)" in out.stderr
  assert "| 2 skipped updates" in out.stderr   # the progress line counts them
