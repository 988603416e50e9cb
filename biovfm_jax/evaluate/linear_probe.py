"""The linear probe, two ways.

`biovfm` is PAPER.md's reference protocol: every epoch the frozen encoder sees
freshly augmented training images (rotation 30 degrees, random crop with
padding 4). `fast` trains the same head on features computed once, without
augmentation, and cached on disk: much cheaper, and it ranks encoders the same
way (benchmarks/eval_speed.py measures both).

The head: features -> LayerNorm with its affine held at identity (weight 1,
bias 0, frozen) -> BatchNorm without affine (eps 1e-6, torch's momentum 0.1 and
unbiased running variance) -> linear (weights truncated-normal std 0.01, bias
0). AdamW lr 1e-2, no weight decay, batch 128 (last partial batch dropped),
cosine to 0 stepped once per epoch, no warmup, seed 42. After every epoch the
validation loss is measured; the head with the lowest one is scored on test.

Features are the encoder's final-norm patch tokens, averaged (the tokens
`load_encoder` returns). MAE's own global-pool probe averages the tokens
before the encoder's last norm; with the per-example LayerNorm that follows,
the two differ only by the last norm's affine.
"""
from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from biovfm_jax.evaluate import features as feat_lib
from biovfm_jax.evaluate.metrics import score

EPS = 1e-6
MULTI_LABEL = "multi-label, binary-class"


def init_head(dim: int, num_outputs: int, seed: int):
  key = jax.random.key(seed)
  # torch trunc_normal_(std=0.01) truncates at +-2 absolute: a plain normal here.
  kernel = 0.01 * jax.random.truncated_normal(key, -200.0, 200.0, (dim, num_outputs))
  return ({"kernel": kernel, "bias": jnp.zeros((num_outputs,))},
          {"mean": jnp.zeros((dim,)), "var": jnp.ones((dim,))})


def head_logits(params, bn, feats, *, train: bool, momentum: float = 0.1):
  """(B, D) features -> (B, C) logits and the updated BatchNorm statistics."""
  x = feats.astype(jnp.float32)
  mu = x.mean(-1, keepdims=True)
  x = (x - mu) * jax.lax.rsqrt(x.var(-1, keepdims=True) + EPS)   # LayerNorm, identity affine
  if train:
    mean, var = x.mean(0), x.var(0)
    n = x.shape[0]
    bn = {"mean": (1 - momentum) * bn["mean"] + momentum * mean,
          "var": (1 - momentum) * bn["var"] + momentum * var * n / max(n - 1, 1)}
  else:
    mean, var = bn["mean"], bn["var"]
  x = (x - mean) * jax.lax.rsqrt(var + EPS)
  return x @ params["kernel"] + params["bias"], bn


def head_loss(logits, labels, task: str):
  """Cross-entropy (BCE with logits for multi-label), averaged over the batch."""
  if task == MULTI_LABEL:
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean()
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels[:, 0]).mean()


def head_scores(logits, task: str):
  return jax.nn.sigmoid(logits) if task == MULTI_LABEL else jax.nn.softmax(logits, -1)


def num_outputs(split) -> int:
  return int(split.num_classes)


class Head:
  """The head's parameters, BatchNorm statistics and AdamW state, and the
  jitted pieces that train and score it."""

  def __init__(self, dim: int, split, cfg):
    self.task = split.task
    self.params, self.bn = init_head(dim, num_outputs(split), cfg.seed)
    # torch's AdamW defaults but weight decay; the lr is fed per epoch.
    adamw = lambda lr: optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8,  # noqa: E731
                                   weight_decay=cfg.weight_decay)
    self.opt_state = adamw(cfg.lr).init(self.params)
    task = self.task

    def update(params, bn, opt_state, feats, labels, lr):
      def loss_fn(p):
        logits, new_bn = head_logits(p, bn, feats, train=True)
        return head_loss(logits, labels, task), new_bn
      (loss, new_bn), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = adamw(lr).update(grads, opt_state, params)
      return optax.apply_updates(params, updates), new_bn, opt_state, loss

    self.update = update

    @jax.jit
    def evaluate(params, bn, feats, labels):
      logits, _ = head_logits(params, bn, feats, train=False)
      return head_loss(logits, labels, task), head_scores(logits, task)

    self.evaluate = evaluate

  def state(self):
    return self.params, self.bn, self.opt_state


def epoch_lr(cfg, epoch: int) -> float:
  """Cosine from cfg.lr to 0 over cfg.epochs, stepped once per epoch."""
  return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * epoch / cfg.epochs))


def _select_and_score(history, test_feats, test_labels, head: Head, bootstrap: int):
  best = min(history, key=lambda h: h["val_loss"])
  _, scores = head.evaluate(best["params"], best["bn"], test_feats, test_labels)
  result = score(test_labels, np.asarray(scores), head.task, bootstrap=bootstrap)
  result.update(best_epoch=best["epoch"], val_loss=best["val_loss"],
                train_loss=best["train_loss"], test_scores=np.asarray(scores))
  return result


def probe_fast(train_feats, train_labels, val_feats, val_labels, test_feats,
               test_labels, split, cfg) -> dict:
  """The head on fixed features: each epoch is one jitted scan over its batches."""
  n, dim = train_feats.shape
  b = int(cfg.batch_size)
  steps = n // b
  if steps == 0:
    raise ValueError(f"{split.name}: {n} training examples < config.probe.batch_size={b}")
  head = Head(dim, split, cfg)
  feats_dev, labels_dev = jnp.asarray(train_feats), jnp.asarray(train_labels)

  @jax.jit
  def run_epoch(params, bn, opt_state, perm, lr):
    def body(carry, idx):
      p, s, o = carry
      p, s, o, loss = head.update(p, s, o, feats_dev[idx], labels_dev[idx], lr)
      return (p, s, o), loss
    (params, bn, opt_state), losses = jax.lax.scan(
        body, (params, bn, opt_state), perm[:steps * b].reshape(steps, b))
    return params, bn, opt_state, losses.mean()

  params, bn, opt_state = head.state()
  history = []
  val_feats, val_labels = jnp.asarray(val_feats), jnp.asarray(val_labels)
  for epoch in range(cfg.epochs):
    perm = np.random.default_rng([cfg.seed, epoch]).permutation(n)
    params, bn, opt_state, train_loss = run_epoch(params, bn, opt_state, perm,
                                                  epoch_lr(cfg, epoch))
    val_loss, _ = head.evaluate(params, bn, val_feats, val_labels)
    history.append({"epoch": epoch, "params": params, "bn": bn,
                    "val_loss": float(val_loss), "train_loss": float(train_loss)})
    history = [min(history, key=lambda h: h["val_loss"]), history[-1]]
  return _select_and_score(history, jnp.asarray(test_feats), jnp.asarray(test_labels),
                           head, cfg.bootstrap)


def probe_biovfm(encoder, train, val_feats, val_labels, test_feats, test_labels, cfg,
                 *, image_size: int | None) -> dict:
  """PAPER.md's protocol: the frozen encoder runs on augmented training images
  every epoch; its features feed the head in the same jitted step. Validation
  and test images are not augmented, so their features are computed once
  (unless the encoder is stochastic: cfg.stochastic_encoder keeps drop path on
  while training, as the reference run did for DINOv2)."""
  b = int(cfg.batch_size)
  if train.num_examples < b:
    raise ValueError(f"{train.name}: {train.num_examples} training examples < "
                     f"config.probe.batch_size={b}")
  dim = _feature_dim(encoder, cfg.pool)
  head = Head(dim, train, cfg)
  featurize = feat_lib.pooled_fn(encoder, cfg.pool)
  stochastic = bool(cfg.stochastic_encoder)

  @jax.jit
  def step(params, bn, opt_state, enc_params, images, labels, rng, lr):
    feats = jax.lax.stop_gradient(featurize(enc_params, images, rng, not stochastic))
    return head.update(params, bn, opt_state, feats, labels, lr)

  params, bn, opt_state = head.state()
  history = []
  base = jax.random.key(cfg.seed)
  val_feats, val_labels = jnp.asarray(val_feats), jnp.asarray(val_labels)
  steps_per_epoch = train.num_examples // b
  for epoch in range(cfg.epochs):
    lr = epoch_lr(cfg, epoch)
    losses = []
    progress = feat_lib.Progress(f"probe {train.name} epoch {epoch + 1}/{cfg.epochs}",
                                 steps_per_epoch * b, every=30.0)
    for i, batch in enumerate(train.batches(
        b, augment=True, seed=cfg.seed, epoch=epoch, shuffle=True, drop_last=True,
        image_size=image_size, process_index=jax.process_index(),
        process_count=jax.process_count())):
      images = feat_lib.global_batch(encoder, batch["image"])
      labels = feat_lib.global_batch(encoder, batch["label"])
      rng = jax.random.fold_in(jax.random.fold_in(base, epoch), i)
      params, bn, opt_state, loss = step(params, bn, opt_state, encoder.params, images,
                                         labels, rng, lr)
      losses.append(loss)
      progress.update(b)
    val_loss, _ = head.evaluate(params, bn, val_feats, val_labels)
    train_loss = float(jnp.mean(jnp.stack(losses)))
    logging.info("probe %s epoch %d: train loss %.4f, val loss %.4f", train.name,
                 epoch + 1, train_loss, float(val_loss))
    history.append({"epoch": epoch, "params": params, "bn": bn,
                    "val_loss": float(val_loss), "train_loss": train_loss})
    history = [min(history, key=lambda h: h["val_loss"]), history[-1]]
  return _select_and_score(history, jnp.asarray(test_feats), jnp.asarray(test_labels),
                           head, cfg.bootstrap)


def _feature_dim(encoder, how: str) -> int:
  width = encoder.config.width
  return 2 * width if how == "cls_mean_patch" else width
