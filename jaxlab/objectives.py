"""Objectives: small pure loss terms combined with weights from config.

`config.objective` keys:
  weights: ConfigDict {term_name: weight}; terms with weight 0 are skipped.
      Built in: cross_entropy, soft_distill, feature_mse.
  label_smoothing: for cross_entropy.
  teacher: checkpoint path of a frozen teacher (needed by distillation terms).
  temperature: soft distillation temperature.
  prepare: name of a batch preparer run before the forward pass (e.g. masking
      for denoising); '' for none.
  eval: name of the eval metric function ('classification').

A term is `fn(ctx: Context, cfg) -> scalar` registered with `@register_term`.
A term that needs block features declares `needs=('features',)`; one that
needs the teacher declares `needs=('teacher',)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlab.registry import Registry


@dataclasses.dataclass
class Context:
  """Everything a loss term may look at for one batch."""
  logits: Any
  batch: dict
  features: Any = None            # [L, B, T, D] block outputs when requested
  teacher_logits: Any = None
  teacher_features: Any = None
  params: Any = None              # materialized student params
  theta: Any = None               # trainable tree
  teacher_params: Any = None
  rng: Any = None


@dataclasses.dataclass(frozen=True)
class Term:
  """A registered loss term: `fn(ctx, cfg) -> scalar` and what its context needs ('teacher', 'features')."""
  fn: Callable
  needs: tuple[str, ...] = ()


# Every module of jaxlab.losses may register terms, preparers and evals (found on the first lookup).
TERMS = Registry("loss term", key="config.objective.weights", package="jaxlab.losses")
PREPARERS = Registry("preparer", key="config.objective.prepare", package="jaxlab.losses")
EVALS = Registry("eval", key="config.objective.eval", package="jaxlab.losses")


def register_term(name: str, needs: tuple[str, ...] = ()):
  """Decorator registering `fn(ctx, cfg) -> scalar` as loss term `name`."""
  return TERMS.register(name, wrap=lambda fn: Term(fn, tuple(needs)))


def register_preparer(name: str):
  """Decorator registering a batch preparer `fn(batch, rng, cfg) -> batch` under `name`."""
  return PREPARERS.register(name)


def register_eval(name: str):
  """Decorator registering an eval metric function `fn(logits, batch) -> metric sums` under `name`."""
  return EVALS.register(name)


def active_terms(cfg) -> dict[str, float]:
  weights = dict(cfg.get("weights", {"cross_entropy": 1.0}))
  unknown = [k for k in weights if k not in TERMS]
  if unknown:
    raise ValueError(f"config.objective.weights: unknown loss terms {unknown}; known: {TERMS.names()}")
  return {k: float(v) for k, v in weights.items() if float(v) != 0.0}


def needs(cfg) -> set[str]:
  out = set()
  for name in active_terms(cfg):
    out |= set(TERMS.get(name).needs)
  return out


def get_preparer(cfg):
  name = cfg.get("prepare", "")
  return PREPARERS.get(name) if name else None


def get_eval(cfg):
  return EVALS.get(cfg.get("eval", "classification"))


def total_loss(ctx: Context, cfg) -> tuple[jax.Array, dict]:
  """Weighted sum of the active terms, and each term's value as a metric."""
  metrics, loss = {}, 0.0
  for name, w in active_terms(cfg).items():
    value = TERMS.get(name).fn(ctx, cfg)
    metrics[f"loss/{name}"] = value
    loss = loss + w * value
  return jnp.asarray(loss, jnp.float32), metrics


def _example_mask(batch, n):
  return batch.get("mask", jnp.ones((n,), jnp.float32))


@register_term("cross_entropy")
def cross_entropy(ctx: Context, cfg) -> jax.Array:
  """Mean softmax cross entropy with label smoothing over the batch.

  Soft targets `batch['soft_label']` [B, K] (Mixup/CutMix, `jaxlab.data.mixing`) replace the one-hot labels
  when present; smoothing then applies to them (the same as mixing smoothed one-hots, as timm does).
  """
  logits = ctx.logits.astype(jnp.float32)
  k = logits.shape[-1]
  onehot = ctx.batch["soft_label"] if "soft_label" in ctx.batch else jax.nn.one_hot(ctx.batch["label"], k)
  ls = float(cfg.get("label_smoothing", 0.0))
  if ls:
    onehot = onehot * (1.0 - ls) + ls / k
  return optax.softmax_cross_entropy(logits, onehot).mean()


@register_term("soft_distill", needs=("teacher",))
def soft_distill(ctx: Context, cfg) -> jax.Array:
  """KL(softmax(t/T) || softmax(s/T)) * T^2, summed over classes, mean over the batch.

  With `objective.distill_normalize='numel'` the sum is divided by B * K
  instead (the DeiT/TLEG code's legacy normalisation).
  """
  t = float(cfg.get("temperature", 1.0))
  s_log = jax.nn.log_softmax(ctx.logits.astype(jnp.float32) / t, axis=-1)
  t_log = jax.nn.log_softmax(jax.lax.stop_gradient(ctx.teacher_logits).astype(jnp.float32) / t, axis=-1)
  kl = jnp.sum(jnp.exp(t_log) * (t_log - s_log), axis=-1) * t * t
  if cfg.get("distill_normalize", "batch") == "numel":
    return kl.sum() / kl.size / ctx.logits.shape[-1]
  return kl.mean()


@register_term("feature_mse", needs=("teacher", "features"))
def feature_mse(ctx: Context, cfg) -> jax.Array:
  """Mean squared error of every block's output against the frozen teacher's.

  The features may be an array or the model's whole `intermediates` tree (e.g.
  `{'blocks': {'features': ([L, B, T, D],)}}`); the MSE is averaged per leaf,
  then over leaves.
  """
  del cfg
  s_leaves = jax.tree.leaves(ctx.features)
  t_leaves = jax.tree.leaves(jax.lax.stop_gradient(ctx.teacher_features))
  s_shapes, t_shapes = [x.shape for x in s_leaves], [x.shape for x in t_leaves]
  if not s_leaves or s_shapes != t_shapes:
    raise ValueError(f"feature_mse: student features {s_shapes} and teacher features {t_shapes} differ")
  return sum(jnp.mean((s.astype(jnp.float32) - t.astype(jnp.float32)) ** 2)
             for s, t in zip(s_leaves, t_leaves, strict=True)) / len(s_leaves)


@register_eval("classification")
def classification_eval(logits, batch) -> dict[str, jax.Array]:
  """Sums (not means) of correct predictions, loss and example count, masked."""
  mask = _example_mask(batch, logits.shape[0])
  label = batch["label"]
  correct = (jnp.argmax(logits, -1) == label).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), label)
  return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(ce * mask), "count": jnp.sum(mask)}


def finalize_eval(sums: dict) -> dict[str, float]:
  """Turns summed eval metrics into means: accuracy = correct / count, etc."""
  count = max(float(sums.get("count", 0.0)), 1.0)
  out = {}
  for k, v in sums.items():
    if k == "count":
      out["count"] = int(v)
    elif k == "correct":
      out["accuracy"] = float(v) / count
    else:
      out[k] = float(v) / count
  return out
