"""The model-soups experiment: pre-train, fine-tune a sweep, cook uniform/greedy/learned soups, compare.

Stages (each a sub-workdir of `workdir`; finished stages are skipped on re-run):
  pretrain/            one digits ViT trained from scratch (the shared init)
  ft_XX/               `soups.num_ingredients` fine-tunes from it with random
                       hyper-parameters (lr, weight decay, label smoothing,
                       augmentation, seed), plus one high learning rate
                       fine-tune (`soups.high_lr`) when set
  uniform_soup/        uniform soup of every fine-tune (transform job)
  uniform_soup_good/   uniform soup of the fine-tunes within `soups.good_margin`
                       of the best held-out accuracy
  greedy_soup/         greedy soup (paper Recipe 1) on the `heldout` split
  learned_soup_train/  learned soup: mixing logits trained on `heldout` with the
                       one training loop (parameterization `soup_mixture`)
  learned_soup/        the learned soup materialized to a plain checkpoint
and the logit ensemble of every fine-tune as the output-space baseline.
Writes `results.json` (one row per model or soup), `results.md` and `soups.png`.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import ml_collections
import numpy as np

from jaxlab import checkpoint, data, pipelines
from jaxlab.transforms import engine, soups

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


def _train_config(config, **over) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.job = "train"
  for k in ("soups", "pipeline"):
    if k in c:
      del c[k]
  c.eval_splits = ("heldout",)
  c.final_eval_splits = SPLITS
  for key, value in over.items():
    node = c
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return c


def _transform(workdir: str, name: str, transform: str, inputs: list[str], args: dict | None = None) -> dict:
  """Runs a transform job into `<workdir>/<name>` unless its checkpoint exists; returns its report."""
  out = os.path.join(workdir, name)
  done = os.path.join(out, "transform.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  cfg = ml_collections.ConfigDict({"transform": transform, "inputs": tuple(inputs), "args": dict(args or {})})
  res = engine.run(cfg, out)
  res = engine.to_jsonable(res)
  with open(done, "w") as f:
    json.dump(res, f, indent=2)
  return res


class _Evaluators:
  """Accuracy of any checkpoint of one architecture on the result splits (compiled once per split)."""

  def __init__(self, data_cfg):
    self.dataset = data.get_dataset(data_cfg)
    self._by_split = {}

  def __call__(self, path: str) -> dict[str, float]:
    ld = checkpoint.load(path)
    out = {}
    for s in SPLITS:
      if s not in self._by_split:
        self._by_split[s] = soups.Evaluator(ld.module, self.dataset, s)
      out[s] = self._by_split[s](ld.params, ld.model_state)
    return out

  def params(self, params, model_state, module) -> dict[str, float]:
    out = {}
    for s in SPLITS:
      if s not in self._by_split:
        self._by_split[s] = soups.Evaluator(module, self.dataset, s)
      out[s] = self._by_split[s](params, model_state)
    return out


def _row(name: str, kind: str, accs: dict, params: int, **extra) -> dict:
  return {"name": name, "kind": kind, "heldout_acc": accs["heldout"], "test_acc": accs["test"],
          "shift_acc": accs["test_shift"], "params": int(params), **extra}


def _accs_from_summary(summary: dict) -> dict:
  return {s: summary["metrics"][s]["accuracy"] for s in SPLITS}


@pipelines.register("soups")
def run(config, workdir: str) -> dict:
  """Runs the model-soups experiment (see the module docstring); returns a short summary.

  Raises:
    ValueError: a bad `config.soups` entry (e.g. fewer than two ingredients).
  """
  t0 = time.time()
  sc = config.soups
  if int(sc.num_ingredients) + (1 if float(sc.high_lr) > 0 else 0) < 2:
    raise ValueError("config.soups.num_ingredients: a soup needs at least two ingredients")
  os.makedirs(workdir, exist_ok=True)
  seed = int(config.seed)

  # 1. the shared pre-trained model
  pre_cfg = _train_config(config, **{"total_steps": int(sc.pretrain_steps), "optimizer.lr": float(sc.pretrain_lr),
                                     "optimizer.warmup_steps": int(sc.pretrain_warmup)})
  pre = pipelines.stage(workdir, "pretrain", pre_cfg)
  pre_path = os.path.join(workdir, "pretrain")
  n_params = int(pre["params"])
  rows = [_row("pretrained", "pretrained", _accs_from_summary(pre), n_params)]

  # 2. the fine-tuning sweep
  hps = sweep(sc, seed)
  paths = []
  for hp in hps:
    ft_cfg = _train_config(config, **{
        "seed": hp["seed"], "total_steps": int(sc.finetune_steps), "optimizer.lr": hp["lr"],
        "optimizer.weight_decay": hp["weight_decay"], "optimizer.warmup_steps": int(sc.finetune_warmup),
        "objective.label_smoothing": hp["label_smoothing"], "data.aug_shift": hp["aug_shift"],
        "data.aug_noise": hp["aug_noise"], "init_from.path": pre_path})
    summ = pipelines.stage(workdir, hp["name"], ft_cfg)
    paths.append(os.path.join(workdir, hp["name"]))
    rows.append(_row(hp["name"], "ingredient", _accs_from_summary(summ), n_params, hparams=hp))
  ingredients = [r for r in rows if r["kind"] == "ingredient"]
  best = max(ingredients, key=lambda r: r["heldout_acc"])
  best["best_by_heldout"] = True

  # 3. soups (transform jobs) and their evaluation
  evals = _Evaluators(pre_cfg.data)
  _transform(workdir, "uniform_soup", "uniform_soup", paths)
  rows.append(_row("uniform_soup", "soup", evals(os.path.join(workdir, "uniform_soup")), n_params,
                   ingredients=len(paths)))
  good = [p for p, r in zip(paths, ingredients, strict=True)
          if r["heldout_acc"] >= best["heldout_acc"] - float(sc.good_margin)]
  _transform(workdir, "uniform_soup_good", "uniform_soup", good)
  rows.append(_row("uniform_soup_good", "soup", evals(os.path.join(workdir, "uniform_soup_good")), n_params,
                   ingredients=len(good)))
  greedy = _transform(workdir, "greedy_soup", "greedy_soup", paths, {"accept": str(sc.greedy_accept)})
  chosen = [os.path.basename(p) for p in greedy["report"]["chosen"]]
  rows.append(_row("greedy_soup", "soup", evals(os.path.join(workdir, "greedy_soup")), n_params,
                   ingredients=len(chosen), chosen=chosen))

  # 4. learned soup: mixing logits trained on the held-out split through the one training loop
  learned_cfg = _train_config(config, **{
      "seed": seed, "total_steps": int(sc.learned_steps), "optimizer.lr": float(sc.learned_lr),
      "optimizer.weight_decay": 0.0, "optimizer.warmup_steps": 0, "optimizer.schedule": "constant",
      "optimizer.grad_clip": 0.0, "objective.label_smoothing": 0.0, "data.aug_shift": 0, "data.aug_noise": 0.0,
      "data.batch_size": int(sc.learned_batch_size), "model.drop_path": 0.0,
      "parameterization": ml_collections.ConfigDict({"name": "soup_mixture", "ingredients": tuple(paths),
                                                     "granularity": str(sc.learned_granularity)})})
  learned_cfg.data.train_split = "heldout"
  learned = pipelines.stage(workdir, "learned_soup_train", learned_cfg)
  _transform(workdir, "learned_soup", "materialize", [os.path.join(workdir, "learned_soup_train")])
  rows.append(_row("learned_soup", "soup", _accs_from_summary(learned), n_params, ingredients=len(paths),
                   trained_on="heldout", mixing_params=int(learned["trainable"])))

  # 5. output-space baseline: logit ensemble of every fine-tune (N times the inference cost)
  ens = soups.logit_ensemble(paths, SPLITS)
  rows.append(_row("logit_ensemble", "ensemble", {s: ens[s]["accuracy"] for s in SPLITS}, n_params * len(paths),
                   ingredients=len(paths)))

  # 6. weight-space interpolation between the pre-trained model and the best fine-tune (WiSE-FT)
  interp = []
  pre_ld, best_path = checkpoint.load(pre_path), os.path.join(workdir, best["name"])
  for alpha in tuple(sc.interp_alphas):
    out = soups.interpolate([pre_ld, checkpoint.load(best_path)], alpha=float(alpha))
    interp.append({"alpha": float(alpha), **evals.params(out.theta, out.model_state, pre_ld.module)})

  claims = _claims(rows, greedy, hps)
  result = {"rows": rows, "claims": claims, "interpolation": {"between": ["pretrained", best["name"]],
                                                              "points": interp},
            "greedy": {k: greedy["report"][k] for k in ("accept", "chosen", "soup_acc", "best_ingredient_acc")},
            "seed": seed, "wall_s": time.time() - t0, "machine": _machine(),
            "config": json.loads(config.to_json_best_effort())}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(results_markdown(result))
  plot(result, os.path.join(workdir, "soups.png"))
  return {"workdir": os.path.abspath(workdir), "rows": len(rows), "wall_s": time.time() - t0,
          **{f"{r['name']}_test": r["test_acc"] for r in rows if r["kind"] != "ingredient"}}


def _machine() -> str:
  return f"{jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPU cores"


def _claims(rows: list[dict], greedy: dict, hps: list[dict]) -> dict:
  """The paper's claims checked on these numbers."""
  by = {r["name"]: r for r in rows}
  ing = [r for r in rows if r["kind"] == "ingredient"]
  best = next(r for r in ing if r.get("best_by_heldout"))
  models = [r for r in rows if r["kind"] in ("ingredient", "soup")]
  top_shift = max(models, key=lambda r: r["shift_acc"])
  high = [hp["name"] for hp in hps if hp["name"].endswith("high_lr")]
  chosen = {os.path.basename(p) for p in greedy["report"]["chosen"]}
  out = {
      "greedy_test_minus_best_individual_test": by["greedy_soup"]["test_acc"] - best["test_acc"],
      "greedy_soup_ge_best_individual_on_test": by["greedy_soup"]["test_acc"] >= best["test_acc"],
      "greedy_soup_ge_best_individual_on_heldout": by["greedy_soup"]["heldout_acc"] >= best["heldout_acc"],
      "best_single_model_under_shift": top_shift["name"],
      "uniform_soup_strongest_under_shift": top_shift["name"].startswith("uniform_soup"),
      "uniform_soup_shift_minus_best_individual_shift": by["uniform_soup"]["shift_acc"] - best["shift_acc"],
      "greedy_num_ingredients": len(chosen),
  }
  if high:
    out["high_lr_ingredient"] = high[0]
    out["high_lr_rejected_by_greedy"] = high[0] not in chosen
    out["high_lr_heldout_acc"] = by[high[0]]["heldout_acc"]
  return out


def results_markdown(result: dict) -> str:
  """The results table and the claims, as markdown."""
  cfg = result["config"]
  lines = ["# Model soups on digits (jaxlab)", "",
           "Command: `python -m jaxlab.main --config=ml_collections_configs/soups.py --workdir=runs/soups`", "",
           f"Seed {result['seed']} (fine-tune seeds 1000+i; sweep drawn from `np.random.default_rng(seed)`); "
           f"machine: {result['machine']} (shared with other jobs); wall time {result['wall_s'] / 60:.1f} min. "
           f"Model: ViT width {cfg['model'].get('width')}, depth {cfg['model'].get('depth')}; "
           f"{cfg['soups']['num_ingredients']} random-search fine-tunes of {cfg['soups']['finetune_steps']} steps "
           f"(+1 at lr {cfg['soups']['high_lr']}) from one model pre-trained for {cfg['soups']['pretrain_steps']} "
           "steps. Held-out = the 180-image `heldout` split (greedy selection, learned-soup training); "
           "test = 360 images; shift = the same test images rotated, blurred and noised (`test_shift`).", "",
           "| model | kind | held-out acc | test acc | shift acc | params | notes |", "|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    notes = []
    if r.get("hparams"):
      h = r["hparams"]
      notes.append(f"lr {h['lr']:.1e}, wd {h['weight_decay']:.2f}, ls {h['label_smoothing']:.2f}, "
                   f"shift {h['aug_shift']}, noise {h['aug_noise']:.2f}")
    if r.get("best_by_heldout"):
      notes.append("**best individual (held-out)**")
    if r.get("ingredients"):
      notes.append(f"{r['ingredients']} ingredients")
    if r.get("chosen"):
      notes.append("chosen: " + ", ".join(r["chosen"]))
    if r.get("trained_on"):
      notes.append(f"mixing weights trained on {r['trained_on']} (its held-out acc is a training acc)")
    lines.append(f"| {r['name']} | {r['kind']} | {r['heldout_acc']:.4f} | {r['test_acc']:.4f} | "
                 f"{r['shift_acc']:.4f} | {r['params']:,} | {'; '.join(notes)} |")
  c = result["claims"]
  lines += ["", "## The paper's claims at this scale", "",
            f"- Greedy soup >= best individual on test: **{c['greedy_soup_ge_best_individual_on_test']}** "
            f"(difference {100 * c['greedy_test_minus_best_individual_test']:+.2f} pp; greedy kept "
            f"{c['greedy_num_ingredients']} ingredients; on held-out, where the guarantee holds: "
            f"{c['greedy_soup_ge_best_individual_on_heldout']}).",
            f"- Uniform soup strongest under shift: **{c['uniform_soup_strongest_under_shift']}** (best model/soup "
            f"under shift: {c['best_single_model_under_shift']}; uniform soup minus best individual under shift: "
            f"{100 * c['uniform_soup_shift_minus_best_individual_shift']:+.2f} pp).",
            ]
  if "high_lr_ingredient" in c:
    lines.append(f"- High learning rate ingredient ({c['high_lr_ingredient']}, held-out acc "
                 f"{c['high_lr_heldout_acc']:.4f}) rejected by greedy: **{c['high_lr_rejected_by_greedy']}**.")
  ip = result["interpolation"]
  lines += ["", f"Weight-space interpolation {ip['between'][0]} -> {ip['between'][1]} (WiSE-FT), test / shift acc: "
            + ", ".join(f"a={p['alpha']:.2f}: {p['test']:.3f}/{p['test_shift']:.3f}" for p in ip["points"]), ""]
  return "\n".join(lines)


def plot(result: dict, path: str) -> None:
  """Held-out vs test and test vs shift accuracy of every model and soup, and the interpolation curve."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  markers = {"uniform_soup": ("*", "tab:green"), "uniform_soup_good": ("P", "tab:olive"),
             "greedy_soup": ("D", "tab:red"), "learned_soup": ("s", "tab:purple"),
             "logit_ensemble": ("X", "tab:orange"), "pretrained": ("v", "gray")}
  for ax, (xk, yk) in zip(axes[:2], (("heldout_acc", "test_acc"), ("test_acc", "shift_acc")), strict=True):
    ing = [r for r in result["rows"] if r["kind"] == "ingredient"]
    ax.scatter([r[xk] for r in ing], [r[yk] for r in ing], c="tab:blue", alpha=0.6, label="fine-tunes")
    for r in ing:
      if r["name"].endswith("high_lr"):
        ax.annotate("high lr", (r[xk], r[yk]), fontsize=8)
    for r in result["rows"]:
      if r["name"] in markers:
        m, col = markers[r["name"]]
        ax.scatter([r[xk]], [r[yk]], marker=m, s=120, c=col, label=r["name"], edgecolors="k")
    ax.set_xlabel(xk.replace("_", " "))
    ax.set_ylabel(yk.replace("_", " "))
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  pts = result["interpolation"]["points"]
  for s in SPLITS:
    axes[2].plot([p["alpha"] for p in pts], [p[s] for p in pts], marker="o", label=s)
  axes[2].set_xlabel("alpha (0 = " + result["interpolation"]["between"][0] + ", 1 = "
                     + result["interpolation"]["between"][1] + ")")
  axes[2].set_ylabel("accuracy")
  axes[2].set_title("weight-space interpolation")
  axes[2].legend(fontsize=8)
  axes[2].grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)

