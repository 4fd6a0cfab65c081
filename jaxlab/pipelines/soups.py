"""The model-soups experiment: pre-train, fine-tune a sweep, cook uniform/greedy/learned soups, compare.

Stages (sub-workdirs of `workdir`, declared over the config's top-level keys; `ml_collections_configs/soups.py`):
  pretrain/            one ViT trained from scratch (the shared init)
  ft_XX/               `soups.num_ingredients` fine-tunes from it with random hyper-parameters (lr, weight decay,
                       label smoothing, augmentation, seed), plus one at `soups.high_lr` when set
  uniform_soup/        uniform soup of every fine-tune (transform)
  uniform_soup_good/   uniform soup of the fine-tunes within `soups.good_margin` of the best held-out accuracy
  greedy_soup/         greedy soup (paper Recipe 1) on the `heldout` split (transform)
  learned_soup_train/  mixing logits trained on `heldout` by the one training loop (parameterization `soup_mixture`)
  learned_soup/        the learned soup materialized to a plain checkpoint (transform)
and, in memory, the logit ensemble of every fine-tune and the WiSE-FT interpolation pretrained -> best fine-tune.
Writes results.json (one row per model or soup), results.md and soups.png.
"""

from __future__ import annotations

import math
import os

import numpy as np

from jaxlab import checkpoint, data, pipelines
from jaxlab.experiments import Experiment, Report, TrainStage, TransformStage, dotted
from jaxlab.transforms import soups

SPLITS = ("heldout", "test", "test_shift")


def sweep(cfg, seed: int) -> list[dict]:
  """The random hyper-parameter sweep: one dict per fine-tune (name, lr, wd, ls, aug_shift, aug_noise, seed)."""
  rng = np.random.default_rng(seed)
  out = []
  lo, hi = (math.log(float(v)) for v in cfg.lr_range)
  for i in range(int(cfg.num_ingredients)):
    out.append({"name": f"ft_{i:02d}", "lr": float(math.exp(rng.uniform(lo, hi))),
                "weight_decay": float(rng.uniform(*cfg.wd_range)),
                "label_smoothing": float(rng.uniform(0.0, cfg.label_smoothing_max)) if rng.random() < 0.5 else 0.0,
                "aug_shift": int(rng.choice(cfg.aug_shift_choices)),
                "aug_noise": float(rng.uniform(0.0, cfg.aug_noise_max)) if rng.random() < 0.5 else 0.0,
                "seed": int(1000 + i)})
  if float(cfg.high_lr) > 0:
    out.append({"name": f"ft_{len(out):02d}_high_lr", "lr": float(cfg.high_lr), "weight_decay": 0.05,
                "label_smoothing": 0.0, "aug_shift": 0, "aug_noise": 0.0, "seed": 1000 + len(out)})
  return out


@pipelines.register("soups")
def run(config, workdir: str) -> dict:
  """Runs the model-soups experiment of `config.soups` (module docstring); returns a short summary.

  Raises:
    ValueError: a bad `config.soups` entry (e.g. fewer than two ingredients).
  """
  exp = Experiment(config, workdir, "soups")
  sc, seed = exp.section, int(exp.base.seed)
  if int(sc.num_ingredients) + (float(sc.high_lr) > 0) < 2:
    raise ValueError("config.soups.num_ingredients: a soup needs at least two ingredients")
  ds, evaluators, rows = data.get_dataset(exp.base.data), {}, []

  def accs(params, model_state, module) -> dict[str, float]:  # one compiled evaluator per split
    evaluators.update({s: soups.Evaluator(module, ds, s) for s in SPLITS if s not in evaluators})
    return {s: evaluators[s](params, model_state) for s in SPLITS}

  def row(name: str, kind: str, a: dict, params: int, row_seed: int = seed, **extra) -> None:
    rows.append({"name": name, "kind": kind, "seed": row_seed, "heldout_acc": a["heldout"], "test_acc": a["test"],
                 "shift_acc": a["test_shift"], "params": int(params), **extra})

  def trained(name: str, overrides: dict, kind: str, label: str = "", row_seed: int = seed, **extra) -> dict:
    summary = exp.run(TrainStage(name, overrides))
    row(label or name, kind, {s: summary["metrics"][s]["accuracy"] for s in SPLITS}, summary["params"], row_seed,
        **extra)
    return summary

  def soup(name: str, transform: str, inputs: list[str], args: dict | None = None, **extra) -> dict:
    report = exp.run(TransformStage(name, transform, inputs, args or {}))["report"]
    ld = checkpoint.load(exp.path(name))
    row(name, "soup", accs(ld.params, ld.model_state, ld.module), rows[0]["params"], **extra)
    return report

  # 1. the shared pre-trained model, 2. the fine-tuning sweep from it
  trained("pretrain", {"total_steps": int(sc.pretrain_steps), "optimizer.lr": float(sc.pretrain_lr),
                       "optimizer.warmup_steps": int(sc.pretrain_warmup)}, "pretrained", "pretrained")
  hps, paths = sweep(sc, seed), []
  for hp in hps:
    trained(hp["name"], {
        "seed": hp["seed"], "total_steps": int(sc.finetune_steps), "optimizer.lr": hp["lr"],
        "optimizer.weight_decay": hp["weight_decay"], "optimizer.warmup_steps": int(sc.finetune_warmup),
        "objective.label_smoothing": hp["label_smoothing"], "data.aug_shift": hp["aug_shift"],
        "data.aug_noise": hp["aug_noise"], "init_from.path": exp.path("pretrain")}, "ingredient",
        row_seed=hp["seed"], hparams=hp)
    paths.append(exp.path(hp["name"]))
  ingredients = [r for r in rows if r["kind"] == "ingredient"]
  best = max(ingredients, key=lambda r: r["heldout_acc"])
  best["best_by_heldout"] = True

  # 3. soups (transform stages); 4. learned soup: mixing logits trained on the held-out split by the training loop
  soup("uniform_soup", "uniform_soup", paths, ingredients=len(paths))
  good = [p for p, r in zip(paths, ingredients, strict=True)
          if r["heldout_acc"] >= best["heldout_acc"] - float(sc.good_margin)]
  soup("uniform_soup_good", "uniform_soup", good, ingredients=len(good))
  chosen = [os.path.basename(p) for p in soup("greedy_soup", "greedy_soup", paths, {"accept": str(sc.greedy_accept)})
            ["chosen"]]
  rows[-1].update(ingredients=len(chosen), chosen=chosen)
  learned = trained("learned_soup_train", {
      **dotted(sc.learned_stage), "seed": seed, "total_steps": int(sc.learned_steps),
      "optimizer.lr": float(sc.learned_lr), "data.batch_size": int(sc.learned_batch_size), "parameterization": {
          "name": "soup_mixture", "ingredients": tuple(paths), "granularity": str(sc.learned_granularity)}},
      "soup", "learned_soup", ingredients=len(paths), trained_on=sc.learned_stage.data.train_split)
  rows[-1].update(mixing_params=int(learned["trainable"]), params=rows[0]["params"])
  exp.run(TransformStage("learned_soup", "materialize", [exp.path("learned_soup_train")]))

  # 5. output-space baseline: logit ensemble of every fine-tune (N times the inference cost)
  ens = soups.logit_ensemble(paths, SPLITS)
  row("logit_ensemble", "ensemble", {s: ens[s]["accuracy"] for s in SPLITS}, rows[0]["params"] * len(paths),
      ingredients=len(paths))

  # 6. weight-space interpolation between the pre-trained model and the best fine-tune (WiSE-FT)
  pre_ld, best_ld = checkpoint.load(exp.path("pretrain")), checkpoint.load(exp.path(best["name"]))
  interp = []
  for alpha in tuple(sc.interp_alphas):
    out = soups.interpolate([pre_ld, best_ld], alpha=float(alpha))
    interp.append({"alpha": float(alpha), **accs(out.theta, out.model_state, pre_ld.module)})
  return report(exp, rows, hps, chosen, {"between": ["pretrained", best["name"]], "points": interp})


def report(exp: Experiment, rows: list[dict], hps: list[dict], chosen: list[str], interp: dict) -> dict:
  """The table of every model and soup, the paper's claims and the plot."""
  sc, cfg, rep = exp.section, exp.base, Report(exp, "Model soups on digits (jaxlab)")
  rep.rows, by, best = rows, {r["name"]: r for r in rows}, next(r for r in rows if r.get("best_by_heldout"))
  base = rep.baseline("test")
  rep.text(f"Seed {cfg.seed} (fine-tune seeds 1000+i; sweep drawn from `np.random.default_rng(seed)`). Model: ViT "
           f"width {cfg.model.get('width')}, depth {cfg.model.get('depth')}; {sc.num_ingredients} random-search "
           f"fine-tunes of {sc.finetune_steps} steps (+1 at lr {sc.high_lr}) from one model pre-trained for "
           f"{sc.pretrain_steps} steps. Held-out = the `heldout` split (greedy selection, learned-soup training); "
           f"test = {base['n']} images (majority class {100 * base['accuracy']:.1f}%); shift = the same test images "
           "rotated, blurred and noised (`test_shift`). One run of each model: no seed statistics.")

  def notes(r):
    h = r.get("hparams")
    out = [f"lr {h['lr']:.1e}, wd {h['weight_decay']:.2f}, ls {h['label_smoothing']:.2f}, shift {h['aug_shift']}, "
           f"noise {h['aug_noise']:.2f}"] if h else []
    out += ["**best individual (held-out)**"] if r.get("best_by_heldout") else []
    out += [f"{r['ingredients']} ingredients"] if r.get("ingredients") else []
    out += ["chosen: " + ", ".join(r["chosen"])] if r.get("chosen") else []
    if r.get("trained_on"):
      out.append(f"mixing weights trained on {r['trained_on']} (its held-out acc is a training acc)")
    return "; ".join(out)
  rep.table(("model", "kind", "held-out acc", "test acc", "shift acc", "params", "notes"),
            [(r["name"], r["kind"], f"{r['heldout_acc']:.4f}", f"{r['test_acc']:.4f}", f"{r['shift_acc']:.4f}",
              f"{r['params']:,}", notes(r)) for r in rows], caption="Accuracy of every model and soup", seeds=False)
  rep.text(f"Weight-space interpolation {interp['between'][0]} -> {interp['between'][1]} (WiSE-FT), test / shift "
           "acc: " + ", ".join(f"a={p['alpha']:.2f}: {p['test']:.3f}/{p['test_shift']:.3f}" for p in interp["points"]))
  learned = rep.precondition("the pre-trained model beats the majority-class baseline (test accuracy)",
                             by["pretrained"]["test_acc"], base["accuracy"])
  several = rep.precondition("greedy soup kept two or more ingredients (with one, it is the best individual)",
                             len(chosen), 2)
  g = by["greedy_soup"]
  rep.claim("Greedy soup is at least as accurate as the best individual model on test",
            g["test_acc"] >= best["test_acc"],
            f"difference {100 * (g['test_acc'] - best['test_acc']):+.2f} pp; greedy kept {len(chosen)} ingredients; "
            f"on held-out, where it is guaranteed: {g['heldout_acc'] >= best['heldout_acc']}",
            requires=[learned, several])
  top = max((r for r in rows if r["kind"] in ("ingredient", "soup")), key=lambda r: r["shift_acc"])
  rep.claim("The uniform soup is the strongest model under distribution shift", top["name"].startswith("uniform_soup"),
            f"best under shift: {top['name']}; uniform soup minus best individual under shift "
            f"{100 * (by['uniform_soup']['shift_acc'] - best['shift_acc']):+.2f} pp", requires=[learned])
  high = [hp["name"] for hp in hps if hp["name"].endswith("high_lr")]
  if high:
    rep.claim("Greedy soup leaves out the high learning rate fine-tune", high[0] not in chosen,
              f"{high[0]} (held-out acc {by[high[0]]['heldout_acc']:.4f}) "
              + ("not chosen" if high[0] not in chosen else "chosen"), requires=[learned])
  rep.extra["interpolation"] = interp
  rep.extra["greedy"] = {"chosen": chosen, "accept": str(sc.greedy_accept)}
  rep.figure("soups.png", lambda axes: _plot(axes, rows, interp), ncols=3, size=(5.0, 4.5))
  res = rep.write()
  return {"workdir": os.path.abspath(exp.workdir), "rows": len(rows), "wall_s": res["wall_s"],
          "verdicts": [c["verdict"] for c in res["claims"]],
          **{f"{r['name']}_test": r["test_acc"] for r in rows if r["kind"] != "ingredient"}}


def _plot(axes, rows: list[dict], interp: dict) -> None:
  """Held-out vs test and test vs shift accuracy of every model and soup, and the interpolation curve."""
  ing = [r for r in rows if r["kind"] == "ingredient"]
  for ax, (xk, yk) in zip(axes[:2], (("heldout_acc", "test_acc"), ("test_acc", "shift_acc")), strict=True):
    ax.scatter([r[xk] for r in ing], [r[yk] for r in ing], c="tab:blue", alpha=0.6, label="fine-tunes")
    for r in ing[-1:] if ing[-1]["name"].endswith("high_lr") else []:
      ax.annotate("high lr", (r[xk], r[yk]), fontsize=8)
    for r, m in zip((r for r in rows if r["kind"] != "ingredient"), "v*PDsX", strict=False):
      ax.scatter([r[xk]], [r[yk]], marker=m, s=120, label=r["name"], edgecolors="k")
    ax.set(xlabel=xk.replace("_", " "), ylabel=yk.replace("_", " "))
  axes[0].legend(fontsize=7)
  for s in SPLITS:
    axes[2].plot([p["alpha"] for p in interp["points"]], [p[s] for p in interp["points"]], marker="o", label=s)
  axes[2].set(xlabel=f"alpha (0 = {interp['between'][0]}, 1 = {interp['between'][1]})", ylabel="accuracy",
              title="weight-space interpolation")
  axes[2].legend(fontsize=8)
