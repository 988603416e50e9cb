"""Models: ViT encoder, MAE. Parameters carry logical axis names as metadata.

Flax 0.12 shards variables created with logical names eagerly, which needs a
mesh at creation. We keep the names as metadata only, so models build on any
host without a mesh; the trainer maps them with
`nnx.get_partition_spec(nnx.state(model))` and `sharding.logical_to_mesh`.
The switch below is thread-local in flax, so layers.param also passes
eager_sharding=False on every parameter.
"""
from flax import nnx

nnx.use_eager_sharding(False)

from biovfm_jax.models.mae import MaskedAutoencoder  # noqa: E402
from biovfm_jax.models.vit import (  # noqa: E402
    VIT_SIZES, ViTConfig, VisionTransformer, vit_config, vit_config_from)

__all__ = ["MaskedAutoencoder", "VIT_SIZES", "ViTConfig", "VisionTransformer",
           "vit_config", "vit_config_from"]
