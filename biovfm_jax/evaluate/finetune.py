"""Full fine-tuning of an encoder on one benchmark, MAE's recipe.

Global pool (mean patch tokens) -> LayerNorm (trainable, MAE's fc_norm) ->
linear head (truncated normal std 2e-5, bias 0). AdamW (0.9, 0.999),
lr = base_lr x batch / 256, linear warmup then cosine per step to min_lr,
weight decay 0.05 on matrices but the cls token and position table (MAE's
main_finetune groups), layer-wise lr decay (0.65 for B), drop path, label
smoothing 0.1 on single-label tasks. The optimiser is the
pretraining one (biovfm_jax/train/optim.py), fed a config of the same shape.

Left out of MAE's recipe: RandAugment, mixup and cutmix (training images get
the probe's rotation + crop augmentation instead). The epoch with the lowest
validation loss is scored on test, as in the linear probe.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from biovfm_jax import sharding as shd
from biovfm_jax.evaluate import features as feat_lib
from biovfm_jax.evaluate.encoder import Encoder
from biovfm_jax.evaluate.linear_probe import MULTI_LABEL, head_scores
from biovfm_jax.evaluate.metrics import score
from biovfm_jax.train import optim


def _loss(logits, labels, task: str, smoothing: float):
  if task == MULTI_LABEL:
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean()
  onehot = jax.nn.one_hot(labels[:, 0], logits.shape[-1])
  onehot = optax.smooth_labels(onehot, smoothing) if smoothing else onehot
  return optax.softmax_cross_entropy(logits, onehot).mean()


# config.finetune's fields that train/optim.py reads under config.optim.
_OPTIM_KEYS = ("base_lr", "lr_batch_base", "lr_scaling", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end",
               "b1", "b2", "eps", "grad_clip_norm", "layer_decay", "patch_embed_lr_mult",
               "freeze_last_layer_epochs", "freeze_pattern", "freeze_blocks", "freeze_blocks_steps")


def _optimizer_config(cfg) -> ml_collections.ConfigDict:
  """The eval config's finetune fields in the shape train/optim.py reads."""
  return ml_collections.ConfigDict({
      "batch_size": int(cfg.batch_size),
      # MAE's fine-tuning recipe: one clip norm, warmup peak x t / W.
      "optim": {**{k: cfg[k] for k in _OPTIM_KEYS}, "clip_scope": "global",
                "warmup_reaches_peak": False, "freeze_last_layer_grads": False}})


def finetune(encoder: Encoder, splits: dict, cfg, *, image_size: int | None) -> dict:
  train, val, test = splits["train"], splits["val"], splits["test"]
  b = int(cfg.batch_size)
  steps_per_epoch = train.num_examples // b
  if steps_per_epoch == 0:
    raise ValueError(f"{train.name}: {train.num_examples} training examples < "
                     f"config.finetune.batch_size={b}")
  total_steps = steps_per_epoch * int(cfg.epochs)
  # A copy of the encoder with the fine-tuning drop path; the frozen one is untouched.
  enc = Encoder(dataclasses.replace(encoder.config, drop_path_rate=float(cfg.drop_path_rate)),
                encoder.params, mesh=encoder.mesh, rules=encoder.rules, source=encoder.source)
  width, n_out, task = enc.config.width, int(train.num_classes), train.task
  key = jax.random.key(cfg.seed)
  params = {
      "encoder": jax.tree.map(jnp.copy, enc.params),
      "fc_norm": {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))},
      "head": {"kernel": 2e-5 * jax.random.truncated_normal(key, -2.0, 2.0, (width, n_out)),
               "bias": jnp.zeros((n_out,))}}
  decay_mask = optim.decay_mask(params, finetune=True)  # MAE's fine-tuning groups
  ocfg = _optimizer_config(cfg)
  schedule = optim.lr_schedule(ocfg, total_steps, steps_per_epoch)
  tx = optim.make_optimizer(ocfg, schedule, decay_mask, params=params,
                            depth=enc.config.depth, total_steps=total_steps,
                            steps_per_epoch=steps_per_epoch)
  opt_state = tx.init(params)
  featurize = feat_lib.pooled_fn(enc, cfg.pool)

  def logits_fn(p, images, rng, deterministic):
    x = featurize(p["encoder"], images, rng, deterministic)
    mu = x.mean(-1, keepdims=True)
    x = (x - mu) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)
    x = x * p["fc_norm"]["scale"] + p["fc_norm"]["bias"]
    return x @ p["head"]["kernel"] + p["head"]["bias"]

  @jax.jit
  def train_step(p, opt_state, images, labels, rng):
    loss, grads = jax.value_and_grad(
        lambda q: _loss(logits_fn(q, images, rng, False), labels, task,
                        float(cfg.label_smoothing)))(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  eval_step = jax.jit(lambda p, images: logits_fn(p, images, None, True))

  def predict(p, split):
    """Logits of every example (the padded last batch trimmed), in order."""
    out = np.zeros((split.num_examples, n_out), np.float32)
    for batch in split.batches(b, augment=False, shuffle=False, drop_last=False,
                               image_size=image_size, process_index=jax.process_index(),
                               process_count=jax.process_count()):
      logits = shd.to_host(eval_step(p, feat_lib.global_batch(enc, batch["image"])))
      index = shd.to_host(feat_lib.global_batch(enc, batch["index"]))
      valid = shd.to_host(feat_lib.global_batch(enc, batch["valid"]))
      out[index[valid]] = logits[valid]
    return out

  def split_loss(logits, labels) -> float:
    return float(_loss(jnp.asarray(logits), jnp.asarray(labels), task, 0.0))

  best = None
  base = jax.random.key(cfg.seed + 1)
  for epoch in range(int(cfg.epochs)):
    losses = []
    for i, batch in enumerate(train.batches(
        b, augment=True, seed=cfg.seed, epoch=epoch, shuffle=True, drop_last=True,
        image_size=image_size, process_index=jax.process_index(),
        process_count=jax.process_count())):
      rng = jax.random.fold_in(jax.random.fold_in(base, epoch), i)
      params, opt_state, loss = train_step(params, opt_state,
                                           feat_lib.global_batch(enc, batch["image"]),
                                           feat_lib.global_batch(enc, batch["label"]), rng)
      losses.append(loss)
    val_loss = split_loss(predict(params, val), val.labels)
    train_loss = float(jnp.mean(jnp.stack(losses)))
    logging.info("finetune %s epoch %d/%d: train loss %.4f, val loss %.4f", train.name,
                 epoch + 1, cfg.epochs, train_loss, val_loss)
    if best is None or val_loss < best["val_loss"]:
      best = {"epoch": epoch, "val_loss": val_loss, "train_loss": train_loss,
              "params": jax.tree.map(jnp.copy, params)}
  logits = predict(best["params"], test)
  scores = np.asarray(head_scores(jnp.asarray(logits), task))
  result = score(test.labels, scores, task, bootstrap=int(cfg.bootstrap))
  result.update(best_epoch=best["epoch"], val_loss=best["val_loss"],
                train_loss=best["train_loss"], test_scores=scores)
  return result
