"""Parameterizations: a trainable tree `theta` and a pure `materialize(theta) -> params`.

A parameterization class is registered under a name and built from
`config.parameterization` (its `name` plus its own keys) and the model config.
It provides:

  init(rng, params) -> theta        params: a freshly initialised model tree
  materialize(theta) -> params      what the Flax model's apply takes

`identity` (plain training) is built in; the method modules register theirs.
"""

from __future__ import annotations

from jaxlab.registry import Registry

# Classes `cls(model_cfg=..., **keys)`; every module of this package may register one (found on the first lookup).
PARAMETERIZATIONS = Registry("parameterization", key="config.parameterization.name",
                             package="jaxlab.parameterizations")


def register(name: str):
  """Decorator registering a parameterization class under `name` (also set as `cls.name`)."""
  def wrap(cls):
    cls.name = name
    return PARAMETERIZATIONS.register(name)(cls)
  return wrap


def names() -> list[str]:
  return PARAMETERIZATIONS.names()


def build(cfg, model_cfg=None):
  """Builds the parameterization named by `cfg.name` (None or empty means identity)."""
  cfg = dict(cfg or {})
  name = cfg.pop("name", None) or "identity"
  return PARAMETERIZATIONS.get(name)(model_cfg=model_cfg, **cfg)


@register("identity")
class Identity:
  """Plain training: theta is the model's params."""

  def __init__(self, model_cfg=None):
    del model_cfg

  def init(self, rng, params):
    del rng
    return params

  def materialize(self, theta):
    return theta
