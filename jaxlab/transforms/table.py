"""The markdown table of every registered transform, generated from the registry.

    python -m jaxlab.transforms.table          # prints the table for the README

Columns: name, idea, inputs, parameters (name: type = default, and the doc),
reference. The README embeds this output between the markers
`<!-- transforms-table -->` and `<!-- /transforms-table -->`; a test checks
that it is up to date.
"""

from __future__ import annotations

from jaxlab.transforms import registry

BEGIN = "<!-- transforms-table -->"
END = "<!-- /transforms-table -->"
_INPUTS = {"1": "1", "2": "2", "N": "N (1 or more)"}


def _cell(text: str) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ").strip()


def param_cell(t: registry.Transform) -> str:
  """`name` (type = default): doc, one parameter per line (`<br>`)."""
  if not t.params:
    return "none"
  return "<br>".join(f"`{k}` ({p.describe()}): {p.doc}" for k, p in t.params.items())


def public_transforms() -> list[registry.Transform]:
  """Every registered transform except private ones (names starting with '_', e.g. registered by tests)."""
  return [t for t in registry.all_transforms() if not t.name.startswith("_")]


def markdown_table() -> str:
  """The markdown table of every registered transform, sorted by name."""
  rows = ["| transform | idea | inputs | parameters | reference |", "|---|---|---|---|---|"]
  for t in public_transforms():
    inputs = _INPUTS[t.inputs] + (", streamed" if t.streaming else "")
    rows.append(f"| `{t.name}` | {_cell(t.idea)} | {inputs} | {_cell(param_cell(t))} | {_cell(t.reference)} |")
  return "\n".join(rows) + "\n"


def readme_block() -> str:
  """The table between the README markers."""
  return f"{BEGIN}\n{markdown_table()}{END}\n"


def main() -> None:
  print(markdown_table(), end="")


if __name__ == "__main__":
  main()
