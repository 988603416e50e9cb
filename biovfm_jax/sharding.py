"""Logical axis names -> device mesh.

Models name the axes of every parameter and key activation with *logical*
names ("batch", "embed", "heads", ...). A config maps logical names to the
physical mesh axes ("data", "fsdp", "tensor"); sharding changes never touch
model code. Activations are constrained through `constrain`, a no-op unless
a mesh is active (set with `use_mesh`), so models run unsharded in tests.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from data_pipeline.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Parameters use `embed`, `mlp`, `heads`, `kv`, `prototypes`; activations use
# the `act_*` names so that a parameter axis (embed -> fsdp) and the batch axis
# (batch -> data+fsdp) never claim the same mesh axis in one array.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("prototypes", "tensor"),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("patch", None),
)

_state = threading.local()


def rules_from_config(rules) -> tuple:
  """ConfigDict/list form `[[logical, mesh_axes], ...]` -> tuple of pairs."""
  out = []
  for name, axes in rules:
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes) or None
    out.append((str(name), axes))
  return tuple(out)


def logical_to_mesh(logical: Sequence[str | None] | None, rules=DEFAULT_RULES,
                    mesh: Mesh | None = None) -> P:
  """Maps logical axis names to a PartitionSpec.

  A mesh axis is used at most once per array (later claims are dropped) and
  mesh axes of size 1 are dropped, so any rule set gives a valid spec.
  """
  if logical is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in logical:
    axes = table.get(name) if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    keep = tuple(a for a in axes if a not in used and
                 (mesh is None or mesh.shape.get(a, 1) > 1))
    used.update(keep)
    spec.append(keep[0] if len(keep) == 1 else (keep or None))
  return P(*spec)


def mesh_sizes(shape: dict | None, num_devices: int) -> dict:
  """`config.mesh` over `num_devices` -> {data, fsdp, tensor, slices}: the
  mesh's axis sizes (data spans the slices) and the slice count.

  data, fsdp, tensor: sizes within one slice (ICI); one may be -1 to take the
  rest. slices (default 1): TPU slices joined over the data-centre network
  (DCN). Raises ConfigError naming config.mesh when the devices do not fit.
  """
  shape = dict(shape or {"data": -1})
  unknown = sorted(set(shape) - set(MESH_AXES) - {"slices"})
  if unknown:
    raise ConfigError(f"config.mesh: unknown axes {unknown}; known: {MESH_AXES + ('slices',)}")
  slices = int(shape.get("slices", 1) or 1)
  if slices < 1 or num_devices % slices:
    raise ConfigError(f"config.mesh.slices={slices} does not divide {num_devices} devices")
  per_slice = num_devices // slices
  sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
  free = [a for a, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ConfigError(f"config.mesh: at most one axis may be -1, got {shape}")
  known = int(np.prod([v for v in sizes.values() if v != -1]))
  if free:
    if per_slice % known:
      raise ConfigError(f"config.mesh={shape}: {per_slice} devices per slice are not "
                       f"divisible by {known}")
    sizes[free[0]] = per_slice // known
  if int(np.prod(list(sizes.values()))) != per_slice:
    raise ConfigError(f"config.mesh={shape} needs {int(np.prod(list(sizes.values()))) * slices} "
                     f"devices, {num_devices} are available")
  sizes["data"] *= slices
  return {**sizes, "slices": slices}


_AUTO = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)


def make_mesh(shape: dict | None = None, devices=None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh of `config.mesh` (see mesh_sizes).

  With slices > 1 the mesh's data axis is slices x data, laid out so only data
  parallelism crosses slices and FSDP/tensor collectives stay inside one (the
  hybrid mesh MaxText and big_vision use for multi-slice runs).
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  sizes = mesh_sizes(shape, devices.size)
  slices = sizes["slices"]
  if slices == 1:
    grid = devices.reshape([sizes[a] for a in MESH_AXES])
  else:
    from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
    if not hasattr(devices.flat[0], "slice_index"):
      raise ConfigError(f"config.mesh.slices={slices}: these devices have no slice index "
                       "(multi-slice meshes are for TPU slices joined over DCN)")
    per_slice = [sizes["data"] // slices] + [sizes[a] for a in MESH_AXES[1:]]
    grid = mesh_utils.create_hybrid_device_mesh(
        per_slice, [slices, 1, 1], devices=list(devices.flat))
  return Mesh(grid, MESH_AXES, axis_types=_AUTO)


def abstract_mesh(shape: dict | None, num_devices: int) -> jax.sharding.AbstractMesh:
  """The mesh make_mesh would build over `num_devices`, without devices: for
  shapes and shardings of a target that is not here (the GPU fit estimate)."""
  sizes = mesh_sizes(shape, num_devices)
  return jax.sharding.AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                                   axis_types=_AUTO)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=DEFAULT_RULES):
  """Activates `mesh` and `rules` for `constrain` inside the block."""
  old = getattr(_state, "ctx", None)
  _state.ctx = (mesh, tuple(rules))
  try:
    yield mesh
  finally:
    _state.ctx = old


def active_mesh() -> tuple[Mesh, tuple] | None:
  return getattr(_state, "ctx", None)


def batch_shards(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  """How many devices the logical batch axis is split over: the reference's GPU
  count, for the terms and masks DINOv2 computes per GPU."""
  axes = logical_to_mesh(("batch",), rules, mesh)[0] or ()
  axes = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in axes]))


def constrain(x: jax.Array, logical: Iterable[str | None]) -> jax.Array:
  """Sharding constraint by logical names; identity when no mesh is active."""
  ctx = active_mesh()
  if ctx is None:
    return x
  mesh, rules = ctx
  spec = logical_to_mesh(tuple(logical), rules, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def named_sharding(logical, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_mesh(logical, rules, mesh))


def to_host(x) -> np.ndarray:
  """A (possibly multi-process) jax.Array -> the whole value as numpy, on every
  process. Collective when the array spans processes: all must call it."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
