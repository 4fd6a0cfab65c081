"""Builds models, variables and parameterizations from config or checkpoint meta."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import parameterizations, trees
from jaxlab.models import registry as model_registry  # not `jaxlab.models`: model modules import this one


def to_dict(cfg) -> dict:
  """ConfigDict / FrozenConfigDict / dict to a plain (JSON-able) dict."""
  if cfg is None:
    return {}
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  return dict(cfg)


def model(model_cfg, num_classes: int):
  return model_registry.build(to_dict(model_cfg), num_classes)


def dummy_input(input_shape, input_dtype, batch: int = 1):
  return jnp.zeros((batch, *input_shape), jnp.dtype(input_dtype))


def init_variables(module, rng, input_shape, input_dtype=np.float32) -> dict:
  """Initialises all variables (`params`, `batch_stats`, ...) of `module`, eval mode.

  Jit-compiled as one program: run eagerly, every initializer op is compiled on its own
  (about a hundred small XLA compilations for a ViT, most of a short run's wall time on a CPU).
  """
  return dict(_init_fn(module, tuple(input_shape), np.dtype(input_dtype).str)(rng))


def per_architecture(make):
  """Caches `make(module, ...)` (a jitted function) by its arguments. Linen modules hash by their fields, so
  every later stage, checkpoint load or evaluation of the same architecture reuses the trace and the compiled
  program; arguments that cannot be hashed (a module with a list field) just build a new one."""
  cached = functools.lru_cache(maxsize=64)(make)

  @functools.wraps(make)
  def get(*args):
    try:
      hash(args)
    except TypeError:
      return make(*args)
    return cached(*args)
  return get


@per_architecture
def _init_fn(module, input_shape: tuple, input_dtype: str):
  """One jitted init per (module, input), shared by `init_variables` and `abstract_variables`."""
  def init(r):  # sown intermediates are dropped inside the program, so XLA removes the forward pass
    x = dummy_input(input_shape, input_dtype)
    variables = module.init({"params": r, "dropout": r}, x, train=False)
    return {k: v for k, v in variables.items() if k != "intermediates"}
  return jax.jit(init)


def abstract_variables(module, input_shape, input_dtype=np.float32) -> dict:
  return dict(jax.eval_shape(_init_fn(module, tuple(input_shape), np.dtype(input_dtype).str), jax.random.key(0)))


def parameterization(param_cfg, model_cfg=None):
  return parameterizations.build(to_dict(param_cfg), to_dict(model_cfg))


def abstract_params(model_cfg, num_classes: int, input_shape: tuple[int, ...]) -> dict:
  """ShapeDtypeStruct tree of a model config's params via `jax.eval_shape` (allocates no weights)."""
  return abstract_variables(model(model_cfg, num_classes), tuple(input_shape))["params"]


def count_params(model_cfg, num_classes: int, input_shape: tuple[int, ...]) -> int:
  """Number of parameters of a model config, computed from shapes only."""
  return trees.count(abstract_params(model_cfg, num_classes, input_shape))
