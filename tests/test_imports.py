"""jaxlab's module import graph has no cycle.

The graph is built from the source with `ast`, without importing anything. Nodes are the package's modules
(`jaxlab.models.vit`; a package is its `__init__`). An edge `a -> b` is any `import` or `from ... import` in `a`
(at module level or inside a function: a function-local import is a cycle postponed, not removed) that resolves
to module `b`: `from jaxlab.models import vit` points at `jaxlab.models.vit` when that is a module, else at
`jaxlab.models`. Importing `jaxlab.models.vit` also runs `jaxlab/models/__init__.py` first: that implicit edge to
a parent package counts, except from a module inside that package (its `__init__` is already running or done), so
a package may import its own submodules (to register them) while those submodules import their siblings.
Imports under `if TYPE_CHECKING:` never run and are not counted. A registry's
discovery (`jaxlab.registry.Registry.discover`: `importlib` by name, at the first lookup) is not an edge either:
every plug-in imports its registry to register, and the registry imports its plug-ins only after every module
involved has finished loading; that is the plug-in mechanism, not a cycle to break.
"""

from __future__ import annotations

import ast
import os
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(package_dir: str, package: str) -> dict[str, str]:
  """`{dotted module name: file path}` of every .py file under `package_dir`."""
  out = {}
  for root, dirs, files in os.walk(package_dir):
    dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
    rel = os.path.relpath(root, package_dir)
    prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
    for f in sorted(files):
      if f.endswith(".py"):
        out[prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"] = os.path.join(root, f)
  return out


def _is_type_checking(node: ast.If) -> bool:
  test = node.test
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool):
  """Every imported dotted name in `tree` (absolute; relative imports resolved against `module`)."""
  stack = [tree]
  while stack:
    node = stack.pop()
    if isinstance(node, ast.If) and _is_type_checking(node):
      stack.extend(node.orelse)
      continue
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, ()
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = module.split(".")
        parts = parts if is_package else parts[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      yield base, tuple(a.name for a in node.names)
    stack.extend(ast.iter_child_nodes(node))


def import_graph(package_dir: str, package: str) -> dict[str, set[str]]:
  """`{module: modules it imports}` over the modules of `package` (see the module docstring for the rule)."""
  mods = _modules(package_dir, package)
  graph = {}
  for name, path in mods.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    edges = set()
    for base, names in _imports(tree, name, path.endswith("__init__.py")):
      targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in mods] if names else []
      if names and len(targets) < len(names) and base in mods:
        targets.append(base)  # `from pkg import name` where name is not a submodule runs pkg/__init__
      if not names and base in mods:
        targets.append(base)
      elif not names:  # `import a.b.c` runs a.b.c (counted) and its parents (not counted, as for every import)
        pass
      for t in list(targets):  # the parent packages the import runs first, unless `name` lives inside them
        parts = t.split(".")
        targets += [p for p in (".".join(parts[:i]) for i in range(1, len(parts)))
                    if p in mods and not name.startswith(p + ".")]
      edges |= {t for t in targets if t != name}
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as `[a, b, ..., a]`, or None."""
  state = {}  # 1 = on the stack, 2 = done
  for start in sorted(graph):
    if state.get(start):
      continue
    path, iters = [start], [iter(sorted(graph[start]))]
    state[start] = 1
    while path:
      nxt = next(iters[-1], None)
      if nxt is None:
        state[path.pop()] = 2
        iters.pop()
      elif state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      elif not state.get(nxt):
        state[nxt] = 1
        path.append(nxt)
        iters.append(iter(sorted(graph[nxt])))
  return None


def test_jaxlab_import_graph_has_no_cycle():
  graph = import_graph(os.path.join(ROOT, "jaxlab"), "jaxlab")
  assert len(graph) > 50 and graph["jaxlab.train"], "the graph builder found no modules or no edges"
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _write(root, files: dict[str, str]):
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_planted_cycles_are_found(tmp_path):
  # A package importing its submodules for registration, which import a sibling: no cycle.
  _write(tmp_path, {
      "pkg/__init__.py": "from pkg import a, b\n",
      "pkg/a.py": "from pkg import b\n",
      "pkg/b.py": "import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from pkg import a\n",
      "pkg/sub/__init__.py": "",
      "pkg/sub/c.py": "from ..b import x\n",
  })
  graph = import_graph(str(tmp_path / "pkg"), "pkg")
  assert graph == {"pkg": {"pkg.a", "pkg.b"}, "pkg.a": {"pkg.b"}, "pkg.b": set(), "pkg.sub": set(),
                   "pkg.sub.c": {"pkg.b"}}
  assert find_cycle(graph) is None
  # A function-local import back from b to a (relative form) closes a cycle.
  _write(tmp_path, {"pkg/b.py": "def f():\n  from . import a\n  return a\n"})
  assert find_cycle(import_graph(str(tmp_path / "pkg"), "pkg")) == ["pkg.a", "pkg.b", "pkg.a"]
  # An outside module importing a submodule runs the package's __init__ first, which imports a module that
  # imports the outside one back: a cycle through the parent package.
  _write(tmp_path, {"q/__init__.py": "", "q/sub/__init__.py": "from q.sub import a, reg\n", "q/sub/reg.py": "",
                    "q/sub/a.py": "def f():\n  from q import x\n  return x\n", "q/x.py": "from q.sub import reg\n"})
  assert find_cycle(import_graph(str(tmp_path / "q"), "q")) is not None
  # A submodule importing a name from its package's __init__, which imports the submodule: a cycle.
  _write(tmp_path, {"pkg/b.py": "", "pkg/sub/c.py": "from pkg import helper\n",
                    "pkg/__init__.py": "from pkg import a, b\nfrom pkg.sub import c\nhelper = 1\n"})
  assert find_cycle(import_graph(str(tmp_path / "pkg"), "pkg")) == ["pkg", "pkg.sub.c", "pkg"]
