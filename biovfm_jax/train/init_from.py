"""`config.init_from`: start a run from the backbone of any checkpoint.

Any checkpoint that holds a backbone will do: an import (timm, MAE, DINOv2 ...),
or a MAE or DINOv2 run of ours, of either objective. Its run JSON says where
the backbone is (`backbone`) and what it is (`encoder`). The run then starts:
  - backbone: the checkpoint's (MAE's encoder; DINOv2's student, and so its
    EMA teacher, which init_extra copies from the student). A learned position
    table is resized to the run's grid as DINOv2 resizes it, a fixed sin-cos
    one rebuilt; registers and LayerScale are kept; a mask token the
    checkpoint lacks starts fresh.
  - the backbone's neighbours in the checkpoint (MAE's decoder, DINOv2's
    heads), where the run's model has the same sub-tree with the same shapes;
  - fresh: everything else (other heads, the optimiser, step, schedules,
    centers, the data position).
A mismatch of architecture is refused before anything compiles, one line per
field, naming the config key and both values. A workdir that holds a
checkpoint resumes it instead (loop.train never calls this then).
"""
from __future__ import annotations

import logging

import jax
import numpy as np

from biovfm_jax.models.patches import resample_patch_kernel, resize_pos_grid, sincos_2d
from biovfm_jax.evaluate.encoder import encoder_config
from biovfm_jax.models.vit import ViTConfig
from biovfm_jax.train import checkpoint as ckpt_lib
from data_pipeline.errors import ConfigError

# What must be equal for the weights to mean the same thing.
_SAME = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "ffn", "num_registers",
         "class_token", "in_channels", "layernorm_eps", "key_bias")


def mismatches(saved: ViTConfig, mine: ViTConfig, where: str,
               patch_resample: bool = False) -> list[str]:
  """One line per architecture field in which the run differs from the backbone
  (the patch size may differ with config.init_patch_resample)."""
  same = [f for f in _SAME if not (patch_resample and f == "patch_size")]
  lines = [f"config.model.{f}={getattr(mine, f)!r}, but the backbone in {where} has "
           f"{f}={getattr(saved, f)!r}" for f in same if getattr(mine, f) != getattr(saved, f)]
  hint = " (config.init_patch_resample=True resamples it)"
  lines = [line + hint if line.startswith("config.model.patch_size=") else line
           for line in lines]
  rope = (saved.pos_embed == "rope", mine.pos_embed == "rope")
  if rope[0] != rope[1]:  # attention trained with rotations means nothing without them
    lines.append(f"config.model.pos_embed={mine.pos_embed!r}, but the backbone in {where} "
                 f"has pos_embed={saved.pos_embed!r}")
  elif rope[0] and saved.rope_base != mine.rope_base:
    lines.append(f"config.model.rope_base={mine.rope_base!r}, but the backbone in {where} "
                 f"has rope_base={saved.rope_base!r}")
  if (saved.layerscale_init is None) != (mine.layerscale_init is None):
    lines.append(f"config.model.layerscale_init={mine.layerscale_init!r}, but the backbone "
                 f"in {where} has {'no ' if saved.layerscale_init is None else ''}LayerScale")
  return lines


def read_backbone(checkpoint: str, where: str, mine: ViTConfig, like: dict, fresh: dict,
                  patch_resample: bool = False) -> tuple[dict, tuple, str, list[str]]:
  """The backbone of any checkpoint fitted to a run's (`like`: abstract, the
  run's `fresh` init fills what it lacks): (host tree, its path in the
  checkpoint, step folder, notes). Architecture mismatches are refused,
  one line per field, naming `where`."""
  step_dir = ckpt_lib.find_step_dir(checkpoint)
  run = ckpt_lib.read_run(step_dir)
  try:
    saved_cfg = encoder_config(run, step_dir)
  except ValueError as e:
    raise ConfigError(f"{where}: {e}") from None
  lines = mismatches(saved_cfg, mine, where, patch_resample)
  if lines:
    raise ConfigError(f"{where} ({step_dir}) does not fit this run:\n" + "\n".join(lines))
  path = tuple(run.get("backbone", "params/encoder").split("/"))
  notes: list[str] = []
  tree = _fit_backbone(ckpt_lib.restore_host(step_dir, path), saved_cfg, mine, like, fresh,
                       notes)
  return tree, path, step_dir, notes


def initial_params(config, spec, objective):
  """The run's first params from `config.init_from` (None when it is unset)."""
  if not config.init_from:
    return None
  where = f"config.init_from={config.init_from}"
  # The student's backbone: the key under which params hold it (the checkpoint
  # records the EMA teacher's, extra/teacher/<the same key>, for DINOv2).
  key = objective.backbone_path[-1]
  # The model's own init, in its shardings: what the checkpoint does not give
  # stays on the devices; what it gives is read on the host, then placed.
  fresh = jax.jit(spec.init_params, out_shardings=spec.param_shardings)()
  like = spec.abstract_params
  params = dict(fresh)
  params[key], path, step_dir, notes = read_backbone(
      config.init_from, where, objective.encoder_config, like[key], fresh[key],
      bool(config.init_patch_resample))
  saved_tree = ckpt_lib.state_metadata(step_dir)
  taken, kept_fresh, misfits = [], [], []
  parent = _subtree(saved_tree, path[:-1]) if len(path) > 1 else None
  for name in sorted(k for k in like if k != key):
    if parent is None or name not in parent:
      kept_fresh.append(name)
      continue
    tree = ckpt_lib.relaid_like(ckpt_lib.restore_host(step_dir, path[:-1] + (name,)),
                                like[name])
    got, want = ckpt_lib.shapes(tree), ckpt_lib.shapes(like[name])
    if got != want:
      misfits.append((name, f"{name}: {sorted(set(got.items()) - set(want.items()))[:2]} "
                            f"in the checkpoint, "
                            f"{sorted(set(want.items()) - set(got.items()))[:2]} here"))
      continue
    params[name] = tree
    taken.append(name)
  if misfits:  # half a decoder (or head) from the checkpoint would be neither
    raise ConfigError(f"{where}: it holds {', '.join(n for n, _ in misfits)} "
                      "with other shapes than this run's (set the config's decoder or "
                      "head sizes to the checkpoint's, recorded in its run JSON):\n"
                      + "\n".join(line for _, line in misfits))
  logging.info(
      "Initialised from %s: %s from its %s%s; %s; %s; the optimiser, step, schedules, "
      "centers and data position start fresh.", step_dir, key, "/".join(path),
      f" ({'; '.join(notes)})" if notes else "",
      "from it too: " + ", ".join(taken) if taken else "nothing else from it",
      "initialised: " + ", ".join(kept_fresh) if kept_fresh else "nothing initialised")
  return place(params, like, spec.param_shardings)


def initial_extra(objective, spec, extra: dict) -> dict:
  """A fresh run's extra, with the entries the objective starts from a
  checkpoint's backbone (objective.extra_from_checkpoints(), e.g. DINOv3's
  Gram teacher) read, fitted to the run's backbone and placed in its shardings."""
  wanted = getattr(objective, "extra_from_checkpoints", dict)()
  if not wanted:
    return extra
  key = objective.backbone_path[-1]
  like, shardings = spec.abstract_params[key], spec.param_shardings[key]
  extra = dict(extra)
  for name, (checkpoint, config_key, what) in wanted.items():
    tree, _, step_dir, notes = read_backbone(checkpoint, f"{config_key}={checkpoint}",
                                             objective.encoder_config, like, extra[name])
    logging.info("%s from %s%s", what, step_dir, f" ({'; '.join(notes)})" if notes else "")
    extra[name] = place(tree, like, shardings)
  return extra


def _subtree(tree, path):
  for k in path:
    if not hasattr(tree, "get") or k not in tree:
      return None
    tree = tree[k]
  return tree


def _fit_backbone(saved: dict, saved_cfg: ViTConfig, mine: ViTConfig, like: dict,
                  fresh: dict, notes: list[str]) -> dict:
  """The saved backbone (host arrays) in the layout and grid of the run's
  (`like`: abstract); what the checkpoint lacks comes from `fresh`."""
  tree = ckpt_lib.relaid_like(saved, like)  # per-layer <-> scanned blocks; drops extras
  ncls = int(mine.class_token)
  if saved_cfg.patch_size != mine.patch_size:  # config.init_patch_resample
    tree["patch_embed"]["kernel"] = resample_patch_kernel(
        np.asarray(saved["patch_embed"]["kernel"]), saved_cfg.patch_size, mine.patch_size,
        mine.in_channels)
    notes.append(f"patch embedding resampled {saved_cfg.patch_size} -> {mine.patch_size}")
  if "pos_embed" in like:  # the run learns its table
    grid = (mine.grid_size, mine.grid_size)
    if "pos_embed" in saved:
      table = np.asarray(saved["pos_embed"], np.float32)
      g = saved_cfg.grid_size
      tree["pos_embed"] = np.concatenate(
          [table[:ncls], resize_pos_grid(table[ncls:], (g, g), grid,
                                         offset=saved_cfg.interpolate_offset)], 0)
      if g != grid[0]:
        notes.append(f"position table {g}x{g} -> {grid[0]}x{grid[1]}")
    else:
      tree["pos_embed"] = np.concatenate(
          [np.zeros((ncls, mine.width), np.float32), sincos_2d(mine.width, *grid)], 0)
      notes.append(f"learned position table from the sin-cos one, {grid[0]}x{grid[1]}")
  elif "pos_embed" in saved:
    notes.append("its learned position table dropped: this run's positions are "
                 f"{mine.pos_embed}")
  missing = sorted(set(like) - set(tree))
  if missing:
    notes.append("fresh: " + ", ".join(missing))
  tree = {**{k: fresh[k] for k in missing}, **tree}
  got, want = ckpt_lib.shapes(tree), ckpt_lib.shapes(like)
  if got != want:  # mismatches() lets nothing else through; a damaged file might
    raise ConfigError(f"the backbone's params do not fit this run's: "
                      f"{sorted(set(got.items()) ^ set(want.items()))[:4]}")
  return tree


def place(params, like, shardings):
  """Host arrays into the run's dtypes and shardings (every process holds the
  whole value; each device takes its shard); device arrays stay."""
  def place(x, abstract, sharding):
    if isinstance(x, jax.Array):
      return x
    x = np.asarray(x, abstract.dtype)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(place, params, like, shardings)
