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

from jaxlab.configs import as_tuple  # noqa: F401  (the one list-key helper; kept here for old imports)

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


def normalized(config, section: str, keys: dict):
  """An unlocked copy of `config` whose `config.<section>.<key>` lists are tuples (`as_tuple(value, kind)`)."""
  import ml_collections
  config = ml_collections.ConfigDict(config.to_dict())
  for key, kind in keys.items():
    config[section][key] = as_tuple(config[section][key], kind)
  return config


def at_chance(stats, chance: float | None) -> bool:
  """Whether every `{'mean', 'std'}` in `stats` is within 2 points (or two seed std) of `chance` accuracy:
  then no arm learned the task, and the differences between arms are noise, not evidence for a claim."""
  return chance is not None and all(abs(s["mean"] - chance) <= max(0.02, 2 * s["std"]) for s in stats)


def command(config_file: str, workdir: str) -> str:
  """The command line that wrote `workdir`, with the overrides `jaxlab.main` recorded in overrides.txt."""
  import shlex
  path = os.path.join(workdir, "overrides.txt")
  overrides = open(path).read().split("\n") if os.path.exists(path) else []
  rel = os.path.relpath(workdir)
  shown = rel if not rel.startswith("..") else os.path.abspath(workdir)

  def quote(arg: str) -> str:  # "--config.x=('a','b')" as one would type it
    if shlex.quote(arg) == arg or any(c in arg for c in '"$`\\'):
      return shlex.quote(arg)
    return f'"{arg}"'

  return " ".join(["python -m jaxlab.main", f"--config=ml_collections_configs/{config_file}", f"--workdir={shown}"]
                  + [quote(o) for o in overrides if o.strip()])


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
