"""Every config key the code reads is declared in a config, so every key can be overridden on the command line.

The code is read with `ast`: a read is `<receiver>.get("key", ...)` or `<receiver>.get("key")` where the receiver is
a config section. Which names hold which section is stated per file below (`config` is the whole config
everywhere; `config.optimizer.get(...)` and `config.get("sharding", {}).get(...)` chains name their section). A key
is declared when `configs.base()` or one of `ml_collections_configs/*.py` (default argument) has it.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# file pattern -> {variable name: the config section it holds}
SECTIONS = {
    "jaxlab/optim.py": {"cfg": "optimizer"},
    "jaxlab/objectives.py": {"cfg": "objective"},
    "jaxlab/losses/*.py": {"cfg": "objective"},
    "jaxlab/train.py": {"ic": "init_from", "obj_cfg": "objective"},
    "jaxlab/data/*.py": {"cfg": "data", "data_cfg": "data"},
    "jaxlab/models/*.py": {"model_cfg": "model"},
}


def _chain(node) -> list[str] | None:
  """`config.a.get('b', x).c` -> ['config', 'a', 'b', 'c']; None when the chain does not start at a name."""
  parts = []
  while True:
    if isinstance(node, ast.Attribute):
      parts.append(node.attr)
      node = node.value
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
          and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
      parts.append(node.args[0].value)
      node = node.func.value
    elif isinstance(node, ast.Name):
      return [node.id, *reversed(parts)]
    else:
      return None


def config_reads(path: str, names: dict[str, str]) -> list[tuple[int, str]]:
  """`(line, dotted key)` of every `.get("key"...)` on a config section in `path` (see the module docstring)."""
  names = {"config": "", **names}
  out = []
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
      continue
    chain = _chain(node.func.value)
    if chain and chain[0] in names:
      section = [names[chain[0]]] if names[chain[0]] else []
      out.append((node.lineno, ".".join(section + chain[1:] + [node.args[0].value])))
  return out


def _flat_keys(cfg, prefix: str = "") -> set[str]:
  out = set()
  for k, v in cfg.items():
    out.add(prefix + k)
    if hasattr(v, "items"):
      out |= _flat_keys(v, prefix + k + ".")
  return out


def declared_keys() -> set[str]:
  from jaxlab import configs
  keys = _flat_keys(configs.base())
  for path in sorted(glob.glob(os.path.join(ROOT, "ml_collections_configs", "*.py"))):
    spec = importlib.util.spec_from_file_location(f"_cfg_{os.path.basename(path)[:-3]}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    keys |= _flat_keys(mod.get_config())
  return keys


def _reads() -> list[tuple[str, int, str]]:
  files = {}
  for pattern, names in SECTIONS.items():
    for path in glob.glob(os.path.join(ROOT, pattern)):
      files[path] = names
  for path in glob.glob(os.path.join(ROOT, "jaxlab", "**", "*.py"), recursive=True):
    files.setdefault(path, {})
  return [(os.path.relpath(p, ROOT), line, key) for p, names in sorted(files.items())
          for line, key in config_reads(p, names)]


def test_every_config_key_read_is_declared():
  reads = _reads()
  assert any(key == "optimizer.eps" for _, _, key in reads), "the scan found no read of optimizer.eps"
  declared = declared_keys()
  # weights entries are loss-term names, args entries transform arguments: their own registries check them
  undeclared = sorted({f"{p}:{line}: config.{key}" for p, line, key in reads if key not in declared
                       and not key.startswith(("objective.weights.", "init_from.args."))})
  assert not undeclared, ("config keys read but declared in no config (declare them in configs.base() or the "
                          "config that uses them, with a comment):\n  " + "\n  ".join(undeclared))


def test_the_scan_finds_reads_through_sections_and_chains(tmp_path):
  src = tmp_path / "m.py"
  src.write_text("def f(config, cfg, d):\n"
                 "  a = config.get('seed', 0)\n"
                 "  b = config.optimizer.get('eps', 1e-8)\n"
                 "  c = config.get('sharding', {}).get('fsdp', ())\n"
                 "  e = cfg.get('mask_rate', 0.15)\n"
                 "  g = d.get('not_a_config', 1)\n")
  assert sorted(config_reads(str(src), {"cfg": "objective"})) == [
      (2, "seed"), (3, "optimizer.eps"), (4, "sharding"), (4, "sharding.fsdp"), (5, "objective.mask_rate")]
  assert _flat_keys({"objective": {"weights": {}}, "seed": 0}) == {"objective", "objective.weights", "seed"}
