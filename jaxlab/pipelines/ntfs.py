"""Pipeline `ntfs` ("Never Train from Scratch", Amos et al. 2024): scratch vs self-pretrained (SPT) S4D and Transformer.

Stages `<task>/<model>/<arm>/seed<s>`: `scratch` (finetune_steps on labels), `spt_pretrain` (pretrain_steps of
`mask_denoise` / `causal_shift` on the training inputs), `spt_finetune` (from it, finetune_steps). Preconditions: equal
labelled steps; pretraining and some arm beat the trivial predictors. Claims: SPT helps both, the Transformer most."""

from __future__ import annotations

import numpy as np

from jaxlab import baselines, configs, data, pipelines
from jaxlab.experiments import Experiment, Report, TrainStage, aggregate, bars, lookup, pm, summary_row
from jaxlab.models import s4d


def stages(exp: Experiment, task: str, model: str, seed: int, info: dict) -> list[TrainStage]:
  """The scratch, pretraining and fine-tuning stages of one task x model x seed."""
  n, base = exp.section, exp.base
  pre, ft, denoise = int(n.pretrain_steps), int(n.finetune_steps), n.objective == "denoise"
  if pre <= 0 or ft <= 0 or model not in n.model:
    raise ValueError(f"config.ntfs: pretrain_steps and finetune_steps must be positive (got {pre}, {ft}) and "
                     f"model.{model} must exist (have {sorted(n.model.keys())})")
  vocab, channels = int(info.get("vocab_size", 0)), int(info.get("input_channels", 1))
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
  return [stage("scratch", ft, base.optimizer.lr),  # the labelled steps of the SPT arm (issue 13)
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
  tasks, models = configs.as_tuple(n.tasks), configs.as_tuple(n.models)
  if n.objective not in ("denoise", "causal") or n.pixel_loss not in ("l1", "ce") or any(
      t not in n.data or t not in n.mask_rate for t in tasks):
    raise ValueError(f"config.ntfs: objective must be 'denoise' or 'causal' (got {n.objective!r}), pixel_loss 'l1' "
                     f"or 'ce' (got {n.pixel_loss!r}); each of tasks {tasks} needs data.<task> and mask_rate.<task>")
  sets = {t: data.get_dataset(n.data[t]) for t in tasks}
  todo = [st for t in tasks for m in models for seed in configs.as_tuple(n.seeds, int)
          for st in stages(exp, t, m, seed, sets[t].info)]  # every stage checked before anything trains
  rep = Report(exp, "Never Train from Scratch: self-pretraining at a matched budget")
  for scratch, pre, ft in zip(todo[0::3], todo[1::3], todo[2::3]):
    (task, model, _, _), seed = scratch.name.split("/"), scratch.overrides["seed"]
    s, p, f = (exp.run(st) for st in (scratch, pre, ft))
    masked = {f"masked_{k}": p["metrics"]["test"].get(k) for k in ("accuracy", "loss", "mae")}  # pretraining quality
    for arm, summ, more, q in (("none", s, {}, {"steps": 0, "wall_s": 0}), (n.objective, f, masked, p)):
      rep.rows.append(summary_row(f"{task}/{model}/{'spt' if more else 'scratch'}/seed{seed}", summ, seed, task=task,
                                  model=model, init=scratch.overrides["model"].get("init", "-"), pretraining=arm,
                                  arm="SPT" if more else "scratch", labelled_steps=int(summ["steps"]), **more,
                                  steps=int(summ["steps"] + q["steps"]), wall_s=summ["wall_s"] + q["wall_s"]))
  table = aggregate(rep.rows, by=("task", "model", "pretraining"))
  trivial = {t: {r["method"]: r["accuracy"] for r in baselines.classification_baselines(ds, "test")}
             for t, ds in sets.items()}  # majority class of the test split; first token (fitted on train) for tokens
  rep.extra["pretraining_baselines"] = floor = {t: pretraining_baselines(ds, n.pixel_loss) for t, ds in sets.items()}
  b, mask = exp.base, f" (mask rates {n.mask_rate.to_dict()}, pixel loss {n.pixel_loss})" * (n.objective == "denoise")
  rep.text(f"Labelled steps per arm: {n.finetune_steps} (scratch: fresh init, lr {b.optimizer.lr}; SPT: after "
           f"{n.pretrain_steps} pretraining steps on the training inputs at lr {n.pretrain_lr}, lr {n.finetune_lr}), "
           f"batch {b.data.batch_size}, {b.optimizer.name} (wd {b.optimizer.weight_decay}); S4D's SSM params lr "
           f"min({n.ssm_lr}, the stage's lr), no weight decay. Objective: {n.objective}{mask}, one loss term (no "
           f"gradient ratios to report). Training wall time {sum(r['wall_s'] for r in rep.rows) / 60:.1f} min.")

  arms = [(t, m, *(lookup(table, task=t, model=m, pretraining=x) for x in ("none", n.objective))) for t in tasks
          for m in models]
  rep.table(("task", "model", "from scratch (%)", f"SPT {n.objective} + fine-tune (%)", "gain"), [
      (t, m, pm(a), pm(c), f"{100 * (c['mean'] - a['mean']):+.1f}" if a and c else "-") for t, m, a, c in arms]
            + [(t, f"*{k}*", f"{100 * v:.1f}", "-", "-") for t in tasks for k, v in trivial[t].items()],
            caption="Test accuracy at equal labelled steps, beside the trivial predictors (*italic*)")
  quality = {t: aggregate([r for r in rep.rows if r["task"] == t], "model", floor[t]["metric"]) for t in tasks}
  rep.table(("task", "model", "pretraining metric", "value", "trivial predictors"), [
      (t, g["model"], floor[t]["metric"], pm(g, *((100, 1) if "acc" in floor[t]["metric"] else (1, 4))),
       floor[t]["what"]) for t in tasks for g in quality[t]], caption="Pretraining, test split masked positions")
  claims(rep, table, n.objective, trivial, {t: [rep.precondition(  # a model without the metric fails (NaN)
      f"{t}/{m}: pretraining {floor[t]['metric']} {floor[t]['rule']}", (lookup(quality[t], model=m) or
      {"mean": np.nan})["mean"], floor[t]["threshold"], at_most=floor[t]["at_most"]) for m in models] + [
      rep.precondition(f"{t}: labelled steps, most minus fewest over both arms' runs", np.ptp(
          [r["labelled_steps"] for r in rep.rows if r["task"] == t]), 0, at_most=True)] for t in tasks})
  if n.plot:
    rep.figure("ntfs.png", lambda axes: _plot(np.atleast_1d(axes), rep.rows, trivial), ncols=len(tasks), size=(4.5, 4))
  res = rep.write()
  return {"workdir": exp.workdir, "runs": len(rep.rows), "verdicts": [c["verdict"] for c in res["claims"]]}


def pretraining_baselines(ds, pixel_loss: str) -> dict:
  """The bar pretraining must clear: unigram accuracy + 2 points (tokens, pixel CE) or 0.95 x the better of position
  mean / all-zero MAE, fitted on train, scored on every non-pad test position (the expectation over i.i.d. masks)."""
  te, tr = (np.asarray(ds.splits[k].arrays["inputs"]) for k in ("test", "train"))
  vocab, pad = int(ds.info.get("vocab_size", 0)), int(ds.info.get("pad_id", -1))
  if not vocab and pixel_loss == "l1":
    pos, zero = (f(te, np.ones(te.shape[:2]), **kw)["mae"] for f, kw in ((baselines.position_mean, {"fit_targets": tr}),
                                                                         (baselines.all_zero, {})))
    return {"metric": "masked_mae", "threshold": 0.95 * min(pos, zero), "at_most": True, "position_mean_mae": pos,
            "all_zero_mae": zero, "rule": "at most 0.95 x the better trivial predictor's", "what": f"position mean "
            f"MAE {pos:.4f}, all-zero MAE {zero:.4f}"}
  if not vocab:  # 256-way CE on grey levels: the tokens are the quantised values
    te, tr = (np.rint(x.reshape(len(x), -1) * 255).astype(np.int64) for x in (te, tr))
  real = lambda x: (x != pad) if pad >= 0 else np.ones(x.shape)  # noqa: E731  (pad is never masked)
  uni = baselines.unigram(te, real(te), fit_targets=tr, fit_mask=real(tr), vocab_size=vocab or 256)
  return {"metric": "masked_accuracy", "threshold": uni["accuracy"] + 0.02, "at_most": False, "unigram": uni,
          "rule": "at least the unigram predictor's + 2 points", "what": f"unigram (always token {uni['token']}) "
          f"accuracy {100 * uni['accuracy']:.1f}%, CE {uni['loss']:.3f}"}


def claims(rep: Report, table: list[dict], objective: str, trivial: dict, requires: dict) -> None:
  """The paper's claims per task, tested where `requires[task]` hold and some arm beats `trivial[task]` by 2 points."""
  for task in dict.fromkeys(g["task"] for g in table):
    get = {(m, a): lookup(table, task=task, model=m, pretraining=a) for m in ("s4d_seq", "transformer_seq")
           for a in ("none", objective)}
    if not all(get.values()):
      continue
    need = [rep.precondition(f"{task}: best arm's test accuracy minus the best trivial predictor's ("
                             f"{' / '.join(trivial[task])}; 2 points)", max(g["mean"] for g in get.values())
                             - max(trivial[task].values()), 0.02), *requires.get(task, ())]
    gain = {m: get[(m, objective)]["mean"] - get[(m, "none")]["mean"] for m in ("s4d_seq", "transformer_seq")}
    gap = [get[("s4d_seq", a)]["mean"] - get[("transformer_seq", a)]["mean"] for a in ("none", objective)]
    ev = f"SPT minus scratch: Transformer {100 * gain['transformer_seq']:+.1f}, S4D {100 * gain['s4d_seq']:+.1f} points"
    rep.claim(f"{task}: self-pretraining raises test accuracy of both models", min(gain.values()) > 0, ev, need)
    rep.claim(f"{task}: the Transformer gains more from self-pretraining than S4D",
              gain["transformer_seq"] > max(gain["s4d_seq"], 0), ev, need)  # losing less is no gain
    rep.claim(f"{task}: self-pretraining narrows the S4D-Transformer gap", abs(gap[1]) < abs(gap[0]),
              f"S4D minus Transformer: {100 * gap[0]:+.1f} points from scratch, {100 * gap[1]:+.1f} with SPT", need)


def _plot(axes, rows: list[dict], trivial: dict) -> None:
  """Per task: test accuracy of each model and arm (mean ± sample std over seeds), the trivial predictors dotted."""
  for ax, t in zip(axes, trivial):
    bars(ax, aggregate([r for r in rows if r["task"] == t], ("model", "arm")), "model", "arm", baselines=trivial[t])
    ax.set(ylabel="test accuracy (%)", title=f"{t} (mean ± sample std over seeds)")
    ax.legend(fontsize=7)
