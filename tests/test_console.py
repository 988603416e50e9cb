"""The console set-up of notebooks (biovfm_jax/console.py), in a fresh
interpreter: it changes the root logger, which pytest's logging shares."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import logging
from absl import logging as absl_logging
from biovfm_jax import console
console.setup_notebook()
console.setup_notebook()  # a re-run cell: still one handler, one filter
absl_logging.info("absl line")  # absl's basicConfig must not add a second handler
logging.info("step 1/4 | loss 1.0")
for level, text in ((logging.INFO, "chatter"), (logging.WARNING, "orbax warning")):
  logging.getLogger("x").handle(logging.LogRecord(
      "x", level, "/site-packages/orbax/checkpoint/a.py", 1, text, None, None))
print(len(logging.root.handlers), len(logging.root.handlers[0].filters))
"""


def test_setup_notebook_shows_progress_and_hides_library_chatter():
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       env=env, check=True, timeout=60)
  assert out.stdout == "1 1\n"
  lines = out.stderr.splitlines()
  for text in ("absl line", "step 1/4 | loss 1.0", "orbax warning"):
    assert sum(bool(re.fullmatch(rf"\d\d:\d\d:\d\d {re.escape(text)}", l))
               for l in lines) == 1, (text, lines)
  assert "chatter" not in out.stderr


def test_library_start_up_lines_and_chatter_stay_off_the_console():
  """`import biovfm_jax` first: TensorFlow then loads without its C++ start-up
  lines (oneDNN ..., written to fd 2), and the console drops jax's and tfds's
  housekeeping but keeps our lines and real warnings."""
  script = """
import logging
import biovfm_jax
from biovfm_jax import console
import tensorflow
console.setup_notebook()
def emit(name, level, path, text):
  logging.getLogger(name).handle(logging.LogRecord(name, level, path, 1, text, None, None))
emit("jax._src.compilation_cache", logging.INFO, "/x/site-packages/jax/_src/c.py", "Resetting")
emit("absl", logging.WARNING, "/x/site-packages/tensorflow_datasets/core/f.py", "Variant")
emit("absl", logging.ERROR, "/x/site-packages/tensorflow_datasets/core/f.py", "tfds error")
emit("jax._src.xla_bridge", logging.WARNING, "/x/site-packages/jax/_src/x.py", "jax warning")
emit("absl", logging.INFO, "/home/me/jax/biovfm_jax/train/loop.py", "our line")
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), check=True, timeout=120)
  assert "oneDNN" not in out.stderr and "InitializeLog" not in out.stderr, out.stderr
  for kept in ("tfds error", "jax warning", "our line"):
    assert kept in out.stderr, (kept, out.stderr)
  assert "Resetting" not in out.stderr and "Variant" not in out.stderr
