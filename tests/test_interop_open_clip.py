"""open_clip checkpoints in (--format=open_clip): the timm ViT trunk of the
vision tower (BiomedCLIP's layout) against the trunk's own forward_features,
on random, perturbed weights built offline."""
import json
import logging

import numpy as np
import open_clip
import pytest
import safetensors.torch
import torch

from biovfm_jax import load_encoder
from biovfm_jax.interop.__main__ import main as cli_main
from biovfm_jax.train import checkpoint as ckpt_lib

RTOL = 1e-5
IMAGE = 32
_TEXT = open_clip.CLIPTextCfg(context_length=8, vocab_size=100, width=32, heads=2, layers=1)


def _timm_clip(seed=0):
  """A CLIP whose vision tower is timm's vit_tiny trunk (+ a linear head), with
  noise on every tensor (LayerNorm weights stay near 1)."""
  vision = open_clip.CLIPVisionCfg(timm_model_name="vit_tiny_patch16_224",
                                   timm_model_pretrained=False, timm_pool="",
                                   timm_proj="linear", image_size=IMAGE)
  torch.manual_seed(seed)
  model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=_TEXT)
  model.visual.set_input_size(IMAGE)  # CLIP leaves the timm trunk at 224
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  return model.eval(), vision


def _save_folder(model, vision, folder):
  """The layout open_clip's save_for_hf writes (BiomedCLIP's): weights and
  open_clip_config.json."""
  folder.mkdir()
  torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
  cfg = {"embed_dim": 32, "vision_cfg": {k: v for k, v in vars(vision).items()
                                         if k.startswith("timm_") or k == "image_size"}}
  hf_cfg = {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
  (folder / "open_clip_config.json").write_text(json.dumps(hf_cfg))


def _images(n=8, seed=1):  # 8: one per fake device
  return np.random.default_rng(seed).normal(size=(n, IMAGE, IMAGE, 3)).astype(np.float32)


def _close(ours, ref):
  ref = np.asarray(ref)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=RTOL * np.abs(ref).max())


def _check_parity(model, out):
  enc = load_encoder(str(out))
  x = _images()
  with torch.no_grad():
    ref = model.visual.trunk.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
  got = enc(x)
  _close(np.asarray(got["cls"]), ref[:, 0])
  _close(np.asarray(got["patch_tokens"]), ref[:, 1:])


def test_folder_matches_the_trunk(tmp_path, caplog):
  model, vision = _timm_clip()
  src, out = tmp_path / "clip", tmp_path / "run"
  _save_folder(model, vision, src)
  caplog.set_level(logging.INFO)
  # No --model: open_clip_config.json names the trunk (vit_tiny -> T).
  assert cli_main(["import", "--format=open_clip", f"--src={src}", f"--out={out}"]) == 0
  _check_parity(model, out)
  run = ckpt_lib.read_run(ckpt_lib.find_step_dir(str(out), None))
  assert run["encoder"]["image_size"] == IMAGE and run["encoder"]["num_heads"] == 3
  assert run["source"]["timm_model_name"] == "vit_tiny_patch16_224"
  sd = model.state_dict()
  text = sum(not k.startswith("visual.") for k in sd)
  head = sum(k.startswith("visual.head.") for k in sd)
  lines = [r.getMessage() for r in caplog.records if "open_clip weights" in r.getMessage()]
  assert lines == [f"open_clip weights: ignored {text} text-tower/logit_scale keys "
                   f"and {head} vision head keys"]


def test_weights_file_needs_model(tmp_path, capsys):
  model, _ = _timm_clip(seed=1)
  src = tmp_path / "clip.safetensors"
  safetensors.torch.save_file(model.state_dict(), src)
  args = ["import", "--format=open_clip", f"--src={src}"]
  assert cli_main(args + [f"--out={tmp_path / 'a'}"]) == 2
  assert "pass size" in capsys.readouterr().err
  assert cli_main(args + [f"--out={tmp_path / 'b'}", "--model=T"]) == 0
  _check_parity(model, tmp_path / "b")


def test_native_vit_tower_is_refused(tmp_path, capsys):
  vision = open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16,
                                   image_size=IMAGE)
  model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=_TEXT)
  src = tmp_path / "clip.bin"
  torch.save(model.state_dict(), src)
  assert cli_main(["import", "--format=open_clip", f"--src={src}",
                   f"--out={tmp_path / 'run'}", "--num-heads=2"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert "only towers with a timm ViT trunk are supported" in err


# BiomedCLIP's own vision tower, as its open_clip_config.json gives it (the text
# tower, a PubMedBERT from the Hub there, is open_clip's smallest own here:
# nothing is downloaded).
BIOMEDCLIP_VISION = {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                     "timm_pool": "", "timm_proj": "linear", "image_size": 224}


@pytest.mark.slow
def test_biomedclip_vit_b16_trunk_at_224(tmp_path):
  vision = open_clip.CLIPVisionCfg(**BIOMEDCLIP_VISION)
  torch.manual_seed(0)
  model = open_clip.CLIP(embed_dim=512, vision_cfg=vision, text_cfg=_TEXT)
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  model.eval()
  src, out = tmp_path / "BiomedCLIP", tmp_path / "run"
  src.mkdir()
  torch.save(model.state_dict(), src / "open_clip_pytorch_model.bin")
  (src / "open_clip_config.json").write_text(json.dumps(
      {"model_cfg": {"embed_dim": 512, "vision_cfg": BIOMEDCLIP_VISION},
       "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                          "std": [0.26862954, 0.26130258, 0.27577711]}}))
  # The README's command for BiomedCLIP (section "Compare with published models").
  assert cli_main(["import", "--format=open_clip", f"--src={src}", f"--out={out}"]) == 0
  run = ckpt_lib.read_run(ckpt_lib.find_step_dir(str(out), None))
  enc = run["encoder"]
  assert (enc["width"], enc["depth"], enc["num_heads"], enc["patch_size"],
          enc["image_size"]) == (768, 12, 12, 16, 224)
  x = np.random.default_rng(1).normal(size=(8, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model.visual.trunk.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
  got = load_encoder(str(out))(x)
  _close(np.asarray(got["cls"]), ref[:, 0])
  _close(np.asarray(got["patch_tokens"]), ref[:, 1:])
