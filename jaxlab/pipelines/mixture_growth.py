"""Pipeline `mixture_growth`: train two members, grow, train the grown net; baselines at matched budgets.

Stages per seed in `seed<s>/`: `member0`, `member1` (half-width template WRNs, member_steps each);
`grow_<rule>_init` (transform `grow_mixture` of the members) and `mg_<rule>` (grow_steps at grow_lr from it);
baselines `small` (half-width dense, 2 * member_steps), `net2net_init`/`net2net` (small widened by copying),
`random_growth_init`/`random_growth` (random new blocks), `large` (full width, MixtureGrowth's training FLOPs),
`large_long` (full width, as many steps). Training FLOPs = 6 * forward MACs (`wrn.forward_macs`) * examples,
summed over a model's ancestry. Precondition and claims: `claims`. Writes results.json/md, accuracy_vs_flops.png.
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
  """The half-width member of a full-width WRN config (stem and every stage halved); ValueError unless an even-stem
  WRN."""
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
  g = (exp := Experiment(config, workdir, section="mixture_growth")).section
  rules, baselines = configs.as_tuple(g.rules), configs.as_tuple(g.baselines)
  for key, got, known in (("rules", rules, RULES), ("baselines", baselines, BASELINES)):
    if set(got) - set(known):
      raise ValueError(f"config.mixture_growth.{key}: unknown {sorted(set(got) - set(known))}; use {known}")
  half, ds = member_model(full := exp.base.model.to_dict()), data.get_dataset(exp.base.data)
  bs, ms, gs = int(exp.base.data.batch_size), int(g.member_steps), int(g.grow_steps)
  flops = lambda m, s: train_flops(m, s, bs, ds.num_classes, ds.input_shape)  # noqa: E731
  f_members, f_grown = 2 * flops(half, ms), 2 * flops(half, ms) + flops(full, gs)
  large_steps = max(1, round(f_grown / flops(full, 1)))
  rep = Report(exp, f"MixtureGrowth on {exp.base.data.name}")

  def row(name, method, summary, seed, fl, steps, at_growth=None):
    rep.rows.append(summary_row(name, summary, seed, method=method, trainable=int(summary["trainable"]),
                                flops=float(fl), train_steps=int(steps), acc_at_growth=at_growth))

  def train(sd, name, seed, model, steps, **over):
    return exp.run(TrainStage(f"{sd}/{name}", {"seed": seed, "model": model, "total_steps": steps, **over}))

  def grow(sd, seed, name, init, transform, inputs, args):
    """The transform stage `init`, then stage `name`: grow_steps at grow_lr from it; (summary, test acc at init)."""
    meta = checkpoint.load_meta(init := exp.run(TransformStage(f"{sd}/{init}", transform, inputs, args))["workdir"])
    summary = train(sd, name, seed, meta["model"], gs, **{
        "parameterization": meta.get("parameterization", {"name": "identity"}), "optimizer.lr": float(g.grow_lr),
        "optimizer.warmup_steps": int(g.grow_warmup), "init_from.path": init})
    return summary, evaluate.evaluate_checkpoint(init, "test")["accuracy"]

  for seed, sd in ((s, f"seed{s}") for s in configs.as_tuple(g.seeds, int)):
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
        ens = {k: sum(m[k] for m in members) for k in ("params", "trainable")} | {"test_accuracy": at}
        row("ensemble", "ensemble of members (sum of logits)", ens, seed, f_members, 2 * ms)
      row(f"mg_{rule}", f"MixtureGrowth ({rule})", s, seed, f_grown, 2 * ms + gs, at)
    if "random_growth" in baselines:
      s, at = grow(sd, seed, "random_growth", "random_growth_init", "grow_random", paths, {"seed": seed})
      row("random_growth", "growth, random new blocks", s, seed, f_grown, 2 * ms + gs, at)
    if "small" in baselines or "net2net" in baselines:
      row("small", "small from scratch", small := train(sd, "small", seed, half, 2 * ms), seed, f_members, 2 * ms)
      if "net2net" in baselines:
        s, at = grow(sd, seed, "net2net", "net2net_init", "grow_net2net", [small["workdir"]],
                     {"noise": float(g.net2net_noise), "seed": seed})
        row("net2net", "growth by copying (Net2Net)", s, seed, f_grown, 2 * ms + gs, at)
    for name, steps, what in (("large", large_steps, "same FLOPs"), ("large_long", 2 * ms + gs, "same steps")):
      if name in baselines:
        row(name, f"large from scratch ({what})", train(sd, name, seed, full, steps), seed, flops(full, steps), steps)

  agg = rep.extra["aggregate"] = aggregate(rep.rows, ROW_KEYS[:6])  # sizes, FLOPs, steps: the same for every seed
  at = aggregate(rep.rows, "name", "acc_at_growth")  # rows without a value (not grown) are left out
  for a in agg:
    a["at_growth"] = (lookup(at, name=a["name"]) or {}).get("mean")
  macs = {k: wrn.forward_macs(m, ds.num_classes, ds.input_shape) for k, m in (("m", half), ("f", full))}
  base = rep.baseline("test")
  rep.text(f"Members: WRN {half}; full: {full}; {g.num_templates} templates per set; {ms} steps per member, grown "
           f"nets {gs} ({gs / ms:g}x; official CIFAR recipe: 40 epochs after 200 per member, 0.2x) at lr {g.grow_lr} "
           f"(base {exp.base.optimizer.lr}), batch {bs}. Forward MACs per example: member {macs['m']:,}, full "
           f"{macs['f']:,}; training FLOPs = 6 x MACs x examples over a model's ancestry.")
  rep.table(("model", "method", "params", "trainable", "train FLOPs", "steps", "test acc (%)", "n",
             "acc at growth (%)"),
            [(a["name"], a["method"], f"{a['params']:,}", f"{a['trainable']:,}", f"{a['flops']:.3g}",
              a["train_steps"], pm(a), a["n"], "" if a["at_growth"] is None else f"{100 * a['at_growth']:.1f}")
             for a in agg] + [("majority", "majority class", 0, 0, 0, 0, f"{100 * base['accuracy']:.1f}", "", "")],
            caption="Test accuracy; majority: the most frequent class of the test split")
  claims(rep, agg, float(g.min_gap))
  rep.figure("accuracy_vs_flops.png", lambda ax: _plot(ax, agg), size=(7, 4.5))
  res = rep.write()
  return {"workdir": exp.workdir, "results": f"{exp.workdir}/results.json", "verdicts": [c["verdict"] for c in
                                                                                       res["claims"]]}


def claims(rep: Report, agg: list[dict], min_gap: float) -> None:
  """Precondition: full width beats half width at the budget. Claims: MixtureGrowth (orthogonal) beats each
  baseline by more than the larger seed std; the large net trained as long is not better than it."""
  mg, small, large, long_ = (lookup(agg, name=n) for n in ("mg_orthogonal", "small", "large", "large_long"))
  pre = [rep.precondition(f"the full-width net ({large['train_steps']} steps) beats the half-width net "
                          f"({small['train_steps']} steps) by at least {100 * min_gap:g} points (test accuracy)",
                          large["mean"] - small["mean"], min_gap)] if small and large else []
  for name, what in (("random_growth", "growth with random new blocks"), ("net2net", "growth by copying (Net2Net)"),
                     ("large", "the large network from scratch at the same training FLOPs")):
    if mg and (other := lookup(agg, name=name)):
      d, noise = mg["mean"] - other["mean"], max(mg["std"], other["std"])
      rep.claim(f"MixtureGrowth beats {what}", d > noise, f"{pm(mg)} vs {pm(other)} (difference {100 * d:+.2f} "
                f"points, larger std {100 * noise:.2f})", requires=pre)
  if mg and long_:
    d, noise = long_["mean"] - mg["mean"], max(mg["std"], long_["std"])
    rep.claim("MixtureGrowth is comparable to the large network trained from scratch as many steps, with fewer "
              "FLOPs", d <= noise, f"{pm(mg)} vs {pm(long_)} ({100 * d:+.2f} points behind, larger std "
              f"{100 * noise:.2f}), {mg['flops'] / long_['flops']:.2f}x its training FLOPs", requires=pre)
  if rules := [a for a in agg if a["name"].startswith("mg_")]:
    rep.text("- Coefficient rule ablation: " + ", ".join(f"{a['name'][3:]} {pm(a)}" for a in rules)
             + f"; best: {max(rules, key=lambda a: a['mean'])['name'][3:]}.")


def _plot(ax, agg: list[dict]) -> None:
  """Test accuracy (mean ± sample std over seeds) against training FLOPs, one marker per model."""
  for a in agg:
    ax.errorbar(a["flops"], 100 * a["mean"], yerr=100 * a["std"], capsize=3, label=a["name"],
                fmt="*" if a["name"].startswith("mg_") else ("s" if a["name"].startswith("large") else "o"))
  ax.set(xscale="log", xlabel="training FLOPs (analytic, incl. members)", ylabel="test accuracy (%)")
  ax.legend(fontsize=7, ncol=2)
