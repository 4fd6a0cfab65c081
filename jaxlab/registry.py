"""The one registry type: a name -> entry table for each kind of plug-in a config selects by name.

Models, data sets, parameterizations, objective terms (and preparers, evals), transforms and pipelines each
keep one `Registry`:

    MODELS = Registry("model", key="config.model.name", package="jaxlab.models")

    @MODELS.register("vit")
    def build_vit(model_cfg, num_classes): ...

    MODELS.get("vit")        # the entry; an unknown name raises ValueError naming the key and the known names

The one discovery rule: the first lookup (`get`, `names`, `items`, `in`) imports every module of the registry's
package (one level, `pkgutil`, in name order, except those in `skip`), so a new plug-in is one file in that
package with a `register` decorator, and no list of modules is kept by hand. Registering never triggers discovery,
so a module of the package may register while the package is being imported.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any


def qualname(obj) -> str:
  """`module.qualname` of a function or class (what identifies a registration across re-imports)."""
  return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


class Registry:
  """Named entries of one kind, filled by `register` and found by `get`.

  Attributes:
    kind: what an entry is, in words ('model', 'data set'); used in errors.
    key: the config key that names an entry ('config.model.name'); errors start with it.
    package: the dotted package whose modules register entries (imported on the first lookup), or None.
    skip: modules of `package` not to import (they register nothing, or would import the registry's user).
  """

  def __init__(self, kind: str, *, key: str, package: str | None = None, skip: tuple[str, ...] = ()):
    self.kind = kind
    self.key = key
    self.package = package
    self.skip = tuple(skip)
    self._entries: dict[str, Any] = {}
    self._discovered = package is None

  def register(self, name: str, entry: Any = None, *, wrap: Callable[[Any], Any] | None = None):
    """Registers `entry` under `name`, or returns a decorator doing so.

    Args:
      name: the name a config uses.
      entry: the thing to register; omitted, `register(name)` is a decorator that registers the decorated
        function or class and returns it unchanged.
      wrap: stores `wrap(decorated)` instead of the decorated object (e.g. a record with its documentation).

    Raises:
      ValueError: `name` is already registered by a different function or class (a re-import of the same one,
        e.g. a reloaded module or a notebook cell run twice, replaces it).
    """
    def add(obj):
      stored = wrap(obj) if wrap is not None else obj
      old = self._entries.get(name)
      if old is not None and qualname(_origin(old)) != qualname(_origin(stored)):
        raise ValueError(f"{self.kind} {name!r} is registered twice ({qualname(_origin(old))} and "
                         f"{qualname(_origin(stored))}); pick another name")
      self._entries[name] = stored
      return obj
    return add if entry is None else add(entry)

  def discover(self) -> None:
    """Imports every module of `package` once (the discovery rule); later calls do nothing."""
    if self._discovered:
      return
    self._discovered = True  # first: a module imported below may look names up while it loads
    pkg = importlib.import_module(self.package)
    for mod in pkgutil.iter_modules(pkg.__path__):
      if mod.name not in self.skip and not mod.name.startswith("_"):
        importlib.import_module(f"{self.package}.{mod.name}")

  def get(self, name: str) -> Any:
    """The entry registered as `name`.

    Raises:
      ValueError: an empty or unknown name, naming `key` and listing the known names.
    """
    self.discover()
    if not name:
      raise ValueError(f"{self.key}: give a {self.kind} name; known: {', '.join(self.names())}")
    if name not in self._entries:
      raise ValueError(f"{self.key}: unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
    return self._entries[name]

  def names(self) -> list[str]:
    """Every registered name, sorted."""
    self.discover()
    return sorted(self._entries)

  def items(self) -> list[tuple[str, Any]]:
    """`(name, entry)` of every registration, sorted by name."""
    return [(n, self._entries[n]) for n in self.names()]

  def __contains__(self, name: str) -> bool:
    self.discover()
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self.names())

  def __repr__(self) -> str:
    return f"Registry({self.kind!r}, key={self.key!r}, package={self.package!r}, {len(self._entries)} entries)"


def _origin(entry):
  """The function or class behind an entry (a record made by `wrap` keeps it as `.fn`)."""
  return getattr(entry, "fn", entry)
