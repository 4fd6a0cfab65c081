"""The one way an experiment reports: rows, seed statistics, baselines, preconditions, claims, results files.

Rows are flat dicts, one per trained or evaluated model: `name` (the arm), `seed` (int), metrics (floats or None,
accuracies as fractions) and any descriptive fields (`depth`, `ratio`, ...). `aggregate` groups them and takes
the mean and the sample standard deviation (ddof=1) over seeds; every table states that convention (`STD_NOTE`).

`Report` collects a page (title, setup text, tables), preconditions and claims, and `Report.write` writes
`results.json` (rows, preconditions, claims, stages with their overrides, command, machine, std convention,
config), `results.md` (the same, in reading order) and the figures, into the experiment's workdir.

Preconditions are `{name, value, threshold, holds}`; claims `{claim, verdict, evidence}` with verdict one of
`VERDICTS`. A claim whose preconditions do not all hold is "not tested", whatever its numbers say.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable, Iterable, Sequence

import numpy as np

STD_NOTE = "mean ± sample std over seeds (ddof=1; 0 with one seed)"
VERDICTS = ("holds", "does not hold", "not tested")
EPS = 1e-9  # accuracies are ratios of counts: a value exactly at its threshold passes


# ----------------------------------------------------------------------------- statistics and baselines


def stats(values: Iterable[float]) -> dict:
  """{'mean', 'std' (sample, ddof=1; 0.0 for one value), 'n', 'values'} of the non-None `values`."""
  v = np.asarray([x for x in values if x is not None], np.float64)
  if v.size == 0:
    return {"mean": None, "std": None, "n": 0, "values": []}
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size),
          "values": v.tolist()}


def aggregate(rows: Sequence[dict], by: str | Sequence[str] = "name", value: str = "test_acc",
              seeds: Sequence[int] | None = None, seed_key: str = "seed") -> list[dict]:
  """Rows grouped by the fields `by`, with `stats` of `value` over their seeds, in order of first appearance.

  Args:
    rows: result rows.
    by: the grouping field(s), e.g. ('name', 'depth').
    value: the metric to summarise.
    seeds: only rows whose `seed_key` is one of these (None: all rows).
    seed_key: the row field holding the seed.

  Returns:
    One dict per group: the `by` fields, `stats(...)` keys (mean, std, n, values) and `seeds`.

  Raises:
    ValueError: two rows of one group with the same seed (they would be counted twice).
  """
  by = (by,) if isinstance(by, str) else tuple(by)
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    if seeds is not None and r.get(seed_key) not in seeds:
      continue
    if r.get(value) is None:
      continue
    groups.setdefault(tuple(r.get(k) for k in by), []).append(r)
  out = []
  for key, rs in groups.items():
    got = [r.get(seed_key) for r in rs]
    if len(set(got)) != len(got):
      raise ValueError(f"aggregate: group {dict(zip(by, key, strict=True))} has seed(s) {got} more than once")
    out.append({**dict(zip(by, key, strict=True)), **stats(r[value] for r in rs), "seeds": got})
  return out


def check_rows(rows: Sequence[dict]) -> None:
  """The row schema: a dict with a str `name`, an int `seed`, and every `*_acc` field None or a fraction in [0, 1].

  Raises:
    ValueError: naming the first row that breaks it and how.
  """
  for i, r in enumerate(rows):
    if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not isinstance(r.get("seed"), int):
      raise ValueError(f"results row {i} ({str(r)[:80]}): a row needs a str 'name' and an int 'seed'")
    bad = [k for k, v in r.items() if k.endswith("_acc") and v is not None and not 0.0 <= v <= 1.0]
    if bad:
      raise ValueError(f"results row {i} ({r['name']}): {bad[0]}={r[bad[0]]} is not a fraction in [0, 1]")


def summary_row(name: str, summary: dict, seed: int = 0, **fields) -> dict:
  """A row from a train stage's summary: name, seed, test_acc, val_acc, params, wall_s, and `fields`."""
  return {"name": name, "seed": int(seed), "test_acc": summary.get("test_accuracy"),
          "val_acc": summary.get("validation_accuracy"), "params": int(summary.get("params", 0)),
          "wall_s": float(summary.get("wall_s", 0.0)), **fields}


def lookup(groups: Sequence[dict], **fields) -> dict | None:
  """The first group of `aggregate(...)` whose fields equal `fields`, or None."""
  return next((g for g in groups if all(g.get(k) == v for k, v in fields.items())), None)


def majority_baseline(labels) -> dict:
  """The trivial classifier that always predicts the most frequent label of `labels` (the evaluated split's).

  Returns:
    {'label': that class, 'accuracy': its frequency, 'n': number of examples}: the accuracy a model must beat,
    which is 1/K only for a balanced split.
  """
  y = np.asarray(labels).reshape(-1)
  if y.size == 0:
    raise ValueError("majority_baseline: the split has no labels")
  classes, counts = np.unique(y, return_counts=True)
  k = int(np.argmax(counts))
  return {"label": classes[k].item(), "accuracy": float(counts[k] / y.size), "n": int(y.size)}


def split_labels(data_cfg, split: str = "test"):
  """The labels of `split` of the data set that `data_cfg` (a config's `data` section) builds."""
  from jaxlab import data
  ds = data.get_dataset(data_cfg)
  if split not in ds.splits:
    raise ValueError(f"config.data: data set {ds.name!r} has no split {split!r}; it has {sorted(ds.splits)}")
  return ds.splits[split].arrays["label"]


# ----------------------------------------------------------------------------- preconditions and claims


def precondition(name: str, value: float, threshold: float, *, at_most: bool = False) -> dict:
  """{name, value, threshold, holds}: holds when value >= threshold (value <= threshold with `at_most`)."""
  value, threshold = float(value), float(threshold)
  holds = value <= threshold + EPS if at_most else value >= threshold - EPS
  return {"name": name, "value": value, "threshold": threshold, "holds": bool(holds)}


def claim(text: str, holds: bool | None, evidence: str, requires: Sequence[dict] = ()) -> dict:
  """{claim, verdict, evidence}. `holds` True/False gives 'holds'/'does not hold', None 'not tested'; any failed
  precondition in `requires` makes it 'not tested', its evidence naming the failed preconditions."""
  failed = [p["name"] for p in requires if not p["holds"]]
  if failed:
    return {"claim": text, "verdict": "not tested", "evidence": "precondition failed: " + "; ".join(failed)}
  verdict = VERDICTS[2] if holds is None else VERDICTS[0] if holds else VERDICTS[1]
  return {"claim": text, "verdict": verdict, "evidence": evidence}


def learned(name: str, accuracy, majority: dict | float, margin: float = 0.05) -> dict:
  """The precondition that a model learned: its (best) accuracy beats the majority class by `margin`.

  Args:
    name: what learned, e.g. 'auxiliary net' (the precondition reads '<name> beats the majority class ...').
    accuracy: a fraction, or groups of `aggregate` / `stats` dicts (their best mean is taken).
    majority: `majority_baseline(...)` of the evaluated split, or its accuracy.
    margin: how far above the majority class (a fraction: 0.05 is 5 points).

  Returns:
    `precondition(...)` with value the (best) accuracy and threshold majority + margin.
  """
  if isinstance(accuracy, dict):
    accuracy = [accuracy]
  if not isinstance(accuracy, (int, float)):
    means = [g["mean"] for g in accuracy if g and g.get("mean") is not None]
    if not means:
      raise ValueError(f"learned({name!r}): no accuracy to compare with the majority class")
    accuracy = max(means)
  base = float(majority["accuracy"] if isinstance(majority, dict) else majority)
  return precondition(f"{name} beats the majority class ({100 * base:.1f}%) by {100 * margin:g} points",
                      accuracy, base + margin)


def matches(name: str, value, reference, tolerance: float = 0.0) -> dict:
  """The precondition that a model is at least as good as a reference (e.g. the plain net of its size at the same
  budget) up to `tolerance`: value - reference >= -tolerance. `value` / `reference`: fractions or `stats` groups
  (their means); the name states both accuracies and the tolerance."""
  v, r = (float(x["mean"] if isinstance(x, dict) else x) for x in (value, reference))
  return precondition(f"{name}: {100 * v:.1f}% vs {100 * r:.1f}% (at most {100 * tolerance:g} points below)",
                      v - r, 0.0 - float(tolerance))


def compare(groups: Sequence[dict], a: str, b: str, over: str, key: str = "method", within_std: bool = False,
            unit: str = "points", ties_win: bool = False) -> dict:
  """Arm `a` against arm `b` at every value of `over` both have (groups of `aggregate` by (key, over)).

  A value is a win when a's mean is higher (`ties_win`: or equal, for "at least as good"; `within_std`: when it
  is at most the larger of the two sample stds below). Returns {'wins', 'n', 'mean_diff' (fraction, None without
  pairs), 'holds' (a majority of wins; None without pairs), 'text' (the evidence sentence)}.
  """
  pairs = [(x, lookup(groups, **{key: b, over: x[over]})) for x in groups if x.get(key) == a]
  diffs = [(x["mean"] - y["mean"], max(x["std"], y["std"])) for x, y in pairs if y and y.get("mean") is not None]
  wins = sum(dm > -sd if within_std else dm >= -EPS if ties_win else dm > EPS for dm, sd in diffs)
  mean = float(np.mean([dm for dm, _ in diffs])) if diffs else None
  how = "within one std or higher" if within_std else "as high or higher" if ties_win else "higher"
  text = (f"{how} at {wins}/{len(diffs)} values of {over} "
          f"(holds at a majority); mean difference {'-' if mean is None else f'{100 * mean:+.1f}'} {unit}")
  return {"wins": wins, "n": len(diffs), "mean_diff": mean, "holds": wins > len(diffs) / 2 if diffs else None,
          "text": text}


# ----------------------------------------------------------------------------- command and machine lines


def _quote(arg: str) -> str:
  """A shell word as one would type it: "--config.x=('a','b')" in double quotes."""
  if shlex.quote(arg) == arg or any(c in arg for c in '"$`\\'):
    return shlex.quote(arg)
  return f'"{arg}"'


def command(workdir: str, config_file: str) -> str:
  """The command line that wrote `workdir`: its config file (with its `:arg`, from the latest recorded attempt
  when `jaxlab.main` ran it; else `ml_collections_configs/<config_file>`) and the overrides recorded in
  `<workdir>/overrides.txt`."""
  cfg = f"ml_collections_configs/{config_file}"
  attempts = os.path.join(workdir, "attempts")
  if os.path.isdir(attempts):
    latest = max((d for d in os.listdir(attempts) if d.isdigit()), default=None)
    path = os.path.join(attempts, latest or "", "command.txt")
    if latest and os.path.exists(path):
      cfg = next((a.split("=", 1)[1] for a in shlex.split(open(path).read()) if a.startswith("--config=")), cfg)
  path = os.path.join(workdir, "overrides.txt")
  overrides = [o for o in open(path).read().split("\n") if o.strip()] if os.path.exists(path) else []
  rel = os.path.relpath(workdir)
  shown = rel if not rel.startswith("..") else os.path.abspath(workdir)
  return " ".join(["python -m jaxlab.main", _quote(f"--config={cfg}"), _quote(f"--workdir={shown}"),
                   *(_quote(o) for o in overrides)])


def machine() -> str:
  """What the numbers were measured on: the jax devices and the host's CPU count (never hard-coded)."""
  import platform

  import jax
  devs = jax.devices()
  kinds = sorted({d.device_kind for d in devs})
  return (f"{len(devs)} x {'/'.join(kinds)} ({devs[0].platform}), {os.cpu_count()} CPU cores, "
          f"{platform.system()} {platform.machine()}, jax {jax.__version__}")


# ----------------------------------------------------------------------------- tables and figures


def pm(group: dict | None, scale: float = 100.0, digits: int = 1) -> str:
  """'mean ± std' of a `stats`/`aggregate` group (scaled, e.g. fractions to %), '-' when missing."""
  if not group or group.get("mean") is None:
    return "-"
  return f"{scale * group['mean']:.{digits}f} ± {scale * group['std']:.{digits}f}"


def markdown_table(header: Sequence[str], body: Iterable[Sequence]) -> list[str]:
  """Markdown lines of a table."""
  lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in body]


def errorbars(ax, groups: Sequence[dict], x: str, series: str, scale: float = 100.0,
              dashed: Callable[[str], bool] = lambda name: False, baselines: dict[str, float] | None = None) -> None:
  """One line per value of `groups[series]` (groups of `aggregate`): the mean against `groups[x]` with
  sample-std error bars, in order of first appearance. `baselines` ({label: fraction}) are dotted lines."""
  names = list(dict.fromkeys(g[series] for g in groups))
  _colors(ax, len(names))
  for name in names:
    pts = sorted((g for g in groups if g[series] == name), key=lambda g: g[x])
    ax.errorbar([g[x] for g in pts], [scale * g["mean"] for g in pts], yerr=[scale * g["std"] for g in pts],
                marker="o", capsize=3, label=str(name), linestyle="--" if dashed(name) else "-")
  _baselines(ax, baselines, scale)


def _colors(ax, n: int) -> None:
  """More than 10 series: 20 distinct colours (matplotlib's default cycle repeats after 10)."""
  if n > 10:
    import matplotlib
    ax.set_prop_cycle(color=[matplotlib.colormaps["tab20"](i) for i in range(20)])


def _baselines(ax, baselines: dict[str, float] | None, scale: float) -> None:
  for j, (label, value) in enumerate((baselines or {}).items()):
    ax.axhline(scale * value, color="k", linestyle=(":", "--", "-.")[j % 3], linewidth=1, label=label)


def bars(ax, groups: Sequence[dict], x: str, series: str, scale: float = 100.0,
         baselines: dict[str, float] | None = None, width: float = 0.8) -> None:
  """Grouped bars of `aggregate` groups: one cluster per value of `groups[x]`, one bar per value of
  `groups[series]` inside it (the mean, sample-std error bars), in order of first appearance; a missing
  (x, series) pair leaves a gap. `baselines` ({label: fraction}, e.g. the majority class) are dotted lines."""
  xs = list(dict.fromkeys(g[x] for g in groups))
  names = list(dict.fromkeys(g[series] for g in groups))
  w = width / max(len(names), 1)
  _colors(ax, len(names))
  for j, name in enumerate(names):
    got = [(i, lookup(groups, **{x: v, series: name})) for i, v in enumerate(xs)]
    got = [(i, g) for i, g in got if g and g.get("mean") is not None]
    ax.bar([i + (j - (len(names) - 1) / 2) * w for i, _ in got], [scale * g["mean"] for _, g in got], w,
           yerr=[scale * g["std"] for _, g in got], capsize=2, label=str(name))
  _baselines(ax, baselines, scale)
  ax.set_xticks(range(len(xs)), [str(v) for v in xs])


def figure(path: str, draw: Callable, ncols: int = 1, size: tuple[float, float] = (6.5, 4.2), nrows: int = 1) -> str:
  """Draws `draw(axes)` with matplotlib's Agg backend into `path`. `axes` as `plt.subplots(nrows, ncols)` gives
  them: one Axes for 1 x 1, a 1-D array when one of `nrows`/`ncols` is 1, else a 2-D array [row, col]; `size`
  is one panel's (width, height)."""
  # A pyplot-free Figure renders with Agg without switching the process's backend (a notebook keeps inline plots).
  from matplotlib.figure import Figure
  fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
  axes = fig.subplots(nrows, ncols, squeeze=True)
  draw(axes)
  for ax in np.atleast_1d(axes).ravel():
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


# ----------------------------------------------------------------------------- the report


class Report:
  """The results page of one experiment: built in reading order, written by `write`.

  Args:
    experiment: the `runner.Experiment` whose workdir, stages, config and wall time are reported.
    title: the page title.
  """

  def __init__(self, experiment, title: str):
    self.exp = experiment
    self.title = title
    self.rows: list[dict] = []
    self.lines: list[str] = []
    self.preconditions: list[dict] = []
    self.claims: list[dict] = []
    self.figures: dict[str, Callable] = {}
    self.extra: dict = {}

  def baseline(self, split: str = "test", data=None) -> dict:
    """`majority_baseline` of `split` of the data set that `data` (a `data` config section, for an experiment
    with a data set per task or stage) builds; default the experiment's own (`base.data`)."""
    return majority_baseline(split_labels(self.exp.base.data if data is None else data, split))

  def learned(self, name: str, accuracy, split: str = "test", margin: float = 0.05, data=None) -> dict:
    """Records and returns `learned(name, accuracy, self.baseline(split, data), margin)`: the (best) accuracy
    beats the majority class of the evaluated split by `margin`."""
    p = learned(name, accuracy, self.baseline(split, data), margin)
    self.preconditions.append(p)
    return p

  def text(self, *paragraphs: str) -> Report:
    """Adds paragraphs (or markdown lines) to the page."""
    for p in paragraphs:
      self.lines += [p, ""]
    return self

  def table(self, header: Sequence[str], body: Iterable[Sequence], caption: str = "", seeds: bool = True) -> Report:
    """Adds a table; the caption of a table of seed statistics (`seeds`) states their convention (`STD_NOTE`)."""
    note = f" ({STD_NOTE})" if seeds else ""
    self.lines += [f"{caption}{note}.".lstrip() if caption else f"Values: {STD_NOTE}.", ""]
    self.lines += markdown_table(header, body) + [""]
    return self

  def precondition(self, *args, **kwargs) -> dict:
    """Records and returns `precondition(...)`."""
    p = precondition(*args, **kwargs)
    self.preconditions.append(p)
    return p

  def matches(self, *args, **kwargs) -> dict:
    """Records and returns `matches(...)`."""
    p = matches(*args, **kwargs)
    self.preconditions.append(p)
    return p

  def claim(self, *args, **kwargs) -> dict:
    """Records and returns `claim(...)`."""
    c = claim(*args, **kwargs)
    self.claims.append(c)
    return c

  def figure(self, name: str, draw: Callable, ncols: int = 1, size: tuple[float, float] = (6.5, 4.2),
             nrows: int = 1) -> None:
    """A figure `name` (e.g. 'pela.png') drawn by `draw(axes)` (see `figure`) when the report is written."""
    self.figures[name] = lambda path: figure(path, draw, ncols, size, nrows)

  def results(self) -> dict:
    """The results.json object."""
    from jaxlab.experiments.runner import jsonable
    check_rows(self.rows)
    exp = self.exp
    return jsonable({
        "title": self.title, "command": command(exp.workdir, exp.config_file), "machine": machine(),
        "std": STD_NOTE, "wall_s": exp.wall_s(), "rows": self.rows, "preconditions": self.preconditions,
        "claims": self.claims, "stages": exp.stages, "figures": sorted(self.figures), **self.extra,
        "config": json.loads(exp.config.to_json_best_effort())})

  def markdown(self, results: dict) -> str:
    """results.md: title, command, machine, the page, preconditions, claims, every stage's overrides."""
    lines = [f"# {self.title}", "", f"Command: `{results['command']}`", "",
             f"Machine: {results['machine']}. Wall time of this invocation: {results['wall_s'] / 60:.1f} min "
             "(stages already done were not re-run).", "", *self.lines]
    if self.preconditions:
      lines += ["## Preconditions", ""]
      lines += markdown_table(("precondition", "value", "threshold", "holds"),
                              ((p["name"], f"{p['value']:.4g}", f"{p['threshold']:.4g}", p["holds"])
                               for p in self.preconditions)) + [""]
    if self.claims:
      lines += ["## Claims", ""]
      lines += markdown_table(("claim", "verdict", "evidence"),
                              ((c["claim"], f"**{c['verdict']}**", c["evidence"]) for c in self.claims)) + [""]
    lines += ["## Stages", "", "Each stage's workdir holds `overrides.json` (what it was asked) and `stage.json` "
              "(that and its summary). `key~{...}`: a section replaced as a whole, showing the entries that differ "
              "from the base config's; paths are relative to the workdir.", ""]
    lines += markdown_table(("stage", "overrides of the base config / transform"),
                            ((f"`{s['name']}`", _describe(s["request"], self.exp.workdir, self.exp.base))
                             for s in results["stages"]))
    return "\n".join(lines) + "\n"

  def write(self) -> dict:
    """Writes results.json, results.md and the figures into the experiment's workdir; returns the results."""
    results = self.results()
    wd = self.exp.workdir
    with open(os.path.join(wd, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
    with open(os.path.join(wd, "results.md"), "w") as f:
      f.write(self.markdown(results))
    for name, draw in self.figures.items():
      draw(os.path.join(wd, name))
    return results


def _describe(request: dict, workdir: str, base) -> str:
  """One table cell: `key=value` overrides of a train stage (a replaced section `key~{...}` shows only the
  entries that differ from the base config's), or `transform(inputs; args)`; paths relative to the workdir."""
  root = os.path.abspath(workdir) + os.sep

  def short(key, v):
    section = base
    for part in key.split("."):
      section = section.get(part) if hasattr(section, "get") else None
    if isinstance(v, dict) and hasattr(section, "to_dict"):
      old = section.to_dict()
      v = {k: x for k, x in v.items() if k not in old or json.dumps(old[k]) != json.dumps(x)}
      key += "~"
    else:
      key += "="
    s = (json.dumps(v, separators=(",", ":")) if isinstance(v, (dict, list))
         else f"{v:.6g}" if isinstance(v, float) else repr(v))
    return f"`{key}{s.replace(root, '').replace('|', '/')}`"

  if request.get("kind") == "transform":
    ins = ", ".join(p[len(root):] if p.startswith(root) else p for p in request["inputs"])
    args = ", ".join(short(k, v).strip("`") for k, v in request["args"].items())
    return f"`{request['transform']}({ins}{'; ' + args if args else ''})`"
  return ", ".join(short(k, v) for k, v in request["overrides"].items()) or "(none)"
