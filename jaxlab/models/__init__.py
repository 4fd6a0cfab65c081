"""Flax Linen models; importing this package registers every built-in model."""

from jaxlab.models import (
    lowrank_vit,  # noqa: F401  (registers 'lowrank_vit')
    registry,
    s4d,  # noqa: F401  (the S4D layer)
    sequence,  # noqa: F401  (registers 's4d_seq', 'transformer_seq')
    vit,  # noqa: F401  (registers 'vit')
    wrn,  # noqa: F401  (registers 'wrn')
    zoo,  # noqa: F401  (registers 'logreg', 'mlp', 'cnn1d', 'gru')
)
from jaxlab.models.registry import build, names, register

__all__ = ["build", "names", "register", "registry"]
