"""Self-supervised objectives. The train loop knows only this registry."""
from data_pipeline.errors import ConfigError


def get_objective(config, *, total_steps: int, steps_per_epoch: int):
  """config.objective -> the objective. Each offers:

    init_model(rngs) -> nnx.Module         the trainable model
    init_extra(params) -> pytree           non-trainable state (EMA teacher, centers)
    loss(model, batch, rng, step, extra) -> (loss, aux scalars, new extra)
    after_update(params, extra, step) -> extra   (e.g. the EMA teacher update)
    flops_per_example() -> float           analytic training FLOPs, for MFU
    visualize(model, batch, rng, extra) -> uint8 image grid for TensorBoard
    encoder_config -> ViTConfig            the backbone's, recorded in checkpoints
    activation_plan(images) -> dict        for the fit check (biovfm_jax/aot.py):
        name -> (ViTConfig, tokens, sequences): a block stack whose saved
        residuals backward keeps, for `images` images on one device; or
        name -> bytes kept besides, split by the tensor axis (head logits)
  """
  name = config.objective
  if name == "mae":
    from biovfm_jax.objectives.mae import MAEObjective
    return MAEObjective(config)
  if name == "dinov2":
    from biovfm_jax.objectives.dinov2 import DINOv2Objective
    return DINOv2Objective(config, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  raise ConfigError(f"config.objective={name!r} is unknown; known: 'mae', 'dinov2'")
