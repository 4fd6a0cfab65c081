"""The transform registry: named, schema-checked, pure functions over checkpoints.

A transform is registered with a name, a one-line idea, a paper reference and the
number of inputs it takes; its typed parameter schema is read from the function:

    @register("expand_learngene", idea="...", reference="arXiv:...", inputs="1")
    def expand(inputs: list[checkpoint.Loaded], *, depth: int, head: Literal["transfer", "reinit"] = "transfer",
               ) -> Output:
      '''Expands ...

      Args:
        inputs: one loaded learngene checkpoint.
        depth: target number of layers (>= 1)
        head: 'transfer' copies the auxiliary head, 'reinit' draws a new one
      '''

Each keyword-only parameter becomes a `Param`: its type from the annotation (`int`, `float`, `str`, `bool`,
`tuple`/`tuple[str, ...]`, or `Literal[...]` for a choice), its default from the signature (none: required), its
doc from its `Args:` line (`docs=` of `register` supplies lines shared by several transforms). So a default is
written once, in the signature.

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
import inspect
import re
import typing
from collections.abc import Callable
from typing import Any

from jaxlab.configs import as_tuple
from jaxlab.registry import Registry

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
          # items stay as given ('a,b' strings split): the transform converts them
          value = as_tuple(value if isinstance(value, (list, tuple, str)) else (value,), kind=lambda v: v)
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


_INPUT_WORDS = {"1": "exactly one input checkpoint", "2": "exactly two input checkpoints",
                "N": "one or more input checkpoints"}
# Every module of jaxlab.transforms may register transforms (found on the first lookup); the engine, this module
# and the table register none.
TRANSFORMS = Registry("transform", key="config.transform", package="jaxlab.transforms",
                      skip=("engine", "registry", "table"))


def _args_docs(doc: str) -> dict[str, str]:
  """`{name: text}` of a Google-style docstring's `Args:` section (continuation lines joined with spaces)."""
  out: dict[str, str] = {}
  lines = (doc or "").splitlines()
  starts = [i for i, line in enumerate(lines) if line.strip() == "Args:"]
  if not starts:
    return out
  base = len(lines[starts[0]]) - len(lines[starts[0]].lstrip())
  indent, name = None, None
  for line in lines[starts[0] + 1:]:
    if not line.strip():
      name = None
      continue
    ind = len(line) - len(line.lstrip())
    if ind <= base:
      break
    indent = ind if indent is None else indent
    m = re.match(r"(\w+)(?: \([^)]*\))?: ?(.*)$", line.strip())
    if ind == indent and m:
      name = m.group(1)
      out[name] = m.group(2).strip()
    elif name is not None and ind > indent:
      out[name] = (out[name] + " " + line.strip()).strip()
  return out


_TYPES = {int: int, float: float, str: str, bool: bool, tuple: tuple}


def _param_type(name: str, key: str, hint) -> tuple[type, tuple | None]:
  """`(type, choices)` of a parameter annotation (see the module docstring for the accepted ones)."""
  if typing.get_origin(hint) is typing.Literal:
    choices = typing.get_args(hint)
    kinds = {type(c) for c in choices}
    if len(kinds) == 1 and kinds <= set(_TYPES):
      return kinds.pop(), tuple(choices)
  elif hint in _TYPES:
    return hint, None
  elif typing.get_origin(hint) is tuple:
    return tuple, None
  raise ValueError(f"transform {name!r}: parameter {key!r} has annotation {hint!r}; use int, float, str, bool, "
                   "tuple or Literal[...] of one of them")


def schema_from_signature(name: str, fn: Callable, docs: dict[str, str] | None = None) -> dict[str, Param]:
  """The parameter schema of transform `fn`: one `Param` per keyword-only parameter (see the module docstring).

  Raises:
    ValueError: a parameter without a type annotation, with an unsupported one, or without a doc line.
  """
  hints = typing.get_type_hints(fn, include_extras=False)
  lines = {**(docs or {}), **_args_docs(inspect.getdoc(fn) or "")}
  out = {}
  for key, p in inspect.signature(fn).parameters.items():
    if p.kind is not inspect.Parameter.KEYWORD_ONLY:
      continue
    if key not in hints:
      raise ValueError(f"transform {name!r}: parameter {key!r} needs a type annotation (int, float, str, bool, "
                       "tuple or Literal[...])")
    kind, choices = _param_type(name, key, hints[key])
    if not lines.get(key):
      raise ValueError(f"transform {name!r}: parameter {key!r} has no line in the docstring's Args: section")
    default = _REQUIRED if p.default is inspect.Parameter.empty else p.default
    out[key] = Param(kind, default, lines[key], choices)
  return out


def register(name: str, *, idea: str, reference: str, inputs: str = "1", params: dict | None = None,
             docs: dict[str, str] | None = None, streaming: bool = False, same_tree: bool | None = None,
             averages: bool = False):
  """Decorator registering `fn(inputs, **args) -> Output` as transform `name`.

  Args:
    name: registry name (`config.transform`).
    idea: one line: what the transform does and why.
    reference: the paper (arXiv id or URL) it comes from.
    inputs: '1', '2' or 'N' (one or more) input checkpoints.
    params: `{arg_name: Param(type, default, doc, choices)}`, the schema the job's
      `config.args` is validated against before any checkpoint is loaded; omitted (the rule), it is read from
      `fn`'s keyword-only parameters and its `Args:` docstring (`schema_from_signature`).
    docs: doc lines of parameters that the docstring does not describe (shared by several transforms).
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
  for key, p in (params or {}).items():
    if not isinstance(p, Param):
      raise ValueError(f"transform {name!r}: parameter {key!r} must be a transforms.Param, got {type(p).__name__}")
  if same_tree is None:
    same_tree = inputs in ("2", "N")

  def record(fn):
    schema = dict(params) if params is not None else schema_from_signature(name, fn, docs)
    return Transform(name, fn, idea, reference, inputs, schema, streaming=streaming, same_tree=bool(same_tree),
                     averages=averages)
  return TRANSFORMS.register(name, wrap=record)


def get(name: str) -> Transform:
  """The transform registered as `name`.

  Raises:
    ValueError: unknown name, listing the known ones.
  """
  return TRANSFORMS.get(name)


def names() -> list[str]:
  """Sorted names of every registered transform."""
  return TRANSFORMS.names()


def all_transforms() -> list[Transform]:
  """Every registered transform, sorted by name."""
  return [t for _, t in TRANSFORMS.items()]
