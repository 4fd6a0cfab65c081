"""Method pipelines: multi-stage experiments, each stage a sub-workdir.

A pipeline is `fn(config, workdir) -> dict` registered with `@register(name)`
and selected by `config.job = 'pipeline'`, `config.pipeline = name`. Stages run
through `stage(...)`, which skips a stage whose sub-workdir already holds its
`summary.json`, so re-running the same command resumes the pipeline.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
from collections.abc import Callable

_PIPELINES: dict[str, Callable] = {}


def register(name: str):
  def wrap(fn):
    _PIPELINES[name] = fn
    return fn
  return wrap


def names() -> list[str]:
  _import_builtins()
  return sorted(_PIPELINES)


def get(name: str) -> Callable:
  _import_builtins()
  if name not in _PIPELINES:
    raise ValueError(f"config.pipeline: unknown pipeline {name!r}; known: {', '.join(names())}")
  return _PIPELINES[name]


def stage(workdir: str, name: str, config) -> dict:
  """Trains `config` in `<workdir>/<name>` unless it is already done; returns its summary."""
  from jaxlab import train
  sub = os.path.join(workdir, name)
  done = os.path.join(sub, "summary.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  return train.train_and_evaluate(config, sub)


def _import_builtins():
  import jaxlab.pipelines as pkg
  for mod in pkgutil.iter_modules(pkg.__path__):
    importlib.import_module(f"jaxlab.pipelines.{mod.name}")
