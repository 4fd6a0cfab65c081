"""Self-pretraining objectives ("Never Train from Scratch", Amos, Berant & Gupta, ICLR 2024).

Pretraining uses only the task's own training inputs. Two batch preparers
(`config.objective.prepare`) build the targets, three loss terms score them on
a `per_position` model output (logits [B, L, K]) only where `target_mask` is 1:

  mask_denoise  i.i.d. Bernoulli(`objective.mask_rate`) masking per position.
                Tokens (int inputs [B, L]): masked ids become `objective.mask_id`
                (the data set's `vocab_size`, so embeddings have vocab_size + 1
                rows); positions equal to `objective.pad_id` (>= 0) are never
                masked. Values (float inputs [B, L, C]): the input becomes
                [x * (1 - m), m], C + 1 channels, the mask flag last.
  causal_shift  next-element prediction: target t is element t + 1; the last
                position (and pad targets) carry no loss. Needs a causal model.

  denoise_ce / causal_ce  cross entropy over K classes: token targets directly,
                value targets quantized to K grey levels (K = 256 for the
                paper's 256-way pixel CE): level = round(x * (K - 1)), x in [0, 1].
  denoise_l1 / causal_l1  L1 regression of the values (K = C outputs).

Every preparer stores `targets` (the clean inputs, or the shifted ones) and
`target_mask` (float [B, L]) in the batch. The eval `per_position` reports
masked-token accuracy and loss (CE), or `mae` (L1, when K equals the number of
value channels); its `count` is the number of scored positions. With
`objective.eval_prepare = True` the training loop applies the preparer to eval
batches too (with a fixed key), which these metrics need.

Objective keys: mask_rate (float in (0, 1)), mask_id (int; required for token
inputs under mask_denoise), pad_id (int, -1 = none), eval_prepare (bool).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxlab import objectives


def _is_tokens(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.integer)


def _not_pad(x, cfg):
  pad = int(cfg.get("pad_id", -1))
  if pad < 0 or not _is_tokens(x):
    return jnp.ones(x.shape[:2], jnp.float32)
  return (x != pad).astype(jnp.float32)


def _with_example_mask(batch, target_mask):
  if "mask" in batch:  # eval padding rows
    target_mask = target_mask * batch["mask"].astype(jnp.float32)[:, None]
  return target_mask


@objectives.register_preparer("mask_denoise")
def mask_denoise(batch: dict, rng: jax.Array, cfg) -> dict:
  """Masks each position i.i.d. with probability `objective.mask_rate` (see the module docstring).

  Args:
    batch: `inputs` int [B, L] tokens or float [B, L, C] values, plus anything else.
    rng: PRNG key.
    cfg: objective config (`mask_rate`, `mask_id`, `pad_id`).

  Returns:
    The batch with masked `inputs`, `targets` (the clean inputs) and `target_mask` [B, L].

  Raises:
    ValueError: for a rate outside (0, 1) or token inputs without `objective.mask_id`.
  """
  rate = float(cfg.get("mask_rate", 0.15))
  if not 0.0 < rate < 1.0:
    raise ValueError(f"config.objective.mask_rate: must be in (0, 1), got {rate}")
  x = batch["inputs"]
  valid = _not_pad(x, cfg)
  m = jax.random.bernoulli(rng, rate, x.shape[:2]).astype(jnp.float32) * valid
  if _is_tokens(x):
    mask_id = int(cfg.get("mask_id", -1))
    if mask_id < 0:
      raise ValueError("config.objective.mask_id: set it to the data set's vocab_size for token inputs "
                       "(models embed vocab_size + 1 ids)")
    inputs = jnp.where(m > 0, jnp.asarray(mask_id, x.dtype), x)
  else:
    if x.ndim != 3:
      raise ValueError(f"mask_denoise: value inputs must be [B, L, C], got shape {tuple(x.shape)}")
    inputs = jnp.concatenate([x * (1.0 - m)[..., None].astype(x.dtype), m[..., None].astype(x.dtype)], -1)
  return {**batch, "inputs": inputs, "targets": x, "target_mask": _with_example_mask(batch, m)}


@objectives.register_preparer("causal_shift")
def causal_shift(batch: dict, rng: jax.Array, cfg) -> dict:
  """Next-element targets: `targets[:, t] = inputs[:, t + 1]`; the last position is not scored.

  Args:
    batch: `inputs` int [B, L] or float [B, L, C].
    rng: unused (the preparer is deterministic).
    cfg: objective config (`pad_id`: pad targets are not scored).

  Returns:
    The batch with `targets` and `target_mask` [B, L]; `inputs` unchanged.
  """
  del rng
  x = batch["inputs"]
  targets = jnp.concatenate([x[:, 1:], x[:, -1:]], axis=1)
  tm = jnp.concatenate([jnp.ones((x.shape[0], x.shape[1] - 1), jnp.float32),
                        jnp.zeros((x.shape[0], 1), jnp.float32)], axis=1)
  tm = tm * _not_pad(targets, cfg)
  return {**batch, "targets": targets, "target_mask": _with_example_mask(batch, tm)}


def _need_targets(ctx_batch, term: str):
  if "targets" not in ctx_batch or "target_mask" not in ctx_batch:
    raise ValueError(f"loss term {term!r} needs config.objective.prepare = 'mask_denoise' or 'causal_shift'")


def class_targets(targets, num_classes: int):
  """Integer targets [B, L]: tokens as they are, values in [0, 1] quantized to `num_classes` levels.

  Raises:
    ValueError: for value targets with more than one channel.
  """
  if _is_tokens(targets):
    return targets
  if targets.shape[-1] != 1:
    raise ValueError(f"cross entropy on values needs one channel, got targets {tuple(targets.shape)}; use an L1 term")
  q = jnp.round(jnp.clip(targets[..., 0], 0.0, 1.0) * (num_classes - 1))
  return q.astype(jnp.int32)


def _check_logits(logits, term: str):
  if logits.ndim != 3:
    raise ValueError(f"loss term {term!r} needs per-position logits [B, L, K] (model output='per_position'), "
                     f"got shape {tuple(logits.shape)}")


def masked_ce(logits, targets, target_mask) -> jax.Array:
  """Mean cross entropy over positions with `target_mask` 1 (0 when there are none)."""
  y = class_targets(targets, logits.shape[-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
  return jnp.sum(ce * target_mask) / jnp.maximum(jnp.sum(target_mask), 1.0)


def masked_l1(pred, targets, target_mask) -> jax.Array:
  """Mean absolute error over channels and positions with `target_mask` 1."""
  if _is_tokens(targets) or pred.shape != targets.shape:
    raise ValueError(f"L1 loss needs value targets shaped like the output, got output {tuple(pred.shape)} "
                     f"and targets {tuple(targets.shape)} ({targets.dtype})")
  err = jnp.abs(pred.astype(jnp.float32) - targets.astype(jnp.float32)).mean(-1)
  return jnp.sum(err * target_mask) / jnp.maximum(jnp.sum(target_mask), 1.0)


def _ce_term(name):
  def term(ctx: objectives.Context, cfg) -> jax.Array:
    del cfg
    _need_targets(ctx.batch, name)
    _check_logits(ctx.logits, name)
    return masked_ce(ctx.logits, ctx.batch["targets"], ctx.batch["target_mask"])
  term.__name__ = name
  term.__doc__ = f"`{name}`: cross entropy on positions where target_mask is 1."
  return term


def _l1_term(name):
  def term(ctx: objectives.Context, cfg) -> jax.Array:
    del cfg
    _need_targets(ctx.batch, name)
    _check_logits(ctx.logits, name)
    return masked_l1(ctx.logits, ctx.batch["targets"], ctx.batch["target_mask"])
  term.__name__ = name
  term.__doc__ = f"`{name}`: L1 regression on positions where target_mask is 1."
  return term


denoise_ce = objectives.register_term("denoise_ce")(_ce_term("denoise_ce"))
causal_ce = objectives.register_term("causal_ce")(_ce_term("causal_ce"))
denoise_l1 = objectives.register_term("denoise_l1")(_l1_term("denoise_l1"))
causal_l1 = objectives.register_term("causal_l1")(_l1_term("causal_l1"))


@objectives.register_eval("per_position")
def per_position_eval(logits, batch) -> dict[str, jax.Array]:
  """Sums over scored positions: `correct` and CE `loss`, or `mae` when the output has as many
  channels as the value targets (L1 models); `count` = number of scored positions."""
  tm = batch["target_mask"].astype(jnp.float32)
  targets = batch["targets"]
  count = jnp.sum(tm)
  if not _is_tokens(targets) and logits.shape[-1] == targets.shape[-1]:
    err = jnp.abs(logits.astype(jnp.float32) - targets.astype(jnp.float32)).mean(-1)
    return {"mae": jnp.sum(err * tm), "count": count}
  y = class_targets(targets, logits.shape[-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
  correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
  return {"correct": jnp.sum(correct * tm), "loss": jnp.sum(ce * tm), "count": count}
