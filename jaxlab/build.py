"""Builds models, variables and parameterizations from config or checkpoint meta."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import models, parameterizations


def to_dict(cfg) -> dict:
  """ConfigDict / FrozenConfigDict / dict to a plain (JSON-able) dict."""
  if cfg is None:
    return {}
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  return dict(cfg)


def model(model_cfg, num_classes: int):
  return models.build(to_dict(model_cfg), num_classes)


def dummy_input(input_shape, input_dtype, batch: int = 1):
  return jnp.zeros((batch, *input_shape), jnp.dtype(input_dtype))


def init_variables(module, rng, input_shape, input_dtype=np.float32) -> dict:
  """Initialises all variables (`params`, `batch_stats`, ...) of `module`, eval mode.

  Jit-compiled as one program: run eagerly, every initializer op is compiled on its own
  (about a hundred small XLA compilations for a ViT, most of a short run's wall time on a CPU).
  """
  x = dummy_input(input_shape, input_dtype)

  def init(r):  # sown intermediates are dropped inside the program, so XLA removes the forward pass
    variables = module.init({"params": r, "dropout": r}, x, train=False)
    return {k: v for k, v in variables.items() if k != "intermediates"}

  return dict(jax.jit(init)(rng))


def abstract_variables(module, input_shape, input_dtype=np.float32) -> dict:
  return jax.eval_shape(lambda r: init_variables(module, r, input_shape, input_dtype), jax.random.key(0))


def parameterization(param_cfg, model_cfg=None):
  return parameterizations.build(to_dict(param_cfg), to_dict(model_cfg))
