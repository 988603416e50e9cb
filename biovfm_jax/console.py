"""Console logging shared by the binaries (main.py, evaluate.py) and the
notebooks: one short time-stamped line per message, library INFO chatter
filtered out."""
import logging as pylogging
import os

from absl import logging

# Libraries whose INFO chatter stays off the progress console.
_CHATTY = ("orbax", "grain", "clu", "tensorboard")
_FORMAT = pylogging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")


def _quiet_libraries(record) -> bool:
  if record.levelno >= pylogging.WARNING:
    return True
  return not any(f"/{lib}/" in record.pathname for lib in _CHATTY)


def setup() -> None:
  handler = logging.get_absl_handler()
  handler.setFormatter(_FORMAT)
  handler.addFilter(_quiet_libraries)


def _quiet_library_start() -> None:
  """TensorFlow's C++ logs quiet, and Keras's files (TensorFlow, which clu
  imports, writes ~/.keras on import) in our cache; before TensorFlow loads."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from data_pipeline import mini  # pylint: disable=import-outside-toplevel
  os.environ.setdefault("KERAS_HOME", os.path.join(mini.cache_root(), "keras"))


def setup_notebook() -> None:
  """The same console in a notebook or script without app.run (which installs
  absl's handler): INFO lines, the training progress, through one stderr
  handler on the root logger, time-stamped and filtered alike. Call it before
  TensorFlow loads (see _quiet_library_start)."""
  _quiet_library_start()
  root = pylogging.getLogger()
  handler = next((h for h in root.handlers if type(h) is pylogging.StreamHandler), None)
  if handler is None:  # absl's first log call adds one (basicConfig) unless we do
    handler = pylogging.StreamHandler()
    root.addHandler(handler)
  handler.setFormatter(_FORMAT)
  handler.addFilter(_quiet_libraries)  # a no-op when already there
  root.setLevel(pylogging.INFO)


def start_binary() -> None:
  """What the binaries (main.py, evaluate.py, the sweep launcher) do first,
  before jax and TensorFlow load: TensorFlow's C++ logs quiet, and the files
  libraries write on import kept in our cache, not in $HOME. TensorFlow (which
  clu imports) writes ~/.keras, and loads matplotlib, which writes
  ~/.config/matplotlib and ~/.cache/matplotlib. Then the console format above."""
  _quiet_library_start()
  from data_pipeline import mini  # pylint: disable=import-outside-toplevel
  os.environ.setdefault("MPLCONFIGDIR", os.path.join(mini.cache_root(), "matplotlib"))
  setup()
