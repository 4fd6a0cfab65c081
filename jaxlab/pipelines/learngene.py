"""The learngene experiment (TLEG and SWS): teacher -> auxiliary nets -> descendants vs scratch.

Stages (sub-workdirs of `workdir` over the config's top-level keys; defaults: `ml_collections_configs/learngene.py`):
  teacher                   a larger ViT trained with cross entropy (skipped with learngene.teacher_path)
  <method>_aux              the auxiliary net (`linear_learngene` for tleg, `stage_sharing` for sws), trained by
                            soft distillation from the teacher
  <method>_d<L>_expanded    its expansion to depth L (`expand_learngene` / `expand_stages`), before fine-tuning
  <method>_d<L>_s<seed>     descendant of depth L: `init_from` the aux through that transform, fine-tuned
  scratch_d<L>_s<seed>      the same architecture from random init, same budget; scratch<k>x_...: k times it
Writes results.json (one row per model), results.md and accuracy_vs_depth.png.
"""

from __future__ import annotations

import os

import numpy as np

from jaxlab import checkpoint, configs, evaluate, pipelines, trees
from jaxlab.experiments.report import Report, aggregate, errorbars, lookup, pm, summary_row
from jaxlab.experiments.runner import Experiment, TrainStage, TransformStage

METHODS = {"tleg": ("expand_learngene", "learngene"), "sws": ("expand_stages", "stages")}  # transform, gene key
AUX = ("teacher", "tleg_aux", "sws_aux")


def method_depths(g, method: str) -> list[int]:
  """Descendant depths a method can build: all for tleg, >= the number of stages for sws."""
  return [d for d in sorted(set(g.depths)) if method == "tleg" or d >= len(g.aux.stages)]


def _train(model: dict, steps: int, lr: float, warmup: int, seed: int = 0, **more) -> dict:
  return {"model": dict(model), "total_steps": int(steps), "optimizer.lr": float(lr),
          "optimizer.warmup_steps": int(warmup), "seed": int(seed), **more}


def _expand_args(g, method: str, depth: int, seed: int) -> dict:
  f = g.finetune
  return {"depth": int(depth), "head": f.head, "final_norm": f.final_norm, "ln_eps": float(f.ln_eps),
          "seed": int(seed), **({"rule": f.sws_rule} if method == "sws" else {})}


def _descendant(g, depth: int) -> dict:
  eps = {"ln_eps": float(g.finetune.ln_eps)} if float(g.finetune.ln_eps) > 0 else {}
  return {**g.aux.model.to_dict(), "depth": int(depth), "final_norm": g.finetune.final_norm, **eps}


@pipelines.register("learngene")
def run(config, workdir: str) -> dict:
  """Runs the learngene experiment of `config.learngene`; returns `{'workdir', 'summary', 'verdicts'}`.

  Raises:
    ValueError: unknown methods, no depths, or SWS stages that do not sum to the aux depth.
  """
  exp = Experiment(config, workdir, "learngene")
  g, a, d, f = exp.section, exp.section.aux, exp.section.distill, exp.section.finetune
  g.methods, g.depths, g.seeds = configs.as_tuple(g.methods), configs.as_tuple(g.depths, int), configs.as_tuple(
      g.seeds, int)
  a.stages = configs.as_tuple(a.stages, int)
  if not g.methods or any(m not in METHODS for m in g.methods):
    raise ValueError(f"config.learngene.methods={list(g.methods)}: choose from {list(METHODS)}")
  if not g.depths or min(g.depths) < 1:
    raise ValueError(f"config.learngene.depths={list(g.depths)}: give depths >= 1")
  if "sws" in g.methods and sum(a.stages) != a.model.depth:
    raise ValueError(f"config.learngene.aux.stages={list(a.stages)} must sum to config.learngene.aux.model.depth="
                     f"{a.model.depth}")
  rows, genes, k = [], {}, int(g.scratch.long_factor)

  def stage(name: str, method: str, depth: int, seed: int, init: str, steps: int, overrides: dict) -> None:
    s = exp.run(TrainStage(name, overrides))
    rows.append(summary_row(name, s, seed, method=method, depth=int(depth), train_steps=int(steps), init=init))

  # 1. teacher, 2. auxiliary nets by soft distillation
  t, teacher = g.teacher, g.teacher_path or exp.path("teacher")
  if not g.teacher_path:
    stage("teacher", "teacher", t.model.depth, 0, "random", t.steps, _train(
        t.model, t.steps, t.lr, t.warmup, **{"objective.label_smoothing": float(t.label_smoothing)}))
  for m in g.methods:
    param = ({"name": "linear_learngene", "coefficient": a.coefficient} if m == "tleg"
             else {"name": "stage_sharing", "stages": tuple(a.stages)})
    stage(f"{m}_aux", f"{m}_aux", a.model.depth, 0, "random", a.steps, _train(
        a.model, a.steps, a.lr, a.warmup, parameterization=param, **{
            "objective.weights": {"soft_distill": float(d.soft_distill), "cross_entropy": float(d.cross_entropy)},
            "objective.teacher": os.path.abspath(teacher), "objective.temperature": float(d.temperature),
            "objective.distill_normalize": d.normalize}))

  # 3. descendants from each learngene (and each expansion before fine-tuning), 4. scratch baselines of the
  # same architectures with the same and k times the budget
  for m in g.methods:
    transform, gene_key = METHODS[m]
    theta = checkpoint.load(exp.path(f"{m}_aux")).theta  # the learngene and the single copies beside it
    genes[m] = (trees.count(theta[gene_key]), trees.count({k: v for k, v in theta.items() if k != gene_key}))
    for depth in method_depths(g, m):
      if g.eval_expanded:
        name = f"{m}_d{depth}_expanded"
        out = exp.run(TransformStage(name, transform, [exp.path(f"{m}_aux")], _expand_args(g, m, depth, 0)))
        acc = evaluate.evaluate_checkpoint(exp.path(name), "test", data_cfg=exp.base.data)["accuracy"]
        rows.append(summary_row(name, {"test_accuracy": acc, "params": out["report"]["descendant_params"]},
                                method=f"{m}_expanded", depth=depth, train_steps=0, init="learngene"))
      for seed in g.seeds:
        stage(f"{m}_d{depth}_s{seed}", m, depth, seed, "learngene", f.steps, _train(
            _descendant(g, depth), f.steps, f.lr, f.warmup, seed, **{
                "init_from.path": exp.path(f"{m}_aux"), "init_from.transform": transform,
                "init_from.args": _expand_args(g, m, depth, seed)}))
  for depth in sorted({dd for m in g.methods for dd in method_depths(g, m)}):
    for seed in g.seeds:
      for arm, steps in (("scratch", f.steps), (f"scratch_{k}x", k * f.steps)):
        stage(f"{arm.replace('_', '')}_d{depth}_s{seed}", arm, depth, seed, "random", steps, _train(
            _descendant(g, depth), steps, g.scratch.lr, g.scratch.warmup * (steps // f.steps), seed))
  return report(exp, rows, genes, k)


def report(exp: Experiment, rows: list[dict], genes: dict, k: int) -> dict:
  """Accuracy per depth (mean ± sample std over seeds), the stored-parameter arithmetic, claims and the plot."""
  g, rep = exp.section, Report(exp, "Learngene on digits: TLEG / SWS descendants against scratch")
  rep.rows = rows
  table = aggregate(rows, by=("method", "depth"))
  base = rep.baseline("test")
  t, a, d, f = g.teacher, g.aux, g.distill, g.finetune
  rep.text(f"Data: {exp.base.data.name}, test split of {base['n']} images (majority class "
           f"{100 * base['accuracy']:.1f}%). Seeds {list(g.seeds)}. Teacher ViT width {t.model.width} depth "
           f"{t.model.depth} ({t.steps} steps). "
           f"Auxiliary nets width {a.model.width} depth {a.model.depth}, {a.steps} steps of soft distillation "
           f"(soft_distill={d.soft_distill}, cross_entropy={d.cross_entropy}, T={d.temperature}); SWS stages "
           f"{list(a.stages)}, split rule '{f.sws_rule}'. Descendants fine-tuned {f.steps} steps (lr {f.lr}, head "
           f"'{f.head}', final norm '{f.final_norm}'); scratch {f.steps} and {k}x{f.steps} steps (lr {g.scratch.lr}).")
  cols = [c for c in (*g.methods, *(f"{m}_expanded" for m in g.methods), "scratch", f"scratch_{k}x")
          if lookup(table, method=c)]
  depths = sorted({r["depth"] for r in table if r["method"] in cols})
  rep.table(("depth", *cols), [(dd, *(pm(lookup(table, method=c, depth=dd)) for c in cols)) for dd in depths],
            caption="Test accuracy (%) per depth; `*_expanded`: the expansion before any fine-tuning, one run")
  aux = [r for r in rows if r["method"] in AUX]
  rep.table(("model", "depth", "test accuracy (%)", "params", "steps"),
            [(r["name"], r["depth"], f"{100 * r['test_acc']:.1f}", f"{r['params']:,}", r["train_steps"]) for r in aux],
            caption="Teacher and auxiliary nets, one run each", seeds=False)
  lines = ["## Stored parameters (the papers' 19x / 20x arithmetic)", ""]
  summary = {"table": table, "methods": {}}
  pre = {r["method"]: rep.precondition(f"{r['name']} beats the majority-class baseline (test accuracy)",
                                       r["test_acc"], base["accuracy"]) for r in aux}
  for m in g.methods:
    ds, (gene, shared) = method_depths(g, m), genes[m]
    total = sum(next(r["params"] for r in rows if r["method"] == m and r["depth"] == dd) for dd in ds)
    summary["methods"][m] = {"depths": ds, "stored": {
        "learngene_params": gene, "shared_params": shared, "learngene_plus_shared": gene + shared,
        "sum_descendant_params": total, "ratio": total / (gene + shared), "ratio_gene_only": total / gene}}
    lines.append(f"- **{m}**: learngene {gene:,} + shared (embeddings, final norm, head) {shared:,} = "
                 f"{gene + shared:,} stored parameters initialise depths {ds} whose parameters sum to {total:,}: "
                 f"**{total / (gene + shared):.1f}x** fewer ({total / gene:.1f}x counting the learngene alone).")
    for arm, text in (("scratch", f"beat scratch at the equal fine-tuning budget ({f.steps} steps)"),
                      (f"scratch_{k}x", f"match or beat scratch trained {k}x longer (within one seed std)")):
      pairs = [(lookup(table, method=m, depth=dd), lookup(table, method=arm, depth=dd)) for dd in ds]
      diffs = [(x["mean"] - y["mean"], max(x["std"], y["std"])) for x, y in pairs if x and y]
      wins = sum(dm > (0 if arm == "scratch" else -tol) for dm, tol in diffs)
      rep.claim(f"{m} descendants {text}", wins > len(diffs) / 2 if diffs else None,
                f"{'higher' if arm == 'scratch' else 'within one std or higher'} at {wins}/{len(diffs)} depths "
                f"(holds at a majority), mean difference {100 * np.mean([x for x, _ in diffs]) if diffs else 0:+.1f} "
                "points", requires=[p for key, p in pre.items() if key in ("teacher", f"{m}_aux")])
  rep.lines += lines + ["", f"The learngene costs {a.steps} auxiliary steps at depth {a.model.depth} plus the "
                        f"teacher, against {k * f.steps} scratch steps per depth at {k}x budget. Caveats: digits is "
                        "tiny, the models small and every budget a few hundred steps, far from the papers' ImageNet "
                        "recipes (no Mixup/CutMix/RandAugment, no repeated augmentation).", ""]
  rep.extra["summary"] = summary
  rep.figure("accuracy_vs_depth.png", lambda ax: _plot(ax, table, aux))
  res = rep.write()
  return {"workdir": os.path.abspath(exp.workdir), "wall_s": res["wall_s"], "summary": summary,
          "verdicts": [c["verdict"] for c in res["claims"]]}


def _plot(ax, table: list[dict], aux: list[dict]) -> None:
  """Mean test accuracy against depth with sample-std error bars per method; teacher and aux nets as stars."""
  errorbars(ax, [r for r in table if r["method"] not in AUX], x="depth", series="method",
            dashed=lambda m: m.endswith("expanded"))
  for r in aux:
    ax.scatter([r["depth"]], [100 * r["test_acc"]], marker="*", s=90, label=r["name"], zorder=3)
  ax.set(xlabel="depth (layers)", ylabel="test accuracy (%)", title="Learngene descendants vs scratch (digits)")
  ax.legend(fontsize=7, ncol=2)
