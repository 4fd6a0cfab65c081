"""Regenerates the README's generated tables (transforms, configs) in place.

    python tools/update_readme.py

Tests check that the README is current (tests/test_configs.py, tests/test_transforms_engine.py).
"""

from __future__ import annotations

import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_BEGIN, CONFIG_END = "<!-- configs-table -->", "<!-- /configs-table -->"


def config_table() -> str:
  """Markdown rows `| file | first docstring line |` for every config file."""
  import ast
  rows = ["| config | what it runs |", "|---|---|"]
  for path in sorted(glob.glob(os.path.join(ROOT, "ml_collections_configs", "*.py"))):
    doc = ast.get_docstring(ast.parse(open(path).read())) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ").strip() or "(no docstring)"
    rows.append(f"| `ml_collections_configs/{os.path.basename(path)}` | {first.replace('|', '/')} |")
  return f"{CONFIG_BEGIN}\n" + "\n".join(rows) + f"\n{CONFIG_END}\n"


def replace_block(text: str, begin: str, end: str, block: str) -> str:
  pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
  if not pattern.search(text):
    raise SystemExit(f"README.md has no {begin} ... {end} block")
  return pattern.sub(lambda _: block, text)


def render(text: str) -> str:
  sys.path.insert(0, ROOT)
  from jaxlab.transforms import table
  text = replace_block(text, table.BEGIN, table.END, table.readme_block())
  return replace_block(text, CONFIG_BEGIN, CONFIG_END, config_table())


def main():
  path = os.path.join(ROOT, "README.md")
  text = open(path).read()
  new = render(text)
  if new != text:
    open(path, "w").write(new)
    print("README.md updated")
  else:
    print("README.md is current")


if __name__ == "__main__":
  main()
