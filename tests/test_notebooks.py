"""The notebooks: committed without outputs, and each one runs end to end in
tiny mode (BIOVFM_NOTEBOOK_TINY=1) through nbclient, in a kernel of this
Python, writing only under a temporary workdir.

A new notebook joins the run test with one `Case` in CASES: the environment
its tiny run needs (e.g. a results CSV it reads from an environment variable)
and a check of its outputs.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from typing import Callable

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
CELL_TIMEOUT_S = 240  # the slowest tiny cell (DINOv2 training) takes ~35 s on 2 busy cores
STRIP = os.path.join(NOTEBOOKS, "strip.py")


def _strip_module():
  import importlib.util
  spec = importlib.util.spec_from_file_location("notebook_strip", STRIP)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


strip = _strip_module()


# --- Committed notebooks carry no outputs.

def test_committed_notebooks_have_no_outputs():
  paths = strip.notebooks()
  assert any(p.endswith("quickstart.ipynb") for p in paths), paths
  for path in paths:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert strip.leftovers(nb) == [], f"{path}: run python notebooks/strip.py"


def _run_notebook_with_outputs(path):
  """A notebook as Jupyter, nbclient and Colab leave it after a run."""
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_markdown_cell("# title"),
      nbformat.v4.new_code_cell("X = 1", metadata={"tags": ["parameters"]}),
      nbformat.v4.new_code_cell("print(X)", execution_count=2, outputs=[
          nbformat.v4.new_output("stream", name="stdout", text="1\n")],
          metadata={"execution": {"iopub.status.idle": "2026-01-01T00:00:00Z"},
                    "outputId": "abc"}),
      nbformat.v4.new_code_cell("X", execution_count=3, outputs=[
          nbformat.v4.new_output("execute_result", data={"text/plain": "1"},
                                 execution_count=3)])])
  nb.metadata["widgets"] = {"state": {}}
  nbformat.write(nb, path)


def test_strip_finds_and_clears_what_a_run_leaves(tmp_path):
  path = str(tmp_path / "ran.ipynb")
  _run_notebook_with_outputs(path)
  found = strip.leftovers(nbformat.read(path, as_version=4))
  assert found == ["metadata.widgets", "cell 2: 1 output(s)", "cell 2: execution_count 2",
                   "cell 2: metadata.execution", "cell 2: metadata.outputId",
                   "cell 3: 1 output(s)", "cell 3: execution_count 3"]
  check = [sys.executable, STRIP, "--check", path]
  failed = subprocess.run(check, capture_output=True, text=True, check=False)
  assert failed.returncode == 1 and "ran.ipynb: not stripped" in failed.stdout
  assert subprocess.run([sys.executable, STRIP, path], check=False).returncode == 0
  nb = nbformat.read(path, as_version=4)
  assert strip.leftovers(nb) == []
  assert [c.source for c in nb.cells] == ["# title", "X = 1", "print(X)", "X"]
  assert nb.cells[1].metadata["tags"] == ["parameters"]  # tags are not run output
  before = open(path, "rb").read()
  assert subprocess.run(check, check=False).returncode == 0
  assert strip.strip(nb) is False and open(path, "rb").read() == before


def test_quickstart_badge_and_repo_url_agree():
  """The repository URL is a placeholder in two places: the Colab badge and
  REPO_URL in the parameters cell. They must name the same repository."""
  nb = nbformat.read(os.path.join(NOTEBOOKS, "quickstart.ipynb"), as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  url = re.search(r'REPO_URL = "https://github\.com/([^"]+)"', params[0].source).group(1)
  badge = re.search(r"colab\.research\.google\.com/github/(\S+?)/blob/main/notebooks/"
                    r"quickstart\.ipynb", nb.cells[0].source).group(1)
  assert badge == url


# --- Each notebook runs in tiny mode.

@dataclasses.dataclass
class Case:
  notebook: str
  env: Callable[[str], dict]            # tmp dir -> extra environment for the run
  check: Callable[[object, str], None]  # (executed notebook, workdir) -> asserts


def _outputs(nb, kind):
  return [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code"
          for o in c.outputs if o.output_type == kind]


def _stdout(nb) -> str:
  return "".join(o.text for _, o in _outputs(nb, "stream") if o.name == "stdout")


def _cells_with_image(nb) -> list[str]:
  return [nb.cells[i].source for i, o in _outputs(nb, "display_data") if "image/png" in o.data]


def _check_quickstart(nb, workdir):
  sources = _cells_with_image(nb)
  assert any("logged_images(mae_dir" in s for s in sources), "no MAE reconstruction image"
  assert any("encoder_pca_map(" in s for s in sources), "no DINOv2 PCA map"
  out = _stdout(nb)
  for name in ("mae", "dinov2"):
    # Each run's report table, as printed, matches the report it wrote.
    report = json.load(open(os.path.join(workdir, "eval", name, "report.json")))
    auc = 100 * report["results"]["mini_modality"]["auc"]
    assert f"# {name}\n" in out
    assert 50 < auc <= 100, (name, auc)  # better than chance even after 4 steps
    assert re.search(rf"\| mini_modality \| {auc:.2f} \| \d+\.\d\d \|", out), out[-2000:]
  assert "| benchmark | mae | dinov2 |" in out  # the comparison
  assert os.path.isdir(os.path.join(workdir, "mae", "checkpoints", "4"))  # tiny: 4 steps


CASES = [
    Case("quickstart.ipynb", lambda tmp: {}, _check_quickstart),
    # The scaling notebook, once written, e.g.:
    # Case("scaling_curves.ipynb", lambda tmp: {"BIOVFM_RESULTS": <a tiny results CSV>},
    #      _check_scaling),
]


def _marked_processes(marker: str) -> list[int]:
  """Live processes whose environment holds `marker` (the kernel and anything
  it started inherit it)."""
  pids = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/environ", "rb") as f:
        if marker.encode() in f.read().split(b"\0"):
          pids.append(int(pid))
    except OSError:  # gone, or not ours
      pass
  return pids


def run_notebook(name: str, tmp: str, extra_env: dict):
  """Executes notebooks/<name> in tiny mode with its workdir under `tmp`, in a
  kernel of this interpreter started in notebooks/ (as Jupyter would); returns
  (executed notebook, the kernel's command line). The executed copy is kept
  as <tmp>/executed.ipynb for a look at a failure."""
  from nbclient import NotebookClient
  workdir = os.path.join(tmp, "work")
  env = dict(os.environ, BIOVFM_NOTEBOOK_TINY="1", BIOVFM_NOTEBOOK_WORKDIR=workdir,
             BIOVFM_DATA=os.path.join(tmp, "data"),  # benchmark files built in tmp
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
             **extra_env)
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": NOTEBOOKS}})
  kernel = {}

  def started(**_):
    with open(f"/proc/{client.km.provisioner.pid}/cmdline", "rb") as f:
      kernel["cmd"] = f.read().split(b"\0")[0].decode()

  client.on_notebook_start = started
  marker = f"BIOVFM_NOTEBOOK_WORKDIR={workdir}"
  try:
    client.execute(env=env)
  finally:
    nbformat.write(nb, os.path.join(tmp, "executed.ipynb"))
    assert _marked_processes(marker) == [], "the kernel (or a child) is still running"
  return nb, kernel["cmd"]


def _repo_status() -> set[str] | None:
  """git's list of changed and untracked files (ignored ones, e.g. __pycache__, aside)."""
  try:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return None  # not a git checkout
  return set(out.splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.notebook)
def test_notebook_runs_in_tiny_mode(case, tmp_path):
  repo_before = _repo_status()
  t0 = time.perf_counter()
  nb, kernel_python = run_notebook(case.notebook, str(tmp_path), case.env(str(tmp_path)))
  print(f"{case.notebook}: {time.perf_counter() - t0:.0f} s")
  assert kernel_python == sys.executable, (
      f"the python3 kernelspec runs {kernel_python}, not this interpreter: a user-level "
      "kernelspec (jupyter kernelspec list) shadows the one ipykernel installed here")
  assert _outputs(nb, "error") == []
  case.check(nb, str(tmp_path / "work" / "tiny"))  # tiny runs write to WORKDIR/tiny
  assert _repo_status() == repo_before, "the notebook wrote into the repository"
