"""The DINOv2 recipe of Oquab et al. (PAPER.md), over configs/common.py.

Not run directly: the thin per-size files (vit_b_dinov2.py, ...) set the size.
ViT-L and g use the reference's large-model settings (131,072 prototypes, a
separate iBOT head, Sinkhorn-Knopp centering, EMA 0.994, drop-path 0.4,
base lr 2e-4, 80 warmup epochs, weight decay to 0.2, 500 epochs).
"""
from ml_collections import config_dict

from configs import common

_LARGE = ("L", "g")


def get_config(size: str | None = "B") -> config_dict.ConfigDict:
  c = common.get_config(size)
  c.objective = "dinov2"
  large = size in _LARGE
  patch = 14 if size in ("H", "g") else 16

  c.model.patch_size = patch
  c.model.pos_embed = "learned"
  c.model.layerscale_init = 1e-5
  c.model.drop_path_rate = 0.4 if size in ("L", "H", "g") else 0.3
  c.model.num_registers = 0
  c.model.ffn = "swiglu" if size in ("H", "g") else "mlp"
  c.model.mask_token = True         # iBOT replaces masked patch embeddings
  c.model.init = "dinov2"

  n_local = config_dict.FieldReference(8)
  c.dinov2 = config_dict.ConfigDict()
  c.dinov2.head_layers = 3
  c.dinov2.head_hidden = 2048
  c.dinov2.head_bottleneck = 256
  c.dinov2.num_prototypes = 131072 if large else 65536
  c.dinov2.separate_ibot_head = large
  # The separate iBOT head's prototypes; None: num_prototypes. (Not a reference to
  # it: setting one would then set both.)
  c.dinov2.ibot_num_prototypes = config_dict.placeholder(int | None)
  c.dinov2.student_temp = 0.1
  c.dinov2.teacher_temp = 0.07
  c.dinov2.warmup_teacher_temp = 0.04
  c.dinov2.warmup_teacher_temp_epochs = 30
  c.dinov2.centering = "sinkhorn_knopp" if large else "softmax"
  c.dinov2.center_momentum = 0.9
  c.dinov2.sinkhorn_iterations = 3
  c.dinov2.koleo_weight = 0.1
  # The reference computes KoLeo on each GPU's images and the iBOT center as
  # the mean of each GPU's mean; "shard" does the same per batch shard (data x
  # fsdp devices). "global": over the whole batch (device-count independent).
  c.dinov2.koleo_scope = "shard"
  c.dinov2.ibot_center_scope = "shard"
  c.dinov2.dino_weight = 1.0
  c.dinov2.ibot_weight = 1.0
  c.dinov2.teacher_momentum = 0.994 if large else 0.992
  c.dinov2.teacher_momentum_end = 1.0
  c.dinov2.n_local_crops = n_local
  # iBOT slots per image as a fraction of the patches; None: the upper end of
  # data.mask_ratio (the most any mask covers).
  c.dinov2.ibot_max_masked_fraction = config_dict.placeholder(float | None)
  # Rows per KoLeo group; None: the whole global batch (the reference: each GPU's batch).
  c.dinov2.koleo_group_size = config_dict.placeholder(int | None)

  # DINOv3's Gram anchoring (off here): the student's global-crop patch tokens
  # keep the patch-similarity (Gram) matrix of a frozen Gram teacher's, loaded
  # from `ckpt` (any run or import of this architecture) or copied from the EMA
  # teacher before step `it_load_ema_teacher`, then, with rep_update, refreshed
  # from it after every update_frequency-th step from it_first_update (at most
  # max_updates times). ema_teacher: the EMA teacher itself is the Gram teacher.
  # The Gram teacher sees config.data.gram_crop_size crops, its patch tokens
  # resized to the student's grid (bicubic, no antialias:
  # dinov3's default). The weight follows
  # loss_weight_schedule (start, peak, end, warmup_epochs, cosine_epochs) when
  # set, else loss_weight. Names and defaults are dinov3's (configs/ssl_default_config.yaml).
  c.dinov2.gram = config_dict.ConfigDict({
      "use_loss": False, "loss_weight": 1.0, "ema_teacher": False,
      "ckpt": config_dict.placeholder(str | None),
      "it_load_ema_teacher": -1, "rep_update": True, "update_frequency": 50000,
      "it_first_update": 0, "max_updates": config_dict.placeholder(int | None),
      "normalized": True, "img_level": False, "remove_neg": False,
      "remove_only_teacher_neg": False, "tokens_used": "all",
      "loss_weight_schedule": config_dict.ConfigDict({
          "enabled": False, "start": 1.0, "peak": 1.0, "end": 1.0, "warmup_epochs": 0.0,
          "cosine_epochs": config_dict.placeholder(float | None)})})

  c.data.crops = "multicrop"
  c.data.global_crop_size = c.get_ref("image_size")
  c.data.global_crop_scale = (0.32, 1.0)
  c.data.local_crop_size = 98 if patch == 14 else 96
  c.data.local_crop_scale = (0.05, 0.32)
  c.data.num_local_crops = n_local
  c.data.mask_probability = 0.5     # share of global crops with iBOT masks
  c.data.mask_ratio = (0.1, 0.5)
  # "shard": the reference's collate on each batch shard (its GPU): exactly
  # int(mask_probability x 2B_shard) global crops masked, ratios stratified over
  # mask_ratio, a function of (seed, step, shard count): a resume on another shard
  # count draws other masks. "example": each crop its own coin and ratio (any count).
  c.data.mask_sampling = "shard"
  c.data.patch_size = c.model.get_ref("patch_size")
  # DINOv3's Gram teacher crops (with config.dinov2.gram): each global crop also
  # at this size for the Gram teacher; None: none. no_distortions: the Gram
  # crop skips the colour distortions (see data_pipeline/multicrop.py).
  c.data.gram_crop_size = config_dict.placeholder(int | None)
  c.data.gram_no_distortions = False
  # Several crop sizes (DINOv3's high-resolution stage): one entry per group,
  # each step draws a group with crop_size_ratios; empty: the sizes above for
  # every step. The step compiles once per group (the log counts them).
  c.data.global_crop_sizes = ()
  c.data.local_crop_sizes = ()
  c.data.gram_crop_sizes = ()
  c.data.crop_size_ratios = ()

  c.batch_size = 1024
  c.steps_per_epoch = 1250          # the reference's "epoch" is 1,250 iterations
  c.total_epochs = 500 if large else 100
  c.optim.base_lr = 2e-4 if large else 4e-3   # lr = base_lr * sqrt(batch / 1024)
  c.optim.lr_batch_base = 1024
  c.optim.lr_scaling = "sqrt"
  c.optim.min_lr = 1e-6
  c.optim.warmup_epochs = 80 if large else 10
  c.optim.weight_decay = 0.04       # none on biases, norms, LayerScale; tokens, pos_embed decay
  c.optim.weight_decay_end = 0.2 if large else 0.4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip_norm = 3.0
  c.optim.clip_scope = "module"     # backbone, dino_head, ibot_head each clipped to 3.0
  c.optim.warmup_reaches_peak = True  # np.linspace(0, lr, warmup) as dinov2's CosineScheduler
  c.optim.layer_decay = 0.9
  c.optim.patch_embed_lr_mult = 0.2
  # The head's last layer (direction and gain) trains at an lr of 0 for the first
  # epoch, as dinov2's last_layer_lr: its gradients still reach Adam's moments.
  c.optim.freeze_last_layer_epochs = 1
  return c
