"""Checkpoint transforms: the registry and the offline transform job."""

from jaxlab.transforms.registry import REQUIRED, Output, Param, all_transforms, apply, get, names, register

__all__ = ["REQUIRED", "Output", "Param", "all_transforms", "apply", "get", "names", "register"]
