"""Pipeline `mnist1d`: the MNIST-1D baseline zoo, every model x every seed through the one training loop.

Stages: `<model>_s<seed>` per model in `mnist1d.models` and seed in `mnist1d.seeds`, each the base config with
`model` = `mnist1d.model_configs.<model>` and the nested keys of `mnist1d.run_overrides.<model>` (e.g. the ViT's
own optimizer). Claims (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D"): each model's accuracy
matches the paper's, and logistic regression < MLP < GRU < CNN. Writes results.json/md and mnist1d.png.

The published numbers (README of greydanus/mnist1d): logistic regression 32%, MLP 68%, CNN 94%, GRU 91%,
human expert 96% test accuracy (one PyTorch run each; 4000 training signals; Adam, lr 1e-2, batch 100).
"""

from __future__ import annotations

import numpy as np

from jaxlab import configs, data, pipelines
from jaxlab.experiments import Experiment, Report, TrainStage, aggregate, dotted, lookup, pm, summary_row

PAPER = {"logreg": 0.32, "mlp": 0.68, "cnn1d": 0.94, "gru": 0.91}  # published test accuracies (1000 test signals)
PAPER_HUMAN = 0.96
PAPER_REFERENCE = "https://github.com/greydanus/mnist1d (README table), arXiv:2011.14439"
DESCRIPTIONS = {"logreg": "logistic regression", "mlp": "MLP (residual, 100 hidden)", "cnn1d": "1D CNN (3 conv, 25 ch)",
                "gru": "bidirectional GRU (6 hidden)", "vit": "ViT, 1D patches of 4"}


def stages(exp: Experiment) -> list[TrainStage]:
  """Every model x seed; refuses unknown models and override keys before anything trains."""
  z, out = exp.section, []
  for model in configs.as_tuple(z.models):
    if model not in z.model_configs:
      raise ValueError(f"config.mnist1d.models: {model!r} has no config.mnist1d.model_configs entry; "
                       f"known: {sorted(z.model_configs.keys())}")
    over = dotted(z.run_overrides[model].to_dict()) if model in z.run_overrides else {}
    for seed in configs.as_tuple(z.seeds, int):
      out.append(TrainStage(f"{model}_s{seed}", {"seed": seed, "model": z.model_configs[model].to_dict(), **over}))
      try:
        exp.derive(**out[-1].overrides)
      except ValueError as e:
        raise ValueError(f"config.mnist1d.run_overrides.{model}: {e}") from e
  if not out:
    raise ValueError("config.mnist1d.models and config.mnist1d.seeds must not be empty")
  return out


@pipelines.register("mnist1d")
def run(config, workdir: str) -> dict:
  """Trains every stage, then reports (ours beside the paper's accuracies)."""
  exp = Experiment(config, workdir, section="mnist1d")
  rep = Report(exp, "MNIST-1D baselines: the small model zoo")
  for st in stages(exp):
    s = exp.run(st)
    rep.rows.append(summary_row(st.name, s, st.overrides["seed"], model=st.name.rsplit("_s", 1)[0],
                                train_acc=s.get("train_accuracy"), steps=int(s["steps"])))
  table = aggregate(rep.rows, by="model")
  train = {g["model"]: g for g in aggregate(rep.rows, by="model", value="train_acc")}
  steps = {r["model"]: (r["steps"], r["params"], r["wall_s"]) for r in rep.rows}
  ds, b = data.get_dataset(exp.base.data), exp.base
  majority = rep.baseline("test")
  rep.text(f"Data: MNIST-1D from the `mnist1d` package's generator (seed {ds.info['generator_args'].get('seed')}): "
           f"train on {ds.num_examples()} signals, test on {majority['n']} (majority class "
           f"{100 * majority['accuracy']:.1f}%). Training: {b.total_steps} steps of batch {b.data.batch_size}, "
           f"{b.optimizer.name} lr {b.optimizer.lr} ({b.optimizer.schedule} schedule, wd {b.optimizer.weight_decay},"
           f" clip {b.optimizer.grad_clip}); per-model overrides in the Stages table. Paper: human expert "
           f"{100 * PAPER_HUMAN:.0f}%; source {PAPER_REFERENCE}.")
  rep.table(("model", "params", "steps", "test acc (%)", "min / max", "train acc (%)", "paper", "wall s / run"),
            [(f"{DESCRIPTIONS.get(g['model'], g['model'])} (`{g['model']}`)", f"{steps[g['model']][1]:,}",
              steps[g["model"]][0], pm(g), f"{100 * min(g['values']):.1f} / {100 * max(g['values']):.1f}",
              pm(train.get(g["model"])), f"{100 * PAPER[g['model']]:.0f}%" if g["model"] in PAPER else "n/a",
              f"{steps[g['model']][2]:.0f}") for g in table]
            + [(f"majority class of the test split (class {majority['label']})", "0", "-",
                f"{100 * majority['accuracy']:.1f}", "-", "-", "-", "-")], caption="Test and train accuracy")
  claims(rep, table, majority["accuracy"])
  cnn, mlp = lookup(table, model="cnn1d"), lookup(table, model="mlp")
  if cnn and mlp:
    rep.text(f"Spatial inductive bias: CNN minus MLP {100 * (cnn['mean'] - mlp['mean']):+.1f} points with "
             f"{steps['cnn1d'][1] / steps['mlp'][1]:.2f}x its parameters (paper: +26 points).")
  rep.text("\n".join(f"- `{m}` underfits: {100 * g['mean']:.1f}% train accuracy after {steps[m][0]} steps." for m, g
                     in train.items() if g["mean"] < 0.9 and m != "logreg"))
  rep.figure("mnist1d.png", lambda ax: _plot(ax, rep.rows), size=(1.4 * len(table) + 2, 3.6))
  res = rep.write()
  return {"workdir": exp.workdir, "rows": rep.rows, "verdicts": [c["verdict"] for c in res["claims"]]}


def claims(rep: Report, table: list[dict], majority: float) -> None:
  """Each paper model within two binomial standard errors (1000 test signals) of its published accuracy; the
  paper's ordering; both only for models that beat the majority class by 2 points (they learned something)."""
  learned = {g["model"]: rep.precondition(f"`{g['model']}` test accuracy minus the majority class's (2 points)",
                                          g["mean"] - majority, 0.02) for g in table if g["model"] in PAPER}
  for g in table:
    if g["model"] in PAPER:
      p = PAPER[g["model"]]
      se = float(np.sqrt(p * (1 - p) / 1000))  # the paper's own test-set standard error
      rep.claim(f"`{g['model']}` reaches the paper's {100 * p:.0f}% test accuracy", abs(g["mean"] - p) <= 2 * se,
                f"{pm(g)}% vs {100 * p:.0f}% ({100 * (g['mean'] - p):+.1f} points; two binomial standard errors "
                f"{200 * se:.1f})", requires=[learned[g["model"]]])
  order = [m for m in ("logreg", "mlp", "gru", "cnn1d") if lookup(table, model=m)]
  if len(order) >= 2:
    means = [lookup(table, model=m)["mean"] for m in order]
    rep.claim("logistic regression < MLP < GRU < CNN (the paper's ordering)",
              all(a < b for a, b in zip(means, means[1:])),
              " < ".join(f"{m} {100 * v:.1f}%" for m, v in zip(order, means)),
              requires=[learned[m] for m in order])


def _plot(ax, rows: list[dict]) -> None:
  """Each seed a dot, the mean a bar, the paper's number a red tick."""
  models = list(dict.fromkeys(r["model"] for r in rows))
  for i, m in enumerate(models):
    acc = [100 * r["test_acc"] for r in rows if r["model"] == m]
    first = i == 0
    ax.bar(i, np.mean(acc), color="#9ecae1", edgecolor="#3182bd", width=0.6, label="mean over seeds" if first else None)
    ax.scatter(i + np.linspace(-0.12, 0.12, len(acc)), acc, color="#08519c", s=14, zorder=3,
               label="each seed" if first else None)
    if m in PAPER:
      ax.hlines(100 * PAPER[m], i - 0.35, i + 0.35, color="#d62728", lw=2.5, zorder=4,
                label="paper" if m == next(x for x in models if x in PAPER) else None)
  ax.axhline(100 * PAPER_HUMAN, color="gray", ls="--", lw=1, label="paper: human expert")
  ax.set_xticks(range(len(models)), [DESCRIPTIONS.get(m, m).split(" (")[0] for m in models], fontsize=8)
  ax.set(ylabel="test accuracy (%)", ylim=(0, 100), title="MNIST-1D baselines")
  ax.legend(fontsize=7, loc="lower right")
