"""Tree utilities: `/`-joined names, regex selection, merging and comparing.

Every other module (freezing, weight decay, learning-rate rules, sharding,
transform targets) selects leaves with the same rules defined here: a list of
regexes matched with `re.fullmatch` against the leaf's `/`-joined path, first
match wins.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

PyTree = Any


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path) -> str:
  """Joins a jax key path into a `/` separated name."""
  return "/".join(_key_name(k) for k in path)


def flatten(tree: PyTree) -> dict[str, Any]:
  """Returns `{name: leaf}` with `/`-joined names, in tree order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_name(p): v for p, v in leaves}


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Inverse of `flatten` for nested dicts."""
  out: dict = {}
  for name, value in flat.items():
    node = out
    parts = name.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return out


def map_with_names(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
  """`jax.tree.map` where `fn` also receives the leaf's `/` name."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_name(p), x), tree)


def first_match(name: str, patterns: Sequence[str]) -> int | None:
  """Index of the first regex in `patterns` that fully matches `name`."""
  for i, pattern in enumerate(patterns):
    if re.fullmatch(pattern, name):
      return i
  return None


def select(tree: PyTree, patterns: Sequence[str] | str) -> dict[str, Any]:
  """Leaves whose names fully match any of the regexes, as `{name: leaf}`."""
  if isinstance(patterns, str):
    patterns = [patterns]
  return {n: v for n, v in flatten(tree).items() if first_match(n, patterns) is not None}


def mask(tree: PyTree, patterns: Sequence[str] | str) -> PyTree:
  """Boolean tree: True where the leaf name matches one of the regexes."""
  if isinstance(patterns, str):
    patterns = [patterns]
  return map_with_names(lambda n, _: first_match(n, patterns) is not None, tree)


def map_with_rules(tree: PyTree, rules: Sequence[tuple[str, Any]], default: Any) -> PyTree:
  """Tree of values: for each leaf the value of the first matching (regex, value) rule."""
  patterns = [r for r, _ in rules]

  def pick(name, _):
    i = first_match(name, patterns)
    return default if i is None else rules[i][1]

  return map_with_names(pick, tree)


def _describe(x) -> str:
  return f"{getattr(x, 'dtype', type(x).__name__)}{list(np.shape(x))}"


def _shape(x) -> list[int]:
  """The shape of an array-like, or `x` itself when it is a shape (a tuple or list of ints)."""
  if isinstance(x, (tuple, list)) and all(isinstance(d, (int, np.integer)) for d in x):
    return [int(d) for d in x]
  return list(np.shape(x))


def shape_difference(name: str, want, have, sides: tuple[str, str] = ("expected", "got")) -> str:
  """One difference line: `shape of <name>: expected [..], got [..]`; `want`/`have` are arrays or shapes and
  `sides` names the two trees."""
  return f"shape of {name}: {sides[0]} {_shape(want)}, {sides[1]} {_shape(have)}"


def diff(reference: PyTree, other: PyTree, *, check_dtype: bool = True,
         sides: tuple[str, str] = ("expected", "got")) -> list[str]:
  """Lists structural differences (missing, unexpected, shape, dtype) of `other`, one line each."""
  ref, oth = flatten(reference), flatten(other)
  out = []
  for name in ref:
    if name not in oth:
      out.append(f"missing {name} ({_describe(ref[name])})")
  for name in oth:
    if name not in ref:
      out.append(f"unexpected {name} ({_describe(oth[name])})")
  for name in ref:
    if name in oth:
      a, b = ref[name], oth[name]
      if np.shape(a) != np.shape(b):
        out.append(shape_difference(name, a, b, sides))
      elif check_dtype and hasattr(a, "dtype") and hasattr(b, "dtype") and a.dtype != b.dtype:
        out.append(f"dtype of {name}: {sides[0]} {a.dtype}, {sides[1]} {b.dtype}")
  return out


class TreeMismatchError(ValueError):
  """Raised when two trees that must agree in structure do not."""


MISMATCH_SHOWN = 5  # differences listed in a mismatch message; the rest are counted


def mismatch_message(what: str, differences: Sequence[str], hint: str = "") -> str:
  """The one tree-mismatch message: `<what>: <first MISMATCH_SHOWN differences> (and N more); <hint>`.

  Args:
    what: which tree differs from which (a path, a checkpoint, 'config vs checkpoint').
    differences: one line per difference (`diff`, `shape_difference`).
    hint: what to do about it.
  """
  shown = "; ".join(differences[:MISMATCH_SHOWN])
  more = f" (and {len(differences) - MISMATCH_SHOWN} more)" if len(differences) > MISMATCH_SHOWN else ""
  return f"{what}: {shown}{more}" + (f"; {hint}" if hint else "")


def mismatch_error(what: str, differences: Sequence[str], hint: str = "") -> TreeMismatchError:
  """A `TreeMismatchError` with `mismatch_message(what, differences, hint)`."""
  return TreeMismatchError(mismatch_message(what, differences, hint))


def check_same_structure(reference: PyTree, other: PyTree, what: str = "tree", *,
                         check_dtype: bool = True) -> None:
  """Raises `TreeMismatchError` listing the first differences, if any."""
  d = diff(reference, other, check_dtype=check_dtype)
  if d:
    raise mismatch_error(f"{what} does not match", d)


def merge(loaded: PyTree, inited: PyTree, *, dont_load: Iterable[str] = (),
          allow_missing: bool = False, allow_unexpected: bool = False) -> dict:
  """Takes leaves from `loaded` where names and shapes agree, else from `inited`.

  Args:
    loaded: tree of loaded values (e.g. from a checkpoint).
    inited: freshly initialised tree that fixes the target structure.
    dont_load: regexes of names to take from `inited` even when loaded has them.
    allow_missing: allow target leaves absent from `loaded` (taken from `inited`).
    allow_unexpected: allow leaves of `loaded` the target lacks (dropped).

  Raises:
    TreeMismatchError: listing missing, unexpected and mis-shaped leaves.
  """
  lf, inf = flatten(loaded), flatten(inited)
  dont_load = list(dont_load)
  problems, out = [], {}
  for name, init_value in inf.items():
    if first_match(name, dont_load) is not None:
      out[name] = init_value
    elif name not in lf:
      if not allow_missing:
        problems.append(f"missing {name} ({_describe(init_value)})")
      out[name] = init_value
    elif np.shape(lf[name]) != np.shape(init_value):
      problems.append(shape_difference(name, init_value, lf[name], ("model", "checkpoint")))
    else:
      out[name] = lf[name]
  if not allow_unexpected:
    problems += [f"unexpected {n}" for n in lf if n not in inf and first_match(n, dont_load) is None]
  if problems:
    raise mismatch_error("cannot merge trees", problems)
  return unflatten(out)


def count(tree: PyTree) -> int:
  """Number of scalar entries in all leaves."""
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def allclose(a: PyTree, b: PyTree, **kw) -> bool:
  """True when both trees have the same names and all leaves are close."""
  fa, fb = flatten(a), flatten(b)
  return fa.keys() == fb.keys() and all(
      np.allclose(np.asarray(fa[k]), np.asarray(fb[k]), **kw) for k in fa)


def max_abs_diff(a: PyTree, b: PyTree) -> dict[str, float]:
  """Per-leaf maximum absolute difference of two trees with the same names."""
  fa, fb = flatten(a), flatten(b)
  return {k: float(np.max(np.abs(np.asarray(fa[k], np.float64) - np.asarray(fb[k], np.float64))))
          for k in fa}
