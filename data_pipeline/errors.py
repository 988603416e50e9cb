"""Error types the programs tell apart (main.py and evaluate.py exit 2 on
ConfigError with its one line). Here, in the lowest layer, because both
data_pipeline and biovfm_jax raise them."""


class ConfigError(ValueError):
  """A config value the run cannot use; the message names the key (config.x.y)."""
