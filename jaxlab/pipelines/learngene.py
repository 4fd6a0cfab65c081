"""The learngene experiment (TLEG and SWS): teacher -> auxiliary nets -> descendants vs scratch (config and keys:
`ml_collections_configs/learngene.py`). Stages: `teacher`; plain cross-entropy nets of the teacher and aux sizes at
their budgets (`plain_teacher`, `plain_aux_s<a>`); aux nets by distillation (`<m>_aux_s<a>`); aux seed 0 expanded
before fine-tuning (`<m>_d<L>_expanded`; `<m>_d<A>_same_norm`: to the aux depth with its own final norm, the aux net
itself); descendants `<m>_d<L>_s<i>` from aux seed `aux.seeds[i]`; `scratch[<k>x]_d<L>_s<i>` at 1x / kx budget."""

from __future__ import annotations

import itertools
import os

import ml_collections

from jaxlab import checkpoint, pipelines, trees
from jaxlab import experiments as ex
from jaxlab.losses import diagnostics

METHODS = {"tleg": ("expand_learngene", "learngene"), "sws": ("expand_stages", "stages")}  # transform, gene key
LISTS = {"methods": str, "depths": int, "seeds": int, "aux.stages": int, "aux.seeds": int}


def method_depths(g, method: str) -> list[int]:
  """Descendant depths a method can build: all for tleg, >= the number of stages for sws."""
  return [d for d in sorted(set(g.depths)) if method == "tleg" or d >= len(g.aux.stages)]


def _expand_args(f, method: str, depth: int, seed: int, **more) -> dict:
  return {"depth": int(depth), "head": f.head, "final_norm": f.final_norm, "seed": int(seed), "ln_eps": float(f.ln_eps),
          **({"rule": f.sws_rule} if method == "sws" else {}), **more}


@pipelines.register("learngene")
def run(config, workdir: str) -> dict:
  """Runs the learngene experiment of `config.learngene`; returns `{'workdir', 'wall_s', 'summary', 'verdicts'}`.

  Raises:
    ValueError: unknown methods, no depths or seeds, or SWS stages that do not sum to the aux depth.
  """
  exp = ex.Experiment(config, workdir, "learngene", lists=LISTS)
  g, a, d, f = exp.section, exp.section.aux, exp.section.distill, exp.section.finetune
  if not g.methods or set(g.methods) - set(METHODS) or not g.depths or min(g.depths) < 1 or not g.seeds or not a.seeds:
    raise ValueError(f"config.learngene: methods {list(g.methods)} must be among {list(METHODS)}; depths (>= 1), "
                     "seeds and aux.seeds must not be empty")
  if "sws" in g.methods and sum(a.stages) != a.model.depth:
    raise ValueError(f"config.learngene.aux.stages={list(a.stages)} must sum to aux.model.depth={a.model.depth}")
  rows, genes, diag, k, t = [], {}, {}, int(g.scratch.long_factor), g.teacher
  teacher, tm, am = g.teacher_path or exp.path("teacher"), t.model.to_dict(), a.model.to_dict()

  def stage(name, method, depth, seed, steps, model, lr, warmup, **more) -> None:
    over = {"model": {**model, "depth": int(depth)}, "total_steps": int(steps), "optimizer.lr": float(lr),
            "optimizer.warmup_steps": int(warmup), "seed": int(seed), **more}
    rows.append(ex.summary_row(name, exp.run(ex.TrainStage(name, over)), seed, method=method, depth=int(depth),
                               train_steps=int(steps)))

  def expanded(name: str, m: str, kind: str, depth: int, args: dict) -> None:
    out = exp.run(ex.TransformStage(name, METHODS[m][0], [exp.path(f"{m}_aux_s{a.seeds[0]}")], args))["report"]
    rows.append(ex.summary_row(name, {"test_accuracy": exp.accuracy(name), "params": out["descendant_params"]},
                               a.seeds[0], method=f"{m}_{kind}", depth=depth, train_steps=0))

  # 1. teacher, plain CE nets of the teacher and aux sizes at their budgets; 2. aux nets by soft distillation
  if g.teacher_path:  # evaluated, not trained
    rows.append(ex.summary_row("teacher", {"test_accuracy": exp.accuracy(teacher)}, method="teacher", depth=tm["depth"],
                               train_steps=0))
  else:
    stage("teacher", "teacher", tm["depth"], 0, t.steps, tm, t.lr, t.warmup,
          **{"objective.label_smoothing": float(t.label_smoothing)})
  stage("plain_teacher", "plain_teacher", tm["depth"], 0, t.steps, {**tm, **g.plain}, t.lr, t.warmup)
  kd = {"objective.weights": {"soft_distill": float(d.soft_distill), "cross_entropy": float(d.cross_entropy)},
        "objective.teacher": os.path.abspath(teacher), "objective.temperature": float(d.temperature),
        "objective.distill_normalize": d.normalize}
  for s in a.seeds:
    stage(f"plain_aux_s{s}", "plain_aux", am["depth"], s, a.steps, {**am, **g.plain}, a.lr, a.warmup)
    for m in g.methods:
      param = ({"name": "linear_learngene", "coefficient": a.coefficient} if m == "tleg"
               else {"name": "stage_sharing", "stages": tuple(a.stages)})
      stage(f"{m}_aux_s{s}", f"{m}_aux", am["depth"], s, a.steps, am, a.lr, a.warmup, parameterization=param, **kd)

  # 3. per method: learngene size, KD gradient vs CE's, expansions, descendants; 4. scratch at 1x and kx the budget
  desc = {**am, "final_norm": f.final_norm, "ln_eps": float(f.ln_eps)}
  for m in g.methods:
    aux0, (transform, gene_key) = exp.path(f"{m}_aux_s{a.seeds[0]}"), METHODS[m]
    theta = checkpoint.load(aux0).theta  # the learngene and the single copies beside it
    genes[m] = (trees.count(theta[gene_key]), trees.count({k: v for k, v in theta.items() if k != gene_key}))
    obj = ml_collections.ConfigDict(checkpoint.load_meta(aux0)["config"]["objective"])
    obj.weights = {"soft_distill": float(d.soft_distill), "cross_entropy": 1.0}
    diag[m] = diagnostics.checkpoint_gradient_ratios(aux0, obj, teacher)["soft_distill"]
    expanded(f"{m}_d{am['depth']}_same_norm", m, "same_norm", am["depth"],
             _expand_args(f, m, am["depth"], 0, final_norm=am["final_norm"], ln_eps=0.0))
    for depth in method_depths(g, m):
      if g.eval_expanded:
        expanded(f"{m}_d{depth}_expanded", m, "expanded", depth, _expand_args(f, m, depth, 0))
      for i, seed in enumerate(g.seeds):
        stage(f"{m}_d{depth}_s{seed}", m, depth, seed, f.steps, desc, f.lr, f.warmup, **{
            "init_from.path": exp.path(f"{m}_aux_s{a.seeds[i % len(a.seeds)]}"), "init_from.transform": transform,
            "init_from.args": _expand_args(f, m, depth, seed)})
  for depth, seed in itertools.product(sorted({dd for m in g.methods for dd in method_depths(g, m)}), g.seeds):
    for arm, steps in (("scratch", f.steps), (f"scratch_{k}x", k * f.steps)):
      stage(f"{arm.replace('_', '')}_d{depth}_s{seed}", arm, depth, seed, steps, desc, g.scratch.lr,
            g.scratch.warmup * (steps // f.steps))
  return report(exp, rows, genes, diag, k)


def report(exp: ex.Experiment, rows: list[dict], genes: dict, diag: dict, k: int) -> dict:
  """Accuracy per depth with the majority class, the teacher/aux table, preconditions, claims, the plot."""
  g, a, d, f = exp.section, exp.section.aux, exp.section.distill, exp.section.finetune
  rep, table = ex.Report(exp, "Learngene on digits: TLEG / SWS descendants against scratch"), ex.aggregate(rows, (
      "method", "depth"))
  rep.rows, base, one = rows, rep.baseline("test"), lambda name: ex.lookup(table, method=name)
  maj, tol, margin = f"{100 * base['accuracy']:.1f}", float(g.tolerance), float(g.learned_margin)
  rep.text(f"Data: {exp.base.data.name}, {base['n']} test images (majority class {maj}%). Seeds {list(g.seeds)}; "
           f"descendant seed i starts from aux seed {list(a.seeds)}[i]. Aux nets: {a.steps} steps of soft distillation "
           f"(soft_distill={d.soft_distill}, cross_entropy={d.cross_entropy}, T={d.temperature}); plain nets: the same "
           f"sizes and budgets with cross entropy. Descendants: {f.steps} steps; scratch: {f.steps} and {k}x{f.steps} "
           f"steps. Init '{a.model.init_scheme}'.")
  cols = [c for c in (*g.methods, *(f"{m}_expanded" for m in g.methods), "scratch", f"scratch_{k}x") if one(c)]
  depths = sorted({r["depth"] for r in table if r["method"] in cols})
  rep.table(("depth", *cols, "majority class"), [(dd, *(ex.pm(ex.lookup(table, method=c, depth=dd)) for c in cols),
                                                  maj) for dd in depths],
            caption="Test accuracy (%) per depth; `*_expanded`: aux seed 0 expanded, before any fine-tuning")
  nets = [n for n in ("teacher", "plain_teacher", "plain_aux", *(f"{m}_aux" for m in g.methods)) if one(n)]
  grad = {f"{m}_aux": f"{x['ratio']:.3g} ({x['cosine']:.2f})" for m, x in diag.items()}
  rep.table(("model", "depth", "steps", "test accuracy (%)", "seeds", "KD / CE grad-norm ratio (cosine)"), [
      (n, one(n)["depth"], next(r["train_steps"] for r in rows if r["method"] == n), ex.pm(one(n)), one(n)["n"],
       grad.get(n, "-")) for n in nets] + [("majority class", "-", "-", maj, "-", "-")], caption="Teacher, plain and "
            "aux nets; last column: soft distillation's gradient against cross entropy's at weight 1 (seed 0's "
            "trained aux net, 64 training images)")
  pre = [rep.learned("teacher", one("teacher"), margin=margin),
         rep.matches("teacher against the plain net of its size and budget", one("teacher"), one("plain_teacher"), tol),
         rep.matches("teacher against the plain aux-size net at the aux budget", one("teacher"), one("plain_aux"))]
  long = rep.learned(f"scratch at {k}x budget (best depth)", [r for r in table if r["method"] == f"scratch_{k}x"],
                     margin=margin)
  summary, acc = {"table": table, "methods": {}}, {r["method"]: r["test_acc"] for r in rows if r["seed"] == a.seeds[0]}
  rep.lines += ["## Stored parameters (the papers' 19x / 20x arithmetic)", ""]
  for m in g.methods:
    ds, (gene, shared), aux = method_depths(g, m), genes[m], one(f"{m}_aux")
    req = pre + [rep.learned(f"{m} aux net (mean of {aux['n']} seeds)", aux, margin=margin),
                 rep.matches(f"{m} aux net against the plain aux-size net at its budget", aux, one("plain_aux"), tol),
                 rep.precondition(f"{m} expanded to the aux depth with the aux's final norm is the aux net (|test "
                                  "accuracy difference|, aux seed 0)", abs(acc[f"{m}_same_norm"] - acc[f"{m}_aux"]),
                                  0.0, at_most=True)]
    total = sum({r["depth"]: r["params"] for r in rows if r["method"] == m}[dd] for dd in ds)
    summary["methods"][m] = {"depths": ds, "distill_gradient": diag[m], "stored": dict(
        learngene_params=gene, shared_params=shared, learngene_plus_shared=gene + shared, sum_descendant_params=total,
        ratio=total / (gene + shared), ratio_gene_only=total / gene)}
    rep.lines.append(f"- **{m}**: learngene {gene:,} + shared (embeddings, final norm, head) {shared:,} stored "
                     f"parameters initialise depths {ds} whose parameters sum to {total:,}: "
                     f"**{total / (gene + shared):.1f}x** fewer ({total / gene:.1f}x counting the learngene alone).")
    for arm, text in (("scratch", f"beat scratch at the equal fine-tuning budget ({f.steps} steps)"),
                      (f"scratch_{k}x", f"match or beat scratch trained {k}x longer (within one seed std)")):
      c = ex.compare([r for r in table if r["depth"] in ds], m, arm, "depth", within_std=arm != "scratch")
      rep.claim(f"{m} descendants {text}", c["holds"], c["text"], requires=req + ([long] if arm != "scratch" else []))
  rep.text("", f"The learngene costs {a.steps} aux steps plus the teacher (scratch: {k * f.steps} per depth at {k}x).")
  rep.extra["summary"] = summary
  rep.figure("accuracy_vs_depth.png", lambda ax: _plot(ax, table, base["accuracy"]))
  res = rep.write()
  return {"workdir": os.path.abspath(exp.workdir), "wall_s": res["wall_s"], "summary": summary,
          "verdicts": [c["verdict"] for c in res["claims"]]}


def _plot(ax, table: list[dict], majority: float) -> None:
  """Mean test accuracy against depth (sample-std bars) per method; teacher, plain and aux nets as single points."""
  ex.errorbars(ax, [r for r in table if "same_norm" not in r["method"]], x="depth", series="method",
               dashed=lambda m: m.endswith("expanded"), baselines={"majority class": majority})
  ax.set(xlabel="depth (layers)", ylabel="test accuracy (%)", title="Learngene descendants vs scratch (digits)")
  ax.legend(fontsize=7, ncol=2)
