"""Console logging shared by the binaries (main.py, evaluate.py): one short
time-stamped line per message, library INFO chatter filtered out."""
import logging as pylogging

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
