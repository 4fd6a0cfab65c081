"""Model registry: `model.name` in a config picks a builder `fn(model_cfg, num_classes)`.

Every module of `jaxlab.models` may register builders; they are imported on the first lookup (the discovery rule
of `jaxlab.registry`), so this module imports no model and any model module may import it.
"""

from __future__ import annotations

from jaxlab.registry import Registry

MODELS = Registry("model", key="config.model.name", package="jaxlab.models")


def register(name: str):
  """Decorator registering a model builder `fn(model_cfg, num_classes) -> flax module` under `name`."""
  return MODELS.register(name)


def names() -> list[str]:
  return MODELS.names()


def build(model_cfg, num_classes: int):
  """Builds the Flax module named by `model_cfg.name`.

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  name = model_cfg.get("name") if hasattr(model_cfg, "get") else model_cfg["name"]
  return MODELS.get(name)(model_cfg, num_classes)
