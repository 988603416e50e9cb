"""The evaluation binary's protocols on generated MedMNIST-format npz files and
on the mini corpus, with tiny encoders saved as real checkpoints."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from biovfm_jax.evaluate import runner as evaluate_bin
from biovfm_jax.evaluate import features as feat_lib
from biovfm_jax.evaluate.encoder import load_encoder
from biovfm_jax.evaluate.protocols import load_splits
from biovfm_jax.models.vit import VisionTransformer, vit_config
from biovfm_jax.train import checkpoint as ckpt_lib
from configs.eval import common
from data_pipeline.readers import medmnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, image_size=28)
BENCHMARKS = "breastmnist,chestmnist"   # binary 1-channel, multi-label 14 labels


def save_encoder(path, *, blind: bool = False, seed: int = 0):
  """A random tiny ViT as an 'imported' checkpoint. `blind`: the patch
  embedding is zeroed, so its features do not depend on the image."""
  cfg = vit_config(None, **TINY)
  model = VisionTransformer(cfg, rngs=nnx.Rngs(seed))
  params = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])
  if blind:
    params["patch_embed"] = jax.tree.map(np.zeros_like, params["patch_embed"])
  ckpt_lib.save_params(str(path), params, {"objective": "test", "backbone": "params",
                                           "encoder": dataclasses.asdict(cfg)})
  return model, params


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("medmnist")
  for flag in BENCHMARKS.split(","):
    medmnist.make_synthetic_npz(medmnist.npz_path(root / "npz", flag, 28), flag, 28,
                                counts=(256, 64, 96), seed=1)
  return {"npz_dir": str(root / "npz"), "data_dir": str(root / "tfds")}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
  root = tmp_path_factory.mktemp("encoders")
  save_encoder(root / "good")
  save_encoder(root / "blind", blind=True)
  return {"good": str(root / "good"), "blind": str(root / "blind")}


def eval_config(protocol, data, checkpoint, out_dir, benchmarks=BENCHMARKS):
  c = common.get_config(protocol)
  c.benchmarks = benchmarks
  c.image_size = 28
  c.npz_dir, c.data_dir = data["npz_dir"], data["data_dir"]
  c.features.batch_size = 64
  c.probe.batch_size = 32
  c.probe.epochs = 4
  c.knn.k = 10
  c.finetune.update(batch_size=32, epochs=3, warmup_epochs=1, base_lr=3e-2)
  return evaluate_bin.resolve_config(c, checkpoint=checkpoint, out_dir=str(out_dir))


def reference_metrics(npz_path):
  """AUC/ACC recomputed from the saved test scores by MedMNIST's own evaluator."""
  from medmnist.evaluator import getACC, getAUC
  saved = np.load(npz_path)
  task = str(saved["task"])
  return getAUC(saved["labels"], saved["scores"], task), getACC(saved["labels"],
                                                                 saved["scores"], task)


def test_load_encoder_gives_the_saved_weights_and_the_model_features(tmp_path):
  model, params = save_encoder(tmp_path / "ckpt", seed=3)
  enc = load_encoder(str(tmp_path / "ckpt"))
  assert enc.config == model.config
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(enc.params), params)
  images = np.random.default_rng(0).normal(size=(8, 28, 28, 3)).astype(np.float32)
  out = enc(images)
  tokens = np.asarray(model(images))
  np.testing.assert_allclose(out["cls"], tokens[:, 0], atol=1e-5)
  np.testing.assert_allclose(out["patch_tokens"], tokens[:, 1:], atol=1e-5)
  assert out["patch_tokens"].shape == (8, 49, 32)
  with pytest.raises(ValueError, match="does not divide"):
    enc(images[:3])
  with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
    load_encoder(str(tmp_path / "nothing"))


@pytest.mark.parametrize("protocol", ["fast", "knn", "biovfm", "finetune"])
def test_protocol_report_matches_medmnist_evaluator(protocol, data, encoders, tmp_path):
  config = eval_config(protocol, data, encoders["good"], tmp_path)
  results = evaluate_bin.run(config)
  report = json.load(open(tmp_path / "report.json"))
  assert os.path.exists(tmp_path / "report.md") and os.path.exists(tmp_path / "report.csv")
  for flag in BENCHMARKS.split(","):
    auc, acc = reference_metrics(tmp_path / "scores" / f"{flag}.npz")
    assert results[flag]["auc"] == pytest.approx(auc, abs=1e-9)
    assert results[flag]["acc"] == pytest.approx(acc, abs=1e-9)
    row = report["results"][flag]
    assert row["auc"] == pytest.approx(auc, abs=1e-9)
  # The synthetic classes are learnable: every protocol clears chance on the binary task.
  assert results["breastmnist"]["auc"] > 0.6, results


def test_biovfm_and_fast_rank_two_encoders_alike(data, encoders, tmp_path):
  aucs = {}
  for protocol in ("biovfm", "fast"):
    for name in ("good", "blind"):
      config = eval_config(protocol, data, encoders[name], tmp_path / protocol / name,
                           benchmarks="breastmnist")
      aucs[protocol, name] = evaluate_bin.run(config)["breastmnist"]["auc"]
  # The blind encoder's features are constant: its scores carry no information.
  assert aucs["fast", "blind"] == pytest.approx(0.5, abs=0.02)
  assert aucs["biovfm", "blind"] == pytest.approx(0.5, abs=0.02)
  assert aucs["fast", "good"] > aucs["fast", "blind"] + 0.1
  assert aucs["biovfm", "good"] > aucs["biovfm", "blind"] + 0.1


def test_knn_scores_match_a_numpy_reference(data, encoders, tmp_path):
  config = eval_config("knn", data, encoders["good"], tmp_path, benchmarks="breastmnist")
  evaluate_bin.run(config)
  enc = load_encoder(encoders["good"])
  splits = load_splits("breastmnist", config)
  train = feat_lib.extract(enc, splits["train"], batch_size=64)
  test = feat_lib.extract(enc, splits["test"], batch_size=64)
  # Cosine similarity, top k, weights exp(sim / T), normalised class votes.
  a = train / np.linalg.norm(train, axis=1, keepdims=True)
  q = test / np.linalg.norm(test, axis=1, keepdims=True)
  sim = q @ a.T
  top = np.argsort(-sim, axis=1)[:, :10]
  w = np.exp(np.take_along_axis(sim, top, 1) / 0.07)
  onehot = np.eye(2)[splits["train"].labels[:, 0]]
  expected = np.einsum("qk,qkc->qc", w, onehot[top]) / w.sum(1, keepdims=True)
  saved = np.load(tmp_path / "scores" / "breastmnist.npz")
  np.testing.assert_allclose(saved["scores"], expected, atol=1e-4)
  np.testing.assert_array_equal(saved["labels"], splits["test"].labels)


def test_feature_cache_is_reused(data, encoders, tmp_path):
  config = eval_config("fast", data, encoders["good"], tmp_path, benchmarks="breastmnist")
  first = evaluate_bin.run(config)["breastmnist"]
  cached = sorted(os.listdir(tmp_path / "features"))
  assert len(cached) == 3  # train, val, test
  mtimes = [os.path.getmtime(tmp_path / "features" / f) for f in cached]
  second = evaluate_bin.run(config)["breastmnist"]
  assert [os.path.getmtime(tmp_path / "features" / f) for f in cached] == mtimes
  assert second["auc"] == first["auc"]


def test_bad_eval_configs_fail_with_the_key(encoders, tmp_path):
  c = common.get_config("fast")
  with pytest.raises(ValueError, match="config.checkpoint"):
    evaluate_bin.resolve_config(c, out_dir=str(tmp_path))
  with pytest.raises(ValueError, match="config.benchmarks"):
    evaluate_bin.resolve_config(common.get_config("fast"), checkpoint=encoders["good"],
                                out_dir=str(tmp_path), benchmarks="imagenet")
  with pytest.raises(ValueError, match="config.image_size"):
    evaluate_bin.resolve_config(common.get_config("fast"), checkpoint=encoders["good"],
                                out_dir=str(tmp_path), image_size=32)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["fast", "biovfm", "finetune"])
def test_protocols_on_the_mini_corpus(protocol, encoders, tmp_path, tmp_path_factory):
  """Modality classification on real images (kNN: the CLI test below)."""
  from configs.eval import mini
  c = mini.get_config()
  c.protocol = protocol
  c.data_dir = str(tmp_path_factory.getbasetemp() / "mini_tfds")  # shared by the three
  c.probe.epochs, c.finetune.epochs = 3, 1
  c = evaluate_bin.resolve_config(c, checkpoint=encoders["good"], out_dir=str(tmp_path))
  result = evaluate_bin.run(c)["mini_modality"]
  auc, acc = reference_metrics(tmp_path / "scores" / "mini_modality.npz")
  assert result["auc"] == pytest.approx(auc, abs=1e-9)
  assert result["acc"] == pytest.approx(acc, abs=1e-9)
  assert json.load(open(tmp_path / "report.json"))["results"]["mini_modality"]["auc"] == \
      pytest.approx(auc, abs=1e-9)
  assert auc > 0.6


@pytest.mark.slow
def test_cli_scores_the_mini_benchmark(encoders, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "evaluate.py", "--config=configs/eval/mini.py",
         f"--checkpoint={encoders['good']}", f"--out_dir={tmp_path / 'out'}",
         "--config.protocol=knn", f"--config.data_dir={tmp_path / 'tfds'}",
         "--config.benchmarks=mini"]
  r = subprocess.run(cmd + [f"--results={tmp_path / 'store.csv'}", "--config.results.run=cli"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "mini_modality" in r.stdout and "| mean |" in r.stdout.lower().replace("**", "")
  report = json.load(open(tmp_path / "out" / "report.json"))
  auc, _ = reference_metrics(tmp_path / "out" / "scores" / "mini_modality.npz")
  assert report["results"]["mini_modality"]["auc"] == pytest.approx(auc, abs=1e-9)
  assert auc > 0.7  # modality is easy to tell even from random features
  # --results: the rows of the results store, its columns as the store defines them.
  from biovfm_jax import results
  rows = results.read(tmp_path / "store.csv", strict=True)
  assert list(rows.columns) == list(results.COLUMNS)
  assert list(zip(rows["run"], rows["benchmark"], rows["metric"], rows["protocol"])) == [
      ("cli", "mini_modality", "auc", "knn"), ("cli", "mini_modality", "acc", "knn")]
  assert rows["value"][0] == pytest.approx(auc, abs=1e-12)
  assert rows["checkpoint"][0] == report["meta"]["checkpoint"]
  bad = subprocess.run(cmd[:3] + [f"--checkpoint={tmp_path / 'missing'}",
                                  f"--out_dir={tmp_path / 'o2'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "no finished checkpoint" in bad.stderr


@pytest.mark.slow
def test_pretraining_logs_the_evaluator_scores_against_the_start(tmp_path, monkeypatch):
  """The quickstart's evaluator scores step 0 (the starting weights), then
  every_steps; later scores carry their gain over step 0, on the console and
  in the metrics, also after a resume (step 0 read back from metrics.jsonl)."""
  sys.path.insert(0, os.path.dirname(__file__))
  from test_train_e2e import run_main
  monkeypatch.setenv("BIOVFM_DATA", str(tmp_path / "data"))  # the evaluator's tfds folder
  flags = ("--config.batch_size=16", "--config.evals.knn_mini.every_steps=4",
           "--config.evals.knn_mini.image_size=28", "--config.checkpoint.every_steps=2")
  r = run_main(tmp_path / "run", "--config.num_train_steps=2", *flags, devices=2, evals=True)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "eval knn_mini, step 0 (the starting weights): mni_anatomy kNN ACC" in r.stderr
  r = run_main(tmp_path / "run", "--config.num_train_steps=4", *flags, devices=2, evals=True)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  scores = {row["step"]: row for row in rows if "eval/knn_mini/mni_anatomy/acc" in row}
  assert sorted(scores) == [0, 4]  # step 4 in the resumed process
  init = scores[0]
  assert not any(k.endswith("_gain") for k in init)
  for step in (4,):
    for bench in ("mni_anatomy", "mini_modality", "mean"):
      for metric in ("acc", "auc"):
        key = f"eval/knn_mini/{bench}/{metric}"
        assert 0 < scores[step][key] <= 1
        assert scores[step][f"{key}_gain"] == pytest.approx(scores[step][key] - init[key])
  acc = [100 * scores[s]["eval/knn_mini/mni_anatomy/acc"] for s in (0, 4)]
  assert f"mni_anatomy kNN ACC {acc[0]:.1f} (init) -> {acc[1]:.1f}, AUC" in r.stderr


def test_evaluator_entries_are_checked_before_training():
  from biovfm_jax.evaluate.during_training import Evaluator
  from configs.common import eval_entry
  with pytest.raises(ValueError, match="eval_entry\\('knn'\\): unknown key"):
    eval_entry("knn", every_steps=1, knn={"kk": 3})
  with pytest.raises(ValueError, match="config.evals.x.protocol"):
    Evaluator("x", eval_entry("linear", every_steps=1))
  with pytest.raises(ValueError, match="every_steps"):
    Evaluator("x", eval_entry("knn", every_steps=0))
  with pytest.raises(ValueError, match="config.evals.x is not an evaluation config"):
    Evaluator("x", {"type": "knn", "every_steps": 1})  # the old form: says what to do
  with pytest.raises(ValueError, match=r"config.evals.x.image_size=32: the benchmarks are"):
    Evaluator("x", eval_entry("knn", every_steps=1, image_size=32))  # was: after training
  entry = eval_entry("fast", every_steps=5, benchmarks="derma,mini", probe={"epochs": 3})
  ev = Evaluator("x", entry)
  assert ev.benchmarks == ["dermamnist", "mini_modality"] and ev.config.probe.epochs == 3
  assert ev.due(10) and not ev.due(11)
  assert ev.config.features.cache is False and ev.config.features.read_threads == 0


def test_report_names_the_checkpoint_step(data, tmp_path):
  """evaluate.py's report said step 0 for any checkpoint."""
  cfg = vit_config(None, **TINY)
  params = nnx.to_pure_dict(nnx.split(VisionTransformer(cfg, rngs=nnx.Rngs(0)), nnx.Param,
                                      ...)[1])
  ckpt_lib.save_params(str(tmp_path / "run"), params, {
      "objective": "test", "backbone": "params", "encoder": dataclasses.asdict(cfg)}, step=300)
  c = eval_config("knn", data, str(tmp_path / "run"), tmp_path / "out",
                  benchmarks="breastmnist")
  evaluate_bin.run(c)
  report = json.load(open(tmp_path / "out" / "report.json"))
  assert report["step"] == 300
  assert "step: 300" in open(tmp_path / "out" / "report.md").read()


def test_evaluator_scores_step_zero_and_shows_the_gain():
  from biovfm_jax.evaluate.during_training import Evaluator
  from configs.common import eval_entry
  ev = Evaluator("k", eval_entry("knn", every_steps=5, benchmarks="anatomy"))
  assert [s for s in range(11) if ev.due(s)] == [0, 5, 10]
  off = Evaluator("k", eval_entry("knn", every_steps=5, benchmarks="anatomy", at_start=False))
  assert [s for s in range(11) if off.due(s)] == [5, 10]
  # A resumed run's step-0 scores: this evaluator's keys only.
  ev.restore_init({"step": 0, "eval/k/mni_anatomy/acc": 0.412, "eval/k/mni_anatomy/auc": 0.8,
                   "eval/j/mni_anatomy/acc": 0.1, "loss": 1.0})
  assert ev.init == {"eval/k/mni_anatomy/acc": 0.412, "eval/k/mni_anatomy/auc": 0.8}
  now = {"eval/k/mni_anatomy/acc": 0.779, "eval/k/mni_anatomy/auc": 0.95,
         "eval/k/mni_anatomy/acc_gain": 0.367, "eval/k/mni_anatomy/auc_gain": 0.15}
  assert ev.summary("mni_anatomy", now) == (
      "mni_anatomy kNN ACC 41.2 (init) -> 77.9, AUC 80.0 (init) -> 95.0")
  ev.restore_init({})  # no step-0 row (an evaluator added on resume): plain scores
  assert ev.init is None
  assert ev.summary("mni_anatomy", now) == "mni_anatomy kNN ACC 77.9, AUC 95.0"
