"""Parameterizations: a trainable tree `theta` and a pure `materialize(theta) -> params`.

A parameterization class is registered under a name and built from
`config.parameterization` (its `name` plus its own keys) and the model config.
It provides:

  init(rng, params) -> theta        params: a freshly initialised model tree
  materialize(theta) -> params      what the Flax model's apply takes

`identity` (plain training) is built in; the method modules register theirs.
"""

from __future__ import annotations

from collections.abc import Callable

_CLASSES: dict[str, Callable] = {}


def register(name: str):
  def wrap(cls):
    _CLASSES[name] = cls
    cls.name = name
    return cls
  return wrap


def names() -> list[str]:
  return sorted(_CLASSES)


def build(cfg, model_cfg=None):
  """Builds the parameterization named by `cfg.name` (None or empty means identity)."""
  cfg = dict(cfg or {})
  name = cfg.pop("name", None) or "identity"
  _import_builtins()
  if name not in _CLASSES:
    raise ValueError(f"config.parameterization.name: unknown parameterization {name!r}; "
                     f"known: {', '.join(names())}")
  return _CLASSES[name](model_cfg=model_cfg, **cfg)


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


def _import_builtins():
  import importlib
  import pkgutil

  import jaxlab.parameterizations as pkg
  for mod in pkgutil.iter_modules(pkg.__path__):
    importlib.import_module(f"jaxlab.parameterizations.{mod.name}")
