"""Pipeline `mixture_growth`: train two members, grow, train the grown net; baselines at matched budgets.

Stages per seed in `seed<s>/`: `member0`, `member1` (half-width template WRNs, member_steps each);
`grow_<rule>_init` (transform `grow_mixture` of the members) and `mg_<rule>` (grow_steps at grow_lr from it);
baselines `small` (half-width dense, 2 * member_steps), `net2net_init`/`net2net` (small widened by copying),
`random_growth_init`/`random_growth` (random new blocks), `large` (full width, MixtureGrowth's training FLOPs),
`large_long` (full width, as many steps). Training FLOPs = 6 * forward MACs (`wrn.forward_macs`) * examples,
summed over a model's ancestry. Claims: MixtureGrowth (orthogonal) beats random growth, Net2Net and the large
net at equal FLOPs by more than the larger seed std. Writes results.json/md and accuracy_vs_flops.png.
"""

from __future__ import annotations

from jaxlab import checkpoint, configs, data, evaluate, pipelines
from jaxlab.experiments import Experiment, Report, TrainStage, TransformStage, aggregate, lookup, pm, summary_row
from jaxlab.models import wrn

ROW_KEYS = ("name", "method", "params", "trainable", "flops", "train_steps", "seed", "test_acc", "val_acc",
            "acc_at_growth")
RULES = ("orthogonal", "copy", "zero", "random")
BASELINES = ("small", "net2net", "random_growth", "large", "large_long")


def member_model(model_cfg: dict) -> dict:
  """The half-width member of a full-width WRN config (stem and every stage halved).

  Raises:
    ValueError: when the stem width is odd or the model is not a WRN.
  """
  if model_cfg.get("name") != "wrn":
    raise ValueError(f"config.model.name={model_cfg.get('name')!r}: the mixture_growth pipeline needs 'wrn'")
  stem = int(model_cfg.get("stem_width", 16))
  if stem % 2:
    raise ValueError(f"config.model.stem_width={stem}: must be even (members use half of it)")
  out = {**model_cfg, "stem_width": stem // 2, "widen_factor": float(model_cfg.get("widen_factor", 2.0)) / 2}
  wrn.stage_widths(out["stem_width"], out["widen_factor"])  # raises for fractional member widths
  return out


def train_flops(model_cfg: dict, steps: int, batch_size: int, num_classes: int, input_shape) -> float:
  """Training FLOPs: 3 passes (forward + backward) * 2 FLOPs per MAC * MACs * examples."""
  return 6.0 * wrn.forward_macs(model_cfg, num_classes, tuple(input_shape)) * batch_size * steps


@pipelines.register("mixture_growth")
def run(config, workdir: str) -> dict:
  """Runs the whole experiment for every seed and writes results.json, results.md and the plot."""
  exp = Experiment(config, workdir, section="mixture_growth")
  g = exp.section
  rules, baselines = configs.as_tuple(g.rules), configs.as_tuple(g.baselines)
  for key, got, known in (("rules", rules, RULES), ("baselines", baselines, BASELINES)):
    if set(got) - set(known):
      raise ValueError(f"config.mixture_growth.{key}: unknown {sorted(set(got) - set(known))}; use {known}")
  full = exp.base.model.to_dict()
  half, ds = member_model(full), data.get_dataset(exp.base.data)
  bs, ms, gs = int(exp.base.data.batch_size), int(g.member_steps), int(g.grow_steps)
  flops = lambda m, s: train_flops(m, s, bs, ds.num_classes, ds.input_shape)  # noqa: E731
  f_members = 2 * flops(half, ms)
  f_grown = f_members + flops(full, gs)
  large_steps = max(1, round(f_grown / flops(full, 1)))
  rep = Report(exp, "MixtureGrowth on the 8x8 digits")

  def row(name, method, summary, seed, fl, steps, at_growth=None):
    rep.rows.append(summary_row(name, summary, seed, method=method, trainable=int(summary["trainable"]),
                                flops=float(fl), train_steps=int(steps), acc_at_growth=at_growth))

  def train(sd, name, seed, model, steps, **over):
    return exp.run(TrainStage(f"{sd}/{name}", {"seed": seed, "model": model, "total_steps": steps, **over}))

  def grow(sd, seed, name, init, transform, inputs, args):
    """The transform stage `init`, then stage `name`: grow_steps at grow_lr from it; (summary, test acc at init)."""
    init = exp.run(TransformStage(f"{sd}/{init}", transform, inputs, args))["workdir"]
    meta = checkpoint.load_meta(init)
    summary = train(sd, name, seed, meta["model"], gs, **{
        "parameterization": meta.get("parameterization", {"name": "identity"}), "optimizer.lr": float(g.grow_lr),
        "optimizer.warmup_steps": int(g.grow_warmup), "init_from.path": init})
    return summary, evaluate.evaluate_checkpoint(init, "test")["accuracy"]

  for seed in configs.as_tuple(g.seeds, int):
    sd = f"seed{seed}"
    members = [train(sd, f"member{k}", seed + 1000 * k, half, ms, parameterization={
        "name": "template_mixing", "num_templates": int(g.num_templates), "member": k, "coef_seed": seed})
        for k in (0, 1)]
    for k, m in enumerate(members):
      row(f"member{k}", f"small (member {k})", m, seed, flops(half, ms), ms)
    paths = [m["workdir"] for m in members]
    for rule in rules:
      args = {"coefficients": rule, "noise": float(g.grow_noise), "seed": seed}
      s, at = grow(sd, seed, f"mg_{rule}", f"grow_{rule}_init", "grow_mixture", paths, args)
      if rule == "zero":  # zero coefficients: the grown net starts as the members' logit ensemble
        ens = {"params": sum(m["params"] for m in members), "trainable": sum(m["trainable"] for m in members),
               "test_accuracy": at}
        row("ensemble", "ensemble of members (sum of logits)", ens, seed, f_members, 2 * ms)
      row(f"mg_{rule}", f"MixtureGrowth ({rule})", s, seed, f_grown, 2 * ms + gs, at)
    if "random_growth" in baselines:
      s, at = grow(sd, seed, "random_growth", "random_growth_init", "grow_random", paths, {"seed": seed})
      row("random_growth", "growth, random new blocks", s, seed, f_grown, 2 * ms + gs, at)
    if "small" in baselines or "net2net" in baselines:
      small = train(sd, "small", seed, half, 2 * ms)
      row("small", "small from scratch", small, seed, f_members, 2 * ms)
      if "net2net" in baselines:
        args = {"noise": float(g.net2net_noise), "seed": seed}
        s, at = grow(sd, seed, "net2net", "net2net_init", "grow_net2net", [small["workdir"]], args)
        row("net2net", "growth by copying (Net2Net)", s, seed, f_grown, 2 * ms + gs, at)
    for name, steps, what in (("large", large_steps, "same FLOPs"), ("large_long", 2 * ms + gs, "same steps")):
      if name in baselines:
        row(name, f"large from scratch ({what})", train(sd, name, seed, full, steps), seed, flops(full, steps), steps)

  # sizes, FLOPs and steps are the same for every seed of a model: group by them too
  agg = rep.extra["aggregate"] = aggregate(rep.rows, ("name", "method", "params", "trainable", "flops", "train_steps"))
  at = aggregate(rep.rows, "name", "acc_at_growth")
  for a in agg:
    a["at_growth"] = (lookup(at, name=a["name"]) or {}).get("mean")
  macs = {k: wrn.forward_macs(m, ds.num_classes, ds.input_shape) for k, m in (("member", half), ("full", full))}
  rep.text(f"Members: WRN {half}; full: {full}; {g.num_templates} templates per set; member steps {ms} each, grown "
           f"steps {gs} at lr {g.grow_lr} (base lr {exp.base.optimizer.lr}), batch {bs}. Forward MACs per example: "
           f"member {macs['member']:,}, full {macs['full']:,}. Training FLOPs = 6 x MACs x examples, summed over a "
           "model's ancestry.")
  rep.table(("model", "method", "params", "trainable", "train FLOPs", "steps", "test acc (%)", "n",
             "acc at growth (%)"),
            [(a["name"], a["method"], f"{a['params']:,}", f"{a['trainable']:,}", f"{a['flops']:.3g}",
              a["train_steps"], pm(a, 100, 2), a["n"], "" if a["at_growth"] is None else f"{100 * a['at_growth']:.2f}")
             for a in agg], caption="Test accuracy")
  claims(rep, agg)
  rep.figure("accuracy_vs_flops.png", lambda ax: _plot(ax, agg), size=(7, 4.5))
  res = rep.write()
  return {"workdir": exp.workdir, "rows": len(rep.rows), "results": f"{exp.workdir}/results.json",
          "verdicts": [c["verdict"] for c in res["claims"]]}


def claims(rep: Report, agg: list[dict]) -> None:
  """MixtureGrowth (orthogonal) against each baseline: beats it by more than the larger seed std."""
  mg = lookup(agg, name="mg_orthogonal")
  for name, what in (("random_growth", "growth with random new blocks"), ("net2net", "growth by copying (Net2Net)"),
                     ("large", "the large network from scratch at the same training FLOPs")):
    other = lookup(agg, name=name)
    if mg and other:
      d, noise = mg["mean"] - other["mean"], max(mg["std"], other["std"])
      rep.claim(f"MixtureGrowth beats {what}", d > noise, f"{pm(mg, 100, 2)} vs {pm(other, 100, 2)} (difference "
                f"{100 * d:+.2f} points, larger std {100 * noise:.2f})")
  long_, rules = lookup(agg, name="large_long"), [a for a in agg if a["name"].startswith("mg_")]
  if mg and long_:
    rep.text(f"- Against the large network trained as many steps: {pm(mg, 100, 2)} vs {pm(long_, 100, 2)}, with "
             f"{mg['flops'] / long_['flops']:.2f}x its training FLOPs.")
  if rules:
    rep.text("- Coefficient rule ablation: " + ", ".join(f"{a['name'][3:]} {pm(a, 100, 2)}" for a in rules)
             + f"; best: {max(rules, key=lambda a: a['mean'])['name'][3:]}.")


def _plot(ax, agg: list[dict]) -> None:
  """Test accuracy (mean ± sample std over seeds) against training FLOPs, one marker per model."""
  for a in agg:
    marker = "*" if a["name"].startswith("mg_") else ("s" if a["name"].startswith("large") else "o")
    ax.errorbar(a["flops"], a["mean"], yerr=a["std"], fmt=marker, capsize=3, markersize=9 if marker == "*" else 6,
                label=a["name"])
  ax.set(xscale="log", xlabel="training FLOPs (analytic, incl. members)", ylabel="test accuracy",
         title="MixtureGrowth vs baselines (digits 8x8)")
  ax.legend(fontsize=7, ncol=2)
