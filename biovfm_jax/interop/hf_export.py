"""Exports a checkpoint as a transformers model folder, with a model card.

    python -m biovfm_jax.interop export --format=hf --src=RUN --out=FOLDER --license=...

The folder holds config.json, model.safetensors (written with
safetensors.numpy: exporting needs neither torch nor transformers),
preprocessor_config.json and README.md (a model card in the Hub's format).
`AutoModel.from_pretrained(FOLDER)` loads it with no missing or unexpected
keys. The class follows the encoder:

  pos_embed='rope'                 DINOv3ViTModel
  registers                        Dinov2WithRegistersModel
  LayerScale, SwiGLU or mask token Dinov2Model
  otherwise (MAE encoders)         ViTModel (a sin-cos table is written as its
                                   position embeddings, with a zero cls row)
  --with-decoder (an MAE run)      ViTMAEForPreTraining, the decoder included

Parts a class has and ours lacks are written as their identity: LayerScale
of ones (Dinov2, DINOv3), a zero mask token, a zero key bias. ViTModel's
pooler, which ours has no counterpart of, is written as the identity
(pooler_output = tanh(final-norm cls token)). What a class cannot represent
exactly (no class token, a LayerScale on ViTModel ...) is a ConversionError
naming the field.

Weight names are those transformers' save_pretrained writes, so older
transformers versions read the folder too.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from biovfm_jax.interop import core
from biovfm_jax.interop.model_card import model_card
from biovfm_jax.models.patches import sincos_2d
from biovfm_jax.models.vit import ViTConfig

# The DINOv3 class; the others are named by the table in the docstring.
DINOV3 = "DINOv3ViTModel"
DEFAULT_TAGS = ("biovfm-jax", "medical-imaging", "self-supervised", "vision-transformer")
_LICENSE = re.compile(r"[a-z0-9][a-z0-9.\-]*")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*")


@dataclasses.dataclass
class Export:
  """What export_hf writes, before it is written (all in memory)."""
  architecture: str
  model_type: str
  config: dict[str, Any]
  weights: dict[str, np.ndarray]
  preprocessor: dict[str, Any]
  card: str


# --------------------------------------------------------------------------
# Class choice


def choose_class(config: ViTConfig, with_decoder: bool = False) -> tuple[str, str]:
  """(architecture, model_type) that represents `config` exactly; raises
  ConversionError naming the field when none does."""
  def refuse(cls: str, field: str, why: str):
    raise core.ConversionError(f"{cls} cannot represent config.model.{field}="
                               f"{getattr(config, field)!r}: {why}")

  rope = config.pos_embed == "rope"
  if with_decoder:
    cls = "ViTMAEForPreTraining"
    if rope:
      refuse(cls, "pos_embed", "ViTMAE has absolute position embeddings")
    if config.num_registers:
      refuse(cls, "num_registers", "ViTMAE has no register tokens")
    if config.layerscale_init is not None:
      refuse(cls, "layerscale_init", "ViTMAE has no LayerScale")
    if config.ffn != "mlp":
      refuse(cls, "ffn", "ViTMAE's FFN is a GELU MLP")
    if config.mask_token:
      refuse(cls, "mask_token", "ViTMAE's encoder has no mask token")
    pair = (cls, "vit_mae")
  elif rope:
    if config.rope_normalize != "separate":
      refuse(DINOV3, "rope_normalize", "transformers normalises each axis by its "
             "own length ('separate')")
    pair = (DINOV3, "dinov3_vit")
  elif config.num_registers:
    pair = ("Dinov2WithRegistersModel", "dinov2_with_registers")
  elif config.layerscale_init is not None or config.ffn == "swiglu" or config.mask_token:
    pair = ("Dinov2Model", "dinov2")
  else:
    pair = ("ViTModel", "vit")
  if not config.class_token:
    refuse(pair[0], "class_token", f"{pair[0]} always has a class token")
  return pair


# --------------------------------------------------------------------------
# Weights


def _f32(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _linear(sd: dict, name: str, kernel, bias=None) -> None:
  """Our (in, out) kernel -> torch Linear `name` (weight (out, in))."""
  sd[f"{name}.weight"] = _f32(kernel).T
  if bias is not None:
    sd[f"{name}.bias"] = _f32(bias)


def _ln(sd: dict, name: str, p: Mapping) -> None:
  sd[f"{name}.weight"] = _f32(p["scale"])
  sd[f"{name}.bias"] = _f32(p["bias"])


def _patch_conv(config: ViTConfig, patch: Mapping) -> tuple[np.ndarray, np.ndarray]:
  """(p*p*C, D) over (row, col, channel) -> Conv2d weight (D, C, p, p), bias."""
  p, c, d = config.patch_size, config.in_channels, config.width
  return (_f32(patch["kernel"]).reshape(p, p, c, d).transpose(3, 2, 0, 1),
          _f32(patch["bias"]))


def _attention(cfg: ViTConfig, attn: Mapping) -> dict[str, tuple]:
  """Our fused attention -> {'q'|'k'|'v'|'o': (kernel (in, out), bias)}."""
  d = cfg.width
  qkv = _f32(attn["qkv_kernel"]).reshape(d, 3, d)
  bias = _f32(attn["qkv_bias"]).reshape(3, d)
  out = {n: (qkv[:, i], bias[i]) for i, n in enumerate("qkv")}
  if not getattr(cfg, "key_bias", True):  # held at zero in our forward
    out["k"] = (qkv[:, 1], np.zeros(d, np.float32))
  out["o"] = (_f32(attn["proj_kernel"]).reshape(d, d), attn["proj_bias"])
  return out


def _layerscale(cfg: ViTConfig, blk: Mapping, name: str) -> np.ndarray:
  if cfg.layerscale_init is None:  # no LayerScale: ones are the identity
    return np.ones(cfg.width, np.float32)
  return _f32(blk[name]["gamma"])


def _position_table(cfg: ViTConfig, params: Mapping) -> np.ndarray:
  """(1, 1 + N, D): the cls row and the patch rows, as ViT/Dinov2 add them."""
  if cfg.pos_embed == "sincos":
    g = cfg.grid_size
    table = np.concatenate([np.zeros((1, cfg.width), np.float32),
                            sincos_2d(cfg.width, g, g)])
  else:
    table = _f32(params["pos_embed"])
  return table[None]


def _vit_blocks(cfg: ViTConfig, params: Mapping, sd: dict, prefix: str) -> None:
  """Blocks in ViT/ViTMAE's file layout (encoder.layer.<i>.*)."""
  for i, blk in enumerate(core.unscanned_blocks(cfg, params)):
    b = f"{prefix}{i}."
    _ln(sd, b + "layernorm_before", blk["norm1"])
    att = _attention(cfg, blk["attn"])
    for n, hf in (("q", "query"), ("k", "key"), ("v", "value")):
      _linear(sd, f"{b}attention.attention.{hf}", *att[n])
    _linear(sd, b + "attention.output.dense", *att["o"])
    _ln(sd, b + "layernorm_after", blk["norm2"])
    mlp = blk["mlp"]
    _linear(sd, b + "intermediate.dense", mlp["fc1"]["kernel"], mlp["fc1"]["bias"])
    _linear(sd, b + "output.dense", mlp["fc2"]["kernel"], mlp["fc2"]["bias"])


def _vit_weights(cfg: ViTConfig, params: Mapping, prefix: str = "",
                 pooler: bool = True) -> dict[str, np.ndarray]:
  d = cfg.width
  sd: dict[str, np.ndarray] = {}
  e = prefix + "embeddings."
  sd[e + "cls_token"] = _f32(params["cls_token"]).reshape(1, 1, d)
  sd[e + "position_embeddings"] = _position_table(cfg, params)
  sd[e + "patch_embeddings.projection.weight"], sd[e + "patch_embeddings.projection.bias"] = (
      _patch_conv(cfg, params["patch_embed"]))
  _vit_blocks(cfg, params, sd, prefix + "encoder.layer.")
  _ln(sd, prefix + "layernorm", params["norm"])
  if pooler:  # no counterpart in ours: the identity (see the module docstring)
    _linear(sd, prefix + "pooler.dense", np.eye(d, dtype=np.float32),
            np.zeros(d, np.float32))
  return sd


def _dinov2_weights(cfg: ViTConfig, params: Mapping) -> dict[str, np.ndarray]:
  d = cfg.width
  sd: dict[str, np.ndarray] = {}
  sd["embeddings.cls_token"] = _f32(params["cls_token"]).reshape(1, 1, d)
  sd["embeddings.mask_token"] = (_f32(params["mask_token"]).reshape(1, d) if cfg.mask_token
                                 else np.zeros((1, d), np.float32))
  if cfg.num_registers:
    sd["embeddings.register_tokens"] = _f32(params["register_tokens"])[None]
  sd["embeddings.position_embeddings"] = _position_table(cfg, params)
  (sd["embeddings.patch_embeddings.projection.weight"],
   sd["embeddings.patch_embeddings.projection.bias"]) = _patch_conv(cfg, params["patch_embed"])
  for i, blk in enumerate(core.unscanned_blocks(cfg, params)):
    b = f"encoder.layer.{i}."
    _ln(sd, b + "norm1", blk["norm1"])
    att = _attention(cfg, blk["attn"])
    for n, hf in (("q", "query"), ("k", "key"), ("v", "value")):
      _linear(sd, f"{b}attention.attention.{hf}", *att[n])
    _linear(sd, b + "attention.output.dense", *att["o"])
    sd[b + "layer_scale1.lambda1"] = _layerscale(cfg, blk, "ls1")
    _ln(sd, b + "norm2", blk["norm2"])
    mlp = blk["mlp"]
    if cfg.ffn == "swiglu":  # weights_in = [gate; value], as DINOv2's w12
      _linear(sd, b + "mlp.weights_in", _f32(mlp["w12_kernel"]).reshape(d, -1),
              mlp["w12_bias"])
      _linear(sd, b + "mlp.weights_out", mlp["w3"]["kernel"], mlp["w3"]["bias"])
    else:
      _linear(sd, b + "mlp.fc1", mlp["fc1"]["kernel"], mlp["fc1"]["bias"])
      _linear(sd, b + "mlp.fc2", mlp["fc2"]["kernel"], mlp["fc2"]["bias"])
    sd[b + "layer_scale2.lambda1"] = _layerscale(cfg, blk, "ls2")
  _ln(sd, "layernorm", params["norm"])
  return sd


def _dinov3_weights(cfg: ViTConfig, params: Mapping) -> dict[str, np.ndarray]:
  d = cfg.width
  sd: dict[str, np.ndarray] = {}
  sd["embeddings.cls_token"] = _f32(params["cls_token"]).reshape(1, 1, d)
  sd["embeddings.mask_token"] = (_f32(params["mask_token"]).reshape(1, 1, d)
                                 if cfg.mask_token else np.zeros((1, 1, d), np.float32))
  regs = (_f32(params["register_tokens"]) if cfg.num_registers
          else np.zeros((0, d), np.float32))
  sd["embeddings.register_tokens"] = regs[None]
  sd["embeddings.patch_embeddings.weight"], sd["embeddings.patch_embeddings.bias"] = (
      _patch_conv(cfg, params["patch_embed"]))
  key_bias = bool(getattr(cfg, "key_bias", True))
  for i, blk in enumerate(core.unscanned_blocks(cfg, params)):
    b = f"layer.{i}."
    _ln(sd, b + "norm1", blk["norm1"])
    att = _attention(cfg, blk["attn"])
    for n in "qvo":
      _linear(sd, f"{b}attention.{n}_proj", *att[n])
    _linear(sd, b + "attention.k_proj", att["k"][0], att["k"][1] if key_bias else None)
    sd[b + "layer_scale1.lambda1"] = _layerscale(cfg, blk, "ls1")
    _ln(sd, b + "norm2", blk["norm2"])
    mlp = blk["mlp"]
    if cfg.ffn == "swiglu":
      w12, b12 = _f32(mlp["w12_kernel"]), _f32(mlp["w12_bias"]).reshape(2, -1)
      _linear(sd, b + "mlp.gate_proj", w12[:, 0], b12[0])
      _linear(sd, b + "mlp.up_proj", w12[:, 1], b12[1])
      _linear(sd, b + "mlp.down_proj", mlp["w3"]["kernel"], mlp["w3"]["bias"])
    else:
      _linear(sd, b + "mlp.up_proj", mlp["fc1"]["kernel"], mlp["fc1"]["bias"])
      _linear(sd, b + "mlp.down_proj", mlp["fc2"]["kernel"], mlp["fc2"]["bias"])
    sd[b + "layer_scale2.lambda1"] = _layerscale(cfg, blk, "ls2")
  _ln(sd, "norm", params["norm"])
  return sd


def _decoder_weights(cfg: ViTConfig, params: Mapping, decoder: Mapping) -> dict:
  """MaskedAutoencoder's decoder -> ViTMAEForPreTraining's decoder.*."""
  from biovfm_jax.models.mae import decoder_config
  dec = decoder_config(cfg, width=decoder["decoder_width"], depth=decoder["decoder_depth"],
                       heads=decoder["decoder_heads"], mlp_dim=decoder["decoder_mlp_dim"])
  dw, g = dec.width, cfg.grid_size
  sd: dict[str, np.ndarray] = {}
  _linear(sd, "decoder.decoder_embed", params["decoder_embed"]["kernel"],
          params["decoder_embed"]["bias"])
  sd["decoder.mask_token"] = _f32(params["mask_token"]).reshape(1, 1, dw)
  sd["decoder.decoder_pos_embed"] = np.concatenate(
      [np.zeros((1, dw), np.float32), sincos_2d(dw, g, g)])[None].astype(np.float32)
  _vit_blocks(dec, {"blocks": params["decoder_blocks"]}, sd, "decoder.decoder_encoder.layer.")
  _ln(sd, "decoder.decoder_norm", params["decoder_norm"])
  _linear(sd, "decoder.decoder_pred", params["decoder_pred"]["kernel"],
          params["decoder_pred"]["bias"])
  return sd


def hf_weights(config: ViTConfig, params: Mapping, *, decoder: Mapping | None = None,
               architecture: str | None = None) -> dict[str, np.ndarray]:
  """Our params -> the state dict transformers' `architecture` saves.

  `params` are VisionTransformer params, or with `decoder` (its kwargs) a
  MaskedAutoencoder's ({'encoder': ..., 'decoder_*': ...})."""
  architecture = architecture or choose_class(config, decoder is not None)[0]
  if decoder is not None:
    core.check_params(config, params, dict(decoder))
    sd = _vit_weights(config, params["encoder"], prefix="vit.", pooler=False)
    sd.update(_decoder_weights(config, params, decoder))
  else:
    core.check_params(config, params)
    if architecture == "ViTModel":
      sd = _vit_weights(config, params)
    elif architecture == DINOV3:
      sd = _dinov3_weights(config, params)
    else:
      sd = _dinov2_weights(config, params)
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


# --------------------------------------------------------------------------
# config.json


def _dinov2_mlp_ratio(cfg: ViTConfig) -> int:
  """The integer mlp_ratio (transformers' Dinov2 configs take no other) with
  which Dinov2 builds cfg.mlp_dim hidden units: D * ratio for the MLP; SwiGLU
  keeps 2/3 of it, rounded up to a multiple of 8."""
  d = cfg.width
  for r in range(1, 65):
    h = d * r
    if h == cfg.mlp_dim if cfg.ffn == "mlp" else (int(h * 2 / 3) + 7) // 8 * 8 == cfg.mlp_dim:
      return r
  raise core.ConversionError(
      f"Dinov2 cannot build config.model.mlp_dim={cfg.mlp_dim} ({cfg.ffn}) at width {d}: "
      "its hidden size comes from an integer mlp_ratio")


def hf_config(config: ViTConfig, architecture: str, model_type: str, *,
              decoder: Mapping | None = None, mae: Mapping | None = None) -> dict:
  """config.json for `architecture` (the fields transformers' config reads)."""
  out = {
      "architectures": [architecture], "model_type": model_type,
      "hidden_size": config.width, "num_hidden_layers": config.depth,
      "num_attention_heads": config.num_heads, "intermediate_size": config.mlp_dim,
      "hidden_act": "gelu", "layer_norm_eps": float(config.layernorm_eps),
      "image_size": config.image_size, "patch_size": config.patch_size,
      "num_channels": config.in_channels, "initializer_range": 0.02, "dtype": "float32",
  }
  if model_type == "dinov3_vit":
    out.update(
        attention_dropout=0.0, drop_path_rate=0.0, rope_theta=float(config.rope_base),
        query_bias=True, key_bias=bool(getattr(config, "key_bias", True)), value_bias=True,
        proj_bias=True, mlp_bias=True,
        layerscale_value=float(config.layerscale_init or 1.0),
        use_gated_mlp=config.ffn == "swiglu", num_register_tokens=config.num_registers,
        pos_embed_shift=config.rope_shift, pos_embed_jitter=config.rope_jitter,
        pos_embed_rescale=config.rope_rescale, apply_layernorm=True,
        reshape_hidden_states=True)
    if config.ffn == "swiglu":
      out["hidden_act"] = "silu"
    return out
  out.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, qkv_bias=True)
  if model_type.startswith("dinov2"):
    out.update(mlp_ratio=_dinov2_mlp_ratio(config),
               layerscale_value=float(config.layerscale_init or 1.0),
               use_swiglu_ffn=config.ffn == "swiglu", drop_path_rate=0.0,
               apply_layernorm=True, reshape_hidden_states=True)
    if model_type == "dinov2":
      out["use_mask_token"] = True
    else:
      out["num_register_tokens"] = config.num_registers
  elif model_type == "vit":
    out.update(encoder_stride=config.patch_size, pooler_output_size=config.width,
               pooler_act="tanh")
  else:  # vit_mae
    mae = dict(mae or {})
    out.update(decoder_hidden_size=decoder["decoder_width"],
               decoder_num_hidden_layers=decoder["decoder_depth"],
               decoder_num_attention_heads=decoder["decoder_heads"],
               decoder_intermediate_size=decoder["decoder_mlp_dim"],
               mask_ratio=float(mae.get("mask_ratio", 0.75)),
               norm_pix_loss=bool(mae.get("norm_pix_loss", True)))
  return out


def preprocessor_config(config: ViTConfig, mean: Sequence[float],
                        std: Sequence[float]) -> dict:
  """An image processor that gives what our input pipeline gives: RGB,
  x / 255, then (x - mean) / std, at the model's image size (bilinear)."""
  return {"image_processor_type": "ViTImageProcessor", "do_convert_rgb": True,
          "do_resize": True, "size": {"height": config.image_size,
                                      "width": config.image_size},
          "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
          "do_normalize": True, "image_mean": [float(x) for x in mean],
          "image_std": [float(x) for x in std]}


# --------------------------------------------------------------------------
# Reading the checkpoint


def _decoder_kwargs(run: dict, params: Mapping, decoder_heads: int | None) -> dict:
  """MaskedAutoencoder kwargs of a checkpoint's decoder: the run JSON's
  (imports record them), else the shapes plus the heads (not in any shape)."""
  mae = run.get("mae") or {}
  if run.get("decoder"):
    found = dict(run["decoder"])
  else:
    layers = params["decoder_blocks"]["layers"]
    flat = core.flatten_params(layers)
    fc1 = next(v for k, v in flat.items() if k.endswith("mlp/fc1/kernel"))
    kernel = np.shape(params["decoder_embed"]["kernel"])
    # Per layer ({i: ...}) or scanned (a leading layer axis).
    depth = (len(layers) if all(str(k).isdigit() for k in layers) else np.shape(fc1)[0])
    found = {"decoder_width": int(kernel[1]), "decoder_depth": int(depth),
             "decoder_mlp_dim": int(np.shape(fc1)[-1]),
             "decoder_heads": mae.get("decoder_heads")}
  if decoder_heads is not None:
    if found.get("decoder_heads") not in (None, decoder_heads):
      raise core.ConversionError(f"--decoder-heads={decoder_heads}, but the run records "
                                 f"decoder_heads={found['decoder_heads']}")
    found["decoder_heads"] = decoder_heads
  if found.get("decoder_heads") is None:
    raise core.ConversionError("the run does not record its decoder's heads (no shape "
                               "shows them): pass --decoder-heads (the run's "
                               "config.mae.decoder_heads; 16 in every config here)")
  return {k: int(found[k]) for k in ("decoder_width", "decoder_depth", "decoder_heads",
                                     "decoder_mlp_dim")}


def read_checkpoint(src: str, step: int | None = None, *, with_decoder: bool = False,
                    decoder_heads: int | None = None):
  """(step_dir, run JSON, ViTConfig, params, decoder kwargs or None), host numpy.
  With a decoder the params are the MaskedAutoencoder's."""
  from biovfm_jax.evaluate.encoder import encoder_config
  from biovfm_jax.train import checkpoint as ckpt_lib
  step_dir = ckpt_lib.find_step_dir(src, step)
  run = ckpt_lib.read_run(step_dir)
  config = encoder_config(run, step_dir)
  backbone = run.get("backbone", "params/encoder")
  if not with_decoder:
    params = ckpt_lib.restore_host(step_dir, tuple(backbone.split("/")))
    return step_dir, run, config, params, None
  if backbone != "params/encoder":
    raise core.ConversionError(
        f"--with-decoder needs an MAE checkpoint (backbone params/encoder); {step_dir} "
        f"is a {run.get('objective', '?')!r} checkpoint (backbone {backbone})")
  params = ckpt_lib.restore_host(step_dir, ("params",))
  if "decoder_embed" not in params:
    raise core.ConversionError(f"{step_dir}: no MAE decoder in params")
  decoder = _decoder_kwargs(run, params, decoder_heads)
  return step_dir, run, config, params, decoder


# --------------------------------------------------------------------------
# The export


def default_normalisation(run: dict) -> tuple[list[float], list[float], str]:
  """(mean, std, where from): the run's config.data.mean/std as its run JSON
  records them (keys data_mean, data_std), else the default of every config
  here (configs/common.py: ImageNet's)."""
  from data_pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD
  if run.get("data_mean") is not None and run.get("data_std") is not None:
    mean, std, why = run["data_mean"], run["data_std"], "the run's config.data.mean/std"
  else:
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    why = ("the configs' default config.data.mean/std (ImageNet's); the checkpoint does "
           "not record the run's own")
  return [float(x) for x in mean], [float(x) for x in std], why


def check_license(license: str) -> str:
  if not license or not _LICENSE.fullmatch(license):
    raise core.ConversionError(f"--license={license!r}: give a Hub license identifier "
                               "(e.g. apache-2.0, cc-by-nc-4.0, other)")
  return license


def build_export(src: str, *, name: str, step: int | None = None,
                 with_decoder: bool = False, license: str, results: str | None = None,
                 tags: Sequence[str] = (), decoder_heads: int | None = None,
                 image_mean: Sequence[float] | None = None,
                 image_std: Sequence[float] | None = None) -> tuple[Export, dict]:
  """Everything export_hf writes, in memory, and a summary."""
  check_license(license)
  for t in tags:
    if not _TAG.fullmatch(t):
      raise core.ConversionError(f"--tags: {t!r} is not a tag (letters, digits, . _ -)")
  if decoder_heads is not None and not with_decoder:
    raise core.ConversionError("--decoder-heads only applies with --with-decoder")
  step_dir, run, config, params, decoder = read_checkpoint(
      src, step, with_decoder=with_decoder, decoder_heads=decoder_heads)
  architecture, model_type = choose_class(config, with_decoder)
  weights = hf_weights(config, params, decoder=decoder, architecture=architecture)
  cfg = hf_config(config, architecture, model_type, decoder=decoder, mae=run.get("mae"))
  mean, std, why = default_normalisation(run)
  if image_mean is not None or image_std is not None:
    why = "given at export (--image-mean/--image-std)"
  mean = list(image_mean) if image_mean is not None else mean
  std = list(image_std) if image_std is not None else std
  objective = str(run.get("objective", "")).strip()
  all_tags = list(dict.fromkeys([*DEFAULT_TAGS,
                                 *([objective] if _TAG.fullmatch(objective) else []),
                                 *tags]))
  card = model_card(name=name, step_dir=step_dir, run=run, config=config,
                    architecture=architecture, decoder=decoder, license=license,
                    tags=all_tags, mean=mean, std=std, norm_source=why, results=results)
  export = Export(architecture, model_type, cfg, weights,
                  preprocessor_config(config, mean, std), card)
  summary = {"checkpoint": step_dir, "architecture": architecture,
             "model_type": model_type, "tensors": len(weights)}
  return export, summary


def write_folder(out: str, export: Export, metadata: Mapping[str, str]) -> list[str]:
  """Writes the folder atomically: into a temporary sibling, renamed into place.
  Refuses an `out` that exists and is not an empty folder."""
  from safetensors.numpy import save
  out = os.path.abspath(out)
  if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
    raise FileExistsError(f"--out={out} exists and is not an empty folder; this "
                          "export never overwrites files: choose a new folder")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  files = {
      "config.json": json.dumps(export.config, indent=2, sort_keys=True) + "\n",
      "preprocessor_config.json": json.dumps(export.preprocessor, indent=2,
                                             sort_keys=True) + "\n",
      "README.md": export.card,
  }
  try:
    # mkdtemp makes the folder 0700; a model folder is read by others like any file.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for fname, text in files.items():
      with open(os.path.join(tmp, fname), "w") as f:
        f.write(text)
    with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
      f.write(save(export.weights, metadata={"format": "pt", **metadata}))
    if os.path.isdir(out):
      os.rmdir(out)  # empty (checked above); fails if something appeared since
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return sorted([*files, "model.safetensors"])


def export_hf(src: str, out: str, **kwargs) -> dict:
  """`interop export --format=hf`: see the module docstring and build_export."""
  from data_pipeline import storage
  if storage.is_remote(out):
    raise ValueError(f"--out={out}: write the folder locally (then upload it)")
  out = os.path.abspath(out)
  if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
    raise FileExistsError(f"--out={out} exists and is not an empty folder; this "
                          "export never overwrites files: choose a new folder")
  export, summary = build_export(src, name=os.path.basename(out), **kwargs)
  meta = {"source": summary["checkpoint"], "architecture": summary["architecture"]}
  files = write_folder(out, export, meta)
  return {"out": out, **summary, "files": files}
