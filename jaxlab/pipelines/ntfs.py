"""Pipeline `ntfs`: from scratch vs self-pretrained (SPT), S4D and Transformer, at a matched step budget.

"Never Train from Scratch" (Amos, Berant & Gupta, ICLR 2024). Stages per task x model x seed, `<task>/<model>/`:
`scratch/seed<s>` (labels only, pretrain_steps + finetune_steps at optimizer.lr), `spt_pretrain/seed<s>`
(`mask_denoise` or `causal_shift` on the training inputs, pretrain_steps at ntfs.pretrain_lr), `spt_finetune/seed<s>`
(from it through `drop_pretraining_head`, finetune_steps at ntfs.finetune_lr); S4D's A, dt, B at min(ntfs.ssm_lr,
the stage's lr) without weight decay. Claims per task, tested where some arm beats the majority class: SPT helps
both models, the Transformer most, and narrows their gap. Writes results.json/md and ntfs.png.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxlab import build, checkpoint, configs, data, pipelines
from jaxlab.experiments import Experiment, Report, TrainStage, aggregate, lookup, majority_baseline, pm, summary_row
from jaxlab.models import s4d


def stages(exp: Experiment, task: str, model: str, seed: int, info: dict) -> list[TrainStage]:
  """The scratch, pretraining and fine-tuning stages of one task x model x seed."""
  n, base = exp.section, exp.base
  pre, ft = int(n.pretrain_steps), int(n.finetune_steps)
  if pre <= 0 or ft <= 0:
    raise ValueError(f"config.ntfs.pretrain_steps and finetune_steps must be positive, got {pre}, {ft}")
  if model not in n.model:
    raise ValueError(f"config.ntfs.model.{model}: no model config; have {sorted(n.model.keys())}")
  vocab, channels = int(info.get("vocab_size", 0)), int(info.get("input_channels", 1))
  denoise = n.objective == "denoise"
  m = {**n.model[model].to_dict(), "name": model, "vocab_size": vocab, "input_channels": channels,
       "causal": bool(n.model[model].get("causal", False)) or not denoise}  # the task's keys from the data set
  if model == "transformer_seq" and not m.get("max_len"):
    m["max_len"] = int(info["seq_len"])
  heads = {"classify": {"output": "classify", "mask_channel": False, "out_dim": 0},  # pretraining: per position
           "pretrain": {"output": "per_position", "mask_channel": not vocab and denoise,
                        "out_dim": vocab or (256 if n.pixel_loss == "ce" else channels)}}

  def stage(arm, steps, lr, **over):
    common = {"seed": seed, "total_steps": steps, "optimizer.lr": float(lr),
              "model": {**m, **heads["pretrain" if arm == "spt_pretrain" else "classify"]},
              "data": {**base.data.to_dict(), **n.data[task].to_dict()}}
    if model == "s4d_seq":
      rules, no_decay = s4d.optimizer_rules(float(lr), float(n.ssm_lr))
      common.update({"optimizer.lr_rules": rules + tuple(base.optimizer.lr_rules),
                     "optimizer.no_decay": tuple(base.optimizer.no_decay) + no_decay})
    return TrainStage(f"{task}/{model}/{arm}/seed{seed}", {**common, **over})

  loss = f"{'denoise' if denoise else 'causal'}_{'ce' if vocab or n.pixel_loss == 'ce' else 'l1'}"
  return [stage("scratch", pre + ft, base.optimizer.lr),
          stage("spt_pretrain", pre, n.pretrain_lr, **{
              "objective.prepare": "mask_denoise" if denoise else "causal_shift", "objective.weights": {loss: 1.0},
              "objective.mask_rate": float(n.mask_rate[task]), "objective.mask_id": vocab or -1,
              "objective.pad_id": int(info.get("pad_id", -1)), "objective.eval": "per_position",
              "objective.eval_prepare": True}),
          stage("spt_finetune", ft, n.finetune_lr, **{
              "init_from.path": exp.path(f"{task}/{model}/spt_pretrain/seed{seed}"),
              "init_from.transform": "drop_pretraining_head", "init_from.args": {"seed": seed},
              "init_from.dont_load": ("decoder/.*",)})]


@pipelines.register("ntfs")
def run(config, workdir: str) -> dict:
  """Runs every stage, then writes results.json, results.md and ntfs.png into `workdir`."""
  exp = Experiment(config, workdir, section="ntfs")
  n = exp.section
  if n.objective not in ("denoise", "causal") or n.pixel_loss not in ("l1", "ce"):
    raise ValueError(f"config.ntfs.objective must be 'denoise' or 'causal' and pixel_loss 'l1' or 'ce', got "
                     f"{n.objective!r}, {n.pixel_loss!r}")
  tasks, models = configs.as_tuple(n.tasks), configs.as_tuple(n.models)
  for t in tasks:
    if t not in n.data or t not in n.mask_rate:
      raise ValueError(f"config.ntfs.tasks: task {t!r} needs config.ntfs.data.{t} and config.ntfs.mask_rate.{t}")
  sets = {t: data.get_dataset(n.data[t]) for t in tasks}
  todo = [st for t in tasks for m in models for seed in configs.as_tuple(n.seeds, int)
          for st in stages(exp, t, m, seed, sets[t].info)]  # every stage checked before anything trains
  rep = Report(exp, "Never Train from Scratch: self-pretraining at a matched budget")
  for scratch, pre, ft in zip(todo[0::3], todo[1::3], todo[2::3]):
    (task, model, _, _), seed = scratch.name.split("/"), scratch.overrides["seed"]
    s, p, f = (exp.run(st) for st in (scratch, pre, ft))
    init = scratch.overrides["model"].get("init", "-")
    masked = {f"masked_{k}": p["metrics"]["test"].get(k) for k in ("accuracy", "loss", "mae")}  # pretraining quality
    for arm, summ, steps, more in (("none", s, s["steps"], {}), (n.objective, f, p["steps"] + f["steps"], masked)):
      rep.rows.append(summary_row(f"{task}/{model}/{'scratch' if arm == 'none' else 'spt'}/seed{seed}", summ, seed,
                                  task=task, model=model, init=init, pretraining=arm, steps=int(steps),
                                  wall_s=summ["wall_s"] + (p["wall_s"] if more else 0), **more))
  table = aggregate(rep.rows, by=("task", "model", "pretraining"))
  majority = {t: majority_baseline(ds.splits["test"].arrays["label"])["accuracy"] for t, ds in sets.items()}
  b = exp.base
  rep.text(f"Budget per model: {n.pretrain_steps + n.finetune_steps} steps (SPT: {n.pretrain_steps} pretraining "
           f"at lr {n.pretrain_lr} + {n.finetune_steps} fine-tuning at lr {n.finetune_lr}; scratch: all on labels at "
           f"lr {b.optimizer.lr}), batch {b.data.batch_size}, {b.optimizer.name} (wd {b.optimizer.weight_decay}); "
           f"S4D's SSM params lr min({n.ssm_lr}, the stage's lr), no weight decay. Objective: {n.objective}"
           + (f" (mask rates {n.mask_rate.to_dict()}; pixel loss {n.pixel_loss})" if n.objective == "denoise" else "")
           + f". Training wall time {sum(r['wall_s'] for r in rep.rows) / 60:.1f} min (sum over stages).")

  def arms(t, m):
    a, c = (lookup(table, task=t, model=m, pretraining=x) for x in ("none", n.objective))
    gain = f"{100 * (c['mean'] - a['mean']):+.1f}" if a and c else "-"
    return (t, m, f"{100 * majority[t]:.1f}", pm(a), pm(c), gain)

  rep.table(("task", "model", "majority class (%)", "from scratch (%)", f"SPT {n.objective} + fine-tune (%)",
             "gain"), [arms(t, m) for t in tasks for m in models], caption="Test accuracy")
  acc, mae = (aggregate(rep.rows, ("task", "model"), v) for v in ("masked_accuracy", "masked_mae"))
  rep.table(("task", "model", "masked accuracy (%)", "masked MAE"),
            [(t, m, pm(lookup(acc, task=t, model=m)), pm(lookup(mae, task=t, model=m), 1, 4))
             for t in tasks for m in models], caption="Pretraining quality on the test split's masked positions")
  claims(rep, table, n.objective, majority)
  if n.plot:
    rep.figure("ntfs.png", lambda axes: _plot(axes, exp, table, tasks, models), ncols=1 + len(tasks), size=(4.5, 3.8))
  res = rep.write()
  return {"workdir": exp.workdir, "runs": len(rep.rows), "verdicts": [c["verdict"] for c in res["claims"]]}


def claims(rep: Report, table: list[dict], objective: str, majority: dict) -> None:
  """The paper's claims per task with both models, tested only where some arm learned (beats the majority)."""
  for task in dict.fromkeys(g["task"] for g in table):
    get = {(m, a): lookup(table, task=task, model=m, pretraining=a) for m in ("s4d_seq", "transformer_seq")
           for a in ("none", objective)}
    if not all(get.values()):
      continue
    best = max(g["mean"] for g in get.values())
    learned = rep.precondition(f"{task}: best arm's test accuracy minus the majority class's (2 points)",
                               best - majority[task], 0.02)
    gain = {m: get[(m, objective)]["mean"] - get[(m, "none")]["mean"] for m in ("s4d_seq", "transformer_seq")}
    gap = [get[("s4d_seq", a)]["mean"] - get[("transformer_seq", a)]["mean"] for a in ("none", objective)]
    ev = f"SPT minus scratch: Transformer {100 * gain['transformer_seq']:+.1f}, S4D {100 * gain['s4d_seq']:+.1f} points"
    rep.claim(f"{task}: self-pretraining raises test accuracy of both models", min(gain.values()) > 0, ev,
              requires=[learned])
    rep.claim(f"{task}: the Transformer gains more from self-pretraining than S4D",
              gain["transformer_seq"] > gain["s4d_seq"], ev, requires=[learned])
    rep.claim(f"{task}: self-pretraining narrows the S4D-Transformer gap", abs(gap[1]) < abs(gap[0]),
              f"S4D minus Transformer: {100 * gap[0]:+.1f} points from scratch, {100 * gap[1]:+.1f} with SPT",
              requires=[learned])


def kernels(exp: Experiment, task: str, seed: int) -> dict[str, np.ndarray] | None:
  """Mean |K_l| over channels of the first S4D layer: at init, after scratch training, after SPT."""
  try:
    loaded = {k: checkpoint.load(exp.path(f"{task}/s4d_seq/{arm}/seed{seed}"))
              for k, arm in (("after scratch training", "scratch"), ("after self-pretraining", "spt_pretrain"))}
  except checkpoint.CheckpointError:
    return None
  meta = loaded["after scratch training"].meta
  shape, disc = tuple(meta["data"]["input_shape"]), meta["model"].get("disc", "zoh")
  module = build.model(meta["model"], meta["data"]["num_classes"])
  rng = jax.random.split(jax.random.key(seed), 3)[0]  # the training loop's init key
  params = {"at init": build.init_variables(module, rng, shape, meta["data"]["input_dtype"])["params"],
            **{k: ld.params for k, ld in loaded.items()}}
  return {k: np.abs(np.asarray(s4d.ssm_kernel(s4d.layer_params_at(p, 0), shape[0], disc))[0]).mean(0)
          for k, p in params.items()}


def _plot(axes, exp: Experiment, table: list[dict], tasks, models) -> None:
  objective, seed = exp.section.objective, configs.as_tuple(exp.section.seeds, int)[0]
  width = 0.8 / (2 * len(models))
  for k, (model, arm) in enumerate((m, a) for m in models for a in ("none", objective)):
    got = [lookup(table, task=t, model=model, pretraining=arm) or {"mean": 0.0, "std": 0.0} for t in tasks]
    axes[0].bar(np.arange(len(tasks)) + (k - len(models) + 0.5) * width, [100 * g["mean"] for g in got], width,
                yerr=[100 * g["std"] for g in got], label=f"{model} {'scratch' if arm == 'none' else 'SPT'}", capsize=2)
  axes[0].set_xticks(np.arange(len(tasks)), tasks)
  axes[0].set(ylabel="test accuracy (%)", title="accuracy by task (mean ± sample std over seeds)")
  axes[0].legend(fontsize=7)
  for ax, task in zip(axes[1:], tasks):
    for label, k in (kernels(exp, task, seed) or {}).items() if "s4d_seq" in models else ():
      ax.semilogy(np.maximum(k, 1e-8), label=label)
      ax.legend(fontsize=7)
    ax.set(title=f"{task}: S4D layer 1, mean |K_l|", xlabel="lag l")
