"""Clears what running a notebook leaves in it, so notebooks are committed
without outputs: cell outputs, execution counts, and the run metadata that
Jupyter, nbclient and Colab add (cell timings, output ids, widget state).
Sources, tags and the kernelspec stay.

  python notebooks/strip.py            # every notebooks/*.ipynb, in place
  python notebooks/strip.py --check    # exit 1 naming each notebook that has outputs
  python notebooks/strip.py A.ipynb B.ipynb
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
# Cell metadata a run writes: nbclient's timings, Colab's execution info and output ids.
CELL_RUN_KEYS = ("execution", "executionInfo", "outputId")
NOTEBOOK_RUN_KEYS = ("widgets",)


def notebooks() -> list[str]:
  """The repository's notebooks: notebooks/*.ipynb."""
  return sorted(glob.glob(os.path.join(HERE, "*.ipynb")))


def leftovers(nb) -> list[str]:
  """What a run left in `nb` (a NotebookNode), one line each; [] when clean."""
  found = [f"metadata.{k}" for k in NOTEBOOK_RUN_KEYS if k in nb.metadata]
  for i, cell in enumerate(nb.cells):
    if cell.cell_type != "code":
      continue
    if cell.get("outputs"):
      found.append(f"cell {i}: {len(cell.outputs)} output(s)")
    if cell.get("execution_count") is not None:
      found.append(f"cell {i}: execution_count {cell.execution_count}")
    found += [f"cell {i}: metadata.{k}" for k in CELL_RUN_KEYS if k in cell.metadata]
  return found


def strip(nb) -> bool:
  """Clears `nb` in place; returns whether anything changed."""
  changed = bool(leftovers(nb))
  for key in NOTEBOOK_RUN_KEYS:
    nb.metadata.pop(key, None)
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs = []
      cell.execution_count = None
      for key in CELL_RUN_KEYS:
        cell.metadata.pop(key, None)
  return changed


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description="Clear notebook outputs before committing.")
  parser.add_argument("paths", nargs="*", help="notebooks (default: notebooks/*.ipynb)")
  parser.add_argument("--check", action="store_true",
                      help="change nothing; exit 1 if any notebook has outputs")
  args = parser.parse_args(argv)
  dirty = 0
  for path in args.paths or notebooks():
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    found = leftovers(nb)
    if not found:
      continue
    dirty += 1
    if args.check:
      print(f"{path}: not stripped ({'; '.join(found[:5])}): run python notebooks/strip.py")
    else:
      strip(nb)
      nbformat.write(nb, path)
      print(f"{path}: stripped")
  return 1 if args.check and dirty else 0


if __name__ == "__main__":
  sys.exit(main())
