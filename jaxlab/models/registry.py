"""Model registry: `model.name` in a config picks a builder `fn(model_cfg, num_classes)`."""

from __future__ import annotations

from collections.abc import Callable

_BUILDERS: dict[str, Callable] = {}


def register(name: str):
  """Decorator registering a model builder under `name`."""
  def wrap(fn):
    _BUILDERS[name] = fn
    return fn
  return wrap


def names() -> list[str]:
  return sorted(_BUILDERS)


def build(model_cfg, num_classes: int):
  """Builds the Flax module named by `model_cfg.name`.

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  name = model_cfg.get("name") if hasattr(model_cfg, "get") else model_cfg["name"]
  if name not in _BUILDERS:
    raise ValueError(f"config.model.name: unknown model {name!r}; known models: {', '.join(names())}")
  return _BUILDERS[name](model_cfg, num_classes)
