"""Measurements an experiment reports beside accuracy: inference throughput of a checkpoint's model."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def forward_throughput(module, params, model_state, input_shape, input_dtype, batch: int = 256,
                       reps: int = 10) -> float:
  """Inference examples per second of a jit-compiled forward pass of `batch` zeros (best of `reps` timed runs).

  Args:
    module: the Flax model.
    params: its params.
    model_state: its other variable collections.
    input_shape: one example's shape.
    input_dtype: the input dtype.
    batch: batch size of the timed forward pass.
    reps: timed repetitions after one warm-up call.
  """
  x = jnp.zeros((batch, *input_shape), jnp.dtype(input_dtype))
  fn = jax.jit(lambda p, s, x: module.apply({"params": p, **s}, x, train=False))
  fn(params, model_state, x).block_until_ready()
  best = float("inf")
  for _ in range(max(1, reps)):
    t = time.perf_counter()
    fn(params, model_state, x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return batch / best


def checkpoint_throughput(loaded, batch: int = 256, reps: int = 10) -> float:
  """`forward_throughput` of a loaded checkpoint (`checkpoint.load`), its input shape and dtype from its meta."""
  data = loaded.meta["data"]
  return forward_throughput(loaded.module, loaded.params, loaded.model_state, tuple(data["input_shape"]),
                            data.get("input_dtype", "float32"), batch, reps)
