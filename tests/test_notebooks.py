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

from test_entry_points import assert_no_library_noise, user_env

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
  assert {os.path.basename(p) for p in paths} >= {"quickstart.ipynb", "scaling_curves.ipynb"}
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


@pytest.mark.parametrize("name", ["quickstart.ipynb", "scaling_curves.ipynb"])
def test_badge_and_repo_url_agree(name):
  """The repository URL is a placeholder in two places: the Colab badge (which
  opens this notebook) and REPO_URL in the parameters cell. They must name the
  same repository."""
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  url = re.search(r'REPO_URL = "https://github\.com/([^"]+)"', params[0].source).group(1)
  badge = re.search(r"colab\.research\.google\.com/github/(\S+?)/blob/main/notebooks/"
                    + re.escape(name), nb.cells[0].source).group(1)
  assert badge == url


# --- Each notebook runs in tiny mode.

@dataclasses.dataclass
class Case:
  notebook: str
  env: Callable[[str], dict]            # tmp dir -> extra environment for the run
  check: Callable[[object, str], None]  # (executed notebook, workdir) -> asserts
  name: str = ""                        # the test id when a notebook has several cases


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


def _markdown_tables(text: str) -> dict[str, list[dict]]:
  """The markdown tables printed in `text`, by their first header cell:
  rows as {header: cell}."""
  tables, header = {}, None
  for line in text.splitlines():
    if not line.startswith("|"):
      header = None
      continue
    cells = [c.strip() for c in line.strip("|").split("|")]
    if header is None:
      header = cells
      tables[header[0]] = []
    elif not set(line) <= set("|-"):
      tables[header[0]].append(dict(zip(header, cells)))
  return tables


def _slope_rows(nb) -> dict[str, dict]:
  """The printed slope table, by benchmark display name."""
  return {row["benchmark"]: row for row in _markdown_tables(_stdout(nb))["benchmark"]}


def _check_scaling_figures(nb, workdir):
  sources = _cells_with_image(nb)
  assert any("plot_curves(" in s for s in sources), "no scaling-curve figure"
  for name in ("slopes.csv", "curves.png", "slopes.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name


def _b_cell(s) -> str:
  """A slope's b as the slope table prints it: bracketed where it is flagged."""
  from biovfm_jax import analysis
  return f"({s['b']:.4f})" if analysis.flagged(s) else f"{s['b']:.4f}"


def _check_effects(nb, workdir, rows: int):
  """The axis-effects table: shown, and written to effects.csv."""
  import pandas as pd
  assert f"{rows} axis effects, written to effects.csv" in _stdout(nb)
  assert len(pd.read_csv(os.path.join(workdir, "effects.csv"))) == rows


def _check_scaling_published(nb, workdir):
  """No results given: the paper's table, its slopes beside the published ones."""
  _check_scaling_figures(nb, workdir)
  mean = _slope_rows(nb)["mean"]
  # The paper's 4-point fits: their 95% intervals include 0, so b is bracketed.
  assert (mean["dinov2 b"], mean["paper dinov2"]) == ("(0.0088)", "0.0088"), mean
  assert (mean["mae b"], mean["paper mae"]) == ("(0.0191)", "0.0191"), mean
  assert mean["mae flag"] == "no measurable effect"
  assert _slope_rows(nb)["Pneumonia"]["mae b"] == "0.0134"  # its interval excludes 0
  out = _stdout(nb)
  assert "flagged: 24 of 26 slopes: no measurable effect" in out
  # objective: biomedclip -> dinov2, dinov2 -> mae; size: T -> S -> B -> L; 13 rows each
  _check_effects(nb, workdir, 5 * 13)
  assert "from the published table" in out
  assert "biomedclip: 12 rows without a positive params_total" in out  # one model: no fit
  factors = {r["factor"]: r for r in _markdown_tables(out)["factor"]}
  classes = factors["num_classes"]
  assert (classes["dinov2 r"], classes["mae r"]) == ("0.05", "-0.24"), classes
  assert "gzip_ratio: optional" in out and "db_index: optional" in out
  assert any("plot_factors(" in s for s in _cells_with_image(nb))


USER_RESULTS = "results.csv"  # in the case's tmp dir, beside its workdir ("work")


def _user_results(tmp: str) -> dict:
  """A results store as a user's runs leave it: 2 model sizes x 2 objectives x
  2 benchmarks, AUCs on a power law in N with a slope per objective and benchmark."""
  from test_analysis import _rows  # noqa: E402 (the analysis tests' row builder)
  import numpy as np
  import pandas as pd
  frames = []
  for objective, slope in (("dinov2", 0.011), ("mae", 0.027)):
    for size, n in (("S", 22_000_000), ("B", 86_000_000)):
      points = [(f"{objective}_{size}", n, bench, np.exp(3.9 + (slope + d) * np.log(n)) / 100)
                for bench, d in (("dermamnist", 0.0), ("octmnist", 0.004))]
      frames.append(_rows(points, objective=objective, model_size=size, protocol="fast"))
  path = os.path.join(tmp, USER_RESULTS)
  pd.concat(frames).to_csv(path, index=False)
  return {"BIOVFM_RESULTS": path}


def _check_scaling_user(nb, workdir):
  """A user's results: the printed slopes are fit_slopes' on the same CSV, the
  paper's columns stay beside them."""
  from biovfm_jax import analysis
  from biovfm_jax.evaluate import report
  _check_scaling_figures(nb, workdir)
  path = os.path.join(workdir, os.pardir, os.pardir, USER_RESULTS)
  slopes = analysis.fit_slopes(analysis.load_results(path))
  assert len(slopes) == 6  # 2 objectives x (2 benchmarks + mean)
  rows = _slope_rows(nb)
  for s in slopes.to_dict("records"):  # two sizes: no interval, so bracketed
    assert rows[report.display_name(s["benchmark"])][f"{s['objective']} b"] == _b_cell(s), s
    assert _b_cell(s).startswith("(")
  assert rows["mean"]["paper mae"] == "0.0191" and rows["OCT"]["paper dinov2"] == "0.0141"
  _check_effects(nb, workdir, 2 * 3)  # objective and model size, on 2 benchmarks + mean
  assert rows["Path"]["mae b"] == ""  # not in these results, in the paper's
  assert f"{len(slopes)} fits over params_total" in _stdout(nb)
  assert "r needs 3 or more" in _stdout(nb)  # 2 benchmarks: no correlation


CASES = [
    Case("quickstart.ipynb", lambda tmp: {}, _check_quickstart),
    # BIOVFM_RESULTS empty: the published table, whatever the caller's environment holds.
    Case("scaling_curves.ipynb", lambda tmp: {"BIOVFM_RESULTS": ""}, _check_scaling_published,
         "scaling_curves-published"),
    Case("scaling_curves.ipynb", _user_results, _check_scaling_user, "scaling_curves-own-runs"),
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
  env = dict(user_env(), BIOVFM_NOTEBOOK_TINY="1", BIOVFM_NOTEBOOK_WORKDIR=workdir,
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
  kernel_log = os.path.join(tmp, "kernel.log")  # the kernel's own stderr (C++ libraries')
  try:
    with open(kernel_log, "w") as log:
      client.execute(env=env, stderr=log)
  finally:
    nbformat.write(nb, os.path.join(tmp, "executed.ipynb"))
    assert _marked_processes(marker) == [], "the kernel (or a child) is still running"
  printed = "".join(getattr(o, "text", "") for _, o in _outputs(nb, "stream"))
  assert_no_library_noise(printed + open(kernel_log).read(), name)
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
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name or c.notebook)
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


def _check_fits_printed(nb, results_csv):
  """Every slope the notebook prints is fit_slopes' on the same results, in
  its group's column (fit.group_labels: objective and data subset here)."""
  from biovfm_jax import analysis
  from biovfm_jax.analysis import fit
  from biovfm_jax.evaluate import report
  slopes = analysis.fit_slopes(analysis.load_results(results_csv))
  keys = fit.group_keys(slopes)
  labels = fit.group_labels(slopes, keys)
  rows = _slope_rows(nb)
  for s in slopes.to_dict("records"):
    label = labels[tuple(s[k] for k in keys)]
    assert rows[report.display_name(s["benchmark"])][f"{label} b"] == _b_cell(s), s
  return slopes


@pytest.mark.slow
def test_scaling_notebook_on_the_tiny_sweep(tiny_sweep_root, tmp_path):
  """The scaling notebook on what the tiny sweep (tests/conftest.py) wrote:
  2 model sizes x 2 objectives x 2 data subsets of the mini corpus."""
  results_csv = os.path.join(tiny_sweep_root, "results.csv")
  nb, _ = run_notebook("scaling_curves.ipynb", str(tmp_path), {"BIOVFM_RESULTS": results_csv})
  assert _outputs(nb, "error") == []
  _check_scaling_figures(nb, str(tmp_path / "work" / "tiny"))
  slopes = _check_fits_printed(nb, results_csv)
  # Both objectives, each data subset its own curve over the two sizes.
  assert sorted(zip(slopes["objective"], slopes["data_subset"], slopes["benchmark"])) == [
      (o, d, b) for o in ("dinov2", "mae") for d in ("mini", "mini_mr_ct")
      for b in ("mini_modality", "mni_anatomy")]
  # (no "mean" row: the mean is over MedMNIST benchmarks, and these are not)
  # Two sizes, one seed: the notebook flags every slope instead of showing it.
  text = _stdout(nb)
  assert "fewer than 3 sizes" in text and "no measurable effect" in text


def test_scaling_notebook_writes_into_the_cache(tmp_path, monkeypatch):
  """Its parameter and setup cells: by default the tables and figures go to
  <cache>/scaling (the project's cache, $BIOVFM_CACHE), not into $HOME;
  BIOVFM_NOTEBOOK_WORKDIR still overrides."""
  from biovfm_jax import console
  monkeypatch.setattr(console, "setup_notebook", lambda: None)  # leave logging alone
  nb = nbformat.read(os.path.join(NOTEBOOKS, "scaling_curves.ipynb"), as_version=4)
  code = [c.source for c in nb.cells if c.cell_type == "code"]
  params = next(s for s in code if "BIOVFM_NOTEBOOK_WORKDIR" in s)
  setup = next(s for s in code if "os.makedirs(WORKDIR" in s)
  program = params + "\n" + "\n".join(l for l in setup.splitlines() if not l.startswith("%"))
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("BIOVFM_CACHE", str(tmp_path / "cache"))
  for name in ("BIOVFM_NOTEBOOK_WORKDIR", "BIOVFM_NOTEBOOK_TINY"):
    monkeypatch.delenv(name, raising=False)

  def workdir() -> str:
    namespace = {}
    exec(compile(program, "scaling_curves.ipynb", "exec"), namespace)  # noqa: S102
    assert os.path.isdir(namespace["WORKDIR"])
    return namespace["WORKDIR"]

  assert workdir() == str(tmp_path / "cache" / "scaling")
  assert not (tmp_path / "home" / "biovfm_scaling").exists()  # the old default
  monkeypatch.setenv("BIOVFM_NOTEBOOK_WORKDIR", str(tmp_path / "mine"))
  assert workdir() == str(tmp_path / "mine")
