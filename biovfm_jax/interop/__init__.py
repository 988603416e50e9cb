"""PyTorch weights in and out: one module per format (timm, mae, dinov2, hf,
open_clip) over one shared core of checked readers (core.py); torch files
are read without pickle execution (torch_files.py)."""
from __future__ import annotations

from biovfm_jax.interop.core import ConversionError, check_params
from biovfm_jax.interop.dinov2 import from_dinov2, from_dinov2_heads
from biovfm_jax.interop.mae import from_mae
from biovfm_jax.interop.timm import (create_timm_model, from_timm, timm_model_kwargs,
                                     timm_model_name, to_timm)
from biovfm_jax.interop.torch_files import load_state_dict

__all__ = ["ConversionError", "check_params", "create_timm_model", "from_dinov2",
           "from_dinov2_heads", "from_mae", "from_timm", "load_state_dict",
           "timm_model_kwargs", "timm_model_name", "to_timm"]
