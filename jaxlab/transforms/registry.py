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

Two optional flags of `register`:
  streaming=True   the transform iterates over its inputs once, one at a time;
                   the engine then hands it a lazy sequence (`engine.Inputs`)
                   that loads a checkpoint only when indexed, so N inputs never
                   sit in memory together (uniform soup of 72 models).
  same_tree=True   (default for '2' and 'N' inputs) all inputs must have the
                   same trainable tree (names, shapes, dtypes); the engine
                   refuses others, listing the first differences, before it
                   loads any weights. Pass False for transforms that combine
                   different architectures.
  averages=True    the transform averages weights; the engine warns when the
                   inputs were trained from different initialisations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Param:
  """A transform parameter: type, default (`REQUIRED` if none), one-line doc, choices.

  Types: `int`, `float`, `str`, `bool` or `tuple` (a comma separated string on
  the command line becomes a tuple of strings; the transform converts items).
  """
  type: type
  default: Any = _REQUIRED
  doc: str = ""
  choices: tuple | None = None

  @property
  def required(self) -> bool:
    return self.default is _REQUIRED

  def describe(self) -> str:
    """`type = default` (or `type, required`) and the choices, for tables and errors."""
    kind = getattr(self.type, "__name__", str(self.type))
    text = f"{kind}, required" if self.required else f"{kind} = {self.default!r}"
    if self.choices is not None:
      text += " (one of " + ", ".join(repr(c) for c in self.choices) + ")"
    return text


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
  """A registered transform: the function, its documentation and its parameter schema."""
  name: str
  fn: Callable[..., Output]
  idea: str
  reference: str
  inputs: str  # '1', '2', 'N' (one or more)
  params: dict[str, Param]
  streaming: bool = False   # fn iterates its inputs once, one at a time (lazy loading allowed)
  same_tree: bool = False   # all inputs must have the same trainable tree
  averages: bool = False    # weight averaging: warn when inputs come from different initialisations

  def check_num_inputs(self, num_inputs: int) -> None:
    """Raises ValueError when `num_inputs` does not fit the declared `inputs`."""
    want = {"1": (1, 1), "2": (2, 2), "N": (1, 10**9)}[self.inputs]
    if num_inputs == 0:
      raise ValueError(f"transform {self.name!r}: no input checkpoints given (config.inputs is empty); "
                       f"it takes {_INPUT_WORDS[self.inputs]}")
    if not want[0] <= num_inputs <= want[1]:
      raise ValueError(f"transform {self.name!r} takes {_INPUT_WORDS[self.inputs]}, got {num_inputs}")

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
          if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError(value)
          value = value.lower() in ("1", "true", "yes")
        elif p.type is tuple:
          value = _as_tuple(value)
        elif p.type in (int, float) and isinstance(value, bool):
          raise TypeError(value)
        elif p.type is int and isinstance(value, float) and not value.is_integer():
          raise ValueError(value)
        else:
          value = p.type(value)
      except (TypeError, ValueError) as e:
        raise ValueError(f"transform {self.name!r}: argument {key!r}={args[key]!r} is not a "
                         f"{p.type.__name__}") from e
      if p.choices is not None and value not in p.choices:
        raise ValueError(f"transform {self.name!r}: argument {key!r}={value!r} not in {list(p.choices)}")
      out[key] = value
    if num_inputs is not None:
      self.check_num_inputs(num_inputs)
    return out


def _as_tuple(value) -> tuple:
  """A tuple from a list/tuple/scalar; strings are split on commas ('a,b' -> ('a', 'b'))."""
  out = []
  for v in value if isinstance(value, (list, tuple)) else (value,):
    if isinstance(v, str):
      out += [part.strip() for part in v.split(",") if part.strip()]
    else:
      out.append(v)
  return tuple(out)


_INPUT_WORDS = {"1": "exactly one input checkpoint", "2": "exactly two input checkpoints",
                "N": "one or more input checkpoints"}
_TRANSFORMS: dict[str, Transform] = {}


def register(name: str, *, idea: str, reference: str, inputs: str = "1", params: dict | None = None,
             streaming: bool = False, same_tree: bool | None = None, averages: bool = False):
  """Decorator registering `fn(inputs, **args) -> Output` as transform `name`.

  Args:
    name: registry name (`config.transform`).
    idea: one line: what the transform does and why.
    reference: the paper (arXiv id or URL) it comes from.
    inputs: '1', '2' or 'N' (one or more) input checkpoints.
    params: `{arg_name: Param(type, default, doc, choices)}`, the schema the job's
      `config.args` is validated against before any checkpoint is loaded.
    streaming: fn reads its inputs once, in order, one at a time; it may then be
      given a lazy sequence that loads each checkpoint only when indexed.
    same_tree: all inputs must have identical trainable trees (default: True for
      '2' and 'N' inputs).
    averages: the transform averages weights (soups, interpolation): the engine
      warns when the inputs were trained from different initialisations.

  Raises:
    ValueError: bad `inputs`, a parameter that is not a `Param`, or a name that a
      different function already registered.
  """
  if inputs not in ("1", "2", "N"):
    raise ValueError(f"transform {name!r}: inputs must be '1', '2' or 'N', got {inputs!r}")
  params = dict(params or {})
  for key, p in params.items():
    if not isinstance(p, Param):
      raise ValueError(f"transform {name!r}: parameter {key!r} must be a transforms.Param, got {type(p).__name__}")
  if same_tree is None:
    same_tree = inputs in ("2", "N")

  def wrap(fn):
    old = _TRANSFORMS.get(name)
    if old is not None and _qualname(old.fn) != _qualname(fn):
      raise ValueError(f"transform {name!r} is registered twice ({_qualname(old.fn)} and {_qualname(fn)}); "
                       "pick another name")
    _TRANSFORMS[name] = Transform(name, fn, idea, reference, inputs, params, streaming=streaming,
                                  same_tree=bool(same_tree), averages=averages)
    return fn
  return wrap


def _qualname(fn) -> str:
  return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def get(name: str) -> Transform:
  """The transform registered as `name`.

  Raises:
    ValueError: unknown name, listing the known ones.
  """
  _import_builtins()
  if not name:
    raise ValueError(f"config.transform: give a transform name; known: {', '.join(names())}")
  if name not in _TRANSFORMS:
    raise ValueError(f"config.transform: unknown transform {name!r}; known: {', '.join(names())}")
  return _TRANSFORMS[name]


def names() -> list[str]:
  """Sorted names of every registered transform."""
  _import_builtins()
  return sorted(_TRANSFORMS)


def all_transforms() -> list[Transform]:
  """Every registered transform, sorted by name."""
  _import_builtins()
  return [_TRANSFORMS[n] for n in sorted(_TRANSFORMS)]


def apply(name: str, inputs, args: dict | None = None) -> Output:
  """Validates `args` and applies transform `name` in memory (nothing is written).

  Args:
    name: a registered transform.
    inputs: loaded checkpoints (`checkpoint.Loaded`), checkpoint paths (loaded one
      at a time for streaming transforms), or an `engine.Inputs`.
    args: the transform's arguments; defaults are filled in from its schema.

  Returns:
    The transform's `Output`.

  Raises:
    ValueError: bad arguments, wrong number of inputs, or (for `same_tree`
      transforms) inputs whose trees differ, listing the first differences.
  """
  from jaxlab.transforms import engine  # local: engine imports this module
  t = get(name)
  if not isinstance(inputs, engine.Inputs):
    inputs = list(inputs)
  args = t.validate(dict(args or {}), len(inputs))
  if not isinstance(inputs, engine.Inputs) and all(isinstance(p, str) for p in inputs):
    inputs = engine.Inputs(inputs)
  engine.check_inputs(t, inputs)
  metas = engine.input_metas(inputs)
  if not t.streaming and isinstance(inputs, engine.Inputs):
    inputs = list(inputs)
  out = t.fn(inputs, **args)
  for key in ("model", "parameterization"):  # callers (train._init_from) rebuild the model from these
    if key not in out.meta and metas and key in metas[0]:
      out.meta[key] = metas[0][key]
  return out


def _import_builtins():
  import importlib
  import pkgutil

  import jaxlab.transforms as pkg
  for mod in pkgutil.iter_modules(pkg.__path__):
    if mod.name not in ("registry", "engine", "table"):
      importlib.import_module(f"jaxlab.transforms.{mod.name}")
