"""The paper's published results table, in the results contract's format.

`published.csv` beside this file is the source of truth; it was written once
from PAPER.md ("Results to beat") by

    python -m biovfm_jax.analysis published --paper=/work/shared/PAPER.md

and tests check it against PAPER.md. Rows: DINOv2 and MAE at T, S, B, L and
BiomedCLIP (objective "biomedclip", one point) on the 12 MedMNIST benchmarks,
metric auc, value = table / 100 (the table's mean row is not stored: fits
recompute it from the 12, as the paper does).

Parameter counts. `params_total` holds the study's size axis, encoder + MAE
decoder (31.2M, 47.4M, 111.66M, 329.24M), for DINOv2 too, since the paper
fits both objectives over it: fit with x="params_total" to reproduce its
slopes. `params_encoder` is this project's encoder of that recipe (what an
evaluation of one of our checkpoints records).

The paper's own fit results (its "Scaling analysis" section) are constants
here, PAPER_SLOPES and PAPER_CORRELATIONS; tests check them against PAPER.md
and that the fits of published.csv reproduce them.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re

import pandas as pd

from biovfm_jax.analysis import results as res
from biovfm_jax.evaluate import report

SIZES = ("T", "S", "B", "L")
# The table's column prefix -> objective.
OBJECTIVES = {"D": "dinov2", "M": "mae"}
BASELINE = ("BiomedCLIP", "biomedclip", "B")  # column, objective, ViT size
# How each recipe's encoder differs from the plain ViT (configs/dinov2_base.py;
# a test checks these against the configs).
ENCODER_OVERRIDES = {"mae": {}, "dinov2": dict(pos_embed="learned", layerscale_init=1e-5,
                                               mask_token=True)}
_FLAG = {display.lower(): flag for flag, display in report.BENCHMARKS}

# The objectives the paper fitted, in the order of the pairs below.
PAPER_OBJECTIVES = tuple(OBJECTIVES.values())
# Published slopes b per benchmark and of the mean AUC ("mean").
PAPER_SLOPES = {
    "chestmnist": (0.0224, 0.0452), "tissuemnist": (0.0224, 0.0240),
    "dermamnist": (0.0223, 0.0269), "octmnist": (0.0141, 0.0692),
    "breastmnist": (0.0124, 0.0318), "organsmnist": (0.0038, 0.0040),
    "pneumoniamnist": (0.0031, 0.0134), "retinamnist": (0.0025, 0.0094),
    "organcmnist": (0.0024, 0.0063), "organamnist": (0.0020, 0.0044),
    "pathmnist": (0.0017, 0.0015), "bloodmnist": (0.0016, 0.0037),
    report.MEAN: (0.0088, 0.0191),
}
# Pearson r of the slopes with each factor (factors.py's names; the paper's
# "number of training samples" comes out as dataset_samples, train + val + test).
PAPER_CORRELATIONS = {"dataset_samples": (0.51, 0.33), "db_index": (0.47, 0.61),
                      "num_classes": (0.05, -0.24), "gzip_ratio": (-0.22, -0.31)}


def markdown_table(text: str, section: str) -> list[list[str]]:
  """Rows (header first) of the first markdown table under `## {section}`."""
  m = re.search(rf"^## {re.escape(section)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
  if not m:
    raise ValueError(f"no section '## {section}' in the paper text")
  rows = []
  for line in m.group(1).splitlines():
    line = line.strip()
    if line.startswith("|"):
      if re.fullmatch(r"\|[\s|:-]+\|", line):
        continue  # the |---| rule under the header
      rows.append([c.strip() for c in line.strip("|").split("|")])
    elif rows:
      break
  if not rows:
    raise ValueError(f"no table under '## {section}'")
  return rows


def paper_auc(text: str) -> pd.DataFrame:
  """The "Results to beat" table, long: objective, model_size, benchmark
  (MedMNIST flag), value (a fraction). The mean row is left out."""
  header, *rows = markdown_table(text, "Results to beat")
  columns = []
  for name in header[1:]:
    if name == BASELINE[0]:
      columns.append(BASELINE[1:])
    else:
      prefix, _, size = name.partition("-")
      if prefix not in OBJECTIVES or size not in SIZES:
        raise ValueError(f"Results to beat: unknown column {name!r}")
      columns.append((OBJECTIVES[prefix], size))
  out = []
  for row in rows:
    if row[0].lower() == report.MEAN:
      continue
    flag = _FLAG.get(row[0].lower())
    if flag is None:
      raise ValueError(f"Results to beat: unknown benchmark {row[0]!r}")
    for (objective, size), cell in zip(columns, row[1:], strict=True):
      out.append({"objective": objective, "model_size": size, "benchmark": flag,
                  "value": round(float(cell) / 100, 6)})
  return pd.DataFrame(out)


def paper_params(text: str) -> dict[str, int]:
  """The study's size axis per ViT size, from the "Scaling analysis" text."""
  m = re.search(r"parameter counts\s+([\d.M,\s]+)", text)
  if not m:
    raise ValueError("Scaling analysis: no 'parameter counts ...' sentence")
  counts = [round(float(c.strip().rstrip("M")) * 1e6)
            for c in m.group(1).strip().rstrip(",;.").split(",")]
  if len(counts) != len(SIZES):
    raise ValueError(f"Scaling analysis: expected {len(SIZES)} parameter counts, got {counts}")
  return dict(zip(SIZES, counts))


def _count(cfg) -> int:
  import jax
  from flax import nnx
  from biovfm_jax.models.vit import VisionTransformer
  model = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


@functools.cache
def encoder_params(objective: str, size: str) -> int:
  """Parameters of this project's encoder of `objective` at ViT `size` (224 px).
  Counted on 1- and 2-block copies (blocks are identical, so the count is
  linear in depth): tracing 24 blocks of ViT-L takes seconds."""
  from biovfm_jax.models.vit import vit_config
  cfg = vit_config(size, **ENCODER_OVERRIDES[objective])
  one, two = (_count(dataclasses.replace(cfg, depth=d)) for d in (1, 2))
  return one + (cfg.depth - 1) * (two - one)


def published_frame(text: str) -> pd.DataFrame:
  """The published table in the results contract's format (see the module doc)."""
  auc, total = paper_auc(text), paper_params(text)
  rows = []
  for r in auc.itertuples():
    known = r.objective in ENCODER_OVERRIDES
    rows.append({
        "run": f"paper_{r.objective}" + (f"_vit_{r.model_size.lower()}" if known else ""),
        "objective": r.objective, "model_size": r.model_size,
        "params_encoder": encoder_params(r.objective, r.model_size) if known else None,
        "params_total": total[r.model_size] if known else None,
        "train_flops": None, "images_seen": None, "data_subset": "biovfm21m",
        "modality_subset": "all", "protocol": "biovfm", "benchmark": r.benchmark,
        "metric": "auc", "value": r.value, "ci_low": None, "ci_high": None,
        "checkpoint": "", "step": None, "git_rev": "", "time": ""})
  return res.check_results(pd.DataFrame(rows, columns=res.COLUMNS), "published table")


def write_published(paper_md: str, out: str, overwrite: bool = False) -> str:
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
  with open(paper_md) as f:
    df = published_frame(f.read())
  tmp = f"{out}.tmp{os.getpid()}"
  df.to_csv(tmp, index=False)
  os.replace(tmp, out)
  return out
