"""The linear segmentation probe: how well a frozen encoder's patch tokens
separate anatomy, pixel by pixel (configs/eval/segmentation_linear.py).

Features: the patch tokens of the frozen encoder on a (gh, gw) grid, either
the last layer after the final norm (layers='last', DINOv2's `linear` head)
or the outputs of the last 4 blocks, each through the final norm,
concatenated along channels (layers='last4', DINOv2's `+ms` features, as
get_intermediate_layers(n=4, norm=True) gives them). Images are uint8
normalised with mean 0.5, std 0.5 per channel (as the classification probe
does) and resized (bilinear) to the encoder's input size when it differs.

The head is DINOv2/v3's linear segmentation head: channel dropout
(Dropout2d, 0.1) -> BatchNorm over channels (affine; torch's eps 1e-5,
momentum 0.1, unbiased running variance) -> a 1x1 convolution, i.e. a
per-token linear layer (weights N(0, 0.01), bias 0). Its logits
(B, gh, gw, C) are upsampled bilinearly to the mask size with
jax.image.resize(method='bilinear', antialias=False): half-pixel centres,
equal to torch's F.interpolate(mode='bilinear', align_corners=False), and
trained with the pixel cross-entropy averaged over every pixel. AdamW
(weight decay 1e-3, betas 0.9/0.999), linear warmup then cosine to 0, stepped
per batch, as DINOv3's linear segmentation config, but lr 1e-2 by default:
DINOv3's 1e-3 is for 40k iterations, small benchmarks give a few hundred
(configs/eval/segmentation_linear.py). After every epoch
the validation loss is measured; the head with the lowest one is scored on
test.

Without augmentation the features are computed once per split and cached on
disk (the `fast` classification protocol's way). With head.augment, every
epoch draws a random horizontal flip per training image (the mask flips with
it) and the frozen encoder recomputes the training features inside the
training step; validation and test are never augmented.

Scores (segmentation_metrics): per class and as the mean over the foreground
classes, Dice and IoU with MONAI's conventions (a class absent from an
image's truth does not count for that image), and pixel accuracy; with
head.bootstrap, 95% percentile intervals over test images.

Outputs per benchmark, in <out_dir>/<benchmark>/: per_image.csv (id,
accuracy, Dice and IoU per class; 'nan' where a class is absent), with
save_predictions='png' predictions/<id>.png (label values 0..C-1, mode L) or
'npz' predictions.npz (ids, masks, classes), and overlays.png (image | truth |
prediction, a few test images; also a TensorBoard image).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from biovfm_jax import sharding as shd
from biovfm_jax.evaluate import features as feat_lib
from biovfm_jax.evaluate import segmentation_metrics as seg_metrics
from data_pipeline import seg_benchmarks, storage
from data_pipeline.errors import ConfigError

PROTOCOL = "segmentation"
LAYERS = ("last", "last4")
SAVE_PREDICTIONS = ("", "png", "npz")
BN_EPS = 1e-5
BN_MOMENTUM = 0.1
MEAN, STD = 0.5, 0.5
# Overlay colours of classes 1, 2, ... (class 0, background, is left uncoloured).
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
                    (210, 245, 60), (250, 190, 212)], np.uint8)


# --- config ------------------------------------------------------------------------

def check_config(config) -> None:
  """ConfigError naming the key, before anything is loaded or compiled."""
  seg_benchmarks.benchmark_names(config.benchmarks)
  h = config.head

  def bad(key, value, msg):
    raise ConfigError(f"config.{key}={value!r}: {msg}")

  size = config.image_size
  if not isinstance(size, int) or isinstance(size, bool) or size < 1:
    bad("image_size", size, "must be a positive integer (the mask size)")
  if h.layers not in LAYERS:
    bad("head.layers", h.layers, f"must be one of {LAYERS}")
  for key in ("epochs", "batch_size"):
    if int(h[key]) < 1:
      bad(f"head.{key}", h[key], "must be >= 1")
  if not float(h.lr) > 0:
    bad("head.lr", h.lr, "must be > 0")
  for key in ("weight_decay", "warmup_epochs", "bootstrap"):
    if h[key] < 0:
      bad(f"head.{key}", h[key], "must be >= 0")
  if h.warmup_epochs >= h.epochs:
    bad("head.warmup_epochs", h.warmup_epochs, f"must be < head.epochs={h.epochs}")
  if not 0 <= float(h.dropout) < 1:
    bad("head.dropout", h.dropout, "must be in [0, 1)")
  if config.save_predictions not in SAVE_PREDICTIONS:
    bad("save_predictions", config.save_predictions, f"must be one of {SAVE_PREDICTIONS}")
  if config.overlays < 0:
    bad("overlays", config.overlays, "must be >= 0")
  unknown = sorted(set(config.segmentation) - set(seg_benchmarks.DEFAULTS))
  if unknown:
    raise ConfigError(f"config.segmentation: unknown keys {unknown}; known: "
                      f"{sorted(seg_benchmarks.DEFAULTS)}")
  if config.results.file:
    bad("results.file", config.results.file, "the results store holds classification "
        "metrics (AUC, ACC); segmentation scores go to report.json only")


def benchmark_key(benchmark: str) -> str:
  """The benchmark's name in reports and output folders: 'mni_tissue',
  'msd:/data/Task04_Hippocampus' -> 'Task04_Hippocampus'."""
  return seg_benchmarks.display_name(benchmark)


def load_splits(benchmark: str, config) -> dict:
  return {s: seg_benchmarks.load_split(benchmark, s, size=int(config.image_size),
                                       data_dir=config.data_dir,
                                       options=dict(config.segmentation))
          for s in ("train", "val", "test")}


# --- features ----------------------------------------------------------------------

def normalize(images) -> jax.Array:
  """uint8 (B, H, W, 3) -> float32, mean 0.5 / std 0.5 per channel."""
  return (images.astype(jnp.float32) / 255.0 - MEAN) / STD


def feature_fn(encoder, layers: str, input_size: int):
  """Traceable (params, uint8 images (B, S, S, 3)) -> float32 (B, gh, gw, D')
  patch features: the last layer (D' = width) or the last 4 (D' = 4 width)."""
  if layers not in LAYERS:
    raise ValueError(f"layers={layers!r}; known: {LAYERS}")
  cfg = encoder.config
  prefix, grid = cfg.num_prefix_tokens, input_size // cfg.patch_size

  def fn(params, images):
    x = normalize(images)
    if x.shape[-1] != cfg.in_channels:
      x = x[..., :cfg.in_channels]
    b = x.shape[0]
    if x.shape[1:3] != (input_size, input_size):
      x = jax.image.resize(x, (b, input_size, input_size, x.shape[-1]), "bilinear")
    if layers == "last":
      tokens = [encoder.tokens(params, x)]
    else:
      with shd.use_mesh(encoder.mesh, encoder.rules):
        x = shd.constrain(x, ("batch", None, None, None))
        tokens = encoder.model(params).intermediate_tokens(x, 4)
    feats = jnp.concatenate([t[:, prefix:].astype(jnp.float32) for t in tokens], axis=-1)
    return feats.reshape(b, grid, grid, feats.shape[-1])

  return fn


def _global(encoder, batch: np.ndarray):
  """This process's rows of a global batch, assembled over the mesh."""
  pc, pi = jax.process_count(), jax.process_index()
  local = len(batch) // pc
  return feat_lib.global_batch(encoder, batch[pi * local:(pi + 1) * local])


def _batch_multiple(encoder, batch_size: int) -> int:
  """batch_size rounded up to a multiple of the data-parallel size."""
  m = max(encoder.data_parallel_size, jax.process_count())
  return -(-int(batch_size) // m) * m


def extract(encoder, images: np.ndarray, *, layers: str, input_size: int,
            batch_size: int, desc: str = "features") -> np.ndarray:
  """(N, gh, gw, D') float32 features of uint8 images (N, S, S, 3)."""
  cache = encoder.__dict__.setdefault("_seg_jit", {})
  if (layers, input_size) not in cache:
    cache[layers, input_size] = jax.jit(feature_fn(encoder, layers, input_size))
  fn = cache[layers, input_size]
  b = _batch_multiple(encoder, batch_size)
  n = len(images)
  if n == 0:
    raise ValueError(f"{desc}: no images")
  out = None
  progress = feat_lib.Progress(desc, n)
  for start in range(0, n, b):
    chunk = images[start:start + b]
    real = len(chunk)
    if real < b:
      chunk = np.concatenate([chunk, np.zeros((b - real,) + chunk.shape[1:], chunk.dtype)])
    feats = shd.to_host(fn(encoder.params, _global(encoder, chunk)))
    if out is None:
      out = np.zeros((n,) + feats.shape[1:], np.float32)
    out[start:start + real] = feats[:real]
    progress.update(real)
  return out


def cached_features(encoder, split, split_name: str, *, layers: str, input_size: int,
                    batch_size: int, cache_dir: str | None) -> np.ndarray:
  """`extract`, read from / written to cache_dir when given; the key covers
  the checkpoint, its config, the split (name, ids, size), the input size
  and the layers."""
  desc = f"features {benchmark_key(split.name)}/{split_name}"
  run = lambda: extract(encoder, split.images, layers=layers, input_size=input_size,  # noqa: E731
                        batch_size=batch_size, desc=desc)
  if not cache_dir:
    return run()
  key = json.dumps({"source": os.path.abspath(encoder.source) if encoder.source else "",
                    "encoder": repr(encoder.config), "benchmark": split.name,
                    "split": split_name, "n": len(split.ids),
                    "ids": hashlib.sha1("\n".join(split.ids).encode()).hexdigest(),
                    "stored_size": int(split.images.shape[1]), "input_size": input_size,
                    "layers": layers, "kind": "segmentation"}, sort_keys=True)
  name = (f"seg_{_safe(benchmark_key(split.name))}_{split_name}_"
          f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy")
  return feat_lib.cached_array(os.path.join(cache_dir, name), len(split.ids), run, desc)


# --- the head ----------------------------------------------------------------------

def init_head(dim: int, num_classes: int, seed: int):
  """(params, BatchNorm running statistics): BN affine at identity, the 1x1
  conv N(0, 0.01) with zero bias (DINOv2/v3's LinearHead)."""
  kernel = 0.01 * jax.random.normal(jax.random.key(seed), (dim, num_classes))
  params = {"bn_scale": jnp.ones((dim,)), "bn_bias": jnp.zeros((dim,)),
            "kernel": kernel, "bias": jnp.zeros((num_classes,))}
  return params, {"mean": jnp.zeros((dim,)), "var": jnp.ones((dim,))}


def head_logits(params, bn, feats, *, train: bool, dropout: float = 0.0, key=None):
  """(B, gh, gw, D) features -> (B, gh, gw, C) logits and the BatchNorm
  statistics (updated when train)."""
  x = feats.astype(jnp.float32)
  if train and dropout > 0:
    # Dropout2d: whole channels of an image, rescaled by 1 / (1 - p).
    keep = jax.random.bernoulli(key, 1.0 - dropout, (x.shape[0], 1, 1, x.shape[-1]))
    x = jnp.where(keep, x / (1.0 - dropout), 0.0)
  if train:
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    n = x.shape[0] * x.shape[1] * x.shape[2]
    bn = {"mean": (1 - BN_MOMENTUM) * bn["mean"] + BN_MOMENTUM * mean,
          "var": (1 - BN_MOMENTUM) * bn["var"] + BN_MOMENTUM * var * n / max(n - 1, 1)}
  else:
    mean, var = bn["mean"], bn["var"]
  x = (x - mean) * jax.lax.rsqrt(var + BN_EPS) * params["bn_scale"] + params["bn_bias"]
  return x @ params["kernel"] + params["bias"], bn


def upsample(logits, size: tuple[int, int]):
  """(B, gh, gw, C) -> (B, H, W, C), bilinear with half-pixel centres and no
  antialiasing: torch's F.interpolate(mode='bilinear', align_corners=False)."""
  b, _, _, c = logits.shape
  return jax.image.resize(logits, (b, size[0], size[1], c), "bilinear", antialias=False)


def pixel_loss(logits, masks):
  """Mean cross-entropy over every pixel; logits at the mask size."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, masks.astype(jnp.int32)).mean()


class SegHead:
  """The head's parameters, BatchNorm statistics and AdamW state, and the
  jitted pieces that train and score it."""

  def __init__(self, dim: int, num_classes: int, mask_size: tuple[int, int], cfg,
               steps_per_epoch: int):
    self.params, self.bn = init_head(dim, num_classes, int(cfg.seed))
    total = int(cfg.epochs) * steps_per_epoch
    warmup = int(round(float(cfg.warmup_epochs) * steps_per_epoch))
    schedule = (optax.warmup_cosine_decay_schedule(0.0, float(cfg.lr), warmup, total, 0.0)
                if warmup else optax.cosine_decay_schedule(float(cfg.lr), total))
    self.schedule = schedule
    self.tx = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                          weight_decay=float(cfg.weight_decay))
    self.opt_state = self.tx.init(self.params)
    dropout, size, tx = float(cfg.dropout), tuple(mask_size), self.tx

    def update(params, bn, opt_state, feats, masks, key):
      def loss_fn(p):
        logits, new_bn = head_logits(p, bn, feats, train=True, dropout=dropout, key=key)
        return pixel_loss(upsample(logits, size), masks), new_bn
      (loss, new_bn), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), new_bn, opt_state, loss

    self.update = update

    @jax.jit
    def evaluate(params, bn, feats, masks):
      """(summed pixel loss, predicted masks uint8) of one batch."""
      logits, _ = head_logits(params, bn, feats, train=False)
      logits = upsample(logits, size)
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, masks.astype(jnp.int32)).sum()
      return loss, jnp.argmax(logits, -1).astype(jnp.uint8)

    self._evaluate = evaluate

  def state(self):
    return self.params, self.bn, self.opt_state

  def evaluate(self, params, bn, feats: np.ndarray, masks: np.ndarray, batch_size: int
               ) -> tuple[float, np.ndarray]:
    """(mean pixel loss, predicted masks (N, H, W) uint8) over a split."""
    total, preds = 0.0, []
    for s in range(0, len(feats), batch_size):
      loss, pred = self._evaluate(params, bn, jnp.asarray(feats[s:s + batch_size]),
                                  jnp.asarray(masks[s:s + batch_size]))
      total += float(loss)
      preds.append(np.asarray(pred))
    return total / masks.size, np.concatenate(preds)


def _history(history, entry):
  """The best (lowest validation loss) and the latest epoch."""
  history.append(entry)
  return [min(history, key=lambda h: h["val_loss"]), history[-1]]


def train_fast(train_feats, train_masks, val_feats, val_masks, num_classes: int, cfg,
               *, name: str = "", eval_batch: int = 64):
  """The head on fixed features: each epoch one jitted scan over its batches.
  Returns (head, best epoch's entry)."""
  n = len(train_feats)
  b = int(cfg.batch_size)
  steps = n // b
  if steps == 0:
    raise ValueError(f"{name}: {n} training images < config.head.batch_size={b}")
  head = SegHead(train_feats.shape[-1], num_classes, train_masks.shape[1:], cfg, steps)
  feats_dev, masks_dev = jnp.asarray(train_feats), jnp.asarray(train_masks)
  base = jax.random.key(int(cfg.seed) + 1)

  @jax.jit
  def run_epoch(params, bn, opt_state, perm, key):
    def body(carry, xs):
      idx, i = xs
      p, s, o = carry
      p, s, o, loss = head.update(p, s, o, feats_dev[idx], masks_dev[idx],
                                  jax.random.fold_in(key, i))
      return (p, s, o), loss
    (params, bn, opt_state), losses = jax.lax.scan(
        body, (params, bn, opt_state), (perm[:steps * b].reshape(steps, b),
                                        jnp.arange(steps)))
    return params, bn, opt_state, losses.mean()

  params, bn, opt_state = head.state()
  history = []
  for epoch in range(int(cfg.epochs)):
    perm = np.random.default_rng([int(cfg.seed), epoch]).permutation(n)
    params, bn, opt_state, train_loss = run_epoch(params, bn, opt_state, perm,
                                                  jax.random.fold_in(base, epoch))
    val_loss, _ = head.evaluate(params, bn, val_feats, val_masks, eval_batch)
    _log_epoch(name, epoch, cfg.epochs, float(train_loss), val_loss)
    history = _history(history, {"epoch": epoch, "params": params, "bn": bn,
                                 "val_loss": val_loss, "train_loss": float(train_loss)})
  return head, history[0]


def train_augmented(encoder, train, val_feats, val_masks, num_classes: int, cfg, *,
                    layers: str, input_size: int, name: str = "", eval_batch: int = 64):
  """The head on features the frozen encoder recomputes every epoch from
  randomly flipped training images (and masks). Returns (head, best entry)."""
  n = len(train.ids)
  b = int(cfg.batch_size)
  if b % max(encoder.data_parallel_size, jax.process_count()):
    raise ValueError(f"config.head.batch_size={b} does not divide over "
                     f"{encoder.data_parallel_size} data-parallel devices (head.augment)")
  steps = n // b
  if steps == 0:
    raise ValueError(f"{name}: {n} training images < config.head.batch_size={b}")
  featurize = feature_fn(encoder, layers, input_size)
  dim = (4 if layers == "last4" else 1) * encoder.config.width
  head = SegHead(dim, num_classes, train.masks.shape[1:], cfg, steps)

  @jax.jit
  def step(params, bn, opt_state, enc_params, images, masks, key):
    feats = jax.lax.stop_gradient(featurize(enc_params, images))
    return head.update(params, bn, opt_state, feats, masks, key)

  params, bn, opt_state = head.state()
  base = jax.random.key(int(cfg.seed) + 1)
  history = []
  for epoch in range(int(cfg.epochs)):
    rng = np.random.default_rng([int(cfg.seed), epoch])
    perm = rng.permutation(n)
    flip = rng.random(n) < 0.5
    losses = []
    progress = feat_lib.Progress(f"head {name} epoch {epoch + 1}/{cfg.epochs}",
                                 steps * b, every=30.0)
    for i in range(steps):
      idx = perm[i * b:(i + 1) * b]
      images, masks = train.images[idx], train.masks[idx]
      f = flip[idx]
      images = np.where(f[:, None, None, None], images[:, :, ::-1], images)
      masks = np.where(f[:, None, None], masks[:, :, ::-1], masks)
      key = jax.random.fold_in(jax.random.fold_in(base, epoch), i)
      params, bn, opt_state, loss = step(params, bn, opt_state, encoder.params,
                                         _global(encoder, images), _global(encoder, masks),
                                         key)
      losses.append(loss)
      progress.update(b)
    train_loss = float(jnp.mean(jnp.stack(losses)))
    val_loss, _ = head.evaluate(params, bn, val_feats, val_masks, eval_batch)
    _log_epoch(name, epoch, cfg.epochs, train_loss, val_loss)
    history = _history(history, {"epoch": epoch, "params": params, "bn": bn,
                                 "val_loss": val_loss, "train_loss": train_loss})
  return head, history[0]


def _log_epoch(name, epoch, epochs, train_loss, val_loss):
  logging.info("head %s epoch %d/%d: train loss %.4f, val loss %.4f", name, epoch + 1,
               epochs, train_loss, val_loss)


# --- one benchmark -----------------------------------------------------------------

def score(pred: np.ndarray, truth: np.ndarray, classes, bootstrap: int = 0
          ) -> tuple[dict, dict]:
  """(the report's numbers, the per-image scores) for predicted and true
  masks (N, H, W)."""
  per_image = seg_metrics.per_image(pred, truth, len(classes))
  s = seg_metrics.summarize(per_image)
  out = {"dice": s["mean_dice"], "iou": s["mean_iou"],
         "pixel_accuracy": s["pixel_accuracy"], "classes": list(classes),
         "dice_per_class": [float(v) for v in s["dice_per_class"]],
         "iou_per_class": [float(v) for v in s["iou_per_class"]],
         "images_per_class": [int(v) for v in (~np.isnan(per_image["dice"])).sum(0)],
         "num_test": int(len(pred))}
  if bootstrap:
    ci = seg_metrics.bootstrap(per_image, int(bootstrap))
    out.update(dice_ci=list(ci["mean_dice"]), iou_ci=list(ci["mean_iou"]),
               pixel_accuracy_ci=list(ci["pixel_accuracy"]))
  return out, per_image


def run_benchmark(encoder, splits: dict, config, *, input_size: int):
  """Trains and scores the head on one benchmark's splits. Returns (result,
  test predictions (N, H, W) uint8, per-image scores)."""
  h = config.head
  name = benchmark_key(splits["train"].name)
  classes = splits["train"].classes
  cache = config.cache_dir if config.features.cache else None
  fb = int(config.features.batch_size)
  feats = {s: cached_features(encoder, splits[s], s, layers=h.layers,
                              input_size=input_size, batch_size=fb, cache_dir=cache)
           for s in (("val", "test") if h.augment else ("train", "val", "test"))}
  masks = {s: splits[s].masks for s in splits}
  eval_batch = max(1, min(fb, 64))
  if h.augment:
    head, best = train_augmented(encoder, splits["train"], feats["val"], masks["val"],
                                 len(classes), h, layers=h.layers, input_size=input_size,
                                 name=name, eval_batch=eval_batch)
  else:
    head, best = train_fast(feats["train"], masks["train"], feats["val"], masks["val"],
                            len(classes), h, name=name, eval_batch=eval_batch)
  test_loss, pred = head.evaluate(best["params"], best["bn"], feats["test"], masks["test"],
                                  eval_batch)
  result, per_image = score(pred, masks["test"], classes, int(h.bootstrap))
  result.update(benchmark=splits["train"].name, best_epoch=best["epoch"],
                val_loss=best["val_loss"], train_loss=best["train_loss"],
                test_loss=test_loss)
  return result, pred, per_image


def evaluate_encoder(encoder, config, out_dir: str | None = None
                     ) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
  """(benchmark key -> result, benchmark key -> overlay sheet) for every
  benchmark of the config; with out_dir, each benchmark's per-image CSV,
  predictions and overlay sheet are written to <out_dir>/<benchmark>/."""
  from biovfm_jax.evaluate import protocols
  input_size = protocols.input_size(encoder, config)
  if input_size % encoder.config.patch_size:
    raise ConfigError(f"config.input_size={input_size} is not a multiple of the encoder's "
                      f"patch size {encoder.config.patch_size}")
  results, sheets = {}, {}
  for benchmark in seg_benchmarks.benchmark_names(config.benchmarks):
    t0 = time.perf_counter()
    key = benchmark_key(benchmark)
    if key in results:
      raise ValueError(f"config.benchmarks: two benchmarks are both named {key!r}")
    splits = load_splits(benchmark, config)
    result, pred, per_image = run_benchmark(encoder, splits, config, input_size=input_size)
    result["seconds"] = time.perf_counter() - t0
    test = splits["test"]
    sheet = overlay_sheet(test.images, test.masks, pred, int(config.overlays))
    if out_dir and jax.process_index() == 0:
      where = storage.join(out_dir, _safe(key))
      write_per_image(storage.join(where, "per_image.csv"), test.ids, test.classes,
                      per_image)
      if config.save_predictions:
        save_predictions(where, config.save_predictions, test.ids, test.classes, pred)
      if sheet is not None:
        _write(storage.join(where, "overlays.png"), _png(sheet))
    if sheet is not None:
      sheets[key] = sheet
    results[key] = result
    logging.info("%s (segmentation, %s): Dice %.2f  IoU %.2f  pixel acc %.2f  (%.0f s)",
                 key, config.head.layers, 100 * result["dice"], 100 * result["iou"],
                 100 * result["pixel_accuracy"], result["seconds"])
  return results, sheets


# --- outputs -----------------------------------------------------------------------

def _safe(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "benchmark"


def _write(path: str, data: bytes) -> None:
  storage.makedirs(storage.dirname(path))
  storage.write_bytes_atomic(path, data)


def _png(array: np.ndarray) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def per_image_header(classes) -> list[str]:
  names = [_safe(c) for c in classes]
  return (["id", "accuracy"] + [f"dice_{c}" for c in names] + [f"iou_{c}" for c in names])


def write_per_image(path: str, ids, classes, per_image: dict) -> None:
  """id, pixel accuracy, Dice and IoU per class (raw, in [0, 1]; 'nan' where
  the class is absent from the image's truth)."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(per_image_header(classes))
  for i, image_id in enumerate(ids):
    w.writerow([image_id, repr(float(per_image["accuracy"][i]))] +
               [repr(float(v)) for v in per_image["dice"][i]] +
               [repr(float(v)) for v in per_image["iou"][i]])
  _write(path, buf.getvalue().encode())


def save_predictions(where: str, fmt: str, ids, classes, pred: np.ndarray) -> None:
  """Predicted masks (label values 0..C-1): predictions/<id>.png (mode L) or
  predictions.npz (ids, masks, classes)."""
  if fmt == "png":
    for image_id, mask in zip(ids, pred):
      parts = [_safe(p) for p in str(image_id).split("/")]
      _write(storage.join(where, "predictions", *parts[:-1], parts[-1] + ".png"),
             _png(np.asarray(mask, np.uint8)))
  elif fmt == "npz":
    buf = io.BytesIO()
    np.savez_compressed(buf, ids=np.array(list(ids)), masks=np.asarray(pred, np.uint8),
                        classes=np.array(list(classes)))
    _write(storage.join(where, "predictions.npz"), buf.getvalue())
  else:
    raise ValueError(f"save_predictions={fmt!r}; known: {SAVE_PREDICTIONS}")


def colour(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """uint8 image (H, W, 3) with the mask's classes 1.. blended in colour."""
  out = image.astype(np.float32)
  colours = PALETTE[(np.maximum(mask.astype(np.int64), 1) - 1) % len(PALETTE)]
  fg = (mask > 0)[..., None]
  out = np.where(fg, (1 - alpha) * out + alpha * colours, out)
  return np.round(out).astype(np.uint8)


def overlay_sheet(images, truth, pred, count: int, min_side: int = 128):
  """uint8 (rows * S', 3 * S', 3): for `count` test images spread over the
  split, image | truth overlay | prediction overlay; None when count is 0.
  Small images are enlarged (nearest) to at least min_side pixels."""
  count = min(int(count), len(images))
  if count <= 0:
    return None
  idx = np.unique(np.linspace(0, len(images) - 1, count).round().astype(int))
  rows = []
  for i in idx:
    img = images[i]
    if img.ndim == 2:
      img = np.repeat(img[..., None], 3, -1)
    rows.append(np.concatenate([img, colour(img, truth[i]), colour(img, pred[i])], axis=1))
  sheet = np.concatenate(rows, axis=0)
  scale = max(1, -(-min_side // images.shape[1]))
  return np.ascontiguousarray(sheet.repeat(scale, 0).repeat(scale, 1))
