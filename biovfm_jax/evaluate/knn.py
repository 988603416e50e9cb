"""Weighted k-nearest-neighbour classification on frozen features (as DINO's
eval_knn): cosine similarity, the k most similar training examples vote with
weight exp(similarity / T); class scores are the normalised votes. For
multi-label tasks each neighbour votes for its whole label vector."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from biovfm_jax.evaluate.linear_probe import MULTI_LABEL
from biovfm_jax.evaluate.metrics import score
from data_pipeline.errors import ConfigError


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k",))
def _vote(query, bank, targets, *, k: int, temperature: float):
  sim = _normalize(query) @ _normalize(bank).T             # (Q, N) cosine
  top, idx = jax.lax.top_k(sim, k)
  w = jnp.exp((top - top[:, :1]) / temperature)            # shift for stability
  votes = jnp.einsum("qk,qkc->qc", w, targets[idx])
  return votes / w.sum(-1, keepdims=True)


def knn_scores(train_feats, train_labels, query_feats, *, task: str, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
  """(Q, C) scores for `query_feats` from the labelled `train_feats`."""
  n = len(train_feats)
  if not 1 <= k <= n:
    raise ConfigError(f"config.knn.k={k} must be in [1, {n}] (the training examples)")
  labels = np.asarray(train_labels)
  if task == MULTI_LABEL:
    targets = labels.astype(np.float32)
  else:
    targets = np.eye(num_classes, dtype=np.float32)[labels[:, 0]]
  bank, targets = jnp.asarray(train_feats, jnp.float32), jnp.asarray(targets)
  out = [np.asarray(_vote(jnp.asarray(query_feats[i:i + chunk], jnp.float32), bank,
                          targets, k=k, temperature=temperature))
         for i in range(0, len(query_feats), chunk)]
  return np.concatenate(out)


def knn_eval(train_feats, train_labels, test_feats, test_labels, split, cfg) -> dict:
  scores = knn_scores(train_feats, train_labels, test_feats, task=split.task,
                      num_classes=int(split.num_classes), k=int(cfg.k),
                      temperature=float(cfg.temperature))
  result = score(test_labels, scores, split.task, bootstrap=int(cfg.bootstrap))
  result.update(k=int(cfg.k), temperature=float(cfg.temperature), test_scores=scores)
  return result
