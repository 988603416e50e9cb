"""Shared defaults for MAE pretraining: the stock recipe of He et al. (PAPER.md).

Not run directly: the thin per-size files (vit_b_mae.py, ...) set the size.
"""
from ml_collections import config_dict

from biovfm_jax.sharding import DEFAULT_RULES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_config(size: str = "B") -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.objective = "mae"
  c.seed = 0
  image_size = config_dict.FieldReference(224)
  c.image_size = image_size  # one value feeds the model and the input pipeline

  # Encoder: a ViT of PAPER.md's sizes; explicit fields override the size.
  c.model = config_dict.ConfigDict()
  c.model.size = size
  c.model.image_size = image_size
  c.model.patch_size = config_dict.placeholder(int)  # default: the size's (16; 14 for H, g)
  c.model.width = config_dict.placeholder(int)
  c.model.depth = config_dict.placeholder(int)
  c.model.num_heads = config_dict.placeholder(int)
  c.model.mlp_dim = config_dict.placeholder(int)
  c.model.pos_embed = "sincos"
  c.model.class_token = True
  c.model.num_registers = 0
  c.model.layerscale_init = config_dict.placeholder(float)
  c.model.drop_path_rate = 0.0
  c.model.ffn = "mlp"
  c.model.dtype = "bfloat16"        # compute dtype
  c.model.param_dtype = "float32"
  c.model.attention_impl = "xla"    # or "cudnn" on GPU
  c.model.remat_policy = "none"     # none | full | dots_saveable | ...
  c.model.scan_layers = False

  c.mae = config_dict.ConfigDict()
  c.mae.mask_ratio = 0.75
  c.mae.decoder_width = 512
  c.mae.decoder_depth = 8
  c.mae.decoder_heads = 16
  c.mae.norm_pix_loss = True

  c.data = config_dict.ConfigDict()
  c.data.shards = "mini"            # "mini", a directory, a glob or a comma list
  c.data.cache_dir = config_dict.placeholder(str)
  c.data.image_size = image_size
  c.data.crop_scale = (0.2, 1.0)
  c.data.hflip = True
  c.data.mean = IMAGENET_MEAN
  c.data.std = IMAGENET_STD
  c.data.num_workers = 0            # grain worker processes (0: in-process)
  c.data.prefetch_buffer = 4
  c.data.read_threads = 2

  c.batch_size = 4096               # global, over all devices and hosts
  c.total_epochs = 800
  c.num_train_steps = config_dict.placeholder(int)   # overrides total_epochs
  c.steps_per_epoch = config_dict.placeholder(int)   # default: records // batch

  c.optim = config_dict.ConfigDict()
  c.optim.base_lr = 1.5e-4          # lr = base_lr * batch_size / lr_batch_base
  c.optim.lr_batch_base = 256
  c.optim.min_lr = 0.0
  c.optim.warmup_epochs = 40
  c.optim.weight_decay = 0.05       # none on biases, norms, tokens, position embeddings
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.grad_clip_norm = 0.0      # 0 disables
  c.optim.grad_accum_steps = 1      # micro-batches per step (same maths, less memory)

  c.mesh = config_dict.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = [list(r) for r in DEFAULT_RULES]

  c.checkpoint = config_dict.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.log_every_steps = 50
  c.image_every_steps = 2000        # TensorBoard reconstruction grid; 0 disables
  c.peak_tflops_per_device = config_dict.placeholder(float)  # for MFU; auto if unset
  return c
