"""The learngene experiment (TLEG and SWS) as one pipeline: teacher -> auxiliary nets -> descendants vs scratch.

Stages (each a sub-workdir of `workdir`, skipped when already done):

  teacher                     a larger ViT trained on the data with cross entropy
  <method>_aux                the auxiliary net (`linear_learngene` for tleg, `stage_sharing` for sws),
                              trained by soft distillation from the teacher (pure KD by default)
  <method>_d<L>_s<seed>       descendant of depth L: `init_from` the aux checkpoint through
                              `expand_learngene` / `expand_stages`, then fine-tuned `finetune.steps`
  scratch_d<L>_s<seed>        the same architecture from random init, same budget
  scratch<k>x_d<L>_s<seed>    the same from random init, k times the budget

It writes `results.json` (one row per model), `results.md` and `accuracy_vs_depth.png`
into `workdir`. Config keys live under `config.learngene` (see `default_config`).
"""

from __future__ import annotations

import json
import os
import sys
import time

import ml_collections
import numpy as np

from jaxlab import configs, pipelines, trees

METHODS = ("tleg", "sws")
_TRANSFORM = {"tleg": "expand_learngene", "sws": "expand_stages"}


def default_config(methods: tuple[str, ...] = ("tleg",), smoke: bool = False) -> ml_collections.ConfigDict:
  """The full (or smoke) learngene experiment on the built-in digits.

  Args:
    methods: which learngene methods to run ('tleg', 'sws' or both).
    smoke: tiny sizes that finish in well under a minute.

  Returns:
    A `configs.base()` config with `job='pipeline'`, `pipeline='learngene'` and a `learngene` section.
  """
  c = configs.base()
  c.job = "pipeline"
  c.pipeline = "learngene"
  c.progress = False
  c.log_every = 50
  c.data.batch_size = 64
  c.data.aug_shift = 1
  c.objective.label_smoothing = 0.0
  c.optimizer.grad_clip = 1.0

  g = ml_collections.ConfigDict()
  g.methods = tuple(methods)           # 'tleg' and/or 'sws'
  g.depths = (2, 3, 4, 6, 8)           # descendant depths (sws: only depths >= its number of stages)
  g.seeds = (0, 1, 2)                  # descendant / scratch seeds
  g.teacher_path = ""                  # an existing teacher checkpoint; '' trains one (stage 'teacher')
  g.teacher = ml_collections.ConfigDict(dict(
      model=dict(name="vit", patch_size=2, width=64, depth=4, num_heads=4, mlp_dim=128, pool="gap",
                 final_norm="tokens", drop_path=0.1, ln_eps=1e-6),
      steps=1200, lr=2e-3, warmup=60))
  # The auxiliary net: the descendants' width, depth = the largest descendant (TLEG: 12 for 3..12).
  g.aux = ml_collections.ConfigDict(dict(
      model=dict(name="vit", patch_size=2, width=32, depth=8, num_heads=2, mlp_dim=64, pool="gap",
                 final_norm="tokens", drop_path=0.0, ln_eps=1e-5),
      steps=800, lr=2e-3, warmup=40,
      coefficient="l/L",               # tleg: 'l/L' (official) or 'l/(L-1)'
      stages=(3, 2, 3)))               # sws: layers per stage of the aux net (sum = aux depth)
  g.distill = ml_collections.ConfigDict(dict(
      soft_distill=1.0, cross_entropy=0.0,   # pure soft distillation (alpha = 1) as the official runs
      temperature=1.0, normalize="batch"))   # 'numel' = DeiT legacy B*K normalisation
  g.finetune = ml_collections.ConfigDict(dict(
      steps=80, lr=1e-3, warmup=0,
      head="transfer",                 # 'transfer' | 'reinit'
      final_norm="pooled",             # descendants: timm fc_norm after pooling (official) | 'tokens'
      ln_eps=1e-6,                     # descendant LN eps (official 1e-6); 0 keeps the aux's
      sws_rule="even"))                # sws depth split: 'even' | 'proportional'
  g.scratch = ml_collections.ConfigDict(dict(lr=2e-3, warmup=8, long_factor=4))  # warmup scales with budget
  g.eval_expanded = True               # also test each expansion before fine-tuning (steps = 0)
  c.learngene = g

  if smoke:
    g.depths = (2,)
    g.seeds = (0,)
    g.teacher.model.update(width=16, depth=1, num_heads=2, mlp_dim=32)
    g.teacher.steps, g.teacher.warmup = 8, 0
    g.aux.model.update(width=16, depth=4, num_heads=2, mlp_dim=32)
    g.aux.steps, g.aux.warmup = 8, 0
    g.aux.stages = (2, 2)
    g.finetune.steps = 4
    g.scratch.warmup = 0
    g.scratch.long_factor = 2
    g.eval_expanded = True
    c.log_every = 4
  return c


def _check(g) -> None:
  g.methods = pipelines.as_tuple(g.methods, str)
  g.depths = pipelines.as_tuple(g.depths, int)
  g.seeds = pipelines.as_tuple(g.seeds, int)
  g.aux.stages = pipelines.as_tuple(g.aux.stages, int)
  unknown = [m for m in g.methods if m not in METHODS]
  if unknown or not g.methods:
    raise ValueError(f"config.learngene.methods={list(g.methods)}: choose from {list(METHODS)}")
  if not g.depths or min(int(d) for d in g.depths) < 1:
    raise ValueError(f"config.learngene.depths={list(g.depths)}: give depths >= 1")
  if "sws" in g.methods and sum(g.aux.stages) != g.aux.model.depth:
    raise ValueError(f"config.learngene.aux.stages={list(g.aux.stages)} must sum to "
                     f"config.learngene.aux.model.depth={g.aux.model.depth}")


def _train_cfg(c, model: dict, steps: int, lr: float, warmup: int, seed: int) -> ml_collections.ConfigDict:
  t = configs.base()
  t.data = c.data
  t.optimizer = ml_collections.ConfigDict(c.optimizer.to_dict())
  t.optimizer.lr, t.optimizer.warmup_steps = float(lr), int(warmup)
  t.model = ml_collections.ConfigDict(dict(model))
  t.total_steps, t.total_epochs = int(steps), 0.0
  t.seed = int(seed)
  t.progress = bool(c.get("progress", False))
  t.log_every = int(c.log_every)
  t.keep_checkpoints = 1
  return t


def method_depths(g, method: str) -> list[int]:
  """Descendant depths a method can build: all for tleg, >= the number of stages for sws."""
  depths = sorted({int(d) for d in g.depths})
  if method == "sws":
    return [d for d in depths if d >= len(g.aux.stages)]
  return depths


def _transform_args(g, method: str, depth: int, seed: int) -> dict:
  f = g.finetune
  args = {"depth": int(depth), "head": f.head, "final_norm": f.final_norm, "ln_eps": float(f.ln_eps),
          "seed": int(seed)}
  if method == "sws":
    args["rule"] = f.sws_rule
  return args


def _descendant_model(g, depth: int) -> dict:
  m = dict(g.aux.model.to_dict())
  m.update(depth=int(depth), final_norm=g.finetune.final_norm)
  if float(g.finetune.ln_eps) > 0:
    m["ln_eps"] = float(g.finetune.ln_eps)
  return m


@pipelines.register("learngene")
def run(config, workdir: str) -> dict:
  """Runs the learngene experiment and writes results.json, results.md and accuracy_vs_depth.png.

  Args:
    config: `default_config(...)` with overrides.
    workdir: where every stage's sub-workdir and the results go.

  Returns:
    `{'workdir', 'results', 'summary'}`.

  Raises:
    ValueError: for a bad `config.learngene` section.
  """
  from jaxlab import checkpoint, data, transforms

  t0 = time.time()
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy: normalise comma-separated lists
  g = config.learngene
  _check(g)
  os.makedirs(workdir, exist_ok=True)
  rows: list[dict] = []

  def row(name, method, depth, seed, summary, steps, init):
    rows.append({"name": name, "method": method, "depth": int(depth), "seed": int(seed),
                 "test_acc": summary.get("test_accuracy"), "val_acc": summary.get("validation_accuracy"),
                 "train_steps": int(steps), "params": int(summary.get("params", 0)), "init": init,
                 "wall_s": float(summary.get("wall_s", 0.0))})

  # 1. Teacher.
  teacher_path = g.teacher_path
  if not teacher_path:
    tc = _train_cfg(config, g.teacher.model.to_dict(), g.teacher.steps, g.teacher.lr, g.teacher.warmup, 0)
    tc.objective.label_smoothing = 0.1
    s = pipelines.stage(workdir, "teacher", tc)
    row("teacher", "teacher", g.teacher.model.depth, 0, s, g.teacher.steps, "random")
    teacher_path = os.path.join(workdir, "teacher")

  # 2. Auxiliary nets by soft distillation.
  aux_info = {}
  for method in g.methods:
    ac = _train_cfg(config, g.aux.model.to_dict(), g.aux.steps, g.aux.lr, g.aux.warmup, 0)
    if method == "tleg":
      ac.parameterization = ml_collections.ConfigDict({"name": "linear_learngene",
                                                        "coefficient": g.aux.coefficient})
    else:
      ac.parameterization = ml_collections.ConfigDict({"name": "stage_sharing", "stages": tuple(g.aux.stages)})
    ac.objective.weights = ml_collections.ConfigDict({k: float(g.distill[k])
                                                      for k in ("soft_distill", "cross_entropy")})
    ac.objective.teacher = os.path.abspath(teacher_path)
    ac.objective.temperature = float(g.distill.temperature)
    ac.objective.distill_normalize = g.distill.normalize
    s = pipelines.stage(workdir, f"{method}_aux", ac)
    row(f"{method}_aux", f"{method}_aux", g.aux.model.depth, 0, s, g.aux.steps, "random")
    aux_info[method] = {"path": os.path.join(workdir, f"{method}_aux"), "trainable": int(s.get("trainable", 0)),
                        "params": int(s.get("params", 0))}

  all_depths = sorted({d for m in g.methods for d in method_depths(g, m)})
  expansions: dict = {}
  # 3. Descendants from the learngene.
  for method in g.methods:
    loaded = checkpoint.load(aux_info[method]["path"])
    gene_key = "learngene" if method == "tleg" else "stages"
    aux_info[method]["gene_params"] = trees.count(loaded.theta[gene_key])
    aux_info[method]["shared_params"] = trees.count({k: v for k, v in loaded.theta.items() if k != gene_key})
    ds = None
    for depth in method_depths(g, method):
      if g.get("eval_expanded", False):
        from jaxlab import build, train
        out = transforms.apply(_TRANSFORM[method], [loaded], _transform_args(g, method, depth, 0))
        expansions[(method, depth)] = out.report
        ds = ds or data.get_dataset(config.data)
        module = build.model(out.meta["model"], ds.num_classes)
        m = train.evaluate(module, out.theta, out.model_state, ds, "test", 256)
        rows.append({"name": f"{method}_d{depth}_expanded", "method": f"{method}_expanded", "depth": depth,
                     "seed": 0, "test_acc": m["accuracy"], "val_acc": None, "train_steps": 0,
                     "params": out.report["descendant_params"], "init": "learngene", "wall_s": 0.0})
      for seed in g.seeds:
        dc = _train_cfg(config, _descendant_model(g, depth), g.finetune.steps, g.finetune.lr,
                        g.finetune.warmup, seed)
        dc.init_from.path = os.path.abspath(aux_info[method]["path"])
        dc.init_from.transform = _TRANSFORM[method]
        dc.init_from.args = ml_collections.ConfigDict(_transform_args(g, method, depth, seed))
        s = pipelines.stage(workdir, f"{method}_d{depth}_s{seed}", dc)
        row(f"{method}_d{depth}_s{seed}", method, depth, seed, s, g.finetune.steps, "learngene")

  # 4. Scratch baselines: the same architectures, same and k-times budget.
  k = int(g.scratch.long_factor)
  for depth in all_depths:
    for seed in g.seeds:
      for name, steps in (("scratch", g.finetune.steps), (f"scratch_{k}x", k * g.finetune.steps)):
        sc = _train_cfg(config, _descendant_model(g, depth), steps, g.scratch.lr,
                        g.scratch.warmup * (steps // g.finetune.steps), seed)
        s = pipelines.stage(workdir, f"{name.replace('_', '')}_d{depth}_s{seed}", sc)
        row(f"{name}_d{depth}_s{seed}", name, depth, seed, s, steps, "random")

  summary = summarize(rows, g, aux_info, k)
  results = {"rows": rows, "summary": summary, "aux": aux_info,
             "expansions": {f"{m}_d{d}": r for (m, d), r in expansions.items()},
             "config": json.loads(config.to_json_best_effort()), "wall_s": time.time() - t0}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(results, workdir))
  plot(rows, os.path.join(workdir, "accuracy_vs_depth.png"))
  return {"workdir": os.path.abspath(workdir), "results": os.path.join(workdir, "results.json"),
          "summary": summary}


def summarize(rows: list[dict], g, aux_info: dict, k: int) -> dict:
  """Mean/std per (method, depth), learngene-vs-scratch comparisons and the stored-parameter arithmetic."""
  stats: dict = {}
  for r in rows:
    if r["test_acc"] is None:
      continue
    stats.setdefault(r["method"], {}).setdefault(r["depth"], []).append(r["test_acc"])
  table = {m: {d: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for d, v in sorted(dv.items())}
           for m, dv in stats.items()}
  out = {"table": table, "methods": {}}
  for method in g.methods:
    depths = method_depths(g, method)
    cmp = {}
    for base in ("scratch", f"scratch_{k}x"):
      diffs = [table[method][d]["mean"] - table[base][d]["mean"] for d in depths
               if d in table.get(method, {}) and d in table.get(base, {})]
      tol = [max(table[method][d]["std"], table[base][d]["std"]) for d in depths
             if d in table.get(method, {}) and d in table.get(base, {})]
      cmp[base] = {"mean_diff": float(np.mean(diffs)) if diffs else None,
                   "wins": int(sum(x > 0 for x in diffs)),
                   "within_or_better": int(sum(x > -t for x, t in zip(diffs, tol, strict=True))),
                   "depths": len(diffs)}
    desc = sum(next((r["params"] for r in rows if r["method"] == method and r["depth"] == d), 0) for d in depths)
    info = aux_info[method]
    stored = info["gene_params"] + info["shared_params"]
    out["methods"][method] = {
        "vs": cmp, "depths": depths,
        "stored": {"learngene_params": info["gene_params"], "shared_params": info["shared_params"],
                   "learngene_plus_shared": stored, "sum_descendant_params": int(desc),
                   "ratio": float(desc / stored) if stored else None,
                   "ratio_gene_only": float(desc / info["gene_params"]) if info["gene_params"] else None},
        "aux_steps": int(g.aux.steps),
        "finetune_steps_total": int(g.finetune.steps * len(depths)),
        "scratch_long_steps_total": int(k * g.finetune.steps * len(depths)),
    }
  return out


def _fmt(cell: dict | None) -> str:
  if not cell:
    return "-"
  return f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"


def markdown(results: dict, workdir: str) -> str:
  """results.md: command, machine, table of mean ± std test accuracy per depth, arithmetic, claims."""
  g = results["config"]["learngene"]
  summ = results["summary"]
  table = summ["table"]
  k = g["scratch"]["long_factor"]
  cols = [m for m in (*g["methods"], *(f"{m}_expanded" for m in g["methods"]), "scratch", f"scratch_{k}x")
          if m in table]
  depths = sorted({d for m in cols for d in table[m]}, key=int)
  overrides = ""
  ofile = os.path.join(workdir, "overrides.txt")
  if os.path.exists(ofile):
    overrides = " ".join(line.strip() for line in open(ofile) if line.strip())
  if sys.argv and sys.argv[0].replace(os.sep, "/").endswith("jaxlab/main.py"):
    cmd = "python -m jaxlab.main " + " ".join(sys.argv[1:])
  else:
    cmd = "jaxlab.main.run(config, workdir)"
  lines = [
      "# Learngene on digits: TLEG / SWS descendants against scratch", "",
      f"Command: `{cmd}`" + (f" (overrides: `{overrides}`)" if overrides and overrides not in cmd else ""), "",
      f"Seeds {list(g['seeds'])}; machine: 2-core CPU shared with other jobs; total wall time "
      f"{results['wall_s'] / 60:.1f} min. Data: scikit-learn digits (1077 train / 360 test images, 8x8).", "",
      f"Teacher ViT width {g['teacher']['model']['width']} depth {g['teacher']['model']['depth']} "
      f"({g['teacher']['steps']} steps). Auxiliary nets width {g['aux']['model']['width']} depth "
      f"{g['aux']['model']['depth']}, {g['aux']['steps']} steps of soft distillation "
      f"(weights soft_distill={g['distill']['soft_distill']}, cross_entropy={g['distill']['cross_entropy']}, "
      f"T={g['distill']['temperature']}); SWS stages {list(g['aux']['stages'])}, split rule "
      f"'{g['finetune']['sws_rule']}'. Descendants fine-tuned {g['finetune']['steps']} steps (lr "
      f"{g['finetune']['lr']}, head '{g['finetune']['head']}', final norm '{g['finetune']['final_norm']}'); "
      f"scratch {g['finetune']['steps']} and {k}x{g['finetune']['steps']} steps (lr {g['scratch']['lr']}).", "",
      "Test accuracy (%), mean ± std over seeds (`*_expanded`: the expansion before any fine-tuning, one run):",
      "", "| depth | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for d in depths:
    lines.append(f"| {d} | " + " | ".join(_fmt(table[m].get(d, table[m].get(str(d)))) for m in cols) + " |")
  aux_rows = [r for r in results["rows"] if r["method"] in ("teacher", "tleg_aux", "sws_aux")]
  lines += ["", "| model | depth | test accuracy (%) | params | steps |", "|---|---|---|---|---|"]
  for r in aux_rows:
    lines.append(f"| {r['name']} | {r['depth']} | {100 * r['test_acc']:.1f} | {r['params']:,} | {r['train_steps']} |")
  lines += ["", "## Stored parameters (the papers' 19x / 20x arithmetic)", ""]
  for m, s in summ["methods"].items():
    st = s["stored"]
    lines.append(f"- **{m}**: learngene {st['learngene_params']:,} + shared (embeddings, final norm, head) "
                 f"{st['shared_params']:,} = {st['learngene_plus_shared']:,} stored parameters initialise "
                 f"depths {s['depths']} whose parameters sum to {st['sum_descendant_params']:,}: "
                 f"**{st['ratio']:.1f}x** fewer ({st['ratio_gene_only']:.1f}x counting the learngene alone).")
  lines += ["", "## What the numbers say", ""]
  for m, s in summ["methods"].items():
    a, b = s["vs"]["scratch"], s["vs"][f"scratch_{k}x"]
    if a["mean_diff"] is None:
      continue
    lines.append(f"- **{m} vs scratch, equal fine-tuning budget** ({g['finetune']['steps']} steps): higher mean "
                 f"at {a['wins']}/{a['depths']} depths, mean difference {100 * a['mean_diff']:+.1f} points. "
                 + ("Supports" if a["wins"] > a["depths"] / 2 else "Does not support")
                 + " the claim that learngene descendants beat scratch at equal budget.")
    lines.append(f"- **{m} vs scratch with {k}x the budget**: within one std or better at "
                 f"{b['within_or_better']}/{b['depths']} depths (higher mean at {b['wins']}), mean difference "
                 f"{100 * b['mean_diff']:+.1f} points. "
                 + ("Supports" if b["within_or_better"] > b["depths"] / 2 else "Does not support")
                 + f" the claim that they match scratch trained several times longer. The learngene itself cost "
                 f"{s['aux_steps']} auxiliary steps at depth {g['aux']['model']['depth']} plus the teacher, "
                 f"against {s['scratch_long_steps_total']} scratch steps for all {len(s['depths'])} depths at "
                 f"{k}x budget.")
  teacher = next((r for r in results["rows"] if r["method"] == "teacher"), None)
  for r in aux_rows:
    if teacher and r["method"] != "teacher":
      lines.append(f"- The {r['name']} reached {100 * r['test_acc']:.1f}% test accuracy by distillation, against "
                   f"the teacher's {100 * teacher['test_acc']:.1f}%"
                   + (": it is under-trained at this budget, which limits what its descendants inherit."
                      if r["test_acc"] < teacher["test_acc"] - 0.1 else "."))
  lines += ["", "Caveats: digits is tiny; the models are small and every budget is a few hundred steps, far from "
            "convergence and from the papers' ImageNet recipes (no Mixup/CutMix/RandAugment, no repeated "
            "augmentation). Numbers are from one run of the pipeline; see results.json for every row.", ""]
  return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
  """Mean test accuracy against depth with a ±std band per method."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  groups: dict = {}
  for r in rows:
    if r["test_acc"] is None or r["method"] in ("teacher", "tleg_aux", "sws_aux"):
      continue
    groups.setdefault(r["method"], {}).setdefault(r["depth"], []).append(r["test_acc"])
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for method, dv in sorted(groups.items()):
    d = sorted(dv)
    mean = np.array([np.mean(dv[x]) for x in d]) * 100
    std = np.array([np.std(dv[x]) for x in d]) * 100
    style = "--" if method.endswith("expanded") else "-"
    ax.errorbar(d, mean, yerr=std, label=method, marker="o", linestyle=style, capsize=3)
  for r in rows:
    if r["method"] in ("teacher", "tleg_aux", "sws_aux") and r["test_acc"] is not None:
      ax.scatter([r["depth"]], [100 * r["test_acc"]], marker="*", s=90, label=r["name"], zorder=3)
  ax.set_xlabel("depth (layers)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("Learngene descendants vs scratch (digits)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
