"""A frozen encoder from any checkpoint: ours (MAE, DINOv2) or imported.

Every checkpoint records in its run JSON which sub-tree is the backbone
("params/encoder" for MAE, "extra/teacher/backbone" for DINOv2, "params" for
an imported encoder) and the backbone's ViTConfig ("encoder"). Only that
sub-tree is read, straight into its shardings on the evaluation mesh.

    enc = biovfm_jax.load_encoder("/tmp/quickstart")
    out = enc(images)   # images (N, H, W, 3) float32, normalised as in training
    out["cls"]          # (N, D), after the final norm (None without a cls token)
    out["patch_tokens"] # (N, L, D), after the final norm
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from biovfm_jax import sharding as shd
from biovfm_jax.models.vit import ViTConfig, VisionTransformer, vit_config
from biovfm_jax.train import checkpoint as ckpt_lib
from biovfm_jax.train.state import ModelSpec

# Fields that change how the encoder runs, not which weights it has; an
# evaluation may override them (bf16 compute, another attention kernel ...).
RUNTIME_FIELDS = ("dtype", "attention_impl", "attention_recompute_from", "remat_policy",
                  "drop_path_rate", "image_size")


def encoder_config(run: dict, where: str) -> ViTConfig:
  if "encoder" not in run:
    raise ValueError(
        f"{where} records no encoder config (run JSON key 'encoder'): it predates "
        "evaluation support. Re-save it, or import the weights with "
        "`python -m biovfm_jax.interop import`.")
  fields = dict(run["encoder"])
  return vit_config(None, **fields)


class Encoder:
  """A ViT backbone with its parameters placed on a mesh; maps images to
  {"cls", "patch_tokens"}. Batches are split over the mesh's data axes."""

  def __init__(self, config: ViTConfig, params, *, mesh=None, rules=None,
               source: str = ""):
    self.config = config
    self.source = source
    self.mesh = mesh if mesh is not None else default_mesh()
    self.rules = _rules(rules)
    self.spec = ModelSpec(lambda rngs: VisionTransformer(config, rngs=rngs), 0,
                          self.mesh, self.rules)
    self.params = jax.device_put(params, self.spec.param_shardings)
    self.batch_sharding = shd.named_sharding(("batch",), self.mesh, self.rules)
    self._apply = jax.jit(self._forward, static_argnames=("deterministic",))

  @property
  def num_params(self) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.params)))

  @property
  def data_parallel_size(self) -> int:
    """How many ways a batch is split: batch sizes must divide by it."""
    axes = self.batch_sharding.spec[0] or ()
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([self.mesh.shape[a] for a in axes]))

  def model(self, params=None) -> VisionTransformer:
    return self.spec.merge(self.params if params is None else params)

  def tokens(self, params, images, rng=None, deterministic=True):
    """(N, prefix + L, D) final-norm tokens; traceable (use inside jit)."""
    with shd.use_mesh(self.mesh, self.rules):
      images = shd.constrain(images, ("batch", None, None, None))
      return self.model(params)(images, rng=rng, deterministic=deterministic)

  def _forward(self, params, images, rng=None, deterministic=True):
    tokens = self.tokens(params, images, rng, deterministic).astype(jnp.float32)
    split = self.config.num_prefix_tokens
    cls = tokens[:, 0] if self.config.class_token else None
    return {"cls": cls, "patch_tokens": tokens[:, split:]}

  def __call__(self, images, *, rng=None, deterministic: bool = True) -> dict[str, Any]:
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
      raise ValueError(f"expected (N, H, W, {self.config.in_channels}) images, "
                       f"got {images.shape}")
    if images.shape[0] % self.data_parallel_size:
      raise ValueError(f"batch of {images.shape[0]} does not divide over "
                       f"{self.data_parallel_size} data-parallel devices")
    images = jax.device_put(images, self.batch_sharding)
    return self._apply(self.params, images, rng, deterministic=deterministic)


def _rules(rules):
  return shd.DEFAULT_RULES if rules is None else shd.rules_from_config(rules)


def default_mesh():
  """Data parallel over every device; parameters replicated (the default
  rules put 'embed' on fsdp, which has size 1 here)."""
  return shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def load_encoder(checkpoint: str, *, step: int | None = None, mesh=None, rules=None,
                 **overrides) -> Encoder:
  """The backbone of a checkpoint (a workdir, its checkpoints/ folder or one
  step's folder) as an `Encoder`. `overrides` replace runtime fields of the
  saved ViTConfig (see RUNTIME_FIELDS), e.g. dtype="bfloat16"."""
  step_dir = ckpt_lib.find_step_dir(checkpoint, step)
  run = ckpt_lib.read_run(step_dir)
  config = encoder_config(run, step_dir)
  bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
  if bad:
    raise ValueError(f"cannot override {bad} of a saved encoder; only {RUNTIME_FIELDS}")
  config = dataclasses.replace(config, **{k: v for k, v in overrides.items()
                                          if v is not None})
  path = tuple(run.get("backbone", "params/encoder").split("/"))
  mesh = mesh if mesh is not None else default_mesh()
  spec = ModelSpec(lambda rngs: VisionTransformer(config, rngs=rngs), 0, mesh,
                   _rules(rules))
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        spec.abstract_params, spec.param_shardings)
  try:
    params = ckpt_lib.restore_subtree(step_dir, path, target)
  except (ValueError, KeyError) as e:
    raise ValueError(f"{step_dir}: the backbone at {'/'.join(path)} does not match the "
                     f"recorded encoder config: {e}") from e
  return Encoder(config, params, mesh=mesh, rules=rules, source=step_dir)
