"""Regenerates the README's generated tables (transforms, configs, and claim verdicts) in place.

    python tools/update_readme.py

Tests check that the README is current (tests/test_configs.py, tests/test_transforms_engine.py). The verdicts
table (between `<!-- verdicts-table -->` markers, when the README has them) quotes the `claims` list of every
committed `results/<experiment>/results.json` (the schema of `jaxlab.experiments.report`).
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_BEGIN, CONFIG_END = "<!-- configs-table -->", "<!-- /configs-table -->"
VERDICTS_BEGIN, VERDICTS_END = "<!-- verdicts-table -->", "<!-- /verdicts-table -->"


def config_table() -> str:
  """Markdown rows `| file | first docstring line |` for every config file."""
  import ast
  rows = ["| config | what it runs |", "|---|---|"]
  for path in sorted(glob.glob(os.path.join(ROOT, "ml_collections_configs", "*.py"))):
    doc = ast.get_docstring(ast.parse(open(path).read())) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ").strip() or "(no docstring)"
    rows.append(f"| `ml_collections_configs/{os.path.basename(path)}` | {first.replace('|', '/')} |")
  return f"{CONFIG_BEGIN}\n" + "\n".join(rows) + f"\n{CONFIG_END}\n"


def verdict_table(root: str = ROOT) -> str:
  """Markdown rows `| experiment | claim | verdict |` from the `claims` list of each `results/*/results.json`
  (results written before that schema, without a list, are left out)."""
  rows = ["| experiment | claim | verdict |", "|---|---|---|"]
  for path in sorted(glob.glob(os.path.join(root, "results", "*", "results.json"))):
    name = os.path.basename(os.path.dirname(path))
    claims = json.load(open(path)).get("claims")
    for c in claims if isinstance(claims, list) else []:
      rows.append(f"| [{name}](results/{name}/results.md) | {c['claim'].replace('|', '/')} | **{c['verdict']}** |")
  return f"{VERDICTS_BEGIN}\n" + "\n".join(rows) + f"\n{VERDICTS_END}\n"


def replace_block(text: str, begin: str, end: str, block: str) -> str:
  pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
  if not pattern.search(text):
    raise SystemExit(f"README.md has no {begin} ... {end} block")
  return pattern.sub(lambda _: block, text)


def render(text: str) -> str:
  sys.path.insert(0, ROOT)
  from jaxlab.transforms import table
  text = replace_block(text, table.BEGIN, table.END, table.readme_block())
  if VERDICTS_BEGIN in text:
    text = replace_block(text, VERDICTS_BEGIN, VERDICTS_END, verdict_table())
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
