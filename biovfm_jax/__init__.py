"""biovfm-jax. `biovfm_jax.load_encoder(checkpoint_dir)` gives a frozen encoder
of any checkpoint (see biovfm_jax/evaluate/encoder.py)."""
from biovfm_jax import console as _console
from biovfm_jax import distributed as _distributed

# Every entry point and a plain `import biovfm_jax` come through here before
# TensorFlow loads and before any device is touched: TensorFlow's start-up lines
# stay unprinted, and with libtpu installed (the test extra) and no TPU chip, jax
# does not probe for one (libtpu's errors).
_console.quiet_library_imports()
_distributed.skip_absent_tpu()


def __getattr__(name):
  # Lazy, so `import biovfm_jax.<module>` does not pull the evaluation stack.
  if name in ("load_encoder", "Encoder"):
    from biovfm_jax.evaluate import encoder
    return getattr(encoder, name)
  raise AttributeError(f"module 'biovfm_jax' has no attribute {name!r}")
