"""biovfm-jax. `biovfm_jax.load_encoder(checkpoint_dir)` gives a frozen encoder
of any checkpoint (see biovfm_jax/evaluate/encoder.py)."""


def __getattr__(name):
  # Lazy, so `import biovfm_jax.<module>` does not pull the evaluation stack.
  if name in ("load_encoder", "Encoder"):
    from biovfm_jax.evaluate import encoder
    return getattr(encoder, name)
  raise AttributeError(f"module 'biovfm_jax' has no attribute {name!r}")
