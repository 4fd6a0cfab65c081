"""Pipeline `s4d`: S4D-Lin / Inv / LegS with ZOH and bilinear discretization on the sequence tasks.

Stages: one training run `<task>/<init>_<disc>/seed<k>` per task x init x disc x seed (every disc on the tasks in
`s4d.disc_tasks`, the first elsewhere). The SSM parameters (A, dt, B) train at `s4d.ssm_lr` (capped at
`optimizer.lr`) without weight decay (`jaxlab.models.s4d.optimizer_rules`); token tasks pool over the true length
(the model's default `pool_pad_id`). Claims (S4D paper): Inv and LegS perform alike; ZOH vs bilinear makes little
difference; each only tested on a task some variant learned (beats the best trivial predictor of the test split,
the majority class and for token tasks the first-token predictor of `jaxlab.baselines`, by 2 points). Writes
results.json/md, accuracy.png and kernels.png (layer-0 kernels of seed 0 at init and after training).
"""

from __future__ import annotations

import jax
import numpy as np

from jaxlab import baselines, build, checkpoint, configs, data, pipelines
from jaxlab.experiments import Experiment, Report, TrainStage, aggregate, bars, lookup, pm, summary_row
from jaxlab.models import s4d as s4d_lib


def stages(exp: Experiment, infos: dict) -> list[TrainStage]:
  """Every (task, init, disc, seed) run: the task's data, its token/channel counts and the SSM rule."""
  s, base = exp.section, exp.base
  rules, no_decay = s4d_lib.optimizer_rules(float(base.optimizer.lr), float(s.ssm_lr))
  out = []
  for task in s.tasks:
    for init in s.inits:
      for disc in s.discs if task in s.disc_tasks else s.discs[:1]:
        for seed in s.seeds:
          out.append(TrainStage(f"{task}/{init}_{disc}/seed{seed}", {
              "seed": seed, "data": {**base.data.to_dict(), **s.data[task].to_dict()},
              "model.init": init, "model.disc": disc, "model.vocab_size": int(infos[task].get("vocab_size", 0)),
              "model.input_channels": int(infos[task].get("input_channels", 1)),
              "optimizer.lr_rules": rules + tuple(base.optimizer.lr_rules),
              "optimizer.no_decay": tuple(base.optimizer.no_decay) + no_decay}))
  return out


@pipelines.register("s4d")
def run(config, workdir: str) -> dict:
  """Trains every stage of `config.s4d`, then reports.

  Raises:
    ValueError: a task without a data config (`s4d.data.<task>`), or an init/disc the layer does not know.
  """
  exp = Experiment(config, workdir, section="s4d")
  s = exp.section
  for key, kind in dict(tasks=str, inits=str, discs=str, disc_tasks=str, seeds=int).items():
    s[key] = configs.as_tuple(s[key], kind)
  checks = (("tasks", s.tasks, s.data), ("inits", s.inits, s4d_lib.INITS), ("discs", s.discs, s4d_lib.DISCS))
  for key, got, known in checks:
    if set(got) - set(known):  # before anything trains
      raise ValueError(f"config.s4d.{key}: unknown {sorted(set(got) - set(known))}; choose from {sorted(known)}")
  sets = {task: data.get_dataset(s.data[task]) for task in s.tasks}
  todo = stages(exp, {t: ds.info for t, ds in sets.items()})
  rep = Report(exp, "S4D: initialisations and discretizations on the built-in sequence tasks")
  for st in todo:
    summ, (task, variant, _) = exp.run(st), st.name.split("/")
    init, disc = variant.split("_")
    rep.rows.append(summary_row(variant, summ, st.overrides["seed"], task=task, model="s4d_seq", init=init,
                                disc=disc, pretraining="none", steps=summ.get("steps")))
  table = aggregate(rep.rows, by=("task", "init", "disc"))
  trivial = {t: {r["method"]: r["accuracy"] for r in baselines.classification_baselines(ds, "test")}
             for t, ds in sets.items()}  # majority class of the test split; first token (fitted on train) for tokens
  m, b = exp.base.model, exp.base
  rep.text(f"Model `s4d_seq`, d_model {m.d_model}, {m.n_layers} layers, d_state {m.d_state}, "
           f"{'causal' if m.causal else 'bidirectional'}, {'pre' if m.prenorm else 'post'}-{m.norm} norm, "
           f"{m.pool} pooling (token tasks: over the true length); {b.total_steps} steps of batch {b.data.batch_size}, "
           f"{b.optimizer.name} lr {b.optimizer.lr} (wd {b.optimizer.weight_decay}), SSM params (A, dt, B) lr "
           f"{min(float(s.ssm_lr), float(b.optimizer.lr))} (`s4d.ssm_lr`, capped at the lr) without weight decay. "
           "Tasks: " + "; ".join(f"{t} (length {sets[t].input_shape[0]}, {sets[t].num_examples()} train, "
                                 f"{sets[t].num_examples('test')} test)" for t in s.tasks) + ".")
  rep.table(("task", "init", "disc", "test accuracy (%)", "runs"), [(g["task"], g["init"], g["disc"], pm(g), g["n"])
            for g in table] + [(t, f"*{k}*", "-", f"{100 * v:.1f}", "-") for t in s.tasks for k, v in
                               trivial[t].items()], caption="Test accuracy, beside the trivial predictors (*italic*)")
  claims(rep, table, trivial, s)
  if s.plot:
    rep.figure("accuracy.png", lambda ax: _bars(ax, rep.rows), size=(2.5 + 2.2 * len(s.tasks), 3.6))
    if s.kernel_task in s.tasks:
      rep.figure("kernels.png", lambda ax: _kernels(ax.figure, exp, todo, sets[s.kernel_task]))
  res = rep.write()
  return {"workdir": exp.workdir, "runs": len(rep.rows), "verdicts": [c["verdict"] for c in res["claims"]],
          **{f"{g['task']}/{g['init']}_{g['disc']}": g["mean"] for g in table}}


def claims(rep: Report, table: list[dict], trivial: dict, s) -> None:
  """Per task: it was learned (precondition); Inv ~ LegS; bilinear ~ ZOH for every init (within two seed std)."""
  for task in dict.fromkeys(g["task"] for g in table):
    groups = [g for g in table if g["task"] == task]
    best = max(groups, key=lambda g: g["mean"])
    learned = rep.precondition(f"{task}: best variant's test accuracy minus the best trivial predictor's "
                               f"({' / '.join(trivial[task])}; 2 points)", best["mean"] - max(trivial[task].values()),
                               0.02)

    def close(a, b):  # None (not tested) without two seeds: no noise estimate
      gap, noise = abs(a["mean"] - b["mean"]), 2 * max(a["std"], b["std"])
      return (None if min(a["n"], b["n"]) < 2 else gap <= noise), f"{100 * gap:.1f} vs {100 * noise:.1f} points"

    inv, legs = lookup(groups, init="inv", disc=s.discs[0]), lookup(groups, init="legs", disc=s.discs[0])
    if inv and legs:
      holds, ev = close(inv, legs)
      rep.claim(f"S4D-Inv and S4D-LegS perform alike on {task}", holds,
                f"|Inv - LegS| vs two seed std: {ev}", requires=[learned])
    pairs = [(i, lookup(groups, init=i, disc="zoh"), lookup(groups, init=i, disc="bilinear")) for i in s.inits]
    pairs = [(i, close(z, b)) for i, z, b in pairs if z and b]
    if pairs:
      holds = None if any(h is None for _, (h, _) in pairs) else all(h for _, (h, _) in pairs)
      rep.claim(f"ZOH vs bilinear makes little difference on {task}", holds,
                "|bilinear - ZOH| vs two seed std: " + "; ".join(f"{i} {ev}" for i, (_, ev) in pairs),
                requires=[learned])


def _bars(ax, rows: list[dict]) -> None:
  bars(ax, aggregate(rows, by=("task", "name")), x="task", series="name")
  ax.set(ylabel="test accuracy (%)", title="S4D init / discretization\n(mean ± sample std over seeds)")
  ax.legend(fontsize=7, ncol=2)


_kernel = jax.jit(s4d_lib.ssm_kernel, static_argnums=(1, 2))


def _kernels(fig, exp: Experiment, todo: list[TrainStage], ds) -> None:
  """Layer-0 kernels (first channels) of each init's first kernel_task stage, at init and after training."""
  s = exp.section
  firsts = {i: next(st for st in todo if st.name.startswith(f"{s.kernel_task}/{i}_")) for i in s.inits}
  fig.clear()  # one row per init
  fig.set_size_inches(8, 1.9 * len(firsts))
  for row, (init, st) in zip(fig.subplots(len(firsts), 2, squeeze=False), firsts.items()):
    c = exp.derive(**st.overrides)
    module = build.model(c.model, ds.num_classes)
    rng = jax.random.split(jax.random.key(int(c.seed)), 3)[0]  # the training loop's init key
    before = build.init_variables(module, rng, ds.input_shape, ds.input_dtype)["params"]
    for ax, params, label in zip(row, (before, checkpoint.load(exp.path(st.name)).params), ("at init", "trained")):
      k = np.asarray(_kernel(s4d_lib.layer_params_at(params, 0), ds.input_shape[0], c.model.disc))[0]
      for ch in range(min(int(s.kernel_channels), k.shape[0])):
        ax.plot(k[ch], lw=0.9)
      ax.set_title(f"S4D-{init} ({c.model.disc}), layer 0, {label}", fontsize=8)
      ax.set_xlabel(f"lag l ({s.kernel_task})", fontsize=8)
