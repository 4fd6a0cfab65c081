"""The model-soups experiment: per seed, pre-train, fine-tune a sweep, cook uniform/greedy/learned soups, compare.

Stages under `s<seed>/` (keys: `ml_collections_configs/soups.py`): `pretrain` and its yardstick `plain_long` (the same
model from scratch, `long_factor` x the steps); `ft_XX` fine-tunes (+ one at `high_lr`); transforms `uniform_soup`,
`greedy_soup`; `learned_soup_train` -> `learned_soup`. In memory: the logit ensemble, the WiSE-FT curve (first seed).
"""

from __future__ import annotations

import math
import os

import numpy as np

from jaxlab import checkpoint, data, pipelines
from jaxlab import experiments as ex
from jaxlab.transforms import soups

SPLITS = ("heldout", "test", "test_shift")
ARMS = ("pretrained", "plain_long", "best_individual", "uniform_soup", "greedy_soup", "learned_soup", "logit_ensemble")
LISTS = {"seeds": int, "lr_range": float, "wd_range": float, "aug_shift_choices": int, "interp_alphas": float}


def sweep(cfg, seed: int) -> list[dict]:
  """The random hyper-parameter sweep of `seed`: one dict per fine-tune (name, lr, wd, ls, shift, noise, seed)."""
  rng, (lo, hi) = np.random.default_rng(seed), (math.log(float(v)) for v in cfg.lr_range)

  def half(top) -> float:  # half of the fine-tunes get the value uniform in [0, top], the others 0
    return float(rng.uniform(0.0, top)) if rng.random() < 0.5 else 0.0
  out = [{"name": f"ft_{i:02d}", "lr": float(math.exp(rng.uniform(lo, hi))), "weight_decay": float(rng.uniform(
      *cfg.wd_range)), "label_smoothing": half(cfg.label_smoothing_max), "aug_shift": int(rng.choice(
          cfg.aug_shift_choices)), "aug_noise": half(cfg.aug_noise_max), "seed": 1000 + 100 * seed + i}
         for i in range(int(cfg.num_ingredients))]
  return out + ([{"name": f"ft_{len(out):02d}_high_lr", "lr": float(cfg.high_lr), "weight_decay": 0.05,
                  "label_smoothing": 0.0, "aug_shift": 0, "aug_noise": 0.0, "seed": 1000 + 100 * seed + len(out)}]
                if float(cfg.high_lr) > 0 else [])


@pipelines.register("soups")
def run(config, workdir: str) -> dict:
  """Runs the model-soups experiment of `config.soups` (module docstring) for every seed; returns a short summary.

  Raises:
    ValueError: a bad `config.soups` entry (fewer than two ingredients, no seeds).
  """
  exp = ex.Experiment(config, workdir, "soups", lists=LISTS)
  sc, k = exp.section, int(exp.section.long_factor)
  if int(sc.num_ingredients) + (float(sc.high_lr) > 0) < 2 or not sc.seeds:
    raise ValueError("config.soups: a soup needs at least two ingredients (num_ingredients, high_lr) and a seed")
  ds, evaluators, rows, info = data.get_dataset(exp.base.data), {}, [], {"seeds": {}, "interpolation": None}

  def accs(params, model_state, module) -> dict[str, float]:  # one compiled evaluator per split
    evaluators.update({s: soups.Evaluator(module, ds, s) for s in SPLITS if s not in evaluators})
    return {s: evaluators[s](params, model_state) for s in SPLITS}

  def row(name: str, kind: str, seed: int, a: dict, stage: str, **extra) -> None:
    rows.append({"name": name, "kind": kind, "seed": seed, "heldout_acc": a["heldout"], "test_acc": a["test"],
                 "shift_acc": a["test_shift"], "stage": stage, "params": rows[0]["params"] if rows else 0, **extra})

  def trained(path: str, name: str, kind: str, seed: int, overrides: dict, **extra) -> None:
    s = exp.run(ex.TrainStage(path, overrides))
    row(name, kind, seed, {sp: s["metrics"][sp]["accuracy"] for sp in SPLITS}, path, **{"params": s["params"], **extra})

  def soup(path: str, transform: str, seed: int, inputs: list[str], args: dict | None = None, **extra) -> dict:
    report = exp.run(ex.TransformStage(path, transform, inputs, args or {}))["report"]
    ld = checkpoint.load(exp.path(path))
    row(os.path.basename(path), "soup", seed, accs(ld.params, ld.model_state, ld.module), path, **extra)
    return report

  for seed in sc.seeds:
    # 1. the pre-trained model and its yardstick, 2. the fine-tuning sweep from it (how far each moved it)
    pre = f"s{seed}/pretrain"
    for path, name, times in ((pre, "pretrained", 1), (f"s{seed}/plain_long", "plain_long", k)):
      trained(path, name, name, seed, {"seed": seed, "total_steps": times * int(sc.pretrain_steps),
                                       "optimizer.lr": float(sc.pretrain_lr), "optimizer.warmup_steps": int(
                                           sc.pretrain_warmup)})
    hps, paths, base_pred = sweep(sc, seed), [], exp.predictions(pre)
    for hp in hps:
      trained(f"s{seed}/{hp['name']}", hp["name"], "ingredient", seed, {
          "seed": hp["seed"], "total_steps": int(sc.finetune_steps), "optimizer.lr": hp["lr"],
          "optimizer.weight_decay": hp["weight_decay"], "optimizer.warmup_steps": int(sc.finetune_warmup),
          "objective.label_smoothing": hp["label_smoothing"], "data.aug_shift": hp["aug_shift"],
          "data.aug_noise": hp["aug_noise"], "init_from.path": exp.path(pre)}, hparams=hp)
      paths.append(exp.path(f"s{seed}/{hp['name']}"))  # share of test predictions the fine-tune changed:
      rows[-1]["moved"] = float(np.mean(exp.predictions(paths[-1]) != base_pred))
    ing = rows[-len(hps):]
    best = ing[soups.greedy_order([r["heldout_acc"] for r in ing])[0]]  # greedy's first pick (official ties)
    rows.append({**best, "name": "best_individual", "kind": "best", "of": best["name"]})

    # 3. soups (transform stages), 4. learned soup: mixing logits trained on `heldout` by the training loop
    soup(f"s{seed}/uniform_soup", "uniform_soup", seed, paths, ingredients=len(paths))
    chosen = [os.path.basename(p) for p in soup(f"s{seed}/greedy_soup", "greedy_soup", seed, paths, {
        "accept": str(sc.greedy_accept)})["chosen"]]
    rows[-1].update(ingredients=len(chosen), chosen=chosen)
    trained(f"s{seed}/learned_soup_train", "learned_soup", "soup", seed, {
        **ex.dotted(sc.learned_stage), "seed": seed, "total_steps": int(sc.learned_steps),
        "optimizer.lr": float(sc.learned_lr), "data.batch_size": int(sc.learned_batch_size), "parameterization": {
            "name": "soup_mixture", "ingredients": tuple(paths), "granularity": str(sc.learned_granularity)}},
        ingredients=len(paths), trained_on=sc.learned_stage.data.train_split, params=best["params"])
    exp.run(ex.TransformStage(f"s{seed}/learned_soup", "materialize", [exp.path(f"s{seed}/learned_soup_train")]))
    ens = soups.logit_ensemble(paths, SPLITS)  # 5. output space: N times the inference cost
    row("logit_ensemble", "ensemble", seed, {s: ens[s]["accuracy"] for s in SPLITS}, "", ingredients=len(paths),
        params=best["params"] * len(paths))
    info["seeds"][seed] = {"chosen": chosen, "best": best["name"], "high_lr": hps[-1]["name"] if sc.high_lr else "",
                           "top_ties": sum(r["heldout_acc"] == best["heldout_acc"] for r in ing)}
    if seed == sc.seeds[0]:  # 6. weight-space interpolation pre-trained -> best fine-tune (WiSE-FT)
      lds = [checkpoint.load(exp.path(pre)), checkpoint.load(exp.path(f"s{seed}/{best['name']}"))]
      info["interpolation"] = {"between": ["pretrained", best["name"]], "points": [
          {"alpha": float(a), **accs((o := soups.interpolate(lds, alpha=float(a))).theta, o.model_state,
                                     lds[0].module)} for a in sc.interp_alphas]}
  return report(exp, rows, info)


def report(exp: ex.Experiment, rows: list[dict], info: dict) -> dict:
  """The soups table over seeds, the per-seed greedy table, preconditions, the paper's claims and the plot."""
  sc, rep, k = exp.section, ex.Report(exp, "Model soups on digits (jaxlab)"), int(exp.section.long_factor)
  rep.rows, base, interp = rows, {s: rep.baseline(s) for s in SPLITS}, info["interpolation"]
  groups = {v: ex.aggregate(rows, value=f"{v}_acc") for v in ("heldout", "test", "shift")}
  rep.text(f"Seeds {list(sc.seeds)}: each pre-trains a model ({sc.pretrain_steps} steps), draws a sweep of "
           f"{sc.num_ingredients} fine-tunes ({sc.finetune_steps} steps, lr log-uniform in {list(sc.lr_range)}; + "
           f"one at lr {sc.high_lr}) and cooks its soups. Held-out: {base['heldout']['n']} images (greedy selection, "
           f"the best individual, ties in the official order; learned-soup training); test: {base['test']['n']} "
           "images; shift: the test images rotated, blurred and noised.")
  rep.table(("model", "held-out acc (%)", "test acc (%)", "shift acc (%)"), [
      (a, *(ex.pm(ex.lookup(groups[v], name=a)) for v in groups)) for a in ARMS] + [
      ("majority class", *(f"{100 * base[s]['accuracy']:.1f}" for s in SPLITS))], caption="Accuracy over the seeds")
  rep.table(("seed", "best individual", "ties at the top (held-out)", "greedy soup chose", "high-lr fine-tune"), [
      (s, v["best"], v["top_ties"], ", ".join(v["chosen"]), v["high_lr"]) for s, v in info["seeds"].items()],
            caption="Greedy soup per seed", seeds=False)
  one = lambda name, v="test": ex.lookup(groups[v], name=name)  # noqa: E731
  low = [r["moved"] for r in rows if r["kind"] == "ingredient" and not r["name"].endswith("high_lr")]
  pre = [rep.learned("pre-trained model", one("pretrained"), margin=float(sc.learned_margin)),
         rep.matches(f"pre-trained model against the plain model of its size at {k}x its steps", one("pretrained"),
                     one("plain_long"), float(sc.tolerance)),
         rep.precondition("fine-tunes move the pre-trained model: median share of test predictions changed",
                          float(np.median(low)), float(sc.min_moved))]
  kept = rep.precondition("greedy soup kept two or more ingredients (median over seeds; with one it is the best "
                          "individual)", float(np.median([len(v["chosen"]) for v in info["seeds"].values()])), 2)
  by_seed = {v: ex.aggregate(rows, ("name", "seed"), f"{v}_acc") for v in ("test", "shift")}
  c = ex.compare(by_seed["test"], "greedy_soup", "best_individual", "seed", key="name", ties_win=True)
  rep.claim("Greedy soup is at least as accurate as the best individual model on test", c["holds"], c["text"],
            requires=[*pre, kept])
  shift = ex.compare(by_seed["shift"], "uniform_soup", "best_individual", "seed", key="name")
  rep.claim("The uniform soup beats the best individual model under distribution shift", shift["holds"],
            shift["text"], requires=pre)
  out = [v["high_lr"] not in v["chosen"] for v in info["seeds"].values()]
  rep.claim("Greedy soup leaves out the high learning rate fine-tune", sum(out) > len(out) / 2 if sc.high_lr else None,
            f"left out at {sum(out)}/{len(out)} seeds" if sc.high_lr else "no high-lr fine-tune (high_lr=0)",
            requires=pre)
  rep.text(f"Weight-space interpolation {interp['between'][0]} -> {interp['between'][1]} (WiSE-FT, seed "
           f"{sc.seeds[0]}), test / shift acc: " + ", ".join(
               f"a={p['alpha']:.2f}: {p['test']:.3f}/{p['test_shift']:.3f}" for p in interp["points"]))
  rep.extra.update(interpolation=interp, greedy={str(s): v for s, v in info["seeds"].items()})
  rep.figure("soups.png", lambda axes: _plot(axes, rows, interp), ncols=2, size=(5.5, 4.5))
  res = rep.write()
  return {"workdir": os.path.abspath(exp.workdir), "rows": len(rows), "wall_s": res["wall_s"],
          "verdicts": [c["verdict"] for c in res["claims"]]}


def _plot(axes, rows: list[dict], interp: dict) -> None:
  """Test vs shift accuracy of every fine-tune, model and soup (all seeds), and the interpolation curve."""
  ing = [r for r in rows if r["kind"] == "ingredient"]
  axes[0].scatter([r["test_acc"] for r in ing], [r["shift_acc"] for r in ing], c="tab:gray", s=20, alpha=0.6,
                  label="fine-tunes")
  for name, m in zip(ARMS, "sP*vXhD", strict=True):
    rs = [r for r in rows if r["name"] == name]
    axes[0].scatter([r["test_acc"] for r in rs], [r["shift_acc"] for r in rs], marker=m, s=80, edgecolors="k",
                    alpha=0.8, label=name)
  axes[0].set(xlabel="test acc", ylabel="shift acc", title="every model and soup, all seeds")
  axes[0].legend(fontsize=7)
  for s in SPLITS:
    axes[1].plot([p["alpha"] for p in interp["points"]], [p[s] for p in interp["points"]], marker="o", label=s)
  axes[1].set(xlabel=f"alpha (0 = {interp['between'][0]}, 1 = {interp['between'][1]})", ylabel="accuracy",
              title="weight-space interpolation")
  axes[1].legend(fontsize=8)
