"""Optimizers from config: AdamW or SGD, warmup + cosine, clipping, per-path rules.

Config keys (`config.optimizer`):
  name: 'adamw' | 'sgd';  lr, weight_decay, b1, b2, eps, momentum, nesterov
  warmup_steps, schedule ('cosine' | 'constant' | 'linear'), min_lr_ratio
  grad_clip: global-norm clipping (0 = off)
  lr_rules: tuple of (regex, multiplier): the learning rate of matching
      parameters is multiplied (first match wins), e.g. (('.*ssm/.*', 0.1),)
  no_decay: regexes of parameters without weight decay (default: biases,
      norms, embeddings and tokens, i.e. every leaf with ndim <= 1 after
      removing the depth axis is NOT assumed; the names decide)
  frozen: regexes of parameters that never change
Paths are `/`-joined names in the trainable tree (the parameterization's theta).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxlab import trees

DEFAULT_NO_DECAY = (r".*bias", r".*(norm|Norm)[^/]*/scale", r".*pos_embed", r".*cls_token")


def schedule(cfg, total_steps: int) -> optax.Schedule:
  lr, warmup = float(cfg.lr), int(cfg.get("warmup_steps", 0))
  kind = cfg.get("schedule", "cosine")
  decay_steps = max(total_steps - warmup, 1)
  end = lr * float(cfg.get("min_lr_ratio", 0.0))
  if kind == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif kind == "linear":
    main = optax.linear_schedule(lr, end, decay_steps)
  elif kind == "constant":
    main = optax.constant_schedule(lr)
  else:
    raise ValueError(f"config.optimizer.schedule: unknown schedule {kind!r}; use cosine, linear or constant")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _scale_by_tree(scales) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def build(cfg, theta, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optax optimizer for trainable tree `theta` from `config.optimizer`."""
  name = cfg.get("name", "adamw")
  sched = schedule(cfg, total_steps)
  parts = []
  if cfg.get("grad_clip", 0.0):
    parts.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
  if name == "adamw":
    parts.append(optax.scale_by_adam(b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8)))
  elif name == "sgd":
    if cfg.get("momentum", 0.0):
      parts.append(optax.trace(decay=cfg.momentum, nesterov=cfg.get("nesterov", False)))
  else:
    raise ValueError(f"config.optimizer.name: unknown optimizer {name!r}; use adamw or sgd")
  wd = float(cfg.get("weight_decay", 0.0))
  if wd:
    no_decay = tuple(cfg.get("no_decay", DEFAULT_NO_DECAY))
    decay_mask = jax.tree.map(lambda m: not m, trees.mask(theta, no_decay))
    parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
  parts.append(optax.scale_by_learning_rate(sched))
  lr_rules = tuple(tuple(r) for r in cfg.get("lr_rules", ()))
  frozen = tuple(cfg.get("frozen", ()))
  if lr_rules or frozen:
    rules = [(r, 0.0) for r in frozen] + [(r, float(m)) for r, m in lr_rules]
    parts.append(_scale_by_tree(trees.map_with_rules(theta, rules, 1.0)))
  return optax.chain(*parts), sched
