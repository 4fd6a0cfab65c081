"""The model-merging experiment: one pre-trained model, fine-tunes on conflicting digit tasks, merges compared.

Tasks are the digits under a fixed input transformation (data set `digits_task`, jaxlab/data/digits_task.py): inverted
intensities, rotated by 90 degrees, mirrored, a fixed pixel permutation (`merging.tasks`). The model is
pre-trained on `merging.pretrain_task` (default `mixed`: every image under one of the transformations or
none, fixed per image, so it knows every task a little) and fine-tuned separately on each task. Each
transformation needs different features, so a fine-tune on one does poorly on the others: the tasks
interfere, the setting in which TIES and DARE claim to beat task arithmetic. As in the papers, a merge is
evaluated on task t with the classification head of t's fine-tune (`merging.task_heads`).

Stages per seed (sub-workdirs of `seed_<s>/`; finished stages are skipped on re-run):
  pretrain/            trained from scratch on `pretrain_task`
  ft_<task>/           one fine-tune per task from it
  <merge>/             uniform_soup, task_arithmetic, ties_merge, dare (combine='ties'), breadcrumbs and
                       model_stock of the fine-tunes (transform jobs, base from their init_from); the
                       scale (lambda) of the task-vector methods is chosen on the tasks' mean `heldout`
                       accuracy over `merging.scales`
Every model is evaluated on every task (`heldout` and `test`). Writes results.json (preconditions,
claims, per-seed rows, aggregates), results.md and merging.png into the workdir.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np

from jaxlab import checkpoint, pipelines, transforms
from jaxlab.data import digits_task
from jaxlab.transforms import engine, soups

SPLITS = ("heldout", "test")
EPS = 1e-9  # accuracies are ratios of counts: a gain of exactly the threshold (e.g. 36/360) passes


TASKS = digits_task.TASKS
build_task = digits_task.build


# ----------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------


def _train_config(config, task: str, **over) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.job = "train"
  for k in ("merging", "pipeline"):
    if k in c:
      del c[k]
  c.data.name = "digits_task"
  c.data.task = task
  c.eval_splits = ("heldout",)
  c.final_eval_splits = SPLITS
  for key, value in over.items():
    node = c
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return c


class TaskEvaluator:
  """Accuracy of (params, model_state) on every task's splits; one compiled eval step per architecture."""

  def __init__(self, data_cfg, tasks):
    self.tasks = tuple(tasks)
    self.datasets = {t: build_task(ml_collections.ConfigDict({**data_cfg.to_dict(), "task": t})) for t in tasks}
    self._ev = {}

  def __call__(self, module, params, model_state, splits=SPLITS, heads=None) -> dict[str, dict[str, float]]:
    """`heads`: optional `{task: head params}`; task t is then evaluated with `params['head'] = heads[t]`."""
    out = {}
    for t in self.tasks:
      out[t] = {}
      p = {**params, "head": heads[t]} if heads and t in heads else params
      for s in splits:
        if (t, s) not in self._ev:
          self._ev[(t, s)] = soups.Evaluator(module, self.datasets[t], s)
        out[t][s] = self._ev[(t, s)](p, model_state)
    return out

  def path(self, path: str, heads=None) -> dict[str, dict[str, float]]:
    ld = checkpoint.load(path)
    return self(ld.module, ld.params, ld.model_state, heads=heads)


def _transform(workdir: str, name: str, transform: str, inputs: list[str], args: dict) -> dict:
  """Runs a transform job into `<workdir>/<name>` unless done; returns its record."""
  out = os.path.join(workdir, name)
  done = os.path.join(out, "transform.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  res = engine.to_jsonable(
    engine.run(ml_collections.ConfigDict({"transform": transform, "inputs": tuple(inputs), "args": dict(args)}), out)
  )
  with open(done, "w") as f:
    json.dump(res, f, indent=2)
  return res


def merge_specs(mc) -> list[tuple[str, str, dict, bool]]:
  """(row name, transform, fixed args, scale searched on held-out) of every merge in the comparison."""
  return [
    ("uniform_soup", "uniform_soup", {}, False),
    ("task_arithmetic", "task_arithmetic", {}, True),
    ("ties", "ties_merge", {"density": str(mc.ties_density)}, True),
    ("dare_ties", "dare", {"density": str(mc.dare_density), "combine": "ties", "seed": 0}, True),
    ("breadcrumbs", "breadcrumbs", {"density": str(mc.breadcrumbs_density), "gamma": str(mc.breadcrumbs_gamma)}, True),
    ("model_stock", "model_stock", {}, False),
  ]


def _mean_acc(accs: dict, split: str, tasks) -> float:
  return float(np.mean([accs[t][split] for t in tasks]))


def run_seed(config, workdir: str, seed: int, evaluator: TaskEvaluator) -> list[dict]:
  """Pre-trains, fine-tunes and merges for one seed; returns one row per model with per-task accuracies."""
  mc = config.merging
  wd = os.path.join(workdir, f"seed_{seed}")
  pre_cfg = _train_config(
    config,
    str(mc.pretrain_task),
    **{
      "seed": seed,
      "total_steps": int(mc.pretrain_steps),
      "optimizer.lr": float(mc.pretrain_lr),
      "optimizer.warmup_steps": int(mc.pretrain_warmup),
    },
  )
  pipelines.stage(wd, "pretrain", pre_cfg)
  pre_path = os.path.join(wd, "pretrain")
  rows = [{"name": "pretrained", "kind": "pretrained", "seed": seed, "accs": evaluator.path(pre_path)}]
  paths = []
  for k, task in enumerate(mc.tasks):
    ft_cfg = _train_config(
      config,
      task,
      **{
        "seed": 100 * seed + k + 1,
        "total_steps": int(mc.finetune_steps),
        "optimizer.lr": float(mc.finetune_lr),
        "optimizer.warmup_steps": int(mc.finetune_warmup),
        "init_from.path": pre_path,
      },
    )
    pipelines.stage(wd, f"ft_{task}", ft_cfg)
    paths.append(os.path.join(wd, f"ft_{task}"))
    rows.append(
      {"name": f"ft_{task}", "kind": "fine-tune", "task": task, "seed": seed, "accs": evaluator.path(paths[-1])}
    )
  module = checkpoint.load(pre_path).module
  # as in the papers, each task keeps its own fine-tune's classification head; the rest is merged
  heads = {t: checkpoint.load(p).params["head"] for t, p in zip(mc.tasks, paths)} if mc.task_heads else None
  for name, transform, args, search in merge_specs(mc):
    search_log = []
    if search:  # in memory: the scale with the best mean held-out accuracy over the tasks
      for s in mc.scales:
        out = transforms.apply(transform, paths, {**args, "scale": str(s)})
        params = out.theta  # identity parameterization (plain fine-tunes)
        acc = evaluator(module, params, out.model_state, ("heldout",), heads=heads)
        search_log.append({"scale": float(s), "heldout_mean": _mean_acc(acc, "heldout", mc.tasks)})
      best = max(search_log, key=lambda r: r["heldout_mean"])  # first best on ties: the smallest scale
      args = {**args, "scale": str(best["scale"])}
    rec = _transform(wd, name, transform, paths, args)
    rows.append(
      {
        "name": name,
        "kind": "merge",
        "seed": seed,
        "transform": transform,
        "args": dict(args),
        "report": rec["report"],
        "scale_search": search_log,
        "accs": evaluator.path(os.path.join(wd, name), heads=heads),
      }
    )
  return rows


# ----------------------------------------------------------------------------
# Aggregation, preconditions, claims
# ----------------------------------------------------------------------------


def _stats(values) -> dict:
  v = np.asarray(values, np.float64)
  return {
    "mean": float(v.mean()),
    "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
    "n": int(len(v)),
    "values": v.tolist(),
  }


def aggregate(rows: list[dict], tasks, seeds) -> dict:
  """Mean and sample std (ddof=1) over seeds of each model's per-task and average test accuracy; the
  per-task upper bound is each task's own fine-tune on that task."""
  names = list(dict.fromkeys(r["name"] for r in rows))
  by = {(r["name"], r["seed"]): r for r in rows}
  out = {}
  for n in names:
    per_task = {t: _stats([by[(n, s)]["accs"][t]["test"] for s in seeds]) for t in tasks}
    avg = _stats([np.mean([by[(n, s)]["accs"][t]["test"] for t in tasks]) for s in seeds])
    out[n] = {"test": per_task, "avg_test": avg}
  up = {t: _stats([by[(f"ft_{t}", s)]["accs"][t]["test"] for s in seeds]) for t in tasks}
  out["upper_bound"] = {
    "test": up,
    "avg_test": _stats([np.mean([by[(f"ft_{t}", s)]["accs"][t]["test"] for t in tasks]) for s in seeds]),
  }
  return out


def preconditions(rows: list[dict], tasks, seeds, mc) -> list[dict]:
  by = {(r["name"], r["seed"]): r for r in rows}
  out = []
  for t in tasks:
    gains = [by[(f"ft_{t}", s)]["accs"][t]["test"] - by[("pretrained", s)]["accs"][t]["test"] for s in seeds]
    out.append(
      {
        "name": f"ft_{t} beats the pretrained model on {t} (min over seeds of the test-accuracy gain)",
        "value": float(min(gains)),
        "threshold": float(mc.min_gain),
        "holds": bool(min(gains) >= mc.min_gain - EPS),
      }
    )
  gaps = []
  for t in tasks:
    for s in seeds:
      accs = by[(f"ft_{t}", s)]["accs"]
      gaps.append(accs[t]["test"] - np.mean([accs[o]["test"] for o in tasks if o != t]))
  out.append(
    {
      "name": "tasks interfere: a fine-tune's own-task minus other-task test accuracy (mean)",
      "value": float(np.mean(gaps)),
      "threshold": float(mc.min_interference),
      "holds": bool(np.mean(gaps) >= mc.min_interference - EPS),
    }
  )
  return out


def claims(rows: list[dict], pre: list[dict], tasks, seeds, min_effect: float = 0.01) -> list[dict]:
  """The papers' claims that their method beats task arithmetic when tasks interfere (average test accuracy,
  paired by seed): holds when every seed's difference is positive and the mean difference is at least
  `min_effect` (differences of a few test images change with float-level changes to training)."""
  ok = all(p["holds"] for p in pre)
  by = {(r["name"], r["seed"]): r for r in rows}

  def avg(n, s):
    return float(np.mean([by[(n, s)]["accs"][t]["test"] for t in tasks]))

  out = []
  for method, paper in (
    ("ties", "TIES (Yadav et al. 2023)"),
    ("dare_ties", "DARE (Yu et al. 2024) with TIES"),
    ("breadcrumbs", "Model breadcrumbs (Davari & Belilovsky 2024)"),
  ):
    claim = f"{paper} beats task arithmetic on average accuracy when the tasks interfere"
    if not ok:
      failed = ", ".join(p["name"] for p in pre if not p["holds"])
      out.append({"claim": claim, "verdict": "not tested", "evidence": f"precondition failed: {failed}"})
      continue
    diffs = [avg(method, s) - avg("task_arithmetic", s) for s in seeds]
    holds = np.mean(diffs) >= min_effect - EPS and all(d > 0 for d in diffs)
    out.append(
      {
        "claim": claim,
        "verdict": "holds" if holds else "does not hold",
        "evidence": f"{method} minus task_arithmetic, average test accuracy per seed: "
        + ", ".join(f"{100 * d:+.1f} pp" for d in diffs)
        + f" (mean {100 * np.mean(diffs):+.1f} pp, sample std "
        + f"{100 * np.std(diffs, ddof=1) if len(diffs) > 1 else 0:.1f} pp; holds if every seed > 0 and the mean "
        + f">= {100 * min_effect:.1f} pp)",
      }
    )
  return out


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------


@pipelines.register("merging")
def run(config, workdir: str) -> dict:
  """Runs the merging experiment (module docstring); returns a short summary.

  Raises:
    ValueError: a bad `config.merging` entry (unknown task, fewer than two tasks, no seeds or scales).
  """
  t0 = time.time()
  config = pipelines.normalized(config, "merging", {"tasks": str, "seeds": int, "scales": float})
  mc = config.merging
  for t in (*mc.tasks, mc.pretrain_task):
    if t not in TASKS:
      raise ValueError(f"config.merging.tasks: unknown task {t!r}; known: {', '.join(TASKS)}")
  if len(mc.tasks) < 2:
    raise ValueError("config.merging.tasks: merging needs at least two tasks")
  if not mc.seeds or not mc.scales:
    raise ValueError("config.merging.seeds and config.merging.scales must not be empty")
  os.makedirs(workdir, exist_ok=True)
  tasks = tuple(mc.tasks)
  all_tasks = tuple(dict.fromkeys((mc.pretrain_task, *tasks)))
  evaluator = TaskEvaluator(config.data, all_tasks)
  rows = []
  for seed in mc.seeds:
    rows += run_seed(config, workdir, int(seed), evaluator)
  seeds = [int(s) for s in mc.seeds]
  agg = aggregate(rows, tasks, seeds)
  pre = preconditions(rows, tasks, seeds, mc)
  result = {
    "tasks": list(tasks),
    "pretrain_task": mc.pretrain_task,
    "seeds": seeds,
    "preconditions": pre,
    "claims": claims(rows, pre, tasks, seeds, float(mc.min_effect)),
    "aggregate": agg,
    "rows": rows,
    "std": "sample std over seeds (ddof=1)",
    "wall_s": time.time() - t0,
    "machine": f"{jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPU cores",
    "command": pipelines.command("merging.py", workdir),
    "config": json.loads(config.to_json_best_effort()),
  }
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(results_markdown(result))
  plot(result, os.path.join(workdir, "merging.png"))
  return {
    "workdir": os.path.abspath(workdir),
    "wall_s": time.time() - t0,
    **{f"{n}_avg_test": a["avg_test"]["mean"] for n, a in agg.items()},
    "verdicts": [c["verdict"] for c in result["claims"]],
  }


ORDER = (
  "pretrained",
  "ft_*",
  "upper_bound",
  "uniform_soup",
  "task_arithmetic",
  "ties",
  "dare_ties",
  "breadcrumbs",
  "model_stock",
)


def _ordered(agg: dict) -> list[str]:
  out = []
  for o in ORDER:
    out += sorted(n for n in agg if n.startswith("ft_")) if o == "ft_*" else [o] if o in agg else []
  return out


def results_markdown(result: dict) -> str:
  """Tables (mean +- sample std over seeds, ddof=1), preconditions and claims as markdown."""
  tasks, agg, cfg = result["tasks"], result["aggregate"], result["config"]["merging"]
  pm = lambda s: f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"  # noqa: E731
  lines = [
    "# Model merging on conflicting digit tasks (jaxlab)",
    "",
    f"Command: `{result['command']}`",
    "",
    f"Pre-trained on `{result['pretrain_task']}` digits for {cfg['pretrain_steps']} steps; one fine-tune of "
    f"{cfg['finetune_steps']} steps per task ({', '.join(tasks)}); seeds {result['seeds']}. Test accuracy "
    f"(%) on each task's 360 test images, mean ± sample std over {len(result['seeds'])} seeds (ddof=1). "
    "Scales (lambda) of the task-vector merges chosen on the mean held-out accuracy (180 images per task) "
    f"over {cfg['scales']}. TIES density {cfg['ties_density']}, DARE density {cfg['dare_density']} "
    f"(combine 'ties'), breadcrumbs density {cfg['breadcrumbs_density']} gamma {cfg['breadcrumbs_gamma']}. "
    f"Machine: {result['machine']}, shared with other jobs; wall time {result['wall_s'] / 60:.1f} min.",
    "",
    "| model | average | " + " | ".join(tasks) + " |",
    "|---|---|" + "---|" * len(tasks),
  ]
  for n in _ordered(agg):
    label = "per-task upper bound (each task's own fine-tune)" if n == "upper_bound" else n
    lines.append(
      f"| {label} | **{pm(agg[n]['avg_test'])}** | " + " | ".join(pm(agg[n]["test"][t]) for t in tasks) + " |"
    )
  scales = {}
  for r in result["rows"]:
    if r.get("scale_search"):
      scales.setdefault(r["name"], []).append(float(r["args"]["scale"]))
  lines += [
    "",
    "Chosen scales per seed: " + "; ".join(f"{n} {v}" for n, v in scales.items()) + ".",
    "",
    "## Preconditions",
    "",
    "| precondition | value | threshold | holds |",
    "|---|---|---|---|",
  ]
  for p in result["preconditions"]:
    lines.append(f"| {p['name']} | {p['value']:.3f} | {p['threshold']:.3f} | {p['holds']} |")
  lines += ["", "## Claims", "", "| claim | verdict | evidence |", "|---|---|---|"]
  for c in result["claims"]:
    lines.append(f"| {c['claim']} | **{c['verdict']}** | {c['evidence']} |")
  return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
  """Average test accuracy per model (bars, sample-std error bars) and per-task accuracy of the merges."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  agg, tasks = result["aggregate"], result["tasks"]
  names = _ordered(agg)
  fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
  means = [100 * agg[n]["avg_test"]["mean"] for n in names]
  stds = [100 * agg[n]["avg_test"]["std"] for n in names]
  colors = [
    "gray"
    if n == "pretrained"
    else "tab:blue"
    if n.startswith("ft_")
    else "black"
    if n == "upper_bound"
    else "tab:orange"
    for n in names
  ]
  axes[0].bar(range(len(names)), means, yerr=stds, color=colors, capsize=3)
  axes[0].set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
  axes[0].set_ylabel("average test accuracy over tasks (%)")
  axes[0].set_title("mean ± sample std over seeds")
  merges = [n for n in names if n not in ("pretrained", "upper_bound") and not n.startswith("ft_")]
  width = 0.8 / max(len(merges), 1)
  for k, n in enumerate(merges):
    axes[1].bar(
      np.arange(len(tasks)) + k * width,
      [100 * agg[n]["test"][t]["mean"] for t in tasks],
      width,
      yerr=[100 * agg[n]["test"][t]["std"] for t in tasks],
      label=n,
      capsize=2,
    )
  axes[1].plot(
    np.arange(len(tasks)) + 0.4 - width / 2,
    [100 * agg["upper_bound"]["test"][t]["mean"] for t in tasks],
    "k_",
    markersize=30,
    label="own fine-tune",
  )
  axes[1].set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
  axes[1].set_ylabel("test accuracy (%)")
  axes[1].legend(fontsize=7)
  for ax in axes:
    ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
