"""A PyTorch reference of facebookresearch/dinov2's training step (one process, fp32).

`modules(repo)` gives the building blocks: dinov2's own classes when `repo` names a
dinov2 clone, else the transcription below (same maths, constructor signatures,
method names and state_dict keys, for the subset the step uses). `ReferenceStep`
is the glue, the same for both: one iteration of dinov2/train/train.py's do_train
loop around SSLMetaArch.forward_backward / update_teacher, without FSDP, the fp16
grad scaler, xFormers or torch.distributed. `collate` builds the batch dict of
dinov2/data/collate.py from masks drawn elsewhere. Indented as dinov2 is (4
spaces), so it reads line by line beside the code it transcribes.

What differs from a dinov2 run, and why (none of it changes the maths in fp32):
  * the student backbone runs once on the global crops (with masks) and once on
    the local crops (without), where dinov2 passes both as a list to its nested
    xFormers path (one sequence with a block-diagonal attention mask);
  * the student head runs once on the concatenated [local cls; global cls; iBOT
    buffer] rows and is split back, where dinov2 uses xFormers'
    BlockDiagonalMask.from_tensor_list / split (a row-wise MLP either way);
  * iBOTPatchLoss.sinkhorn_knopp_teacher calls dist.all_reduce unconditionally;
    without a process group the step runs it with all_reduce as the identity
    (what it is for one process);
  * inputs stay fp32 (dinov2 collates crops to fp16 and runs FSDP mixed precision).

For trajectory comparisons: the key third of each attn.qkv.bias has no effect on
any output (it shifts every score of a query's softmax by the same q.b_k), so its
gradient is zero up to rounding and AdamW turns that rounding into steps of up to lr,
pure noise: two correct implementations drift apart there only; compare the query and
value thirds.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import types
import warnings
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------
# Transcription of dinov2's modules (only what the training step uses).
# --------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """dinov2/layers/patch_embed.py PatchEmbed (no norm, flattened): conv with
    kernel = stride = patch, (B, C, H, W) -> (B, H/p * W/p, D)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        assert x.shape[-2] % self.patch_size[0] == 0 and x.shape[-1] % self.patch_size[1] == 0
        return self.proj(x).flatten(2).transpose(1, 2)


class LayerScale(nn.Module):
    """dinov2/layers/layer_scale.py LayerScale: x * gamma (gamma a trainable vector)."""

    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    """dinov2/layers/attention.py Attention: one qkv Linear, per-head
    softmax(q k^T * head_dim**-0.5) v, output Linear `proj`."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, proj_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """dinov2/layers/mlp.py Mlp: fc1 -> exact GELU -> fc2 (no dropout)."""

    def __init__(self, in_features, hidden_features, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """dinov2/layers/block.py Block (drop path 0): pre-norm residual blocks
    x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x))), LayerNorm eps 1e-6."""

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, proj_bias, ffn_bias, init_values):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """dinov2/models/vision_transformer.py DinoVisionTransformer, restricted to
    ffn_layer="mlp", no registers, block_chunks=0, drop_path_rate=0. Same
    parameter names/shapes and forward maths (incl. the bicubic pos_embed
    interpolation for other input sizes). NB dinov2's own default is
    block_chunks=1 (keys blocks.0.<i>....); pass block_chunks=0 to it."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, ffn_bias=True, proj_bias=True, drop_path_rate=0.0,
                 drop_path_uniform=False, init_values=None, ffn_layer="mlp", block_chunks=0,
                 num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1):
        super().__init__()
        if ffn_layer != "mlp" or block_chunks or num_register_tokens or drop_path_rate:
            raise NotImplementedError("transcription: mlp FFN, no chunks/registers/drop path only")
        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth  # read by get_params_groups_with_decay
        self.chunked_blocks = False
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = 0
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_bias, ffn_bias, init_values) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, x, w, h):
        """As dinov2: pos_embed as is at the native size, else its patch part
        resized bicubically with scale factor (w0 + offset) / M."""
        npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        pos = self.pos_embed.float()
        dim, m = x.shape[-1], int(math.sqrt(n))
        assert n == m * m
        w0, h0 = w // self.patch_size, h // self.patch_size
        if self.interpolate_offset:
            kwargs = {"scale_factor": ((w0 + self.interpolate_offset) / m, (h0 + self.interpolate_offset) / m)}
        else:
            kwargs = {"size": (w0, h0)}
        grid = F.interpolate(pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic",
                             antialias=self.interpolate_antialias, **kwargs)
        assert grid.shape[-2:] == (w0, h0)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((pos[:, :1], grid), dim=1).to(x.dtype)

    def prepare_tokens_with_masks(self, x, masks=None):
        """Patch embeddings, masked ones replaced by mask_token, cls token in
        front, then + (interpolated) pos_embed."""
        _, _, w, h = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.interpolate_pos_encoding(x, w, h)

    def forward_features(self, x, masks=None):
        if isinstance(x, list):
            raise NotImplementedError("the list (nested tensor) path needs xFormers; call once per crop group")
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        x_norm = self.norm(x)
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_regtokens": x_norm[:, 1:1],
                "x_norm_patchtokens": x_norm[:, 1:], "x_prenorm": x, "masks": masks}

    def forward(self, *args, is_training=False, **kwargs):
        out = self.forward_features(*args, **kwargs)
        return out if is_training else self.head(out["x_norm_clstoken"])


class _WeightNormLinear(nn.Module):
    """torch.nn.utils.weight_norm(nn.Linear(in, out, bias=False)) (dim=0), as
    dinov2's DINOHead.last_layer: weight = weight_g * weight_v / ||weight_v||_row."""

    def __init__(self, in_features, out_features):
        super().__init__()
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(v)

    def forward(self, x):
        return F.linear(x, self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True)))


class DINOHead(nn.Module):
    """dinov2/layers/dino_head.py DINOHead: MLP (Linear/GELU, nlayers Linears,
    keys mlp.0, mlp.2, ...) to the bottleneck, L2 normalisation (eps 1e-12 in
    fp32), weight-normed last_layer without bias, weight_g filled with 1."""

    def __init__(self, in_dim, out_dim, use_bn=False, nlayers=3, hidden_dim=2048, bottleneck_dim=256, mlp_bias=True):
        super().__init__()
        assert not use_bn, "transcription: no BatchNorm"
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim, bias=mlp_bias)
        else:
            layers = [nn.Linear(in_dim, hidden_dim, bias=mlp_bias), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim, bias=mlp_bias), nn.GELU()]
            self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim, bias=mlp_bias))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = _WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x):
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


def _sinkhorn_knopp(teacher_output, teacher_temp, n_samples, n_iterations=3):
    """The Sinkhorn-Knopp loop shared by dino_clstoken_loss.py and
    ibot_patch_loss.py (one process): Q = exp(t / temp)^T (K x B), normalised
    to sum 1, then 3 x (rows to 1/K, columns to 1/B), columns scaled to 1."""
    q = torch.exp(teacher_output.float() / teacher_temp).t()
    k = q.shape[0]
    q /= torch.sum(q)
    for _ in range(n_iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples
    return q.t()


class _LazyCenter(nn.Module):
    """The deferred center EMA of DINOLoss / iBOTPatchLoss: update_center only
    records the batch sum; apply_center_update (run first thing in
    softmax_center_teacher) folds it in: center = center * m + sum / n * (1 - m)."""

    def _record(self, batch_sum, n):
        self.updated, self.async_batch_center, self.len_teacher_output = False, batch_sum, n

    @torch.no_grad()
    def apply_center_update(self):
        if self.updated is False:
            t = self.async_batch_center / self.len_teacher_output
            self.center = self.center * self.center_momentum + t * (1 - self.center_momentum)
            self.updated = True


class DINOLoss(_LazyCenter):
    """dinov2/loss/dino_clstoken_loss.py DINOLoss, single process."""

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.updated = True

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output, teacher_temp):
        self.apply_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_iterations=3):
        return _sinkhorn_knopp(teacher_output, teacher_temp, teacher_output.shape[0], n_iterations)

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list):
        """- sum over (student, teacher) pairs of mean_batch sum_k t log_softmax(s / temp)."""
        total = 0
        for s in student_output_list:
            lsm = F.log_softmax(s / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                total -= torch.sum(t * lsm, dim=-1).mean()
        return total

    @torch.no_grad()
    def update_center(self, teacher_output):
        self._record(torch.sum(teacher_output, dim=0, keepdim=True), len(teacher_output))


class iBOTPatchLoss(_LazyCenter):
    """dinov2/loss/ibot_patch_loss.py iBOTPatchLoss, single process (the
    non-xFormers `lossfunc`, which is the same cross-entropy)."""

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))
        self.updated = True

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens, teacher_temp):
        self.apply_center_update()
        return F.softmax((teacher_patch_tokens - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
        return _sinkhorn_knopp(teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations)

    def forward_masked(self, student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat,
                       n_masked_patches=None, masks_weight=None):
        """- sum_i w_i sum_k t log_softmax(s / temp) / n_crops, w_i = 1 / (masked
        patches of token i's crop)."""
        s, t = student_patch_tokens_masked.float(), teacher_patch_tokens_masked.float()
        loss = torch.sum(t * F.log_softmax(s / self.student_temp, dim=-1), dim=-1)
        if masks_weight is None:
            masks_weight = ((1 / student_masks_flat.sum(-1).clamp(min=1.0)).unsqueeze(-1)
                            .expand_as(student_masks_flat)[student_masks_flat])
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        return -(loss * masks_weight).sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens):
        self._record(torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True), len(teacher_patch_tokens))


class KoLeoLoss(nn.Module):
    """dinov2/loss/koleo_loss.py KoLeoLoss: -mean log(||x_i - x_nn(i) + 1e-8|| + eps)
    over L2-normalised rows, nn(i) the max inner product off the diagonal."""

    def pairwise_NNs_inner(self, x):
        dots = torch.mm(x, x.t())
        dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
        return torch.max(dots, dim=1)[1]

    def forward(self, student_output, eps=1e-8):
        x = F.normalize(student_output, eps=eps, p=2, dim=-1)
        nn_index = self.pairwise_NNs_inner(x)
        distances = F.pairwise_distance(x, x[nn_index], p=2, eps=1e-8)
        return -torch.log(distances + eps).mean()


def get_vit_lr_decay_rate(name, lr_decay_rate=1.0, num_layers=12, force_is_backbone=False, chunked_blocks=False):
    """dinov2/utils/param_groups.py get_vit_lr_decay_rate: decay ** (L + 1 -
    layer_id), layer_id 0 for tokens/patch embed, i + 1 for blocks.i, L + 1 else."""
    layer_id = num_layers + 1
    if name.startswith("backbone") or force_is_backbone:
        tokens = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
        if any("." + t in name for t in tokens):
            layer_id = 0
        elif force_is_backbone and any(t in name for t in tokens):
            layer_id = 0
        elif ".blocks." in name and ".residual." not in name:
            layer_id = int(name[name.find(".blocks."):].split(".")[2]) + 1
        elif chunked_blocks and "blocks." in name and "residual." not in name:
            layer_id = int(name[name.find("blocks."):].split(".")[2]) + 1
        elif "blocks." in name and "residual." not in name:
            layer_id = int(name[name.find("blocks."):].split(".")[1]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def get_params_groups_with_decay(model, lr_decay_rate=1.0, patch_embed_lr_mult=1.0):
    """dinov2/utils/param_groups.py get_params_groups_with_decay: one dict per
    trainable parameter (params, name, lr_multiplier, wd_multiplier, is_last_layer)."""
    chunked_blocks = False
    if hasattr(model, "n_blocks"):
        n_blocks, chunked_blocks = model.n_blocks, model.chunked_blocks
    elif hasattr(model, "blocks"):
        n_blocks = len(model.blocks)
    elif hasattr(model, "backbone"):
        n_blocks = len(model.backbone.blocks)
    else:
        n_blocks = 0
    groups = []
    for name, param in model.named_parameters():
        name = name.replace("_fsdp_wrapped_module.", "")
        if not param.requires_grad:
            continue
        d = {"params": param, "is_last_layer": "last_layer" in name, "name": name, "wd_multiplier": 1.0,
             "lr_multiplier": get_vit_lr_decay_rate(name, lr_decay_rate, num_layers=n_blocks,
                                                    force_is_backbone=n_blocks > 0, chunked_blocks=chunked_blocks)}
        if name.endswith(".bias") or "norm" in name or "gamma" in name:
            d["wd_multiplier"] = 0.0
        if "patch_embed" in name:
            d["lr_multiplier"] *= patch_embed_lr_mult
        groups.append(d)
    return groups


def fuse_params_groups(all_params_groups, keys=("lr_multiplier", "wd_multiplier", "is_last_layer")):
    """dinov2/utils/param_groups.py fuse_params_groups: one group per distinct
    (lr_multiplier, wd_multiplier, is_last_layer), in order of first appearance."""
    fused = defaultdict(lambda: {"params": []})
    for d in all_params_groups:
        key = "".join(f"{k}{d[k]}_" for k in keys)
        fused[key].update({k: d[k] for k in keys})
        fused[key]["params"].append(d["params"])
    return fused.values()


class CosineScheduler:
    """dinov2/utils/utils.py CosineScheduler: freeze_iters zeros, linear warmup
    (np.linspace, endpoint included), then final + (base - final)(1 + cos(pi i / n)) / 2;
    final_value past total_iters."""

    def __init__(self, base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0, freeze_iters=0):
        self.final_value, self.total_iters = final_value, total_iters
        iters = np.arange(total_iters - warmup_iters - freeze_iters)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
        self.schedule = np.concatenate(
            (np.zeros(freeze_iters), np.linspace(start_warmup_value, base_value, warmup_iters), cosine))
        assert len(self.schedule) == self.total_iters

    def __getitem__(self, it):
        return self.final_value if it >= self.total_iters else self.schedule[it]


def modules(repo: str | None = None) -> types.SimpleNamespace:
    """The building blocks: from the dinov2 clone at `repo` (its own code,
    imported as the `dinov2` package; all of these import without xFormers,
    omegaconf or fvcore), else the transcription above. `.source` says which."""
    names = ("DinoVisionTransformer", "DINOHead", "DINOLoss", "iBOTPatchLoss", "KoLeoLoss",
             "get_params_groups_with_decay", "fuse_params_groups", "CosineScheduler")
    if not repo:
        g = globals()
        return types.SimpleNamespace(source="transcription", **{n: g[n] for n in names})
    repo = os.path.abspath(repo)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "xFormers is not available", torch.cuda.amp deprecation
        import dinov2
        from dinov2 import layers, loss
        from dinov2.models import vision_transformer
        from dinov2.utils import param_groups, utils
    if not os.path.abspath(dinov2.__file__).startswith(repo + os.sep):
        raise ImportError(f"`dinov2` was already imported from {dinov2.__file__}, not {repo}")
    return types.SimpleNamespace(
        source=repo, DinoVisionTransformer=vision_transformer.DinoVisionTransformer, DINOHead=layers.DINOHead,
        DINOLoss=loss.DINOLoss, iBOTPatchLoss=loss.iBOTPatchLoss, KoLeoLoss=loss.KoLeoLoss,
        get_params_groups_with_decay=param_groups.get_params_groups_with_decay,
        fuse_params_groups=param_groups.fuse_params_groups, CosineScheduler=utils.CosineScheduler)


# --------------------------------------------------------------------------------------
# The training step (glue, the same for both namespaces).
# --------------------------------------------------------------------------------------


def build_schedulers(CosineScheduler, *, epoch_length, epochs, lr, min_lr, warmup_epochs, weight_decay,
                     weight_decay_end, momentum_teacher, final_momentum_teacher, teacher_temp,
                     warmup_teacher_temp, warmup_teacher_temp_epochs, freeze_last_layer_epochs):
    """dinov2/train/train.py build_schedulers -> (lr, wd, momentum, teacher_temp,
    last_layer_lr); `lr` is cfg.optim.lr, i.e. after the scaling rule
    (sqrt_wrt_1024: base_lr * sqrt(total batch / 1024))."""
    total = epochs * epoch_length
    lr_kw = dict(base_value=lr, final_value=min_lr, total_iters=total, warmup_iters=warmup_epochs * epoch_length,
                 start_warmup_value=0)
    last_layer = CosineScheduler(**lr_kw)
    last_layer.schedule[: freeze_last_layer_epochs * epoch_length] = 0
    temp_iters = warmup_teacher_temp_epochs * epoch_length
    return (CosineScheduler(**lr_kw),
            CosineScheduler(base_value=weight_decay, final_value=weight_decay_end, total_iters=total),
            CosineScheduler(base_value=momentum_teacher, final_value=final_momentum_teacher, total_iters=total),
            CosineScheduler(base_value=teacher_temp, final_value=teacher_temp, total_iters=temp_iters,
                            warmup_iters=temp_iters, start_warmup_value=warmup_teacher_temp),
            last_layer)


def apply_optim_scheduler(optimizer, lr, wd, last_layer_lr):
    """dinov2/train/train.py apply_optim_scheduler."""
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group["wd_multiplier"]
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]


@contextlib.contextmanager
def _one_process_all_reduce():
    """dist.all_reduce as the identity while no process group exists (dinov2's
    iBOTPatchLoss.sinkhorn_knopp_teacher calls it unconditionally)."""
    if dist.is_initialized():
        yield
        return
    saved = dist.all_reduce
    dist.all_reduce = lambda tensor, *args, **kwargs: None
    try:
        yield
    finally:
        dist.all_reduce = saved


def dinov2_upperbound(n_tokens, n_global_crops_total, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5):
    """collate_data_and_cast's `upperbound`: sum over the int(B * p) masked
    crops of int(N * prob_max_i), prob_max from torch.linspace(*ratio, n + 1)."""
    n_masked = int(n_global_crops_total * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_masked + 1)
    return sum(int(n_tokens * probs[i + 1]) for i in range(n_masked))


def collate(global_crops, local_crops, masks, upperbound=None):
    """The dict of dinov2/data/collate.py collate_data_and_cast, from given masks.

    global_crops / local_crops: (B, n_crops, C, H, W) per image (stacked crop-major
    here, as collate does), or already collated (n_crops * B, C, H, W); float.
    masks: (n_global * B, N) or (n_global * B, h, w) bool, crop-major (row c * B + b).
    upperbound: only sizes the zero-padded iBOT buffers in forward_backward; rows
    past n_masked_patches are dropped before any loss or center, so every value
    >= n_masked_patches gives the same maths. dinov2's own value (drawn masks
    never exceed it) is dinov2_upperbound(N, 2B, ratio, prob); default n_masked_patches.
    """
    def crop_major(x):
        x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x, dtype=torch.float32)
        return x.transpose(0, 1).flatten(0, 1) if x.ndim == 5 else x

    masks = torch.as_tensor(np.asarray(masks) if not torch.is_tensor(masks) else masks, dtype=torch.bool).flatten(1)
    mask_indices_list = masks.flatten().nonzero().flatten()
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    n = mask_indices_list.shape[0]
    if upperbound is None:
        upperbound = n
    assert upperbound >= n, f"upperbound {upperbound} < {n} masked patches"
    return {"collated_global_crops": crop_major(global_crops), "collated_local_crops": crop_major(local_crops),
            "collated_masks": masks, "mask_indices_list": mask_indices_list, "masks_weight": masks_weight,
            "upperbound": int(upperbound), "n_masked_patches": torch.full((1,), fill_value=n, dtype=torch.long)}


def randomize(module, seed):
    """`module` with weights well away from init, so every part matters:
    LayerScale ~0.3, weight_g and norms ~1, linears ~1/sqrt(fan in), the rest ~0.1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith(("weight_g", "gamma")) or ("norm" in name and name.endswith("weight")):
                p.copy_((0.3 if name.endswith("gamma") else 1.0) + 0.1 * r)
            elif p.ndim >= 2 and not name.endswith(("_token", "pos_embed")):
                p.copy_(r / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(0.1 * r)
    return module


def clone_module(module):
    """copy.deepcopy that also works on dinov2's DINOHead: the old-style
    torch.nn.utils.weight_norm keeps a non-leaf `weight` attribute, which
    deepcopy refuses; it is recomputed from weight_g/weight_v at every forward,
    so it is detached first."""
    for m in module.modules():
        if hasattr(m, "weight_g") and isinstance(getattr(m, "weight", None), torch.Tensor):
            if not isinstance(m.weight, nn.Parameter):
                m.weight = m.weight.detach()
    return copy.deepcopy(module)


class ReferenceStep:
    """dinov2's training iteration (train.py do_train body + SSLMetaArch), one process.

    ns: modules(...). student: {"backbone", "dino_head"[, "ibot_head"]} modules;
    teacher: the same keys, default clone_module of each student module (a plain
    copy.deepcopy fails on dinov2's DINOHead); its parameters get requires_grad
    False. The keyword arguments are dinov2's config entries (defaults from
    ssl_default_config.yaml; `lr` is cfg.optim.lr, i.e. after the scaling rule;
    epoch_length is train.OFFICIAL_EPOCH_LENGTH); centering is "centering"
    (alias "softmax_centering") or "sinkhorn_knopp". State to compare: .student,
    .teacher (nn.ModuleDict), .dino_loss.center, .ibot_patch_loss.center (see
    centers()), .optimizer, .grad_norms (per-module norms before clipping).
    """

    def __init__(self, ns, student, teacher=None, *, n_local_crops, lr, dino_loss_weight=1.0,
                 koleo_loss_weight=0.1, ibot_loss_weight=1.0, separate_ibot_head=False, centering="centering",
                 student_temp=0.1, center_momentum=0.9, layerwise_decay=0.9, patch_embed_lr_mult=0.2,
                 clip_grad=3.0, adamw_beta1=0.9, adamw_beta2=0.999, epoch_length=1250, epochs=100,
                 warmup_epochs=10, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4,
                 momentum_teacher=0.992, final_momentum_teacher=1.0, teacher_temp=0.07,
                 warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30, freeze_last_layer_epochs=1):
        assert dino_loss_weight > 0, "dinov2's SSLMetaArch needs the DINO loss (it builds the head there)"
        keys = ["backbone", "dino_head"] + (["ibot_head"] if separate_ibot_head else [])
        assert sorted(student) == sorted(keys), f"student keys {sorted(student)} != {keys}"
        teacher = {k: clone_module(m) for k, m in student.items()} if teacher is None else teacher
        self.student = nn.ModuleDict({k: student[k] for k in keys})
        self.teacher = nn.ModuleDict({k: teacher[k] for k in keys})
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.student.train()  # SSLMetaArch.train(): student train, teacher eval
        self.teacher.eval()
        self.ns, self.n_local_crops = ns, n_local_crops
        self.dino_loss_weight, self.koleo_loss_weight, self.ibot_loss_weight = (
            dino_loss_weight, koleo_loss_weight, ibot_loss_weight)
        self.do_dino, self.do_koleo, self.do_ibot = dino_loss_weight > 0, koleo_loss_weight > 0, ibot_loss_weight > 0
        self.ibot_separate_head = separate_ibot_head
        self.centering = {"softmax_centering": "centering"}.get(centering, centering)
        assert self.centering in ("centering", "sinkhorn_knopp"), centering
        self.clip_grad = clip_grad
        dino_out = self.student["dino_head"].last_layer.weight_v.shape[0]
        self.dino_loss = ns.DINOLoss(dino_out, student_temp=student_temp, center_momentum=center_momentum)
        self.koleo_loss = ns.KoLeoLoss()
        ibot_out = self.student["ibot_head" if separate_ibot_head else "dino_head"].last_layer.weight_v.shape[0]
        self.ibot_patch_loss = ns.iBOTPatchLoss(ibot_out, student_temp=student_temp, center_momentum=center_momentum)
        # SSLMetaArch.get_params_groups + train.py build_optimizer
        groups = []
        for m in self.student.values():
            fused = ns.fuse_params_groups(ns.get_params_groups_with_decay(
                m, lr_decay_rate=layerwise_decay, patch_embed_lr_mult=patch_embed_lr_mult))
            for g in fused:
                g["foreach"] = True
            groups += fused
        self.optimizer = torch.optim.AdamW(groups, betas=(adamw_beta1, adamw_beta2))
        (self.lr_schedule, self.wd_schedule, self.momentum_schedule, self.teacher_temp_schedule,
         self.last_layer_lr_schedule) = build_schedulers(
            ns.CosineScheduler, epoch_length=epoch_length, epochs=epochs, lr=lr, min_lr=min_lr,
            warmup_epochs=warmup_epochs, weight_decay=weight_decay, weight_decay_end=weight_decay_end,
            momentum_teacher=momentum_teacher, final_momentum_teacher=final_momentum_teacher,
            teacher_temp=teacher_temp, warmup_teacher_temp=warmup_teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs, freeze_last_layer_epochs=freeze_last_layer_epochs)
        self.grad_norms = {}

    @torch.no_grad()
    def _teacher_output(self, global_crops, upperbound, mask_indices_list, n_masked_patches,
                        n_masked_patches_tensor, teacher_temp):
        """SSLMetaArch.forward_backward's get_teacher_output."""
        n_global = 2
        out = self.teacher["backbone"](global_crops, is_training=True)
        cls = out["x_norm_clstoken"].chunk(n_global)
        cls = torch.cat((cls[1], cls[0]))  # swapped: crop A's teacher targets crop B's student
        patch = out["x_norm_patchtokens"]
        dim, n_cls = patch.shape[-1], cls.shape[0]
        ibot_t = None
        if self.do_ibot and not self.ibot_separate_head:
            buf = patch.new_zeros(upperbound + n_cls, dim)
            buf[:n_cls].copy_(cls)
            torch.index_select(patch.flatten(0, 1), dim=0, index=mask_indices_list,
                               out=buf[n_cls:n_cls + n_masked_patches])
            after = self.teacher["dino_head"](buf)
            cls_after, masked_after = after[:n_cls], after[n_cls:n_cls + n_masked_patches]
        elif self.do_ibot:
            buf = patch.new_zeros(upperbound, dim)
            torch.index_select(patch.flatten(0, 1), dim=0, index=mask_indices_list, out=buf[:n_masked_patches])
            cls_after = self.teacher["dino_head"](cls)
            masked_after = self.teacher["ibot_head"](buf)[:n_masked_patches]
        else:
            cls_after = self.teacher["dino_head"](cls)
        if self.centering == "centering":
            dino_t = self.dino_loss.softmax_center_teacher(cls_after, teacher_temp=teacher_temp).view(
                n_global, -1, *cls_after.shape[1:])
            self.dino_loss.update_center(cls_after)
            if self.do_ibot:
                masked_after = masked_after.unsqueeze(0)
                ibot_t = self.ibot_patch_loss.softmax_center_teacher(
                    masked_after[:, :n_masked_patches], teacher_temp=teacher_temp).squeeze(0)
                self.ibot_patch_loss.update_center(masked_after[:n_masked_patches])
        else:
            dino_t = self.dino_loss.sinkhorn_knopp_teacher(cls_after, teacher_temp=teacher_temp).view(
                n_global, -1, *cls_after.shape[1:])
            if self.do_ibot:
                with _one_process_all_reduce():
                    ibot_t = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                        masked_after, teacher_temp=teacher_temp, n_masked_patches_tensor=n_masked_patches_tensor)
        return dino_t, ibot_t

    def forward_backward(self, data, teacher_temp):
        """SSLMetaArch.forward_backward: teacher targets, student forward, the loss
        terms, loss.backward(). Returns the logged loss_dict as floats plus
        total_loss (train.py's logged sum of them) and backprop_loss (the
        accumulated loss that was differentiated)."""
        n_global, n_local = 2, self.n_local_crops
        global_crops, local_crops = data["collated_global_crops"], data["collated_local_crops"]
        masks, mask_indices_list = data["collated_masks"], data["mask_indices_list"]
        n_masked_patches_tensor = data["n_masked_patches"].clone()  # all_reduce would change it in place
        n_masked_patches, upperbound = mask_indices_list.shape[0], data["upperbound"]
        masks_weight = data["masks_weight"]
        n_local_terms = max(n_local * n_global, 1)
        n_global_terms = (n_global - 1) * n_global
        ibot_loss_scale = 1.0 / n_global

        dino_t, ibot_t = self._teacher_output(global_crops, upperbound, mask_indices_list, n_masked_patches,
                                              n_masked_patches_tensor, teacher_temp)
        losses, acc = {}, 0
        # dinov2: backbone([global, local], masks=[masks, None]) on the nested path
        s_global = self.student["backbone"](global_crops, masks=masks, is_training=True)
        s_local = self.student["backbone"](local_crops, masks=None, is_training=True)
        head_inputs = [s_local["x_norm_clstoken"], s_global["x_norm_clstoken"]]
        if self.do_ibot:
            patch = s_global["x_norm_patchtokens"]
            buf = patch.new_zeros(upperbound, s_global["x_norm_clstoken"].shape[-1])
            buf[:n_masked_patches].copy_(torch.index_select(patch.flatten(0, 1), dim=0, index=mask_indices_list))
            if not self.ibot_separate_head:
                head_inputs.append(buf)
            else:
                s_ibot = self.student["ibot_head"](buf)[:n_masked_patches]
        # dinov2: one dino_head call on the BlockDiagonalMask concatenation, split back
        outs = list(self.student["dino_head"](torch.cat(head_inputs)).split([len(x) for x in head_inputs]))
        s_local_after, s_global_after = outs.pop(0), outs.pop(0)
        if self.do_ibot and not self.ibot_separate_head:
            s_ibot = outs.pop(0)[:n_masked_patches]

        if n_local > 0:
            loss = self.dino_loss(student_output_list=s_local_after.chunk(n_local),
                                  teacher_out_softmaxed_centered_list=dino_t) / (n_global_terms + n_local_terms)
            losses["dino_local_crops_loss"] = loss
            acc = acc + self.dino_loss_weight * loss
        loss_scales = 2
        if self.do_dino:
            loss = self.dino_loss(student_output_list=[s_global_after],
                                  teacher_out_softmaxed_centered_list=[dino_t.flatten(0, 1)])
            loss = loss * loss_scales / (n_global_terms + n_local_terms)
            losses["dino_global_crops_loss"] = loss
            acc = acc + self.dino_loss_weight * loss
            if self.do_koleo:
                koleo = self.koleo_loss_weight * sum(self.koleo_loss(p) for p in s_global["x_norm_clstoken"].chunk(2))
                acc = acc + koleo
                losses["koleo_loss"] = koleo / loss_scales
        if self.do_ibot:
            loss = self.ibot_patch_loss.forward_masked(s_ibot, ibot_t, student_masks_flat=masks,
                                                       n_masked_patches=n_masked_patches, masks_weight=masks_weight)
            loss = loss * loss_scales * ibot_loss_scale
            losses["ibot_loss"] = loss / 2
            acc = acc + self.ibot_loss_weight * loss
        acc.backward()
        out = {k: v.item() for k, v in losses.items()}
        out["total_loss"] = sum(out.values())
        out["backprop_loss"] = acc.item()
        return out

    @torch.no_grad()
    def update_teacher(self, m):
        """SSLMetaArch.update_teacher: teacher = teacher * m + student * (1 - m)."""
        t = [p for k in self.student for p in self.teacher[k].parameters()]
        s = [p for k in self.student for p in self.student[k].parameters()]
        torch._foreach_mul_(t, m)
        torch._foreach_add_(t, s, alpha=1 - m)

    def step(self, iteration, data):
        """One do_train iteration: schedules at `iteration`, zero_grad,
        forward_backward, per-module clip_grad_norm_ (unless clip_grad is 0),
        AdamW step, teacher EMA. Returns the losses and the schedule values."""
        lr, wd = self.lr_schedule[iteration], self.wd_schedule[iteration]
        mom, teacher_temp = self.momentum_schedule[iteration], self.teacher_temp_schedule[iteration]
        last_layer_lr = self.last_layer_lr_schedule[iteration]
        apply_optim_scheduler(self.optimizer, lr, wd, last_layer_lr)
        self.optimizer.zero_grad(set_to_none=True)
        out = self.forward_backward(data, teacher_temp=teacher_temp)
        if self.clip_grad:
            self.grad_norms = {k: float(nn.utils.clip_grad_norm_(v.parameters(), self.clip_grad))
                               for k, v in self.student.items()}
        self.optimizer.step()
        self.update_teacher(mom)
        if math.isnan(out["total_loss"]):
            raise AssertionError("NaN loss (train.py raises here too)")
        out.update(lr=float(lr), wd=float(wd), mom=float(mom), teacher_temp=float(teacher_temp),
                   last_layer_lr=float(last_layer_lr))
        return out

    def centers(self):
        """{"dino": (1, K), "ibot": (1, 1, K)} centers after folding in the pending
        update (dinov2 folds it in lazily, at the next softmax_center_teacher;
        folding it earlier changes nothing)."""
        self.dino_loss.apply_center_update()
        self.ibot_patch_loss.apply_center_update()
        return {"dino": self.dino_loss.center.clone(), "ibot": self.ibot_patch_loss.center.clone()}
