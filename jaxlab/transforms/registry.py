"""The transform engine: named, schema-checked, pure functions over checkpoints.

A transform is registered with a name, a one-line idea, a paper reference, the
number of inputs it takes and a typed parameter schema:

    @register("expand_learngene", idea="...", reference="arXiv:...", inputs="1",
              params={"depth": Param(int, None, "target depth")})
    def expand(inputs: list[checkpoint.Loaded], *, depth: int) -> Output: ...

It receives loaded checkpoints (`Loaded`: meta, theta, model_state, module)
and returns an `Output`: the new trainable tree, model state, and the meta
entries that change (`model`, `parameterization`, ...). The engine validates
arguments against the schema *before* any checkpoint is loaded, and records
provenance in the output checkpoint's meta.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Param:
  """A transform parameter: type, default (`REQUIRED` if none), one-line doc, choices."""
  type: type
  default: Any = _REQUIRED
  doc: str = ""
  choices: tuple | None = None

  @property
  def required(self) -> bool:
    return self.default is _REQUIRED


REQUIRED = _REQUIRED


@dataclasses.dataclass
class Output:
  """What a transform returns."""
  theta: Any
  model_state: dict = dataclasses.field(default_factory=dict)
  meta: dict = dataclasses.field(default_factory=dict)  # keys overriding the first input's meta
  report: dict = dataclasses.field(default_factory=dict)  # numbers to print and record


@dataclasses.dataclass
class Transform:
  name: str
  fn: Callable[..., Output]
  idea: str
  reference: str
  inputs: str  # '1', '2', 'N' (one or more)
  params: dict[str, Param]

  def validate(self, args: dict, num_inputs: int | None = None) -> dict:
    """Checks `args` against the schema; returns them with defaults filled in.

    Raises:
      ValueError: naming the unknown, missing or mistyped argument.
    """
    unknown = sorted(set(args) - set(self.params))
    if unknown:
      raise ValueError(f"transform {self.name!r}: unknown argument(s) {unknown}; "
                       f"parameters: {sorted(self.params) or 'none'}")
    out = {}
    for key, p in self.params.items():
      if key not in args or args[key] is None:
        if p.required:
          raise ValueError(f"transform {self.name!r}: argument {key!r} is required ({p.doc})")
        out[key] = p.default
        continue
      value = args[key]
      try:
        if p.type is bool and isinstance(value, str):
          value = value.lower() in ("1", "true", "yes")
        elif p.type is tuple:
          value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        else:
          value = p.type(value)
      except (TypeError, ValueError) as e:
        raise ValueError(f"transform {self.name!r}: argument {key!r}={args[key]!r} is not a "
                         f"{p.type.__name__}") from e
      if p.choices is not None and value not in p.choices:
        raise ValueError(f"transform {self.name!r}: argument {key!r}={value!r} not in {list(p.choices)}")
      out[key] = value
    if num_inputs is not None:
      want = {"1": (1, 1), "2": (2, 2), "N": (1, 10**9)}[self.inputs]
      if not want[0] <= num_inputs <= want[1]:
        raise ValueError(f"transform {self.name!r} takes {self.inputs} input checkpoint(s), got {num_inputs}")
    return out


_TRANSFORMS: dict[str, Transform] = {}


def register(name: str, *, idea: str, reference: str, inputs: str = "1", params: dict | None = None):
  """Decorator registering `fn(inputs, **args) -> Output` as transform `name`."""
  if inputs not in ("1", "2", "N"):
    raise ValueError("inputs must be '1', '2' or 'N'")

  def wrap(fn):
    _TRANSFORMS[name] = Transform(name, fn, idea, reference, inputs, dict(params or {}))
    return fn
  return wrap


def get(name: str) -> Transform:
  _import_builtins()
  if name not in _TRANSFORMS:
    raise ValueError(f"config.transform: unknown transform {name!r}; known: {', '.join(names())}")
  return _TRANSFORMS[name]


def names() -> list[str]:
  _import_builtins()
  return sorted(_TRANSFORMS)


def all_transforms() -> list[Transform]:
  _import_builtins()
  return [_TRANSFORMS[n] for n in sorted(_TRANSFORMS)]


def apply(name: str, inputs: list, args: dict | None = None) -> Output:
  """Validates `args` and applies transform `name` to loaded checkpoints `inputs`."""
  t = get(name)
  args = t.validate(dict(args or {}), len(inputs))
  return t.fn(inputs, **args)


def _import_builtins():
  import importlib
  import pkgutil

  import jaxlab.transforms as pkg
  for mod in pkgutil.iter_modules(pkg.__path__):
    if mod.name not in ("registry", "engine"):
      importlib.import_module(f"jaxlab.transforms.{mod.name}")
