"""Console logging shared by the binaries (main.py, evaluate.py) and the
notebooks: one short time-stamped line per message, library INFO chatter
filtered out."""
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging as pylogging
import os
import re
import sys

from absl import logging

# Libraries whose INFO chatter stays off the progress console (orbax's thread
# joins, jax's "Resetting cache at <empty>." and its TPU probe ...): their
# loggers by name, and those that log through absl by their files. tfds's
# warnings too: they are about folders it is building ("Variant folder ... has
# no dataset_info.json"), and the eval loader says what it builds itself.
_CHATTY = ("orbax", "grain", "clu", "tensorboard", "jax", "jaxlib", "tensorflow",
           "tensorflow_datasets")
_WARNS_IN_HOUSEKEEPING = ("tensorflow_datasets",)
_LIBRARY_FILE = re.compile(r"[/\\](?:site|dist)-packages[/\\](\w+)[/\\]")
_FORMAT = pylogging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")


def quiet_libraries(record) -> bool:
  """A logging filter: False for the chatter of the libraries above."""
  in_file = _LIBRARY_FILE.search(record.pathname)
  lib = in_file.group(1) if in_file else record.name.split(".")[0]
  if lib not in _CHATTY:
    return True
  floor = pylogging.ERROR if lib in _WARNS_IN_HOUSEKEEPING else pylogging.WARNING
  return record.levelno >= floor


def setup() -> None:
  handler = logging.get_absl_handler()
  handler.setFormatter(_FORMAT)
  handler.addFilter(quiet_libraries)


@contextlib.contextmanager
def _stderr_fd_silenced():
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as devnull:
      os.dup2(devnull.fileno(), 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
  """TensorFlow (clu's writers, tfds) writes its C++ start-up lines ("oneDNN
  custom operations are on ...", once per shared library) to file descriptor 2
  as it loads, and no environment variable silences them: its first import runs
  with fd 2 on /dev/null. An import error still surfaces: it is raised after."""

  def find_spec(self, name, path, target=None):  # pylint: disable=unused-argument
    if name != "tensorflow":
      return None
    # tfds asks find_spec whether TensorFlow is installed long before it imports
    # it: this finder stays until the import itself has run.
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
      return spec
    real, finder = spec.loader, self

    class Loader(importlib.abc.Loader):
      def create_module(self, spec):
        return real.create_module(spec)

      def exec_module(self, module):
        if finder in sys.meta_path:
          sys.meta_path.remove(finder)
        with _stderr_fd_silenced():
          real.exec_module(module)

    spec.loader = Loader()
    return spec


def quiet_library_imports() -> None:
  """What `import biovfm_jax` does before any library loads: TensorFlow's C++
  logs quiet and its start-up lines unprinted (it is only a tool here)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if "tensorflow" not in sys.modules and not any(
      isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlowImport())


def _quiet_library_start() -> None:
  """Keras's files (TensorFlow, which clu imports, writes ~/.keras on import)
  in our cache; before TensorFlow loads."""
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
  handler.addFilter(quiet_libraries)  # a no-op when already there
  root.setLevel(pylogging.INFO)


def start_binary() -> None:
  """What the binaries (main.py, evaluate.py, the sweep launcher) do first,
  before jax and TensorFlow load: the files
  libraries write on import kept in our cache, not in $HOME. TensorFlow (which
  clu imports) writes ~/.keras, and loads matplotlib, which writes
  ~/.config/matplotlib and ~/.cache/matplotlib. Then the console format above."""
  _quiet_library_start()
  from data_pipeline import mini  # pylint: disable=import-outside-toplevel
  os.environ.setdefault("MPLCONFIGDIR", os.path.join(mini.cache_root(), "matplotlib"))
  setup()
