"""Data sets: importing this package registers every built-in data set."""

from jaxlab.data import digits, tfds_source  # noqa: F401  (register built-ins)
from jaxlab.data import mnist1d  # noqa: F401  (registers 'mnist1d')
from jaxlab.data import sequences  # noqa: F401  (registers 'listops', 'seq_digits', 'pathfinder')
from jaxlab.data.base import ArraySource, Dataset, get_dataset, image_augment, names, register

__all__ = ["ArraySource", "Dataset", "get_dataset", "image_augment", "names", "register"]
