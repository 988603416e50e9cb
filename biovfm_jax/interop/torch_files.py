"""Reads PyTorch weight files into plain numpy state dicts, safely.

Pickled .pth files can run code when loaded, so they are read with
torch.load(weights_only=True) only: a file holding anything but tensors and
plain containers is refused. Safetensors need no torch at all.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import ml_dtypes  # noqa: F401  registers bfloat16 with numpy (bf16 safetensors)
import numpy as np

SAFETENSORS_EXTS = (".safetensors",)
PICKLE_EXTS = (".pth", ".pt", ".bin")

# Where checkpoints nest their weights, tried in this order: MAE's
# {'model': ...}, DINOv2's eval {'teacher': ...}, Lightning-style {'state_dict': ...}.
NESTED_KEYS = ("model", "teacher", "state_dict")

# The one non-tensor class allowed in a pickle: MAE's training checkpoints
# store their argparse Namespace under 'args'; it holds plain values only.
_SAFE_GLOBALS = [argparse.Namespace]


def _install_hint() -> str:
  return 'install the interop extra: pip install "biovfm-jax[interop]"'


def _load_safetensors(path: str) -> dict:
  try:
    from safetensors.numpy import load_file
  except ImportError as e:
    raise ImportError(f"reading {path} needs safetensors; {_install_hint()}") from e
  return load_file(path)


def _load_pickle(path: str):
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {path} needs torch (or convert it to "
                      f".safetensors first); {_install_hint()}") from e
  import pickle
  try:
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
    raise ValueError(
        f"{path}: refused: it holds pickled Python objects besides tensors, "
        f"which torch.load(weights_only=True) will not load (loading them could "
        f"run arbitrary code). Re-save only the state dict (torch.save("
        f"model.state_dict(), ...)) or as .safetensors. Detail: {first}") from None


def _to_numpy(value) -> np.ndarray:
  """A torch tensor or array -> numpy; floating types become float32."""
  if hasattr(value, "detach"):  # torch.Tensor
    import torch
    t = value.detach().cpu()
    if t.is_floating_point():
      t = t.to(torch.float32)
    return t.numpy()
  a = np.asarray(value)
  if np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16:
    a = a.astype(np.float32)
  return a


def _is_array(value) -> bool:
  return hasattr(value, "detach") or isinstance(value, np.ndarray)


def pick_state_dict(obj, *, path: str = "<checkpoint>",
                    key: str | None = None) -> Mapping:
  """The mapping of weights inside a loaded checkpoint: `obj[key]` when key
  is given, `obj` itself when it holds arrays, else the first of NESTED_KEYS
  present."""
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
  if key is not None:
    if key not in obj:
      raise ValueError(f"{path}: has no key {key!r}; top-level keys: {sorted(obj)[:20]}")
    obj = obj[key]
    if not isinstance(obj, Mapping):
      raise ValueError(f"{path}: {key!r} is a {type(obj).__name__}, not a dict of tensors")
    return obj
  if any(_is_array(v) for v in obj.values()):
    return obj
  for k in NESTED_KEYS:
    if isinstance(obj.get(k), Mapping):
      return obj[k]
  raise ValueError(f"{path}: found no tensors at the top level nor under any of "
                   f"{NESTED_KEYS}; top-level keys: {sorted(obj)[:20]} (pass key=)")


def _flatten(tree: Mapping, path: str, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, path, name + "."))
    elif _is_array(v):
      out[name] = _to_numpy(v)
    else:
      raise ValueError(f"{path}: key {name!r} holds a {type(v).__name__}, not a "
                       "tensor (pass key= to pick the weights inside the checkpoint)")
  return out


def load_state_dict(path: str | os.PathLike, *,
                    key: str | None = None) -> dict[str, np.ndarray]:
  """Weights of a .safetensors / .pth / .pt / .bin file as {name: array}.

  Floating tensors come back as float32. For pickles, nested checkpoints are
  unwrapped (see pick_state_dict; `key` picks one explicitly).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  ext = os.path.splitext(path)[1].lower()
  if ext in SAFETENSORS_EXTS:
    if key is not None:
      raise ValueError(f"{path}: safetensors files are flat; key={key!r} does not apply")
    obj = _load_safetensors(path)
  elif ext in PICKLE_EXTS:
    obj = _load_pickle(path)
  else:
    raise ValueError(f"{path}: unknown weight file extension {ext!r}; expected "
                     f"one of {SAFETENSORS_EXTS + PICKLE_EXTS}")
  return _flatten(pick_state_dict(obj, path=path, key=key), path)
