"""No import cycles in biovfm_jax/ or data_pipeline/: a static check of the
import graph, built with ast from the package files.

Every import counts, also those inside functions: a lazy import hides a cycle
at import time but the two modules still need each other. `from a import b`
is an edge to the module a.b when that is a module, else to a. The implicit
import of a package's __init__ is not an edge (a package that imports its own
submodules is the usual layout, not a cycle).
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("biovfm_jax", "data_pipeline")


def _modules(root: str, packages=PACKAGES) -> dict[str, str]:
  """{dotted module name: file} for the .py files of `packages` under `root`."""
  found = {}
  for package in packages:
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, package)):
      dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
      for name in filenames:
        if name.endswith(".py"):
          rel = os.path.relpath(os.path.join(dirpath, name), root)[:-3].split(os.sep)
          if rel[-1] == "__init__":
            rel = rel[:-1]
          found[".".join(rel)] = os.path.join(dirpath, name)
  return found


def import_graph(root: str, packages=PACKAGES) -> dict[str, set[str]]:
  """{module: the modules of `packages` it imports}."""
  modules = _modules(root, packages)
  graph = {}
  for name, path in modules.items():
    is_package = path.endswith("__init__.py")
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    edges = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        edges.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the package of this module
          parts = name.split(".")[:len(name.split(".")) - node.level + is_package]
          base = ".".join(parts + ([node.module] if node.module else []))
        for a in node.names:
          sub = f"{base}.{a.name}"
          edges.add(sub if sub in modules else base)
    graph[name] = {e for e in edges if e in modules and e != name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_no_import_cycles_in_the_packages():
  graph = import_graph(ROOT)
  assert len(graph) > 50 and graph["data_pipeline.loader"]  # the walk found the code
  assert "data_pipeline.selection" in graph["data_pipeline.loader"]
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_finds_lazy_and_relative_cycles(tmp_path):
  """The check can fail: a cycle through a function-level import and a relative
  import is found; a package importing its own submodules is not a cycle."""
  files = {
      "data_pipeline/__init__.py": "",
      "data_pipeline/shards.py": "def f():\n  from data_pipeline.corpus import build\n",
      "data_pipeline/corpus.py": "from . import shards\n",
      "data_pipeline/readers/__init__.py": "from data_pipeline.readers import dicom\n",
      "data_pipeline/readers/dicom.py": "from data_pipeline.readers.common import X\n",
      "data_pipeline/readers/common.py": "import numpy\n",
      "biovfm_jax/__init__.py": "",
  }
  for rel, text in files.items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(text)
  graph = import_graph(str(tmp_path))
  assert graph["data_pipeline.readers"] == {"data_pipeline.readers.dicom"}
  assert find_cycle(graph) == ["data_pipeline.corpus", "data_pipeline.shards",
                               "data_pipeline.corpus"]
  (tmp_path / "data_pipeline/corpus.py").write_text("import numpy\n")
  assert find_cycle(import_graph(str(tmp_path))) is None



def test_the_library_does_not_import_the_configs():
  """Configs import the library, never the other way round (lazy imports count)."""
  graph = import_graph(ROOT, PACKAGES + ("configs",))
  offenders = {m: sorted(e for e in edges if e.split(".")[0] == "configs")
               for m, edges in graph.items() if m.split(".")[0] != "configs"}
  offenders = {m: e for m, e in offenders.items() if e}
  assert not offenders, f"library modules importing configs/: {offenders}"
  assert "configs.eval.common" in graph["configs.common"]  # the walk sees configs' imports
