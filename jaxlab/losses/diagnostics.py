"""Loss-term diagnostics: how hard each term of a combined objective pulls, measured against the task loss.

An objective `sum_k w_k L_k` (`config.objective.weights`) can carry a term whose gradient is so small next
to the task loss's that training ignores it (issue 13: PELA's weight perturbation at about 1/1000 of cross
entropy's, touching 1% of the entries). For one batch this module computes, for every active term k, the
gradient of its weighted value `w_k L_k` with respect to the trainable tree and reports

    grad_norm   || d(w_k L_k) / d theta ||_2
    ratio       grad_norm_k / grad_norm_task        (1.0 for the task term itself)
    cosine      cos(grad_k, grad_task)              (direction: helping, fighting, or orthogonal)
    touched     fraction of theta's entries with a non-zero gradient from the term
    value, weight

`gradient_ratios` works on any `theta -> {term: unweighted value}` function; `objective_gradient_ratios` on
a `theta -> objectives.Context` function with the registered terms; `make_context_fn` builds that function
the way the train step builds its context (same preparer, model call and teacher call).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import objectives


def _flat(tree) -> jax.Array:
  leaves = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)]
  return jnp.concatenate(leaves) if leaves else jnp.zeros((0,), jnp.float32)


def gradient_ratios(term_values: Callable[[Any], Mapping[str, jax.Array]], theta, weights: Mapping[str, float],
                    task: str = "cross_entropy") -> dict[str, dict[str, float]]:
  """Per-term gradient norms of a weighted objective, relative to the task term.

  Args:
    term_values: `theta -> {term name: unweighted scalar}` for one fixed batch (and fixed randomness).
    theta: the trainable tree the gradients are taken with respect to.
    weights: `{term name: weight}`; terms missing from `term_values` raise.
    task: the term the others are compared with.

  Returns:
    `{term: {'weight', 'value', 'grad_norm', 'ratio', 'cosine', 'touched'}}` as Python floats.

  Raises:
    ValueError: when `task` or a weighted term is not among the computed values.
  """
  weights = {k: float(v) for k, v in weights.items()}
  if task not in weights:
    raise ValueError(f"loss diagnostics: the task term {task!r} is not in the objective's weights {sorted(weights)}")

  def weighted(th):
    vals = term_values(th)
    missing = sorted(set(weights) - set(vals))
    if missing:
      raise ValueError(f"loss diagnostics: no value for the weighted terms {missing}")
    return {k: weights[k] * vals[k].astype(jnp.float32) for k in weights}, vals

  grads, vals = jax.jit(jax.jacrev(weighted, has_aux=True))(theta)  # one compiled program, not op by op
  flat = {k: _flat(g) for k, g in grads.items()}
  norms = {k: float(jnp.linalg.norm(v)) for k, v in flat.items()}
  t_vec, t_norm = flat[task], norms[task]
  out = {}
  for k, v in flat.items():
    denom = norms[k] * t_norm
    out[k] = {"weight": weights[k], "value": float(vals[k]), "grad_norm": norms[k],
              "ratio": norms[k] / t_norm if t_norm > 0 else float("inf"),
              "cosine": float(jnp.dot(v, t_vec)) / denom if denom > 0 else 0.0,
              "touched": float(np.mean(np.asarray(v) != 0.0)) if v.size else 0.0}
  return out


def objective_gradient_ratios(context_fn: Callable[[Any], objectives.Context], theta, obj_cfg,
                              task: str = "cross_entropy") -> dict[str, dict[str, float]]:
  """`gradient_ratios` of the registered terms of `obj_cfg` (its active `weights`), on `context_fn(theta)`."""
  weights = objectives.active_terms(obj_cfg)

  def values(th):
    ctx = context_fn(th)
    return {name: objectives.TERMS.get(name).fn(ctx, obj_cfg) for name in weights}

  return gradient_ratios(values, theta, weights, task)


def make_context_fn(module, param, obj_cfg, model_state, batch: dict, rng, teacher=None,
                    train: bool = True) -> Callable[[Any], objectives.Context]:
  """`theta -> objectives.Context` for one batch, built as the train step builds it (`jaxlab.train`).

  Args:
    module: the Flax model.
    param: the parameterization (`materialize(theta) -> params`).
    obj_cfg: the objective config (preparer, which terms need features / the teacher).
    model_state: non-param collections (e.g. batch_stats).
    batch: one batch (`inputs`, `label`, ...); the preparer, if any, runs once with `rng`.
    rng: PRNG key for the preparer and dropout (fixed, so every term sees the same forward pass).
    teacher: an object with `module`, `params`, `model_state` (the frozen teacher), or None.
    train: the model's train flag (dropout, BatchNorm statistics).
  """
  from jaxlab import evaluate as evaluation
  need = objectives.needs(obj_cfg)
  want_features = "features" in need
  if "teacher" in need and teacher is None:
    raise ValueError("loss diagnostics: the objective has teacher terms; pass the teacher (config.objective.teacher)")
  prep_rng, drop_rng = jax.random.split(rng)
  preparer = objectives.get_preparer(obj_cfg)
  if preparer is not None:
    batch = preparer(batch, prep_rng, obj_cfg)
  t_logits = t_feats = None
  if teacher is not None:
    t_logits, _, t_feats = evaluation.apply_model(teacher.module, teacher.params, teacher.model_state,
                                                  batch["inputs"], train=False, features=want_features)

  def context_fn(theta):
    params = param.materialize(theta)
    logits, _, feats = evaluation.apply_model(module, params, model_state, batch["inputs"], train=train,
                                              rng=drop_rng, features=want_features)
    return objectives.Context(logits=logits, batch=batch, features=feats, params=params, theta=theta, rng=rng,
                              teacher_logits=t_logits, teacher_features=t_feats,
                              teacher_params=None if teacher is None else teacher.params)

  return context_fn


def checkpoint_gradient_ratios(student: str, obj_cfg, teacher: str | None = None, batch_size: int = 64,
                               seed: int = 0) -> dict[str, dict[str, float]]:
  """`objective_gradient_ratios` of `obj_cfg` at a saved checkpoint, on its data set's first `batch_size` training
  examples, with the checkpoint at `teacher` (if any) as the frozen teacher.

  Args:
    student: checkpoint (directory) whose trainable tree is differentiated.
    obj_cfg: the objective config (e.g. a trained stage's `config.objective` read from its checkpoint meta).
    teacher: teacher checkpoint, needed when the objective has teacher terms.
    batch_size: examples in the batch.
    seed: PRNG seed of the preparer / dropout.
  """
  from jaxlab import checkpoint, data
  st = checkpoint.load(student)
  ds = data.get_dataset(st.meta["data"]["config"], st.meta)
  fn = make_context_fn(st.module, st.parameterization, obj_cfg, st.model_state,
                       ds.device_preprocess(ds.sample_batch(batch_size)), jax.random.key(seed),
                       teacher=checkpoint.load(teacher) if teacher else None)
  return objective_gradient_ratios(fn, st.theta, obj_cfg)
