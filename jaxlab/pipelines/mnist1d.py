"""The MNIST-1D baseline benchmark: every zoo model x every seed through the one training loop.

`config.job = 'pipeline'`, `config.pipeline = 'mnist1d'`. Each run is a stage
(sub-workdir `<model>_s<seed>`; done stages are skipped on re-run) trained with
the shared keys of `config` (data, optimizer, steps, ...), its model from
`config.zoo.model_configs[<model>]` and any other keys from
`config.zoo.run_overrides[<model>]` (a nested dict merged into the run's
config, e.g. `{'total_steps': 2000, 'optimizer': {'lr': 1e-3}}`). Writes `results.json` (one
row per run: name, model, params, seed, test_acc, train_acc, steps, wall_s),
`results.md` (ours beside the paper's published accuracies) and `mnist1d.png`
into `workdir`.

The published numbers (Greydanus and Kobak, "Scaling down deep learning with
MNIST-1D", README of greydanus/mnist1d): logistic regression 32%, MLP 68%,
CNN 94%, GRU 91%, human expert 96% test accuracy (one PyTorch run each;
4000 training signals; Adam, learning rate 1e-2, batch 100, constant rate).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time

import numpy as np

from jaxlab import pipelines

PAPER = {  # published test accuracies on the default MNIST-1D (README of greydanus/mnist1d, arXiv:2011.14439)
    "logreg": 0.32,
    "mlp": 0.68,
    "cnn1d": 0.94,
    "gru": 0.91,
}
PAPER_HUMAN = 0.96
PAPER_REFERENCE = "https://github.com/greydanus/mnist1d (README table), arXiv:2011.14439"
DESCRIPTIONS = {
    "logreg": "logistic regression",
    "mlp": "MLP (residual, 100 hidden)",
    "cnn1d": "1D CNN (3 conv, 25 ch)",
    "gru": "bidirectional GRU (6 hidden)",
    "vit": "ViT, 1D patches of 4",
}


def run_config(config, model: str, seed: int):
  """The training config of one run: the shared keys, this model's config and optimizer overrides, seed.

  Raises:
    ValueError: when `model` has no entry in `config.zoo.model_configs`.
  """
  import ml_collections
  mcfgs = config.zoo.model_configs
  if model not in mcfgs:
    raise ValueError(f"config.zoo.models: {model!r} has no config.zoo.model_configs entry; "
                     f"known: {sorted(mcfgs.keys())}")
  c = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
  c.job = "train"
  c.seed = int(seed)
  c.model = ml_collections.ConfigDict(dict(mcfgs[model]))
  over = config.zoo.get("run_overrides", {}).get(model)
  if over:
    _merge(c, over.to_dict() if hasattr(over, "to_dict") else dict(over), f"config.zoo.run_overrides.{model}")
  return c


def _merge(node, over: dict, where: str) -> None:
  """Recursively sets `over`'s leaves into ConfigDict `node`; unknown keys are an error."""
  for k, v in over.items():
    if k not in node:
      raise ValueError(f"{where}.{k}: no such config key")
    if isinstance(v, dict):
      _merge(node[k], v, f"{where}.{k}")
    else:
      node[k] = v


def run(config, workdir: str) -> dict:
  """Trains every `config.zoo.models` x `config.zoo.seeds` and writes the results files.

  Returns:
    `{'rows': [...], 'summary': [...], 'results_md': path}`.
  """
  from jaxlab import train  # noqa: F401  (stage() trains through it)
  os.makedirs(workdir, exist_ok=True)
  models, seeds = pipelines.as_tuple(config.zoo.models), pipelines.as_tuple(config.zoo.seeds, int)
  if not models or not seeds:
    raise ValueError("config.zoo.models and config.zoo.seeds must not be empty")
  rows = []
  t0 = time.time()
  for model in models:
    for seed in seeds:
      cfg = run_config(config, model, seed)
      s = pipelines.stage(workdir, f"{model}_s{seed}", cfg)
      rows.append({
          "name": f"{model}_s{seed}",
          "model": model,
          "params": int(s["params"]),
          "seed": seed,
          "test_acc": s.get("test_accuracy"),
          "train_acc": s.get("train_accuracy"),
          "steps": int(s["steps"]),
          "wall_s": float(s["wall_s"]),
      })
      print(f"mnist1d: {model} seed {seed}: test {rows[-1]['test_acc']:.4f} "
            f"({rows[-1]['params']:,} params, {rows[-1]['wall_s']:.1f}s)", flush=True)
  summary = aggregate(rows)
  # Sum of the runs' own wall times, so a re-run that skips done stages reports the same figure.
  results = {"config": _config_facts(config), "machine": machine(),
             "total_wall_s": float(sum(r["wall_s"] for r in rows)), "pipeline_wall_s": time.time() - t0,
             "rows": rows, "summary": summary, "paper": {**PAPER, "human": PAPER_HUMAN}}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  md = results_markdown(results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(md)
  plot(rows, os.path.join(workdir, "mnist1d.png"))
  return {"rows": rows, "summary": summary, "results_md": os.path.join(workdir, "results.md")}


def _config_facts(config) -> dict:
  return {"data": config.data.to_dict(), "optimizer": config.optimizer.to_dict(),
          "total_steps": int(config.get("total_steps", 0) or 0),
          "total_epochs": float(config.get("total_epochs", 0) or 0),
          "models": list(config.zoo.models), "seeds": [int(s) for s in config.zoo.seeds],
          "model_configs": config.zoo.model_configs.to_dict(),
          "run_overrides": config.zoo.get("run_overrides", {}).to_dict()
          if config.zoo.get("run_overrides") else {}}


def machine() -> str:
  import jax
  return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} on " \
         f"{jax.devices()[0].platform}"


def aggregate(rows: list[dict]) -> list[dict]:
  """Mean, sample std, min and max of test accuracy per model (in first-seen order)."""
  out = []
  for model in dict.fromkeys(r["model"] for r in rows):
    rs = [r for r in rows if r["model"] == model]
    acc = np.array([r["test_acc"] for r in rs], np.float64)
    tr = np.array([r["train_acc"] for r in rs if r["train_acc"] is not None], np.float64)
    out.append({"model": model, "params": rs[0]["params"], "n": len(rs), "test_mean": float(acc.mean()),
                "test_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                "test_min": float(acc.min()), "test_max": float(acc.max()),
                "train_mean": float(tr.mean()) if len(tr) else None,
                "wall_s_mean": float(np.mean([r["wall_s"] for r in rs])), "steps": rs[0]["steps"],
                "paper": PAPER.get(model)})
  return out


def results_markdown(results: dict) -> str:
  """The results table (ours beside the paper's) and what it says."""
  cfg, summary = results["config"], results["summary"]
  steps = cfg["total_steps"] or f"{cfg['total_epochs']} epochs"
  opt = cfg["optimizer"]
  lines = [
      "# MNIST-1D baselines: the small model zoo",
      "",
      "Command: `python -m jaxlab.main --config=ml_collections_configs/mnist1d.py --workdir=runs/mnist1d`",
      "",
      f"Seeds: {cfg['seeds']}. Machine: {results['machine']} (shared with other jobs, so wall times are "
      f"indicative only). Total training wall time {results['total_wall_s'] / 60:.1f} min.",
      f"Data: MNIST-1D from the `mnist1d` package's generator with its default arguments (seed 42): "
      f"train on {_train_size(cfg)} signals, test on the package's 1000 test signals.",
      f"Training: {steps} steps, batch {cfg['data']['batch_size']}, {opt['name']} lr {opt['lr']} "
      f"({opt['schedule']} schedule, weight decay {opt['weight_decay']}, grad clip {opt['grad_clip']}); "
      f"per-model overrides: {cfg['run_overrides'] or 'none'}.",
      "",
      "| model | params | steps | test acc (mean ± std) | min / max | train acc | paper | wall s / run |",
      "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for s in summary:
    paper = f"{100 * s['paper']:.0f}%" if s["paper"] is not None else "n/a"
    train_acc = f"{100 * s['train_mean']:.1f}%" if s["train_mean"] is not None else "n/a"
    lines.append(f"| {DESCRIPTIONS.get(s['model'], s['model'])} (`{s['model']}`) | {s['params']:,} | "
                 f"{s['steps']} | {100 * s['test_mean']:.1f}% ± {100 * s['test_std']:.1f} | "
                 f"{100 * s['test_min']:.1f} / {100 * s['test_max']:.1f} | {train_acc} | {paper} | "
                 f"{s['wall_s_mean']:.0f} |")
  lines += ["", f"Paper: human expert {100 * PAPER_HUMAN:.0f}%. Source: {PAPER_REFERENCE}.", "",
            "## What the numbers say", ""]
  lines += claim_lines(summary)
  lines.append("")
  return "\n".join(lines)


def _train_size(cfg) -> str:
  d = cfg["data"]
  n = int(d.get("num_samples") or 5000) * float(d.get("train_split") or 0.8)
  n = int(n) - int(d.get("validation_size", 0) or 0) - int(d.get("heldout_size", 0) or 0)
  if d.get("train_size"):
    n = int(d["train_size"])
  return f"{n}"


def claim_lines(summary: list[dict]) -> list[str]:
  """Plain statements comparing our means with the paper's numbers and its ordering claim."""
  by = {s["model"]: s for s in summary}
  out = []
  for s in summary:
    if s["paper"] is None:
      continue
    diff = s["test_mean"] - s["paper"]
    # Binomial standard error of a 1000-signal test accuracy at the paper's value.
    se = float(np.sqrt(s["paper"] * (1 - s["paper"]) / 1000))
    verdict = "within two binomial standard errors of" if abs(diff) <= 2 * se else (
        "above" if diff > 0 else "below")
    out.append(f"- `{s['model']}`: {100 * s['test_mean']:.1f}% vs the paper's {100 * s['paper']:.0f}% "
               f"({100 * diff:+.1f} points; {verdict} the paper, whose test-set standard error alone is "
               f"{100 * se:.1f} points).")
  order = [m for m in ("logreg", "mlp", "gru", "cnn1d") if m in by]
  if len(order) >= 2:
    means = [by[m]["test_mean"] for m in order]
    holds = all(a < b for a, b in zip(means, means[1:]))
    out.append(f"- The paper's ordering logistic regression < MLP < GRU < CNN "
               f"{'holds' if holds else 'does NOT hold'} here: "
               + " < ".join(f"{m} {100 * by[m]['test_mean']:.1f}%" for m in order) + ".")
  if "mlp" in by and "cnn1d" in by:
    gap = by["cnn1d"]["test_mean"] - by["mlp"]["test_mean"]
    out.append(f"- Spatial inductive bias: the CNN beats the MLP by {100 * gap:.1f} points with "
               f"{by['cnn1d']['params'] / by['mlp']['params']:.2f}x its parameters (paper: 26 points).")
  if "vit" in by:
    v = by["vit"]
    out.append(f"- The ViT with 1D patches ({v['params']:,} params) reaches {100 * v['test_mean']:.1f}% "
               f"± {100 * v['test_std']:.1f} (not in the paper's table).")
  spread = [s for s in summary if s["n"] > 1]
  if spread:
    worst = max(spread, key=lambda s: s["test_std"])
    base = [s for s in spread if s["model"] in PAPER]
    if base:
      worst_b = max(base, key=lambda s: s["test_std"])
      far = _min_gap(base) > 3 * worst_b["test_std"]
      out.append(f"- Seed noise: among the paper's baselines the largest std over seeds is "
                 f"{100 * worst_b['test_std']:.1f} points (`{worst_b['model']}`); the smallest gap between two "
                 f"of them is {100 * _min_gap(base):.1f} points, {'far larger' if far else 'NOT far larger'} "
                 f"than the seed noise{', which is the point of the benchmark' if far else ''}.")
    if worst not in base:
      out.append(f"- The noisiest model over seeds is `{worst['model']}` (std {100 * worst['test_std']:.1f} points).")
  for s in summary:
    if s["train_mean"] is None:
      continue
    if s["train_mean"] < 0.9 and s["model"] != "logreg":
      out.append(f"- `{s['model']}` underfits: {100 * s['train_mean']:.1f}% train accuracy after {s['steps']} steps "
                 f"(more steps or a higher learning rate would raise it; it is not a capacity limit of the data).")
    elif s["train_mean"] > 0.99 and s["test_mean"] < 0.8:
      out.append(f"- `{s['model']}` fits the training set ({100 * s['train_mean']:.1f}%) but tests at "
                 f"{100 * s['test_mean']:.1f}%: without a spatial prior it memorises rather than generalises.")
  return out


def _min_gap(summary: list[dict]) -> float:
  means = sorted(s["test_mean"] for s in summary)
  return min((b - a for a, b in zip(means, means[1:])), default=0.0)


def plot(rows: list[dict], path: str) -> None:
  """Test accuracy per model: each seed a dot, the mean a bar, the paper's number a red tick."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  models = list(dict.fromkeys(r["model"] for r in rows))
  fig, ax = plt.subplots(figsize=(1.4 * len(models) + 2, 3.6))
  for i, m in enumerate(models):
    acc = [100 * r["test_acc"] for r in rows if r["model"] == m]
    ax.bar(i, np.mean(acc), color="#9ecae1", edgecolor="#3182bd", width=0.6,
           label="ours (mean over seeds)" if i == 0 else None)
    ax.scatter(np.full(len(acc), i) + np.linspace(-0.12, 0.12, len(acc)), acc, color="#08519c", s=14, zorder=3,
               label="ours (each seed)" if i == 0 else None)
    if m in PAPER:
      ax.hlines(100 * PAPER[m], i - 0.35, i + 0.35, color="#d62728", lw=2.5, zorder=4,
                label="paper" if m == next(x for x in models if x in PAPER) else None)
  ax.axhline(100 * PAPER_HUMAN, color="gray", ls="--", lw=1, label="paper: human expert")
  ax.set_xticks(range(len(models)), [DESCRIPTIONS.get(m, m).split(" (")[0] for m in models], fontsize=8)
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title("MNIST-1D baselines")
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


pipelines.register("mnist1d")(run)
