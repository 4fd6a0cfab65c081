"""Data sets: importing this package registers every built-in data set."""

from jaxlab.data import (  # noqa: F401  (register built-ins)
    digits,  # 'digits'
    mnist1d,  # 'mnist1d'
    sequences,  # 'listops', 'seq_digits', 'pathfinder'
    tfds_source,  # 'tfds'
)
from jaxlab.data.base import ArraySource, Dataset, get_dataset, image_augment, names, register

__all__ = ["ArraySource", "Dataset", "get_dataset", "image_augment", "names", "register"]
