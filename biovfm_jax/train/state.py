"""The train state, its shardings, and how it is built without materialising twice.

Parameters live as plain nested dicts of arrays (nnx's "pure dict"), which
optax, orbax and jit shardings all handle natively; the model is rebuilt from
(graphdef, params, constants) inside the jitted step with `nnx.merge`.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from biovfm_jax import sharding as shd
from biovfm_jax.train.optim import decay_mask


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any     # trainable (the student, for DINOv2)
  opt_state: Any
  extra: Any      # the objective's non-trainable state: EMA teacher, centers ({} for MAE)


class ModelSpec:
  """What the trainer needs of an objective's model, without allocating it.

  graphdef: the module structure; param_shardings: where each parameter
  lives, from its logical axis names and the config's rules; `constants()`:
  non-trainable variables (fixed sin-cos tables ...), rebuilt, not stored.
  """

  def __init__(self, init_model: Callable[[nnx.Rngs], nnx.Module], seed: int,
               mesh: Mesh, rules):
    self._init_model, self._seed = init_model, seed
    abstract = nnx.eval_shape(lambda: init_model(nnx.Rngs(seed)))
    self.graphdef, abs_params, _ = nnx.split(abstract, nnx.Param, ...)
    self.abstract_params = nnx.to_pure_dict(abs_params)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abs_params))
    self.param_shardings = jax.tree.map(
        lambda spec: NamedSharding(mesh, shd.logical_to_mesh(tuple(spec), rules, mesh)),
        logical, is_leaf=lambda x: isinstance(x, P))
    self.decay_mask = decay_mask(self.abstract_params)  # the pretraining references' groups
    self.replicated = NamedSharding(mesh, P())
    self._constants = None

  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.abstract_params))

  def init_params(self):
    """Fresh parameters (traceable: call inside jit)."""
    model = self._init_model(nnx.Rngs(self._seed))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    return nnx.to_pure_dict(params)

  def constants(self):
    if self._constants is None:
      def build():
        _, _, rest = nnx.split(self._init_model(nnx.Rngs(self._seed)), nnx.Param, ...)
        return nnx.to_pure_dict(rest)
      abstract = jax.eval_shape(build)
      # Nothing to compute (the usual case: position tables are not variables)
      # means nothing runs on the devices, so an ahead-of-time compile for
      # devices that are not here (biovfm_jax/aot.py) can build the step too.
      self._constants = (abstract if not jax.tree.leaves(abstract)
                         else jax.jit(build, out_shardings=self.replicated)())
    return self._constants

  def merge(self, params, constants=None) -> nnx.Module:
    constants = self.constants() if constants is None else constants
    return nnx.merge(self.graphdef, nnx.State(params), nnx.State(constants))


def _shard_like_params(tree, params_treedef, param_shardings, replicated):
  """Optimiser-state shardings: sub-trees shaped like the params, or like one
  of their top-level parts (DINOv3's Gram teacher: the backbone), follow them."""
  parts = [(params_treedef, param_shardings)]
  if isinstance(param_shardings, dict):
    parts += [(jax.tree.structure(v), v) for v in param_shardings.values()
              if isinstance(v, dict)]

  def like(x):
    return next((s for t, s in parts if jax.tree.structure(x) == t), None)
  return jax.tree.map(lambda x: like(x) or replicated, tree,
                      is_leaf=lambda x: like(x) is not None)


def state_shardings(spec: ModelSpec, tx: optax.GradientTransformation, objective):
  """Optimiser moments and an EMA teacher (same tree as the params) are sharded
  like the params; counters and centers are replicated."""
  treedef = jax.tree.structure(spec.abstract_params)
  like_params = lambda tree: _shard_like_params(  # noqa: E731
      tree, treedef, spec.param_shardings, spec.replicated)
  return TrainState(
      step=spec.replicated, params=spec.param_shardings,
      opt_state=like_params(jax.eval_shape(tx.init, spec.abstract_params)),
      extra=like_params(jax.eval_shape(objective.init_extra, spec.abstract_params)))


def abstract_state(spec: ModelSpec, tx, objective, shardings: TrainState) -> TrainState:
  abstract = jax.eval_shape(lambda: _fresh_state(spec, tx, objective))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def _fresh_state(spec: ModelSpec, tx, objective, params=None) -> TrainState:
  params = spec.init_params() if params is None else params
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    extra=objective.init_extra(params))


def create_state(spec: ModelSpec, tx, objective, shardings: TrainState,
                 params=None) -> TrainState:
  """Initialises the state directly into its shardings (no host copy); from
  given `params` (e.g. imported weights) instead of the model's init if set."""
  return jax.jit(lambda p: _fresh_state(spec, tx, objective, p),
                 out_shardings=shardings)(params)
