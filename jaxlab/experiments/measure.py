"""Measurements an experiment reports beside accuracy: inference throughput of a checkpoint's model."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


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


def interleaved_throughput(models: dict, batch: int = 256, rounds: int = 20) -> dict[str, dict[str, float]]:
  """Examples/s of several loaded checkpoints' jit-compiled forward passes, timed in interleaved rounds.

  Each round times every model once (in order), so a change of machine load during the measurement hits every
  model alike, unlike timing one model after another. Returns {name: {median, min, max}} examples/s over rounds.

  Args:
    models: {name: checkpoint.load(...) result}.
    batch: batch size of the timed forward pass (zeros).
    rounds: timed rounds after one warm-up call per model.
  """
  fns, times = {}, {k: [] for k in models}
  for k, ld in models.items():
    data = ld.meta["data"]
    x = jnp.zeros((batch, *data["input_shape"]), jnp.dtype(data.get("input_dtype", "float32")))
    fns[k] = (jax.jit(lambda v, x, m=ld.module: m.apply(v, x, train=False)), ld.variables(), x)
    fns[k][0](fns[k][1], x).block_until_ready()
  for _ in range(max(1, rounds)):
    for k, (fn, v, x) in fns.items():
      t = time.perf_counter()
      fn(v, x).block_until_ready()
      times[k].append(time.perf_counter() - t)
  return {k: {"median": batch / float(np.median(t)), "min": batch / max(t), "max": batch / min(t)}
          for k, t in times.items()}
