"""`python -m biovfm_jax.interop export --format=hf`: transformers folders out.

Tiny checkpoints in the run layout (MAE with its decoder; DINOv2-like with
registers, SwiGLU, LayerScale and learned positions; RoPE with LayerScale,
no key bias and scanned blocks; and, for features only, a Dinov2Model and a
gated-MLP DINOv3), perturbed so that a dropped bias,
LayerScale or a transposed kernel shows, are exported and loaded by
transformers' AutoModel with no missing or unexpected keys; their features
match load_encoder's within 1e-5 (relative to the largest value). Each export
is imported back (`import --format=hf`) and continues pretraining."""
import dataclasses
import json
import logging
import os

import jax
import numpy as np
import pytest
import torch
import transformers as hf
import yaml
from flax import nnx

from biovfm_jax import load_encoder
from biovfm_jax import results as results_lib
from biovfm_jax.interop import hf as hf_import
from biovfm_jax.interop import hf_export
from biovfm_jax.interop.__main__ import main as cli_main
from biovfm_jax.models import MaskedAutoencoder, VisionTransformer, vit_config
from biovfm_jax.train import checkpoint as ckpt_lib
from test_init_from import _flat, _setup

RTOL = 1e-5
STEP, BATCH = 3, 16
# The tiny MAE of test_train_e2e (TINY["mae"]): main.py can continue it.
_T = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, image_size=32)
_DECODER = dict(decoder_width=32, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=128)
CONFIGS = {
    "mae": vit_config(None, **_T),
    "dinov2": vit_config(None, **_T, num_registers=2, layerscale_init=1e-5, ffn="swiglu",
                         pos_embed="learned", mask_token=True, init="dinov2"),
    "rope": vit_config(None, **_T, pos_embed="rope", key_bias=False, num_registers=1,
                       layerscale_init=1e-5, scan_layers=True, rope_rescale=2.0),
    # Features only: the other layouts of each class.
    "dinov2_plain": vit_config(None, **_T, layerscale_init=1e-5, pos_embed="sincos"),
    "rope_swiglu": vit_config(None, **_T, pos_embed="rope", ffn="swiglu"),
}
CLASSES = {"mae": "ViTModel", "dinov2": "Dinov2WithRegistersModel",
           "rope": "DINOv3ViTModel", "dinov2_plain": "Dinov2Model",
           "rope_swiglu": "DINOv3ViTModel"}
MEASURED: dict[str, float] = {}


def _perturbed(module, seed):
  params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x, np.float32)
                      + 0.05 * rng.normal(size=np.shape(x)).astype(np.float32), params)


def _run_json(config, shard_dir, **extra):
  from data_pipeline import shards as shards_lib
  manifest = shards_lib.read_manifest(shard_dir)
  return {"seed": 0, "batch_size": BATCH, "data_shards": shard_dir,
          "num_records": manifest["num_records"],
          "shards": [[s["file"], s["bytes"]] for s in manifest["shards"]],
          "total_steps": 10, "model_size": "", "encoder": dataclasses.asdict(config),
          **extra}


@pytest.fixture(scope="session")
def runs(tmp_path_factory, shard_dir):
  """{name: workdir}: step-3 checkpoints laid out as main.py lays them out."""
  tmp = tmp_path_factory.mktemp("runs")
  out = {}
  mae = MaskedAutoencoder(CONFIGS["mae"], **_DECODER, rngs=nnx.Rngs(0))
  out["mae"] = str(tmp / "mae")
  ckpt_lib.save_params(out["mae"], _perturbed(mae, 0), _run_json(
      CONFIGS["mae"], shard_dir, objective="mae", backbone="params/encoder"), step=STEP)
  for seed, name in enumerate(("dinov2", "rope", "dinov2_plain", "rope_swiglu"), 1):
    vit = VisionTransformer(CONFIGS[name], rngs=nnx.Rngs(seed))
    out[name] = str(tmp / name)
    ckpt_lib.save_params(out[name], {"backbone": _perturbed(vit, seed)}, _run_json(
        CONFIGS[name], shard_dir, objective="dinov2", backbone="params/backbone"),
                         step=STEP)
  return out


class _Records(logging.Handler):
  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def _load(cls, folder):
  """cls.from_pretrained(folder), asserting transformers reported no
  missing, unexpected or mismatched keys (in its return and in its log)."""
  handler = _Records()
  log = logging.getLogger("transformers")
  log.addHandler(handler)
  try:
    model, info = cls.from_pretrained(folder, output_loading_info=True)
  finally:
    log.removeHandler(handler)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  said = " ".join(handler.messages)
  for phrase in ("were not initialized", "were not used", "LOAD REPORT", "MISSING",
                 "UNEXPECTED", "MISMATCH"):
    assert phrase not in said, said
  return model.eval()


def _export(src, out, *flags):
  assert cli_main(["export", "--format=hf", f"--src={src}", f"--out={out}",
                   "--license=cc-by-nc-4.0", *flags]) == 0
  return str(out)


@pytest.fixture(scope="session")
def exports(runs, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("exports")
  out = {name: _export(src, tmp / name) for name, src in runs.items()}
  out["mae_decoder"] = _export(runs["mae"], tmp / "mae_decoder", "--with-decoder",
                               "--decoder-heads=2")
  return out


def _images(n=8, seed=1):  # 8: one per fake device
  return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)


def _rel(ours, ref) -> float:
  ours, ref = np.asarray(ours), np.asarray(ref)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_automodel_features_equal_load_encoders(name, runs, exports):
  model = _load(hf.AutoModel, exports[name])
  assert type(model).__name__ == CLASSES[name]
  x = _images()
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state
  got = load_encoder(runs[name])(x)
  split = 1 + CONFIGS[name].num_registers
  err = max(_rel(got["cls"], ref[:, 0]), _rel(got["patch_tokens"], ref[:, split:]))
  MEASURED[name] = err
  print(f"{name}: max relative error {err:.2e}")
  assert err <= RTOL


def test_rope_export_omits_the_key_bias(exports):
  cfg = json.load(open(os.path.join(exports["rope"], "config.json")))
  assert cfg["key_bias"] is False and cfg["rope_theta"] == 100.0
  assert cfg["pos_embed_rescale"] == 2.0 and cfg["pos_embed_jitter"] is None
  from safetensors import safe_open
  with safe_open(os.path.join(exports["rope"], "model.safetensors"), "np") as f:
    keys = set(f.keys())
    assert f.metadata()["format"] == "pt"
  assert "layer.0.attention.k_proj.weight" in keys
  assert "layer.0.attention.k_proj.bias" not in keys


def test_mae_with_decoder_is_vitmae_for_pretraining(runs, exports):
  model = _load(hf.AutoModelForPreTraining, exports["mae_decoder"])
  assert type(model).__name__ == "ViTMAEForPreTraining"
  cfg = model.config
  assert (cfg.decoder_hidden_size, cfg.decoder_num_hidden_layers,
          cfg.decoder_num_attention_heads, cfg.decoder_intermediate_size) == (32, 1, 2, 128)
  x = _images()
  n = CONFIGS["mae"].num_patches
  noise = np.random.default_rng(2).uniform(size=(len(x), n)).astype(np.float32)
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2),
                noise=torch.from_numpy(noise))
  step_dir = ckpt_lib.find_step_dir(runs["mae"])
  params = ckpt_lib.restore_host(step_dir, ("params",))
  mae = _merged(lambda: MaskedAutoencoder(CONFIGS["mae"], **_DECODER, rngs=nnx.Rngs(0)),
                params)
  pred, mask = mae(x, noise, mask_ratio=cfg.mask_ratio)
  np.testing.assert_array_equal(np.asarray(mask), ref.mask.numpy().astype(bool))
  err = _rel(pred, ref.logits)
  MEASURED["mae_decoder"] = err
  print(f"mae decoder: max relative error {err:.2e}")
  assert err <= RTOL
  # Every patch, in order (as the card says): the encoder's features.
  model.config.mask_ratio = 0.0
  with torch.no_grad():
    ref_all = model.vit(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2),
                        noise=torch.arange(n).float().expand(len(x), -1)).last_hidden_state
  got = load_encoder(runs["mae"])(x)
  assert max(_rel(got["cls"], ref_all[:, 0]), _rel(got["patch_tokens"], ref_all[:, 1:])) <= RTOL
  # The decoder's weights come back through `import --format=hf` unchanged.
  config, back, decoder, _ = hf_import.from_hf(exports["mae_decoder"])
  assert decoder == _DECODER
  want = {k: np.asarray(v) for k, v in _flat(params).items()}
  for k, v in _flat(back).items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)
  assert set(_flat(back)) == set(want)


def _merged(build, params):
  """A model holding `params` (saved, string layer keys), built without an init."""
  from biovfm_jax.interop import core
  graphdef, state, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  nnx.replace_by_pure_dict(state, core.nest(core.flatten_params(params)))
  return nnx.merge(graphdef, state, rest)


def test_image_processor_normalises_as_training(exports):
  from data_pipeline import transforms
  processor = hf.AutoImageProcessor.from_pretrained(exports["mae"])
  pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  got = processor(pixels, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  want = transforms.normalize(pixels, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  # Other sizes: resized as the evaluation loader resizes (PIL bilinear, antialiased).
  from data_pipeline import eval_loader
  for side in (48, 20):
    other = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    got = processor(other, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    want = transforms.normalize(eval_loader.resize(other, 32), transforms.IMAGENET_MEAN,
                                transforms.IMAGENET_STD)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  grey = pixels[..., 0]  # grey images are repeated to RGB, as our loaders do
  got = processor(np.stack([grey] * 3, -1), return_tensors="np")["pixel_values"][0]
  want = transforms.normalize(transforms.to_rgb(grey), transforms.IMAGENET_MEAN,
                              transforms.IMAGENET_STD)
  np.testing.assert_allclose(got.transpose(1, 2, 0), want, rtol=0, atol=1e-5)


def _front_matter(text):
  assert text.startswith("---\n")
  header, body = text[4:].split("\n---\n", 1)
  return yaml.safe_load(header), body


def test_model_card_header_and_training_facts(exports, shard_dir):
  meta, body = _front_matter(open(os.path.join(exports["dinov2"], "README.md")).read())
  assert meta["library_name"] == "transformers"
  assert meta["license"] == "cc-by-nc-4.0"
  assert meta["pipeline_tag"] == "image-feature-extraction"
  assert {"biovfm-jax", "medical-imaging", "self-supervised", "dinov2"} <= set(meta["tags"])
  assert "## Objective" in body and "DINOv2" in body
  assert "`Dinov2WithRegistersModel`" in body and "cls + 2 registers" in body
  assert f"- images seen: {STEP * BATCH:,} (step x global batch)" in body
  assert f"- steps: {STEP:,} of 10" in body
  assert f"`{shard_dir}`" in body
  # The manifest's counts per modality (the fixture's records are all CT).
  assert "| CT | 40 | 100.0% |" in body
  assert "the configs' default config.data.mean/std (ImageNet's)" in body


def test_model_card_results_table(runs, tmp_path):
  step_dir = ckpt_lib.find_step_dir(runs["mae"])
  rows = results_lib.evaluation_rows(
      {"dermamnist": {"auc": 0.9124, "acc": 0.8, "auc_ci": [0.9, 0.92]},
       "pathmnist": {"auc": 0.95, "acc": 0.85}},
      run="tiny", run_facts={"objective": "mae", "batch_size": BATCH}, checkpoint=step_dir,
      step=STEP, protocol="fast", params_encoder=1, model_size="T", data_subset="x",
      modality_subset="all")
  rows += results_lib.evaluation_rows(  # another checkpoint: not in the card
      {"bloodmnist": {"auc": 0.5, "acc": 0.5}}, run="other", run_facts={"objective": "mae"},
      checkpoint="/elsewhere/checkpoints/9", step=9, protocol="fast", params_encoder=1,
      model_size="T", data_subset="x", modality_subset="all")
  store = tmp_path / "results.csv"
  results_lib.append(store, rows)
  out = _export(runs["mae"], tmp_path / "hf", f"--results={store}", "--tags=demo",
                "--image-mean=0.5,0.5,0.5", "--image-std=0.5,0.5,0.5")
  meta, body = _front_matter(open(os.path.join(out, "README.md")).read())
  assert "demo" in meta["tags"]
  pre = json.load(open(os.path.join(out, "preprocessor_config.json")))
  assert pre["image_mean"] == pre["image_std"] == [0.5, 0.5, 0.5]
  assert "given at export (--image-mean/--image-std)" in body
  table = [line for line in body.split("## Results")[1].splitlines()
           if line.startswith("| ")]
  assert table == ["| benchmark | AUC | ACC |", "| Derma | 91.24 (90.00-92.00) | 80.00 |",
                   "| Path | 95.00 | 85.00 |", "| mean | 93.12 | 82.50 |"]
  assert "Blood" not in body


def test_refusals(runs, exports, tmp_path, capsys):
  # Never writes into a folder holding files it did not write.
  before = sorted(os.listdir(exports["mae"]))
  assert cli_main(["export", "--format=hf", f"--src={runs['mae']}",
                   f"--out={exports['mae']}", "--license=mit"]) == 2
  assert "not an empty folder" in capsys.readouterr().err
  assert sorted(os.listdir(exports["mae"])) == before
  # An empty folder is fine; no temporary folder is left beside it.
  (tmp_path / "empty").mkdir()
  _export(runs["mae"], tmp_path / "empty")
  assert sorted(os.listdir(tmp_path)) == ["empty"]
  capsys.readouterr()
  for flags, says in (
      ([], "needs --license"),
      (["--license=mit", "--with-decoder"], "needs an MAE checkpoint"),
      (["--license=Not A License"], "Hub license identifier")):
    src = runs["dinov2"] if "--with-decoder" in flags else runs["mae"]
    assert cli_main(["export", "--format=hf", f"--src={src}",
                     f"--out={tmp_path / 'x'}", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
  assert cli_main(["export", "--format=hf", f"--src={runs['mae']}", f"--out={tmp_path / 'x'}",
                   "--license=mit", "--with-decoder"]) == 2
  assert "--decoder-heads" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()
  # What a class cannot represent: one line naming the field.
  no_cls = dataclasses.replace(CONFIGS["mae"], class_token=False)
  with pytest.raises(hf_export.core.ConversionError, match="config.model.class_token=False"):
    hf_export.choose_class(no_cls)
  with pytest.raises(hf_export.core.ConversionError, match="config.model.layerscale_init"):
    hf_export.choose_class(dataclasses.replace(CONFIGS["mae"], layerscale_init=0.1), True)


# --- Continued pretraining from each export, imported back.


def _reimport(folder, tmp_path):
  out = tmp_path / "reimported"
  assert cli_main(["import", "--format=hf", f"--src={folder}", f"--out={out}"]) == 0
  return str(out)


def _skip_unsupported(model_type):
  if model_type not in hf_import.SUPPORTED:
    pytest.skip(f"`import --format=hf` does not read {model_type} yet")


_DINO = ["--config=configs/quickstart_dinov2.py", "--config.image_size=32",
         "--config.model.patch_size=8", "--config.model.width=32",
         "--config.model.depth=2", "--config.model.num_heads=2", "--config.model.mlp_dim=64",
         "--config.data.local_crop_size=16", "--config.dinov2.head_hidden=64",
         "--config.dinov2.head_bottleneck=32", "--config.dinov2.num_prototypes=128",
         "--config.dinov2.n_local_crops=2", "--config.batch_size=8", "--config.evals={}"]
CONTINUE = {
    "dinov2": [*_DINO, "--config.model.num_registers=2", "--config.model.layerscale_init=1e-5",
               "--config.model.ffn=swiglu", "--config.model.pos_embed=learned",
               "--config.model.mask_token=True"],
    "rope": [*_DINO, "--config.model.num_registers=1", "--config.model.layerscale_init=1e-5",
             "--config.model.pos_embed=rope", "--config.model.key_bias=False",
             "--config.model.mask_token=True"],
}


@pytest.mark.parametrize("name,model_type", [("dinov2", "dinov2_with_registers"),
                                             ("rope", "dinov3_vit")])
def test_dinov2_continues_from_its_export(name, model_type, runs, exports, tmp_path):
  """The re-imported export initialises DINOv2 pretraining: its backbone is
  the run's, to the bit (a few steps: the slow test below)."""
  _skip_unsupported(model_type)
  src = _reimport(exports[name], tmp_path)
  _, params = _setup([*CONTINUE[name], f"--config.init_from={src}"], tmp_path)
  saved = ckpt_lib.restore_host(ckpt_lib.find_step_dir(runs[name]), ("params", "backbone"))
  mine = jax.device_get(params["backbone"])
  got, want = _flat(mine), _flat(ckpt_lib.relaid_like(saved, mine))
  if not CONFIGS[name].mask_token:  # the class's mask token, exported as zeros
    np.testing.assert_array_equal(got.pop("mask_token"), 0)
  assert set(got) == set(want), set(got) ^ set(want)
  if not CONFIGS[name].key_bias:  # the k third, held at zero in the forward, exports as none
    d = CONFIGS[name].width
    for k in [k for k in want if k.endswith("qkv_bias")]:
      want[k] = np.concatenate([want[k][:d], np.zeros(d, np.float32), want[k][2 * d:]])
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _main(workdir, flags):
  import subprocess
  import sys
  from test_train_e2e import ROOT
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                                   "--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "main.py", f"--workdir={workdir}", *flags], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("name,model_type", [("mae_decoder", "vit_mae"),
                                             ("rope", "dinov3_vit")])
def test_pretraining_continues_from_the_export_with_main(name, model_type, exports, tmp_path,
                                                         shard_dir):
  """main.py, 2 steps from the re-imported folder: finite losses; MAE keeps
  the exported decoder (not initialised afresh). (The Dinov2WithRegisters
  export's start is checked to the bit above; DINOv2 from an init_from trains
  in test_init_from.py: its main.py run here would add nothing but time.)"""
  _skip_unsupported(model_type)
  from test_train_e2e import TINY, losses
  src = _reimport(exports[name], tmp_path)
  flags = TINY["mae"] if name == "mae_decoder" else CONTINUE[name]
  r = _main(tmp_path / "run", [*flags, f"--config.init_from={src}",
                               "--config.num_train_steps=2", f"--config.data.shards={shard_dir}",
                               "--config.evals={}", "--config.image_every_steps=0",
                               "--config.log_every_steps=1"])
  assert r.returncode == 0, r.stderr[-3000:]
  line = next(x for x in r.stderr.splitlines() if "Initialised from" in x)
  if name == "mae_decoder":
    assert "from it too: decoder_blocks, decoder_embed" in line, line
    assert "nothing initialised" in line, line
  got = losses(tmp_path / "run")
  assert len(got) == 2 and all(np.isfinite(v) for v in got.values()), got
