"""Device mesh and sharding rules: data parallel by default, FSDP-style by rules.

`config.sharding.fsdp`: tuple of (regex, axis) rules; a matching parameter
leaf is sharded along its `axis` over the mesh's `data` axis when that axis
size divides the dimension, else replicated. Everything else is replicated;
batches are split along their leading axis.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlab import trees


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """1D mesh named `data` over all (or the first `num_devices`) devices, Auto axes."""
  devices = jax.devices() if num_devices is None else jax.devices()[:num_devices]
  return jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def param_shardings(tree, mesh, fsdp_rules=()):
  """Tree of NamedShardings for `tree` (arrays or ShapeDtypeStructs)."""
  n = mesh.shape["data"]
  rules = [(r, int(a)) for r, a in fsdp_rules]

  def pick(name, x):
    i = trees.first_match(name, [r for r, _ in rules])
    shape = np.shape(x)
    if i is not None:
      axis = rules[i][1] % max(len(shape), 1)
      if len(shape) and shape[axis] % n == 0:
        spec = [None] * len(shape)
        spec[axis] = "data"
        return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())

  return trees.map_with_names(pick, tree)


def put_batch(batch: dict, mesh) -> dict:
  """Places this process's part of a global batch, sharded over the `data` axis."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
