"""Flax Linen models; importing this package registers every built-in model."""

from jaxlab.models import (
    registry,
    vit,  # noqa: F401  (registers 'vit')
)
from jaxlab.models.registry import build, names, register

__all__ = ["build", "names", "register", "registry"]
