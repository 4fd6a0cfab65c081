"""Method pipelines: each method's multi-stage experiment, a declaration on the runner of `jaxlab.experiments`.

A pipeline is `fn(config, workdir) -> dict` registered with `@register(name)` and selected by
`config.job = 'pipeline'`, `config.pipeline = name`. It builds an `experiments.Experiment` over its config (keys
under `config.<name>`), runs `TrainStage`s and `TransformStage`s (done stages are skipped, so re-running the same
command resumes the experiment) and writes its results through `experiments.Report`. docs/adding_a_method.md.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

_PIPELINES: dict[str, Callable] = {}


def register(name: str):
  """Decorator: registers `fn(config, workdir) -> dict` as pipeline `name`."""
  def wrap(fn):
    _PIPELINES[name] = fn
    return fn
  return wrap


def names() -> list[str]:
  """The registered pipeline names (every module of this package is imported first)."""
  _import_builtins()
  return sorted(_PIPELINES)


def get(name: str) -> Callable:
  """The pipeline `name`.

  Raises:
    ValueError: an unknown name, listing the known ones.
  """
  _import_builtins()
  if name not in _PIPELINES:
    raise ValueError(f"config.pipeline: unknown pipeline {name!r}; known: {', '.join(names())}")
  return _PIPELINES[name]


def _import_builtins():
  import jaxlab.pipelines as pkg
  for mod in pkgutil.iter_modules(pkg.__path__):
    importlib.import_module(f"jaxlab.pipelines.{mod.name}")
