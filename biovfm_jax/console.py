"""Console logging shared by the binaries (main.py, evaluate.py): one short
time-stamped line per message, library INFO chatter filtered out."""
import logging as pylogging
import os

from absl import logging


def _quiet_libraries(record) -> bool:
  """Keeps library INFO chatter (orbax, grain, clu) off the progress console."""
  if record.levelno >= pylogging.WARNING:
    return True
  return not any(f"/{lib}/" in record.pathname for lib in ("orbax", "grain", "clu"))


def setup() -> None:
  handler = logging.get_absl_handler()
  handler.setFormatter(pylogging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  handler.addFilter(_quiet_libraries)


def start_binary() -> None:
  """What evaluate.py and the sweep launcher do first: TensorFlow's C++ logs
  quiet, Keras's files (TensorFlow, which clu imports, writes them on import)
  in our cache rather than ~/.keras, and the console format above."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from data_pipeline import mini  # pylint: disable=import-outside-toplevel
  os.environ.setdefault("KERAS_HOME", os.path.join(mini.cache_root(), "keras"))
  setup()
