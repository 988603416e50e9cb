"""The model card (README.md) of an exported transformers folder, in the Hub's
format: a YAML header (library_name, license, tags, pipeline_tag), then the
objective, architecture, training data (shards, records per modality from
their manifests), steps and images seen, and with a results store the
checkpoint's benchmark table. Used by hf_export.py."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from biovfm_jax.interop import core
from biovfm_jax.models.vit import ViTConfig


def _yaml_list(key: str, items: Sequence[str]) -> str:
  """A YAML list of plain scalars (tags are checked by hf_export first)."""
  return f"{key}:\n" + "".join(f"- {x}\n" for x in items)


def card_header(license: str, tags: Sequence[str]) -> str:
  """The YAML front matter the Hub reads."""
  return ("---\nlibrary_name: transformers\n"
          f"license: {license}\n" + _yaml_list("tags", tags)
          + "pipeline_tag: image-feature-extraction\n---\n")


_OBJECTIVES = {
    "mae": "Masked autoencoding (MAE, He et al. 2021): the encoder sees a random subset "
           "of the patches, a light decoder reconstructs the pixels of the others.",
    "dinov2": "Self-distillation (DINOv2, Oquab et al. 2023): DINO and iBOT losses "
              "between a student and its EMA teacher over multi-crop views; the "
              "exported encoder is the teacher's backbone.",
}


def _describe_objective(run: dict) -> str:
  objective = str(run.get("objective", ""))
  if objective in _OBJECTIVES:
    return _OBJECTIVES[objective]
  source = run.get("source") or {}
  if source:
    return (f"Imported weights (`interop import --format={source.get('format', '?')}` "
            f"from `{source.get('path', '?')}`), not pretrained here.")
  return f"`{objective or 'unknown'}`"


def _positions(config: ViTConfig) -> str:
  if config.pos_embed == "rope":
    return (f"axial 2D RoPE (base {config.rope_base:g}, per-axis normalised patch "
            "centres), no position parameters")
  if config.pos_embed == "sincos":
    return "fixed 2D sin-cos (written as the position table, zero cls row)"
  return "learned table (cls row + patches)"


def _architecture(config: ViTConfig, architecture: str, run: dict,
                  decoder: Mapping | None) -> str:
  size = run.get("model_size") or "custom"
  ffn = "SwiGLU" if config.ffn == "swiglu" else "GELU MLP"
  rows = [("transformers class", f"`{architecture}`"), ("size", f"ViT-{size}"),
          ("width / depth / heads", f"{config.width} / {config.depth} / {config.num_heads}"),
          ("FFN", f"{ffn}, {config.mlp_dim} hidden"),
          ("patch / image size", f"{config.patch_size} px / {config.image_size} px "
                                 f"({config.grid_size}x{config.grid_size} patches)"),
          ("positions", _positions(config)),
          ("tokens", f"cls + {config.num_registers} registers + patches"),
          ("LayerScale", "yes" if config.layerscale_init is not None else "no"),
          ("LayerNorm eps", f"{config.layernorm_eps:g}")]
  if decoder:
    rows.append(("MAE decoder", f"width {decoder['decoder_width']}, depth "
                 f"{decoder['decoder_depth']}, {decoder['decoder_heads']} heads"))
  from biovfm_jax.evaluate.report import markdown
  return markdown(["", ""], [[a, b] for a, b in rows])


def find_manifests(spec: str) -> list[tuple[str, dict]]:
  """(path, doc) of the manifests (or subset files) that describe a shard spec
  (config.data.shards); those not found are left out."""
  from data_pipeline import shards as shards_lib
  from data_pipeline import storage
  found: list[tuple[str, dict]] = []
  items = [s.strip() for s in str(spec).split(",") if s.strip()]
  for item in items:
    candidates = []
    if item == "mini":
      from data_pipeline import mini
      candidates.append(os.path.join(mini.corpus_dir(), shards_lib.MANIFEST))
    elif item.endswith(".json"):
      candidates.append(item)
    else:
      base = item if not any(c in item for c in "*?[") else os.path.dirname(item)
      if base.endswith(".array_record"):
        base = os.path.dirname(base)
      candidates.append(storage.join(base, shards_lib.MANIFEST))
    for path in candidates:
      try:
        if storage.as_path(path).is_file():
          doc = json.loads(storage.as_path(path).read_text())
          if path not in [p for p, _ in found]:
            found.append((path, doc))
      except (OSError, ValueError):
        continue
  return found


def _training_data(run: dict) -> str:
  from biovfm_jax.evaluate.report import markdown
  spec = run.get("data_shards")
  if spec is None:
    return "Not recorded in the checkpoint (an import, or a run from before it was).\n"
  shards = run.get("shards") or []
  text = [f"- shards: `{spec}` ({len(shards)} shard files, "
          f"{sum(int(b) for _, b in shards):,} bytes)"]
  if run.get("num_records") is not None:
    text.append(f"- records in play: {int(run['num_records']):,}")
  if run.get("data_mixture"):
    text.append(f"- mixture: {run['data_mixture']}")
  out = "\n".join(text) + "\n"
  manifests = find_manifests(spec)
  if not manifests:
    return out + ("\nNo manifest.json or subset file was found for this spec at export "
                  "time: the counts per modality are not given.\n")
  for path, doc in manifests:
    mods = doc.get("modalities") or {}
    total = int(doc.get("num_records") or sum(mods.values()))
    out += f"\nRecords per modality (`{path}`, {total:,} records):\n\n"
    rows = [[m, f"{int(c):,}", f"{100 * int(c) / max(total, 1):.1f}%"]
            for m, c in sorted(mods.items(), key=lambda kv: (-int(kv[1]), kv[0]))]
    out += markdown(["modality", "records", "share"], rows)
  return out


def _training(run: dict, step: int) -> str:
  batch = run.get("batch_size")
  lines = [f"- steps: {step:,}" + (f" of {int(run['total_steps']):,}"
                                   if run.get("total_steps") else "")]
  if batch is not None:
    lines.append(f"- global batch: {int(batch):,}")
    lines.append(f"- images seen: {step * int(batch):,} (step x global batch)")
  else:
    lines.append("- images seen: not recorded (no batch size in the checkpoint)")
  if run.get("seed") is not None:
    lines.append(f"- seed: {run['seed']}")
  return "\n".join(lines) + "\n"


def results_tables(store: str, step_dir: str) -> str:
  """The markdown benchmark table(s) of one checkpoint from a results store
  (biovfm_jax/results.py): one per protocol, the paper's row order, values
  x100, the latest row of each (benchmark, metric)."""
  from biovfm_jax import results as results_lib
  from biovfm_jax.evaluate import report
  frame = results_lib.read(store)

  def norm(p):
    return os.path.normpath(str(p)).rstrip("/")

  mine = frame[[norm(c) == norm(step_dir) for c in frame["checkpoint"]]]
  if mine.empty:
    have = sorted({str(c) for c in frame["checkpoint"]})[:5]
    raise core.ConversionError(f"--results={store} has no rows for checkpoint {step_dir} "
                               f"(it has rows for e.g. {have})")
  mine = mine.sort_values("time")
  out = []
  for protocol in sorted(set(mine["protocol"])):
    rows = mine[mine["protocol"] == protocol]
    latest: dict[str, dict[str, Any]] = {}
    for _, r in rows.iterrows():
      ci = None if (math.isnan(r["ci_low"]) or math.isnan(r["ci_high"])) else [
          r["ci_low"], r["ci_high"]]
      latest.setdefault(r["benchmark"], {})[r["metric"]] = (float(r["value"]), ci)
    order = report.ordered(latest)
    cells = []
    for b in order:
      cells.append([report.display_name(b)] + [
          report._fmt(*latest[b][m]) if m in latest[b] else "-"  # pylint: disable=protected-access
          for m in report.METRICS])
    means = [report._mean(latest[b][m][0] for b in order if m in latest[b])  # pylint: disable=protected-access
             for m in report.METRICS]
    cells.append([report.MEAN] + [report._fmt(v) for v in means])  # pylint: disable=protected-access
    out.append(f"Protocol `{protocol}` (results store `{store}`), values x100:\n\n"
               + report.markdown(["benchmark", "AUC", "ACC"], cells))
  return "\n".join(out)


def model_card(*, name: str, step_dir: str, run: dict, config: ViTConfig,
               architecture: str, decoder: Mapping | None, license: str,
               tags: Sequence[str], mean: Sequence[float], std: Sequence[float],
               norm_source: str = "", results: str | None = None) -> str:
  step = int(os.path.basename(step_dir.rstrip("/")))
  body = [f"# {name}\n",
          f"A ViT encoder exported from the biovfm-jax checkpoint `{step_dir}` (step "
          f"{step}) by `python -m biovfm_jax.interop export --format=hf`.\n",
          "## Objective\n", _describe_objective(run) + "\n",
          "## Architecture\n", _architecture(config, architecture, run, decoder),
          "## Training data\n", _training_data(run),
          "## Training\n", _training(run, step),
          "## Preprocessing\n",
          f"RGB, resized to {config.image_size}x{config.image_size} (bilinear), x / 255, "
          f"then normalised with mean {list(mean)} and std {list(std)}"
          + (f" ({norm_source})" if norm_source else "")
          + " (`preprocessor_config.json`; `AutoImageProcessor` applies it).\n"]
  if results:
    from data_pipeline import eval_loader
    body += ["## Results\n",
             "Benchmarks of this checkpoint. Their features were computed as the "
             "reference linear probe computes them: images normalised with mean "
             f"{list(eval_loader.MEAN)} and std {list(eval_loader.STD)}, not the "
             "preprocessing above.\n",
             results_tables(results, step_dir)]
  first = 1 + config.num_registers
  if decoder:
    use = ("```python\nimport torch\n"
           "from transformers import AutoImageProcessor, AutoModelForPreTraining\n\n"
           "processor = AutoImageProcessor.from_pretrained(FOLDER)\n"
           "model = AutoModelForPreTraining.from_pretrained(FOLDER)  # ViTMAEForPreTraining\n"
           "pixels = processor(images, return_tensors=\"pt\")[\"pixel_values\"]\n"
           "loss = model(pixels).loss  # masks config.mask_ratio of the patches at random\n"
           "# Features of every patch, in order:\n"
           "model.config.mask_ratio = 0.0\n"
           f"noise = torch.arange({config.num_patches}).float().expand(len(pixels), -1)\n"
           "out = model.vit(pixels, noise=noise)\n"
           "cls, patches = out.last_hidden_state[:, 0], out.last_hidden_state[:, 1:]\n```\n\n"
           "`AutoModel` gives the encoder alone (`ViTMAEModel`, which reports the decoder's "
           "weights as unused and masks patches as above).\n")
  else:
    use = ("```python\nfrom transformers import AutoImageProcessor, AutoModel\n\n"
           "processor = AutoImageProcessor.from_pretrained(FOLDER)\n"
           "model = AutoModel.from_pretrained(FOLDER)\n"
           "out = model(**processor(images, return_tensors=\"pt\"))\n"
           "cls = out.last_hidden_state[:, 0]  # class token\n"
           f"patches = out.last_hidden_state[:, {first}:]  # patch tokens\n```\n")
  body += ["## Use\n", use,
           "Features are the final-norm tokens; the class token is first"
           + (f", then {config.num_registers} register tokens" if config.num_registers
              else "") + ", then the patch tokens in row-major order."
           + (" `pooler_output` is not a trained part of this model (an identity "
              "pooler: tanh of the class token)." if architecture == "ViTModel" else "")
           + "\n"]
  return card_header(license, tags) + "\n" + "\n".join(body)


