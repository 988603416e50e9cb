"""Command line for weight conversion.

  python -m biovfm_jax.interop import --format=timm --src=vit.safetensors --out=/tmp/vit --model=S
  python -m biovfm_jax.interop import --format=hf --src=hf_model_folder --out=/tmp/vit
  python -m biovfm_jax.interop import --format=open_clip --src=open_clip_folder --out=/tmp/vit
  python -m biovfm_jax.interop export --format=timm --src=/tmp/run --out=/tmp/vit.safetensors
  python -m biovfm_jax.interop export --format=hf --src=/tmp/run --out=/tmp/vit_hf --license=apache-2.0

`import` writes a checkpoint (workdir/checkpoints/0/) that evaluation
(load_encoder) reads like any other and pretraining can start from (with
MAE's decoder, and the DINO/iBOT heads of a DINOv2 training checkpoint); `export`
writes the encoder of any checkpoint in timm's layout, or (--format=hf) as a
transformers model folder with its preprocessor config and a model card
(README.md), ready for `huggingface-cli upload`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

IMPORT_FORMATS = ("timm", "mae", "dinov2", "hf", "open_clip")
EXPORT_FORMATS = ("timm", "hf")
# timm_model of an exported encoder that no named timm architecture fits.
CUSTOM_TIMM_MODEL = "VisionTransformer"


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m biovfm_jax.interop", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="PyTorch weights -> a checkpoint here")
  imp.add_argument("--format", required=True, choices=IMPORT_FORMATS)
  imp.add_argument("--src", required=True,
                   help=".safetensors, .pth, .pt or .bin weight file; for --format=hf "
                   "a transformers model folder (config.json and weights); for "
                   "--format=open_clip also a folder with open_clip_config.json")
  imp.add_argument("--out", required=True, help="workdir to write the checkpoint in")
  imp.add_argument("--model", default=None,
                   help="size ('T','S','B','L','H','g'): gives the number of heads")
  imp.add_argument("--num-heads", type=int, default=None,
                   help="number of heads, instead of --model")
  imp.add_argument("--image-size", type=int, default=None,
                   help="image size of the config (timm, dinov2); the learned "
                   "position table is resized when it differs from the file's")
  imp.add_argument("--decoder-heads", type=int, default=None,
                   help="MAE decoder heads (default 16, as every MAE release)")
  imp.add_argument("--key", default=None,
                   help="checkpoint key holding the weights (default: found)")
  exp = sub.add_parser("export", help="a checkpoint's encoder -> PyTorch weights")
  exp.add_argument("--format", required=True, choices=EXPORT_FORMATS)
  exp.add_argument("--src", required=True,
                   help="workdir, its checkpoints/ folder or one step's folder")
  exp.add_argument("--out", required=True,
                   help="output .safetensors file; for --format=hf a new (or empty) folder")
  exp.add_argument("--step", type=int, default=None, help="default: the latest")
  hf = exp.add_argument_group("--format=hf")
  hf.add_argument("--license", default=None,
                  help="required for --format=hf: the model card's license, a Hub "
                  "identifier (apache-2.0, cc-by-nc-4.0, other ...); the weights carry "
                  "the terms of the data they were trained on, which only you know")
  hf.add_argument("--with-decoder", action="store_true",
                  help="an MAE checkpoint as ViTMAEForPreTraining, its decoder included")
  hf.add_argument("--decoder-heads", type=int, default=None,
                  help="with --with-decoder, when the run does not record them: "
                  "the run's config.mae.decoder_heads")
  hf.add_argument("--results", default=None,
                  help="results store (CSV, or a glob): the card gets this "
                  "checkpoint's benchmark table")
  hf.add_argument("--tags", default="",
                  help="comma-separated extra model card tags")
  hf.add_argument("--image-mean", default=None,
                  help="comma-separated normalisation mean (default: the run's "
                  "config.data.mean where its checkpoint records it, else ImageNet's, "
                  "every config's default)")
  hf.add_argument("--image-std", default=None, help="as --image-mean, for the std")
  return ap


def run_import(args) -> dict:
  from biovfm_jax.interop import dinov2, mae, timm, torch_files
  if args.decoder_heads is not None and args.format != "mae":
    raise SystemExit("--decoder-heads only applies to --format=mae")
  ckpts = os.path.join(args.out, "checkpoints")
  if os.path.isdir(ckpts) and os.listdir(ckpts):
    raise SystemExit(f"{ckpts} already holds checkpoints; choose a new --out")
  if args.format == "hf":
    return _import_hf(args)
  if args.format == "open_clip":
    return _import_open_clip(args)
  sd = torch_files.load_state_dict(args.src, key=args.key)
  heads = dict(size=args.model, num_heads=args.num_heads)
  if args.format == "timm" and args.model is None and args.num_heads is None:
    # A file this tool exported says its own architecture (timm_kwargs).
    heads["num_heads"] = _timm_kwargs(args.src).get("num_heads")
  run = {"objective": args.format, "backbone": "params",
         "source": {"path": os.path.abspath(args.src), "format": args.format}}
  if args.format == "mae":
    if args.image_size is not None:
      raise SystemExit("--image-size does not apply to --format=mae (fixed "
                       "sin-cos positions follow the image size at run time)")
    config, params, decoder = mae.from_mae(
        sd, **heads, decoder_heads=args.decoder_heads or mae.MAE_DECODER_HEADS)
    run.update(backbone="params/encoder", decoder=decoder)
  else:
    fn = timm.from_timm if args.format == "timm" else dinov2.from_dinov2
    config, params = fn(sd, **heads, image_size=args.image_size)
    if args.format == "dinov2":
      # A training checkpoint's DINO/iBOT heads sit beside the backbone, so
      # continued pretraining can start from them too (when their shapes fit).
      dino_heads, arch = dinov2.from_dinov2_heads(sd, config.width)
      if dino_heads:
        params = {"backbone": params, **dino_heads}
        run.update(backbone="params/backbone", heads=arch)
  return _save(args.out, config, params, run)


def _save(out: str, config, params, run: dict) -> dict:
  """The import as a checkpoint (step 0) whose run JSON records the encoder."""
  from biovfm_jax.train.checkpoint import save_params
  run["encoder"] = dataclasses.asdict(config)
  step_dir = save_params(out, params, run, step=0)
  return {"checkpoint": step_dir, **run}


def _import_hf(args) -> dict:
  """A transformers folder: config.json gives the architecture."""
  from biovfm_jax.interop import hf
  if args.model is not None or args.num_heads is not None or args.key is not None:
    raise SystemExit("--model, --num-heads and --key do not apply to --format=hf "
                     "(config.json gives the architecture)")
  config, params, decoder, cfg = hf.from_hf(args.src, image_size=args.image_size)
  run = {"objective": "mae" if decoder else "hf", "backbone": "params",
         "source": {"path": os.path.abspath(args.src), "format": "hf",
                    "model_type": cfg["model_type"],
                    "architectures": cfg.get("architectures")}}
  if decoder:  # the layout --format=mae writes
    run.update(backbone="params/encoder", decoder=decoder)
  return _save(args.out, config, params, run)


def _import_open_clip(args) -> dict:
  """An open_clip model's timm ViT trunk (the vision tower before its head)."""
  from biovfm_jax.interop import open_clip
  config, params, vision = open_clip.from_open_clip(
      args.src, size=args.model, num_heads=args.num_heads, image_size=args.image_size,
      key=args.key)
  run = {"objective": "open_clip", "backbone": "params",
         "source": {"path": os.path.abspath(args.src), "format": "open_clip",
                    "timm_model_name": vision.get("timm_model_name")}}
  return _save(args.out, config, params, run)


def _timm_kwargs(path: str) -> dict:
  """The timm_kwargs metadata of a .safetensors file ({} when it has none)."""
  if not str(path).endswith(".safetensors"):
    return {}
  from safetensors import safe_open
  with safe_open(path, "np") as f:
    meta = f.metadata() or {}
  return json.loads(meta.get("timm_kwargs", "{}"))


def _floats(text: str | None, flag: str) -> list[float] | None:
  if text is None:
    return None
  try:
    values = [float(x) for x in text.split(",")]
  except ValueError:
    values = []
  if len(values) != 3:
    raise ValueError(f"{flag}={text!r}: give three comma-separated numbers (R,G,B)")
  return values


def _export_hf(args) -> dict:
  from biovfm_jax.interop import hf_export
  if args.license is None:
    raise ValueError("--format=hf needs --license (the model card's license: a Hub "
                     "identifier such as apache-2.0, cc-by-nc-4.0 or other)")
  return hf_export.export_hf(
      args.src, args.out, step=args.step, with_decoder=args.with_decoder,
      license=args.license, results=args.results,
      tags=[t.strip() for t in args.tags.split(",") if t.strip()],
      decoder_heads=args.decoder_heads,
      image_mean=_floats(args.image_mean, "--image-mean"),
      image_std=_floats(args.image_std, "--image-std"))


_HF_ONLY = ("license", "with_decoder", "decoder_heads", "results", "image_mean",
            "image_std")


def run_export(args) -> dict:
  if args.format == "hf":
    return _export_hf(args)
  given = [f"--{k.replace('_', '-')}" for k in _HF_ONLY if getattr(args, k)]
  if args.tags:
    given.append("--tags")
  if given:
    raise ValueError(f"{', '.join(given)} only apply to --format=hf")
  import jax
  from safetensors.numpy import save

  from data_pipeline import storage

  from biovfm_jax.evaluate.encoder import load_encoder
  from biovfm_jax.interop import core, timm
  if not args.out.endswith(".safetensors"):
    raise SystemExit(f"--out={args.out} must end in .safetensors")
  enc = load_encoder(args.src, step=args.step)
  config = enc.config
  sd = timm.to_timm(config, jax.device_get(enc.params))
  kwargs = timm.timm_model_kwargs(config)
  meta = {"format": "pt", "source": enc.source or args.src,
          "timm_kwargs": json.dumps(kwargs)}
  try:
    meta["timm_model"] = timm.timm_model_name(config)
  except core.ConversionError as e:
    # No named timm architecture: timm's VisionTransformer class from the kwargs.
    meta["timm_model"] = CUSTOM_TIMM_MODEL
    step = "" if args.step is None else f", step={args.step}"
    print(f"note: {e}. The file's metadata has timm_model={CUSTOM_TIMM_MODEL!r}. In Python:\n"
          "  import biovfm_jax, safetensors.torch; "
          "from biovfm_jax.interop.timm import create_timm_model\n"
          f"  model = create_timm_model(biovfm_jax.load_encoder({args.src!r}{step}).config); "
          f"model.load_state_dict(safetensors.torch.load_file({args.out!r}))", file=sys.stderr)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  # save_file writes mode 0600; write_bytes_atomic follows the umask like every
  # other file written here, and never leaves half a file.
  storage.write_bytes_atomic(args.out, save(sd, metadata=meta))
  return {"out": args.out, "timm_model": meta["timm_model"],
          "timm_kwargs": kwargs, "tensors": len(sd)}


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  from data_pipeline import storage
  args.src, args.out = storage.expand(args.src), storage.expand(args.out)
  try:
    result = run_import(args) if args.command == "import" else run_export(args)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    # Bad inputs (layouts, shapes, refused files) end in one line, not a traceback.
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result, indent=1, default=str))
  return 0


if __name__ == "__main__":
  sys.exit(main())
