"""Offline transform of saved checkpoints into a new checkpoint.

    python -m jaxlab.main --config=ml_collections_configs/transform.py \
        --config.transform=uniform_soup --config.inputs=runs/a,runs/b --workdir=runs/soup

Arguments of the transform go under `config.args` (`--config.args.depth=6`).
The README lists every transform with its parameters.
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.job = "transform"
  c.transform = arg or ""     # registered transform name
  c.inputs = ("",)            # input checkpoint workdirs (tuple; comma separated on the command line)
  c.args = ml_collections.ConfigDict()
  return c
