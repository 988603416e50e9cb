"""Fields every pretraining config has; the objective bases (mae_base.py,
dinov2_base.py) set the recipe on top. Not run directly."""
from ml_collections import config_dict

from biovfm_jax.sharding import DEFAULT_RULES
from biovfm_jax.train import validate
from configs.eval import common as eval_common
from data_pipeline.errors import ConfigError
from data_pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD

# Sizes whose blocks are scanned by default (config.model.scan_layers).
_SCANNED_SIZES = ("L", "H", "g")


def get_config(size: str | None) -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.objective = ""
  c.seed = 0
  # A checkpoint whose backbone starts the run (an import, or a run of either
  # objective; biovfm_jax/train/init_from.py says what else comes from it).
  c.init_from = ""
  # Another patch size than the backbone's: resample its patch embedding
  # (FlexiViT's pseudo-inverse resize), e.g. a /14 release continued at /16.
  c.init_patch_resample = False
  image_size = config_dict.FieldReference(224)
  c.image_size = image_size  # one value feeds the model and the input pipeline

  # Encoder: a ViT of PAPER.md's sizes; explicit fields override the size.
  c.model = config_dict.ConfigDict()
  c.model.size = config_dict.FieldReference(size, field_type=str | None)  # None: custom
  c.model.image_size = image_size
  c.model.patch_size = config_dict.placeholder(int | None)  # default: the size's (16; 14 for H, g)
  c.model.width = config_dict.placeholder(int | None)
  c.model.depth = config_dict.placeholder(int | None)
  c.model.num_heads = config_dict.placeholder(int | None)
  c.model.mlp_dim = config_dict.placeholder(int | None)
  c.model.pos_embed = "sincos"      # "sincos" | "learned" | "rope" (DINOv3's axial RoPE)
  c.model.class_token = True
  c.model.num_registers = 0
  c.model.layerscale_init = config_dict.placeholder(float | None)
  c.model.layernorm_eps = config_dict.placeholder(float | None)  # None: 1e-6 (HF ViT: 1e-12)
  c.model.key_bias = True           # False: no k bias in attention (DINOv3)
  # pos_embed="rope": frequency base; patch centres to [-1, 1] per axis ("separate")
  # or by the longer/shorter side ("max"/"min"); training-time coordinate
  # augmentation (DINOv3: rescale=2.0): shift U(-s, s), per-axis jitter and joint
  # rescale log-uniform in [1/v, v]. None: off.
  c.model.rope_base = 100.0
  c.model.rope_normalize = "separate"
  c.model.rope_shift = config_dict.placeholder(float | None)
  c.model.rope_jitter = config_dict.placeholder(float | None)
  c.model.rope_rescale = config_dict.placeholder(float | None)
  c.model.drop_path_rate = 0.0
  c.model.ffn = "mlp"
  c.model.dtype = "bfloat16"        # compute dtype
  c.model.param_dtype = "float32"
  c.model.attention_impl = "xla"    # or "cudnn" on GPU
  # "xla" attention over >= this many tokens recomputes its softmax in the backward
  # pass instead of saving it (models/layers.py attention_recompute); None: never.
  c.model.attention_recompute_from = config_dict.FieldReference(96, field_type=int | None)
  c.model.remat_policy = "none"     # none | full | dots_saveable | ...
  # One lax.scan over the blocks instead of a Python loop for the large sizes: XLA
  # compiles one block, not depth copies (ViT-L MAE train step on 2 CPU cores, the
  # AOT fit check on v5p-128: see benchmarks/RESULTS.md "Compile and restart").
  # Same maths and params (stacked on a leading layer axis). Its step time on GPU
  # is not measured yet (no GPU was lent): benchmarks/gpu_suite.py's *_scan cases.
  c.model.scan_layers = size in _SCANNED_SIZES
  c.model.in_channels = 3
  c.model.mask_token = False        # a learned token for masked patches (iBOT)
  c.model.init = "mae"              # "mae" (xavier) or "dinov2" (truncated normal)

  c.data = config_dict.ConfigDict()
  c.data.shards = "mini"            # "mini", a directory, a glob, a comma list, or a
                                    # subset file <dir>/subsets/<name>.subset.json
  # Sampling weights per modality or source, e.g. weights="ultrasound:0.5,CT:0.3,MR:0.2"
  # (or a dict); empty: every record alike. See data_pipeline/selection.py.
  c.data.mixture = config_dict.ConfigDict({"by": "modality", "weights": ""})
  c.data.cache_dir = config_dict.placeholder(str | None)
  c.data.crops = "single"           # "single" (MAE) or "multicrop" (DINOv2)
  c.data.image_size = image_size
  c.data.crop_ratio = (3 / 4, 4 / 3)  # aspect range of the random resized crops
  c.data.mean = IMAGENET_MEAN
  c.data.std = IMAGENET_STD
  # Input parallelism; None: chosen from the host's cores (os.sched_getaffinity),
  # logged once: workers = cores - 1 (at most 32, the train loop keeps a core)
  # on hosts of more than 2 cores, else 0; read threads = 2 per worker, or one
  # per core (at most 16) in-process. Batches never depend on either.
  c.data.num_workers = config_dict.placeholder(int | None)  # grain worker processes (0: in-process)
  c.data.prefetch_buffer = 4
  c.data.read_threads = config_dict.placeholder(int | None)  # batches made at once, per process
  # Batches whose host-to-device transfer is issued ahead of the step taking
  # them (0: each is sent when its step starts). Each costs one batch of
  # uint8 pixels in device memory.
  c.data.device_prefetch = 2
  # Stop when the unreadable records found exceed this fraction of the records in play
  # (each is skipped, named once in the log and counted on the progress line).
  c.data.max_skipped_fraction = 0.01
  # Resume even though the shards or record count differ from the checkpoint's run.
  c.data.allow_input_change = False

  c.batch_size = 1024               # global, over all devices and hosts
  c.total_epochs = 100
  c.num_train_steps = config_dict.placeholder(int | None)   # overrides total_epochs
  c.steps_per_epoch = config_dict.placeholder(int | None)   # default: records // batch

  c.optim = config_dict.ConfigDict()
  c.optim.base_lr = 1e-3
  c.optim.lr_batch_base = 256
  c.optim.lr_scaling = "linear"     # lr = base_lr x batch / lr_batch_base, or x sqrt(...)
  c.optim.min_lr = 0.0
  c.optim.warmup_epochs = 10
  c.optim.weight_decay = 0.05       # none on biases, norm scales, LayerScale gammas (tokens decay, as in both references)
  c.optim.weight_decay_end = config_dict.placeholder(float | None)  # cosine to it, if set
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8                # Adam's epsilon
  c.optim.grad_clip_norm = 0.0      # 0 disables
  # "global": one norm over all parameters (optax's clip_by_global_norm); "module": each
  # top-level module (DINOv2: backbone, dino_head, ibot_head) clipped on its own, as
  # torch's clip_grad_norm_ per student module (max_norm / (norm + 1e-6)).
  c.optim.clip_scope = "global"
  # The lr warmup rises linearly from 0 at step 0 to the peak at step warmup (MAE's
  # per-iteration rule) or, True, reaches the peak at its last step (DINOv2's np.linspace).
  c.optim.warmup_reaches_peak = False
  c.optim.grad_accum_steps = 1      # micro-batches per step (same maths, less memory)
  c.optim.layer_decay = 1.0         # layer-wise lr decay (1: none)
  c.optim.patch_embed_lr_mult = 1.0
  c.optim.freeze_last_layer_epochs = 0
  c.optim.freeze_pattern = "last_layer"  # regex over param paths frozen for those epochs
  # The freeze is an lr of 0 (dinov2's last_layer_lr): gradients still reach Adam's
  # moments. True also zeroes them before Adam (DINO v1's cancel_gradients_last_layer).
  c.optim.freeze_last_layer_grads = False
  # Continued pretraining from a public backbone on small data: its first K blocks and its
  # embeddings (patch embedding, cls/register/mask tokens, position table) stay fixed for
  # the first N optimiser steps: no Adam step, no weight decay, out of the clip norm.
  c.optim.freeze_blocks = 0         # K, the backbone's first blocks held (0: off)
  c.optim.freeze_blocks_steps = config_dict.placeholder(int | None)  # N; None: the whole run
  # A step whose loss or gradients are not finite leaves params, optimiser state and
  # EMA unchanged (the step count advances) instead of stopping the run ...
  c.optim.skip_nonfinite = False
  c.optim.max_consecutive_skips = 5  # ... unless more than this many in a row

  # Devices per slice along each axis (-1: the rest); slices > 1 joins TPU slices over
  # DCN, data-parallel only across them (see biovfm_jax/sharding.py:make_mesh).
  c.mesh = config_dict.ConfigDict(dict(data=-1, fsdp=1, tensor=1, slices=1))
  c.sharding_rules = [list(r) for r in DEFAULT_RULES]

  c.checkpoint = config_dict.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True
  # JAX's persistent compilation cache, so a restart skips the compile:
  # "" -> <workdir>/compile_cache, "none" -> off, or a directory (local or gs://;
  # shared by the hosts of a multi-host run). JAX_COMPILATION_CACHE_DIR, when
  # set, wins (biovfm_jax/train/compile_cache.py).
  c.compile_cache_dir = ""

  c.log_every_steps = 50
  c.image_every_steps = 2000        # TensorBoard sample grid; 0 disables
  c.peak_tflops_per_device = config_dict.placeholder(float | None)  # for MFU; auto if unset
  # Benchmarks scored while pretraining (biovfm_jax/evaluate/during_training.py):
  # name -> eval_entry(protocol, every_steps=N, <eval config keys>).
  c.evals = config_dict.ConfigDict()
  return c


# Path fields made absolute where the config enters (the library's, for the sweep launcher).
expand_paths = validate.expand_paths


def eval_entry(protocol: str, every_steps: int, **overrides) -> config_dict.ConfigDict:
  """One entry of `config.evals`: the evaluation config of `protocol`
  (configs/eval/common.py) with `overrides`, scored every `every_steps` steps.
  Unknown keys fail here, as the config file loads."""
  c = eval_common.get_config(protocol)
  c.every_steps = every_steps
  # Also score the starting weights (step 0), so later scores show their gain.
  c.at_start = True
  c.features.cache = False   # the features change as the model trains
  # Decode in the training thread: reader threads started anew at each evaluation
  # left glibc malloc arenas behind, ~50-100 MB of host memory per evaluation.
  c.features.read_threads = 0
  c.lock()
  try:
    c.update(overrides)
  except (KeyError, AttributeError) as e:
    raise ConfigError(f"eval_entry({protocol!r}): unknown key {e}") from None
  return c
