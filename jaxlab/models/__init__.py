"""Flax Linen models; importing this package registers every built-in model.

Builders are registered with `jaxlab.models.registry.register` in the modules of this package, which are found by
the registry's discovery rule; they are also imported here so `jaxlab.models.vit` etc. are attributes of the
package.
"""

from jaxlab.models import (
    lowrank_vit,  # noqa: F401  (registers 'lowrank_vit')
    registry,
    s4d,  # noqa: F401  (the S4D layer)
    sequence,  # noqa: F401  (registers 's4d_seq', 'transformer_seq')
    vit,  # noqa: F401  (registers 'vit')
    wrn,  # noqa: F401  (registers 'wrn')
    zoo,  # noqa: F401  (registers 'logreg', 'mlp', 'cnn1d', 'gru')
)
from jaxlab.models.registry import MODELS, build, names, register

__all__ = ["MODELS", "build", "names", "register", "registry"]
