"""`config.profile_steps`: a few train steps traced with `jax.profiler` into `<workdir>/profile`.

The trace (an XSpace `*.xplane.pb` under `<workdir>/profile/plugins/profile/<run>/`) opens in TensorBoard's
profile plugin (`pip install tensorboard tensorboard-plugin-profile; tensorboard --logdir <workdir>/profile`)
or in XProf (`pip install xprof; xprof --logdir <workdir>/profile`): per-op device time, the step timeline and
the memory profile. Each traced step is marked with `jax.profiler.StepTraceAnnotation`, so the tools' step-time
breakdown sees steps. The first step of a run compiles, so tracing starts at the run's second step (or its
first when it has only one).
"""

from __future__ import annotations

import os

import jax
from absl import logging


class StepTracer:
  """Traces train steps `[first, first + num_steps)` of a run; a no-op when `num_steps` is 0.

  Call `step(step, state)` right before each train step and `close(state)` when the loop ends (also on an
  exception). `state` is waited on before the trace starts and stops, so the trace holds whole steps.
  """

  def __init__(self, workdir: str, num_steps: int, start: int, total: int):
    if num_steps < 0:
      raise ValueError(f"config.profile_steps={num_steps}: must be >= 0 (0 = no trace)")
    self.directory = os.path.join(workdir, "profile")
    self.first = start + 1 if total - start > 1 else start
    self.last = min(self.first + num_steps, total)
    self.enabled = num_steps > 0 and self.first < total and jax.process_index() == 0
    self._tracing = False
    self._annotation = None

  def step(self, step: int, state) -> None:
    if not self.enabled:
      return
    self._end_annotation()
    if step == self.first:
      jax.block_until_ready(state)
      os.makedirs(self.directory, exist_ok=True)
      jax.profiler.start_trace(self.directory)
      self._tracing = True
    elif step == self.last:
      self.close(state)
    if self._tracing:
      self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
      self._annotation.__enter__()

  def close(self, state) -> None:
    """Stops the trace (after `state` is computed) if one is running."""
    if not self._tracing:
      return
    jax.block_until_ready(state)
    self._end_annotation()
    jax.profiler.stop_trace()
    self._tracing = False
    logging.info("profile of steps %d-%d written to %s", self.first, self.last - 1, self.directory)

  def _end_annotation(self):
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
      self._annotation = None
