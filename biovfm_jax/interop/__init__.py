"""PyTorch weights in and out: timm, MAE and DINOv2 checkpoints to our
params, and our encoders to timm. See convert.py and torch_files.py."""
from __future__ import annotations

from biovfm_jax.interop.convert import (
    ConversionError, check_params, create_timm_model, from_dinov2, from_mae,
    from_timm, timm_model_kwargs, timm_model_name, to_timm)
from biovfm_jax.interop.torch_files import load_state_dict

__all__ = ["ConversionError", "check_params", "create_timm_model", "from_dinov2",
           "from_mae", "from_timm", "load_state_dict", "timm_model_kwargs",
           "timm_model_name", "to_timm"]
