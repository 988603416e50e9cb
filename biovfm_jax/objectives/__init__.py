"""Self-supervised objectives. The train loop knows only this registry."""


def get_objective(config):
  """config.objective -> objective instance (init_model, loss, flops_per_example)."""
  name = config.objective
  if name == "mae":
    from biovfm_jax.objectives.mae import MAEObjective
    return MAEObjective(config)
  raise ValueError(f"config.objective={name!r} is unknown; known: 'mae'")
