"""README's "Compare with published models", run as written: each import
command of its table on a small model built offline in that format (the
README's own --src / --out paths moved under tmp_path, and its ViT size
letter for the small one), then its evaluation loop for two of them on a
generated MedMNIST file, its merge into one table beside the paper's columns,
and its BiomedCLIP-versus-paper commands. The commands are parsed out of
README.md, so the README and this test cannot drift apart."""
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from biovfm_jax.evaluate import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SECTION = "Compare with published models"
PAPER_MD = os.path.join(os.path.dirname(ROOT), "shared", "PAPER.md")
IMPORT = "python -m biovfm_jax.interop import "
# The README's absolute folders, which this test moves under tmp_path.
PLACES = ("/ckpt/", "/eval/", "/runs/")


def section() -> str:
  with open(README) as f:
    text = f.read()
  m = re.search(rf"^## {re.escape(SECTION)}\n(.*?)(?=^## )", text, re.M | re.S)
  assert m, f"README.md has no '## {SECTION}' section"
  return m.group(1)


def table() -> dict[str, dict[str, str]]:
  """{model: {source, format, import, licence}} of the section's table."""
  rows = [[c.strip() for c in line.strip().strip("|").split("|")]
          for line in section().splitlines() if line.startswith("|")]
  header, rule, *rows = rows
  assert header == ["model", "source", "format", "import", "licence"], header
  assert set("".join(rule)) <= set("-:")
  return {r[0]: dict(zip(header[1:], r[1:], strict=True)) for r in rows}


def bash_blocks() -> list[list[str]]:
  """The section's ```bash blocks, as lists of commands (continuations joined,
  comment lines left out)."""
  blocks = re.findall(r"```bash\n(.*?)```", section(), re.S)
  return [[c.strip() for c in re.sub(r"\\\n\s*", "", b).splitlines()
           if c.strip() and not c.startswith("#")] for b in blocks]


def import_command(model: str) -> str:
  cmd = table()[model]["import"]
  assert cmd.startswith("`") and cmd.endswith("`"), cmd
  return cmd.strip("`")


def _local(cmd: str, root) -> str:
  """`cmd` with the README's absolute places (not configs/eval/...) under root."""
  names = "|".join(p.strip("/") for p in PLACES)
  return re.sub(rf"(?<![\w.])/({names})/", lambda m: f"{root}/{m.group(1)}/", cmd)


# --- What the table promises.

def test_the_table_covers_the_issue_models_with_a_licence():
  t = table()
  assert list(t) == ["RAD-DINO", "Phikon", "Phikon-v2", "UNI", "BiomedCLIP", "DINOv2",
                     "DINOv2 (torch hub)", "DINOv3", "MAE", "ours"]
  for model, row in t.items():
    assert row["licence"], model
    if model != "ours":
      fmt = re.search(r"--format=(\w+)", row["import"]).group(1)
      assert row["format"].startswith(f"`{fmt}`"), (model, row)
      assert import_command(model).startswith(IMPORT), model
  # Every --src is what the download block fetches, from the row's source.
  downloads = next(b for b in bash_blocks() if any(c.startswith("hf download") for c in b))
  fetched = {}
  for c in downloads:
    words = shlex.split(c)
    if words[:2] == ["hf", "download"]:
      fetched[words[words.index("--local-dir") + 1]] = words[2]
    elif words[0] == "wget":
      fetched[words[1].rsplit("/", 1)[1]] = words[1]
  for model, row in t.items():
    if model != "ours":
      src = re.search(r"--src=(\S+)", row["import"]).group(1).split("/")[0]
      assert src in fetched, (model, src)
      hub_id = fetched[src]
      if not hub_id.startswith("https://"):
        prefix = re.sub(r"\{.*", "", row["source"].strip("`").split("`")[0])
        assert hub_id.startswith(prefix), (model, hub_id, row["source"])
  assert "microsoft/rad-dino" in t["RAD-DINO"]["source"]
  assert "owkin/phikon`" in t["Phikon"]["source"]
  assert "owkin/phikon-v2" in t["Phikon-v2"]["source"]
  assert "MahmoodLab/UNI" in t["UNI"]["source"]
  assert "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in t["BiomedCLIP"]["source"]


# --- The paper's columns (report --paper).

@pytest.mark.skipif(not os.path.exists(PAPER_MD), reason="no ../shared/PAPER.md")
def test_paper_columns_are_papers_results_to_beat():
  from biovfm_jax.analysis import published
  with open(PAPER_MD) as f:
    text = f.read()
  header = published.markdown_table(text, "Results to beat")[0]
  columns = report.paper_columns()
  assert list(columns) == header[1:]
  auc = published.paper_auc(text)
  for r in auc.itertuples():
    name = ("BiomedCLIP" if r.objective == "biomedclip"
            else f"{'D' if r.objective == 'dinov2' else 'M'}-{r.model_size}")
    assert columns[name][r.benchmark] == pytest.approx(r.value, abs=1e-9)
  assert all(len(c) == 12 for c in columns.values())


def test_merge_with_paper_columns(tmp_path, capsys):
  report.write_report({"breastmnist": {"auc": 0.9, "acc": 0.8}}, tmp_path / "mine",
                      name="mine")
  report.main(["--merge", str(tmp_path / "mine"), "--out", str(tmp_path / "cmp"),
               "--paper", "BiomedCLIP", "M-L"])
  printed = capsys.readouterr().out
  assert "| benchmark | mine | paper BiomedCLIP | paper M-L |" in printed
  assert "| Breast | 90.00 | 92.06 | 92.30 |" in printed
  assert "| Derma | - | 93.49 | 95.66 |" in printed
  assert "| mean | 90.00 | 92.06 | 92.30 |" in printed  # over Breast, which all have
  doc = json.load(open(tmp_path / "cmp" / "comparison.json"))
  assert doc["runs"] == ["mine", "paper BiomedCLIP", "paper M-L"]
  with pytest.raises(ValueError, match="no column 'X-B' in the paper's table; its columns: "
                                       "D-T, D-S, D-B, D-L, M-T, M-S, M-B, M-L, BiomedCLIP"):
    report.merge_reports([tmp_path / "mine"], tmp_path / "c2", paper=["X-B"])
  with pytest.raises(ValueError, match="AUC only"):
    report.merge_reports([tmp_path / "mine"], tmp_path / "c2", metric="acc",
                         paper=["BiomedCLIP"])
  report.write_report({"breastmnist": {"auc": 0.9, "acc": 0.8}}, tmp_path / "clash",
                      name="paper BiomedCLIP")
  with pytest.raises(ValueError, match="two reports share the name 'paper BiomedCLIP'"):
    report.merge_reports([tmp_path / "clash"], tmp_path / "c3", paper=["BiomedCLIP"])


# --- Small models in each format, where the README's --src says.

_HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           image_size=28, patch_size=7)


def _perturbed(model, seed=0):
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  return model.eval()


def _hf_folder(build):
  def write(path):
    _perturbed(build()).save_pretrained(path)
  return write


def _timm_file(path):
  """UNI's file: a timm ViT state dict with LayerScale and no head, as
  pytorch_model.bin (a tiny one)."""
  import timm
  import torch
  model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                            init_values=1e-5, num_classes=0)
  os.makedirs(os.path.dirname(path))
  torch.save(_perturbed(model).state_dict(), path)


def _open_clip_folder(path):
  sys.path.insert(0, os.path.dirname(__file__))
  from test_interop_open_clip import _save_folder, _timm_clip
  import pathlib
  model, vision = _timm_clip()
  _save_folder(model, vision, pathlib.Path(path))


def _dinov2_file(path):
  sys.path.insert(0, os.path.dirname(__file__))
  from test_interop import _T, numpy_sd, save, timm_model, to_dinov2_layout
  model = timm_model("vit_small_patch14_dinov2", img_size=28, **_T)
  mask = np.zeros((1, 192), np.float32)
  save(to_dinov2_layout(numpy_sd(model), mask_token=mask), path)


def _mae_file(path):
  sys.path.insert(0, os.path.dirname(__file__))
  import torch
  from test_interop import MaeDecoder, mae_sincos, timm_model
  encoder = timm_model("vit_tiny_patch16_224", img_size=32)
  decoder = MaeDecoder(192, 64, 1, 16, 4, 16 * 16 * 3)
  with torch.no_grad():
    encoder.pos_embed.copy_(torch.from_numpy(mae_sincos(192, 2)))
  torch.save({"model": {**encoder.state_dict(), **decoder.state_dict()}}, path)


def _builders():
  import transformers as hf
  return {
      "RAD-DINO": _hf_folder(lambda: hf.Dinov2Model(hf.Dinov2Config(**_HF,
                                                                    layerscale_value=0.5))),
      "Phikon": _hf_folder(lambda: hf.ViTModel(hf.ViTConfig(**_HF))),
      "Phikon-v2": _hf_folder(lambda: hf.Dinov2Model(hf.Dinov2Config(**_HF))),
      "UNI": _timm_file,
      "BiomedCLIP": _open_clip_folder,
      "DINOv2": _hf_folder(lambda: hf.Dinov2Model(hf.Dinov2Config(**_HF))),
      "DINOv2 (torch hub)": _dinov2_file,
      "DINOv3": _hf_folder(lambda: hf.DINOv3ViTModel(hf.DINOv3ViTConfig(
          hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
          image_size=32, patch_size=8, num_register_tokens=2))),
      "MAE": _mae_file,
  }


def run_import(model: str, root) -> str:
  """The README's import command for `model`, on its small stand-in: the
  checkpoint folder written."""
  from biovfm_jax.interop.__main__ import main as cli_main
  argv = shlex.split(import_command(model))[len(shlex.split(IMPORT)) - 1:]
  src = next(a for a in argv if a.startswith("--src="))[len("--src="):]
  os.makedirs(os.path.join(root, "downloads"), exist_ok=True)
  _builders()[model](os.path.join(root, "downloads", src))
  argv = [f"--src={os.path.join(root, 'downloads', src)}" if a.startswith("--src=") else
          "--model=T" if a.startswith("--model=") else _local(a, root) for a in argv]
  assert cli_main(argv) == 0, (model, argv)
  return next(a for a in argv if a.startswith("--out="))[len("--out="):]


@pytest.mark.parametrize("model", [m for m in _builders() if m not in ("RAD-DINO",
                                                                        "BiomedCLIP")])
def test_import_command(model, tmp_path):
  from biovfm_jax import load_encoder
  out = run_import(model, tmp_path)
  enc = load_encoder(out)
  size = enc.config.image_size
  got = enc(np.random.default_rng(0).normal(size=(8, size, size, 3)).astype(np.float32))
  assert np.isfinite(np.asarray(got["patch_tokens"])).all()


# --- Scored side by side, then merged, as the README says.

_EVAL_OVERRIDES = ("--image_size=28 --config.download=False --benchmarks=breastmnist "
                   "--config.probe.epochs=2 --config.probe.batch_size=32 "
                   "--config.features.batch_size=32")


def _bash(*cmds: str, env: dict) -> list[str]:
  """Each of `cmds` in bash from the repository root, `python` being this
  interpreter, all at once (they are independent); their stdouts."""
  procs = [subprocess.Popen(["bash", "-c", f"python() {{ {shlex.quote(sys.executable)} "
                             f"\"$@\"; }}\n{cmd}"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for cmd in cmds]
  outs = []
  for cmd, p in zip(cmds, procs):
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, f"{cmd}: exit {p.returncode}\n{err[-3000:]}"
    outs.append(out)
  return outs


@pytest.mark.slow
def test_score_side_by_side_and_merge(tmp_path):
  from data_pipeline.readers import medmnist
  npz = tmp_path / "npz"
  medmnist.make_synthetic_npz(medmnist.npz_path(npz, "breastmnist", 28), "breastmnist", 28,
                              counts=(96, 32, 48), seed=1)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  blocks = bash_blocks()
  loop = next(b for b in blocks if b[0].startswith("for ckpt in"))
  evaluate = next(c for c in loop if c.startswith("python evaluate.py"))
  assert "--config=configs/eval/medmnist_linear.py" in evaluate and "--image_size=224" in evaluate
  merge = next(c for c in loop if c.startswith("python -m biovfm_jax.evaluate.report"))
  listed = re.search(r"for ckpt in (.*?); do", loop[0]).group(1).split()
  assert listed[-1] == "/runs/vit_b_mae"  # ours, next to the imports

  # Two of the table's models, imported by their README commands and scored by its loop.
  # (Each evaluation on its own tfds folder: both start at once.)
  scored = {"RAD-DINO": "/ckpt/rad_dino", "BiomedCLIP": "/ckpt/biomedclip"}
  runs = []
  for model, ckpt in scored.items():
    assert ckpt in listed
    assert run_import(model, tmp_path) == f"{tmp_path}{ckpt}"
    overrides = (f"{_EVAL_OVERRIDES} --config.npz_dir={npz} "
                 f"--config.data_dir={tmp_path / 'tfds' / model}")
    runs.append(f"ckpt={tmp_path}{ckpt}; {_local(evaluate, tmp_path)} {overrides}")
  _bash(*runs, env=env)

  printed, = _bash(_local(merge, tmp_path), env=env)
  doc = json.load(open(tmp_path / "eval" / "compare" / "comparison.json"))
  assert doc["runs"] == ["biomedclip", "rad_dino", "paper BiomedCLIP", "paper D-B",
                         "paper M-B"]
  assert list(doc["values"]["breastmnist"]) == doc["runs"]
  breast = next(line for line in printed.splitlines() if line.startswith("| Breast |"))
  assert breast.endswith("| 92.06 | 90.48 | 91.84 |"), breast
  assert len([line for line in printed.splitlines() if line.startswith("| ")]) == 1 + 12 + 1

  # The BiomedCLIP block: the table's import, the loop's evaluation, and its merge.
  block = next(b for b in blocks if b[0] == import_command("BiomedCLIP"))
  assert block[1] == evaluate.replace("$(basename $ckpt)", "biomedclip").replace(
      "$ckpt", "/ckpt/biomedclip")
  _bash(_local(block[2], tmp_path), env=env)
  cmp = sorted(glob.glob(str(tmp_path / "eval" / "*" / "comparison.json")))
  assert len(cmp) == 2
  doc = json.load(open(next(p for p in cmp if "/compare/" not in p)))
  assert doc["runs"] == ["biomedclip", "paper BiomedCLIP"]
  assert doc["values"]["breastmnist"]["paper BiomedCLIP"] == pytest.approx(0.9206)
