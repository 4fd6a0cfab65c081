"""Checkpoint transforms: the registry and the offline transform job."""

from jaxlab.transforms.engine import apply
from jaxlab.transforms.registry import REQUIRED, TRANSFORMS, Output, Param, all_transforms, get, names, register

__all__ = ["REQUIRED", "TRANSFORMS", "Output", "Param", "all_transforms", "apply", "get", "names", "register"]
