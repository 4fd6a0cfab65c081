"""`digits_task`: the digits data set under one fixed input transformation (`data.task`).

Tasks (`TASKS`): `identity`, `invert` (1 - x), `rot90` (rotated by 90 degrees), `flip` (mirrored left-right),
`permute` (a fixed pixel permutation, seed 1234), and `mixed` (every image under one of the others, including
none, fixed per image position, seed 5). Splits and labels are those of `digits` (its `test_shift` is dropped).
The model-merging experiment fine-tunes one model per task; the tasks need different features, so they interfere.
"""

from __future__ import annotations

import numpy as np

from jaxlab.data import base, digits


def _permutation() -> np.ndarray:
  return np.random.default_rng(1234).permutation(64)


TASKS = {
  "identity": lambda x: x,
  "invert": lambda x: 1.0 - x,
  "rot90": lambda x: np.rot90(x, k=1, axes=(1, 2)),
  "flip": lambda x: x[:, :, ::-1],
  "permute": lambda x: x.reshape(len(x), 64, -1)[:, _permutation()].reshape(x.shape),
}


def mixed(x: np.ndarray) -> np.ndarray:
  """Every image under one of the single-task transformations (including none), fixed per image position."""
  names = [t for t in TASKS if t != "mixed"]
  which = np.random.default_rng(5).integers(0, len(names), len(x))
  out = np.empty_like(x)
  for k, t in enumerate(names):
    out[which == k] = TASKS[t](x[which == k])
  return out


TASKS["mixed"] = mixed


def check_task(task: str, key: str = "config.data.task") -> str:
  """`task` if it is a known task, else a ValueError naming `key` and the known tasks."""
  if task not in TASKS:
    raise ValueError(f"{key}: unknown task {task!r}; known: {', '.join(TASKS)}")
  return task


@base.register("digits_task")
def build(cfg) -> base.Dataset:
  """The digits data set with every image transformed by `TASKS[cfg.task]` (same splits and labels)."""
  task = check_task(cfg.get("task", "identity"))
  ds = digits.build(cfg)
  fn = TASKS[task]
  splits = {k: base.ArraySource({"inputs": np.ascontiguousarray(fn(v.arrays["inputs"]), np.float32),
                                 "label": v.arrays["label"]})
            for k, v in ds.splits.items() if k != "test_shift"}
  return base.Dataset(name="digits_task", num_classes=10, splits=splits, input_shape=ds.input_shape,
                      augment=ds.augment, info={"task": task, "split_sizes": {k: len(v) for k, v in splits.items()}})
