"""Data sets: importing this package registers every built-in data set."""

from jaxlab.data import (  # noqa: F401  (register built-ins)
    digits,  # 'digits'
    digits_task,  # 'digits_task' (the digits under a fixed input transformation)
    lra,  # 'lra_listops', 'lra_pathfinder' (from a user-supplied LRA release directory)
    mnist1d,  # 'mnist1d'
    sequences,  # 'listops', 'seq_digits', 'pathfinder'
    tfds_source,  # 'tfds'
)
from jaxlab.data.base import ArraySource, Dataset, checkpoint_meta_for, get_dataset, image_augment, names, register
from jaxlab.data.pipeline import TrainBatches

__all__ = ["ArraySource", "Dataset", "TrainBatches", "checkpoint_meta_for", "get_dataset", "image_augment", "names",
           "register"]
