"""Pipeline `merging`: one pre-trained model, fine-tunes on conflicting digit tasks, merges compared.

Tasks: the digits under fixed input transformations (`digits_task`), which need different features, so the
fine-tunes interfere: where TIES and DARE claim to beat task arithmetic. Stages per seed in `seed_<s>/`: `pretrain`,
`ft_<task>` (from it) and one transform stage per merge, the task-vector merges' scale chosen first (in memory) on
the tasks' mean held-out accuracy; task t is scored with ft_t's head (`merging.task_heads`). Preconditions: each
fine-tune beats the pre-trained model on its task; the tasks interfere. Writes results.json/md and merging.png.
"""

from __future__ import annotations

import itertools

import ml_collections
import numpy as np

from jaxlab import checkpoint, pipelines, transforms
from jaxlab.data import digits_task
from jaxlab.experiments import Experiment, Report, TrainStage, TransformStage, aggregate, bars, lookup, pm, report
from jaxlab.transforms import soups

SPLITS = ("heldout", "test")
CLAIMS = (("ties", "TIES (Yadav et al. 2023)"), ("dare_ties", "DARE (Yu et al. 2024) with TIES"),
          ("breadcrumbs", "Model breadcrumbs (Davari & Belilovsky 2024)"))


def merge_specs(mc) -> list[tuple[str, str, dict, bool]]:
  """(row name, transform, fixed args, scale searched on held-out) of every merge in the comparison."""
  return [("uniform_soup", "uniform_soup", {}, False), ("task_arithmetic", "task_arithmetic", {}, True),
          ("ties", "ties_merge", {"density": str(mc.ties_density)}, True),
          ("dare_ties", "dare", {"density": str(mc.dare_density), "combine": "ties", "seed": 0}, True),
          ("breadcrumbs", "breadcrumbs", {"density": str(mc.breadcrumbs_density), "gamma": str(mc.breadcrumbs_gamma)},
           True), ("model_stock", "model_stock", {}, False)]


def task_evaluator(data_cfg, tasks):
  """`fn(module, params, model_state, splits, heads)` -> {task: {split: accuracy}}, task t with `heads[t]` as the
  head when given; one compiled eval step per task and split."""
  sets = {t: digits_task.build(ml_collections.ConfigDict({**data_cfg.to_dict(), "task": t})) for t in tasks}
  evs = {}

  def accs(module, params, model_state, splits=SPLITS, heads=None):
    evs.update({(t, s): soups.Evaluator(module, sets[t], s) for t, s in itertools.product(tasks, splits)
                if (t, s) not in evs})
    return {t: {s: evs[(t, s)]({**params, "head": heads[t]} if heads and t in heads else params, model_state)
                for s in splits} for t in tasks}
  return accs


def _row(name, seed, accs, tasks, **fields) -> dict:
  """A result row: per-task accuracies (`accs`, `test_<task>`) and their mean over `tasks` (`test_acc`)."""
  return {"name": name, "seed": seed, **fields, "accs": accs,
          "test_acc": float(np.mean([accs[t]["test"] for t in tasks])), **{f"test_{t}": accs[t]["test"] for t in tasks}}


def run_seed(exp: Experiment, seed: int, evaluate) -> list[dict]:
  """Pre-trains, fine-tunes and merges for one seed; returns one row per model."""
  mc, wd = exp.section, f"seed_{seed}"

  def load(name, heads=None):  # every task's accuracies of stage `name`'s checkpoint
    ld = checkpoint.load(exp.path(f"{wd}/{name}"))
    return evaluate(ld.module, ld.params, ld.model_state, heads=heads)

  exp.run(TrainStage(f"{wd}/pretrain", {"seed": seed, "data.task": mc.pretrain_task, "total_steps": mc.pretrain_steps,
                                        "optimizer.lr": mc.pretrain_lr, "optimizer.warmup_steps": mc.pretrain_warmup}))
  rows = [_row("pretrained", seed, load("pretrain"), mc.tasks, kind="pretrained")]
  for k, task in enumerate(mc.tasks):
    exp.run(TrainStage(f"{wd}/ft_{task}", {
        "seed": 100 * seed + k + 1, "data.task": task, "total_steps": mc.finetune_steps, "optimizer.lr": mc.finetune_lr,
        "optimizer.warmup_steps": mc.finetune_warmup, "init_from.path": exp.path(f"{wd}/pretrain")}))
    rows.append(_row(f"ft_{task}", seed, load(f"ft_{task}"), mc.tasks, kind="fine-tune", task=task))
  paths = [exp.path(f"{wd}/ft_{t}") for t in mc.tasks]
  module = checkpoint.load(paths[0]).module
  # as in the papers, each task keeps its own fine-tune's classification head; the rest is merged
  heads = {t: checkpoint.load(p).params["head"] for t, p in zip(mc.tasks, paths)} if mc.task_heads else None
  for name, transform, args, search in merge_specs(mc):
    log = []
    for s in mc.scales if search else ():  # in memory: the scale with the best mean held-out accuracy
      out = transforms.apply(transform, paths, {**args, "scale": str(s)})
      acc = evaluate(module, out.theta, out.model_state, ("heldout",), heads)  # identity parameterization
      log.append({"scale": float(s), "heldout_mean": float(np.mean([acc[t]["heldout"] for t in mc.tasks]))})
    args = {**args, "scale": str(max(log, key=lambda r: r["heldout_mean"])["scale"])} if log else args  # first best
    rec = exp.run(TransformStage(f"{wd}/{name}", transform, paths, args))
    rows.append(_row(name, seed, load(name, heads), mc.tasks, kind="merge", transform=transform, args=args,
                     report=rec["report"], scale_search=log))
  return rows


def upper_bound(rows: list[dict], tasks) -> list[dict]:
  """Per seed, each task's own fine-tune on that task (the per-task upper bound), as rows named 'upper_bound'."""
  by = {(r["name"], r["seed"]): r for r in rows}
  return [_row("upper_bound", s, {t: by[(f"ft_{t}", s)]["accs"][t] for t in tasks}, tasks)
          for s in dict.fromkeys(r["seed"] for r in rows)]


def preconditions(rows: list[dict], tasks, seeds, mc) -> list[dict]:
  """Each fine-tune beats the pre-trained model on its task (min over seeds); the tasks interfere."""
  by = {(r["name"], r["seed"]): r["accs"] for r in rows}
  gain = {t: min(by[(f"ft_{t}", s)][t]["test"] - by[("pretrained", s)][t]["test"] for s in seeds) for t in tasks}
  gaps = [by[(f"ft_{t}", s)][t]["test"] - np.mean([by[(f"ft_{t}", s)][o]["test"] for o in tasks if o != t])
          for t in tasks for s in seeds]
  return [report.precondition(f"ft_{t} beats the pretrained model on {t} (min over seeds of the test-accuracy gain)",
                              g, mc.min_gain) for t, g in gain.items()] + [report.precondition(
      "tasks interfere: a fine-tune's own-task minus other-task test accuracy (mean)", np.mean(gaps),
      mc.min_interference)]


def claims(rows: list[dict], pre: list[dict], tasks, seeds, min_effect: float = 0.01) -> list[dict]:
  """Each method beats task arithmetic on average test accuracy, paired by seed: every seed's difference positive
  and the mean at least `min_effect` (differences of a few test images move with float-level changes)."""
  by = {(r["name"], r["seed"]): r["test_acc"] for r in rows}
  out = []
  for method, paper in CLAIMS:
    d = np.array([by[(method, s)] - by[("task_arithmetic", s)] for s in seeds])
    std = float(d.std(ddof=1)) if len(d) > 1 else 0.0
    out.append(report.claim(f"{paper} beats task arithmetic on average accuracy when the tasks interfere",
                            bool(d.mean() >= min_effect - 1e-9 and (d > 0).all()),
                            f"{method} minus task_arithmetic, average test accuracy per seed: "
                            + ", ".join(f"{100 * x:+.1f} pp" for x in d) + f" (mean {100 * d.mean():+.1f} pp, "
                            f"sample std {100 * std:.1f} pp; holds if every seed > 0 and the mean >= "
                            f"{100 * min_effect:.1f} pp)", requires=pre))
  return out


@pipelines.register("merging")
def run(config, workdir: str) -> dict:
  """Runs the merging experiment (module docstring); ValueError for an unknown task, fewer than two tasks, no seeds
  or no scales (`config.merging`)."""
  mc = (exp := Experiment(config, workdir, section="merging", lists=dict(tasks=str, seeds=int, scales=float))).section
  for t in (*mc.tasks, mc.pretrain_task):
    digits_task.check_task(t, "config.merging.tasks")
  if len(mc.tasks) < 2 or not mc.seeds or not mc.scales:
    raise ValueError("config.merging: needs at least two tasks, and seeds and scales must not be empty")
  evaluate = task_evaluator(exp.base.data, tuple(dict.fromkeys((mc.pretrain_task, *mc.tasks))))
  rep = Report(exp, "Model merging on conflicting digit tasks (jaxlab)")
  rep.rows = [r for seed in mc.seeds for r in run_seed(exp, seed, evaluate)]
  rep.preconditions = preconditions(rep.rows, mc.tasks, mc.seeds, mc)
  rep.claims = claims(rep.rows, rep.preconditions, mc.tasks, mc.seeds, float(mc.min_effect))
  groups = {v: aggregate(rep.rows + upper_bound(rep.rows, mc.tasks), value=v)
            for v in ("test_acc", *(f"test_{t}" for t in mc.tasks))}
  rep.extra.update(tasks=list(mc.tasks), aggregate=groups)
  names = [g["name"] for g in groups["test_acc"]]  # pretrained, ft_*, merges, upper_bound
  names.insert(1 + len(mc.tasks), names.pop())  # the upper bound beside the fine-tunes
  rep.text(f"Pre-trained on `{mc.pretrain_task}` digits ({mc.pretrain_steps} steps), one fine-tune per task "
           f"({mc.finetune_steps} steps), merged; seeds {list(mc.seeds)}. Scales (lambda) of the task-vector merges "
           f"chosen on the tasks' mean held-out accuracy over {list(mc.scales)}; merges evaluated with "
           f"{'each task' if mc.task_heads else 'the merged'} head. Every stage's lr, densities and scale: Stages.")
  label = {"upper_bound": "per-task upper bound (each task's own fine-tune)"}
  maj = rep.baseline("test")["accuracy"]  # every task has the same test labels (the same images)
  rep.table(("model", "average", *mc.tasks), [(label.get(n, n), f"**{pm(lookup(groups['test_acc'], name=n))}**",
                                              *(pm(lookup(groups[f"test_{t}"], name=n)) for t in mc.tasks))
                                             for n in names] + [("majority class", *[f"{100 * maj:.1f}"] * (
                                                 1 + len(mc.tasks)))], caption="Test accuracy (%)")
  searched = dict.fromkeys(r["name"] for r in rep.rows if r.get("scale_search"))
  rep.text("Chosen scales per seed: " + "; ".join(
      f"{n} {[float(r['args']['scale']) for r in rep.rows if r['name'] == n]}" for n in searched) + ".")
  rep.figure("merging.png", lambda axes: _plot(axes, groups, names, mc.tasks, maj), ncols=2, size=(7, 4.5))
  res = rep.write()
  return {"workdir": exp.workdir, "verdicts": [c["verdict"] for c in res["claims"]]}


def _plot(axes, groups: dict, names: list[str], tasks, majority: float) -> None:
  """Average test accuracy per model (sample-std error bars) and per-task accuracy of the merges."""
  avg = [lookup(groups["test_acc"], name=n) for n in names]
  colors = [{"pretrained": "gray", "upper_bound": "black"}.get(n, "tab:blue" if n[:3] == "ft_" else "tab:orange")
            for n in names]
  axes[0].bar(range(len(names)), [100 * g["mean"] for g in avg], yerr=[100 * g["std"] for g in avg], color=colors,
              capsize=3)
  axes[0].set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
  axes[0].set(ylabel="average test accuracy over tasks (%)", title="mean ± sample std over seeds")
  merges = [n for n in names if n != "pretrained" and n[:3] != "ft_"]  # the merges and the per-task upper bound
  bars(axes[1], [{**lookup(groups[f"test_{t}"], name=n), "task": t} for t in tasks for n in merges], x="task",
       series="name", baselines={"majority class": majority})
  axes[1].set(ylabel="test accuracy (%)")
  axes[1].legend(fontsize=7)
