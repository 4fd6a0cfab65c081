"""Offline transform of saved checkpoints into a new checkpoint.

    python -m jaxlab.main --config=ml_collections_configs/transform.py:uniform_soup \
        --config.inputs=runs/a,runs/b --workdir=runs/soup
    python -m jaxlab.main --config=ml_collections_configs/transform.py:interpolate \
        --config.inputs=runs/a,runs/b --config.args.alpha=0.3 --workdir=runs/wise

The argument after `:` names the transform and pre-fills `config.args` with its
parameters and their defaults, so `--config.args.<name>=<value>` overrides work
(ml_collections cannot add new keys on the command line). Without it,
`--config.transform=<name>` runs the transform with its defaults. The README
lists every transform with its parameters (`python -m jaxlab.transforms.table`).
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.job = "transform"
  c.transform = arg or ""     # registered transform name
  c.inputs = ""               # input checkpoint workdirs, comma separated (a tuple works from Python)
  c.args = ml_collections.ConfigDict()
  if arg:
    from jaxlab import transforms
    for key, p in transforms.get(arg).params.items():
      c.args[key] = ml_collections.config_dict.placeholder(p.type) if p.required else p.default
  c.sharding = ml_collections.ConfigDict()
  c.sharding.num_devices = 0  # 0 = default placement; N = mesh over the first N devices
  c.sharding.fsdp = ()        # ((regex, axis), ...) leaves sharded over the mesh while transforming
  return c
