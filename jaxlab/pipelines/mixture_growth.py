"""The MixtureGrowth experiment: train two members, grow, train the grown net; baselines at matched budgets.

Per seed, in `<workdir>/seed<s>/` (each stage a sub-workdir, done stages skipped on re-run):

    member0, member1            half-width template WRNs (`template_mixing`, member 0 / 1), member_steps each
    grow_<rule>_init            grow_mixture(member0, member1, coefficients=<rule>)   (transform, no training)
    mg_<rule>                   the grown template WRN trained grow_steps at grow_lr
    small                       half-width dense WRN from scratch, 2 * member_steps (the members' budget)
    net2net_init, net2net       small widened by channel duplication, then grow_steps at grow_lr
    random_growth_init, random_growth   members + random off-diagonal blocks, then grow_steps at grow_lr
    large                       full-width dense WRN from scratch, as many training FLOPs as MixtureGrowth
    large_long                  full-width dense WRN, 2 * member_steps + grow_steps steps

Training FLOPs are counted analytically (`jaxlab.models.wrn.forward_macs`):
`6 * MACs(one example) * batch_size * steps` (forward + backward), summed over
a model's ancestry (a grown net includes the members it came from). The
per-step cost of materializing kernels from templates (independent of the
batch) is not counted. Writes `results.json` (one row per model and seed),
`results.md` and `accuracy_vs_flops.png` into the workdir.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np

from jaxlab import checkpoint, data, pipelines, train
from jaxlab.models import wrn

ROW_KEYS = ("name", "method", "params", "trainable", "flops", "train_steps", "seed", "test_acc", "val_acc",
            "acc_at_growth")


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
  out = dict(model_cfg)
  out["stem_width"] = stem // 2
  out["widen_factor"] = float(model_cfg.get("widen_factor", 2.0)) / 2
  wrn.stage_widths(out["stem_width"], out["widen_factor"])  # raises for fractional member widths
  return out


def train_flops(model_cfg: dict, steps: int, batch_size: int, num_classes: int, input_shape) -> float:
  """Training FLOPs: 3 passes (forward + backward) * 2 FLOPs per MAC * MACs * examples."""
  return 6.0 * wrn.forward_macs(model_cfg, num_classes, tuple(input_shape)) * batch_size * steps


def stage_config(config, *, model: dict, steps: int, seed: int, parameterization: dict | None = None,
                 lr: float | None = None, warmup: int | None = None, init_from: str = ""):
  """A training config for one stage, derived from the pipeline config."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.job = "train"
  c.model = ml_collections.ConfigDict(model)
  c.parameterization = ml_collections.ConfigDict(parameterization or {"name": "identity"})
  c.total_steps, c.total_epochs = int(steps), 0.0
  c.seed = int(seed)
  if lr is not None:
    c.optimizer.lr = float(lr)
  if warmup is not None:
    c.optimizer.warmup_steps = int(warmup)
  c.init_from.path = init_from
  return c


def transform_stage(workdir: str, name: str, transform: str, inputs: list[str], args: dict) -> str:
  """Runs an offline transform into `<workdir>/<name>` unless it already holds a checkpoint."""
  from jaxlab.transforms import engine
  out = os.path.join(workdir, name)
  try:
    checkpoint.resolve(out)
    return out
  except checkpoint.CheckpointError:
    pass
  c = ml_collections.ConfigDict({"job": "transform", "transform": transform, "inputs": tuple(inputs),
                                 "args": dict(args)})
  engine.run(c, out)
  return out


def _test_acc(path: str) -> float:
  return train.evaluate_checkpoint(path, "test")["accuracy"]


@pipelines.register("mixture_growth")
def run(config, workdir: str) -> dict:
  """Runs the whole experiment for every seed and writes results.json, results.md and the plot."""
  t0 = time.time()
  rules, baselines = tuple(config.rules), tuple(config.baselines)
  bad = sorted(set(rules) - {"orthogonal", "copy", "zero", "random"})
  if bad:
    raise ValueError(f"config.rules: unknown coefficient rule(s) {bad}; use orthogonal, copy, zero, random")
  bad = sorted(set(baselines) - {"small", "net2net", "random_growth", "large", "large_long"})
  if bad:
    raise ValueError(f"config.baselines: unknown baseline(s) {bad}")
  full = dict(config.model.to_dict())
  half = member_model(full)
  ds = data.get_dataset(config.data)
  bs, ms, gs = int(config.data.batch_size), int(config.member_steps), int(config.grow_steps)
  flops = lambda m, s: train_flops(m, s, bs, ds.num_classes, ds.input_shape)  # noqa: E731
  f_members = 2 * flops(half, ms)
  f_grown = f_members + flops(full, gs)
  large_steps = max(1, int(round(f_grown / flops(full, 1))))
  rows = []

  def row(name, method, summary, seed, fl, steps, acc_at_growth=None):
    rows.append({"name": name, "method": method, "params": int(summary["params"]),
                 "trainable": int(summary["trainable"]), "flops": float(fl), "train_steps": int(steps),
                 "seed": int(seed), "test_acc": summary.get("test_accuracy"),
                 "val_acc": summary.get("validation_accuracy"), "acc_at_growth": acc_at_growth})

  for seed in tuple(config.seeds):
    sd = os.path.join(workdir, f"seed{seed}")
    # Phases A and B: the two half-width members, each with its own optimizer and schedule.
    m0 = pipelines.stage(sd, "member0", stage_config(config, model=half, steps=ms, seed=seed,
                                                     parameterization=_template(config, 0, seed)))
    m1 = pipelines.stage(sd, "member1", stage_config(config, model=half, steps=ms, seed=seed + 1000,
                                                     parameterization=_template(config, 1, seed)))
    row("member0", "small (member 0)", m0, seed, flops(half, ms), ms)
    row("member1", "small (member 1)", m1, seed, flops(half, ms), ms)
    members = [m0["workdir"], m1["workdir"]]
    # Phase C: grow with every coefficient rule and train the grown network.
    for rule in rules:
      init = transform_stage(sd, f"grow_{rule}_init", "grow_mixture", members,
                             {"coefficients": rule, "noise": float(config.grow_noise), "seed": int(seed)})
      at_growth = _test_acc(init)
      if rule == "zero":
        ens = {"params": 0, "trainable": 0, "test_accuracy": at_growth, "validation_accuracy": None}
        row("ensemble", "ensemble of members (sum of logits)", ens, seed, f_members, 2 * ms)
      s = _grown_stage(config, sd, f"mg_{rule}", init, seed)
      row(f"mg_{rule}", f"MixtureGrowth ({rule})", s, seed, f_grown, 2 * ms + gs, at_growth)
    if "random_growth" in baselines:
      init = transform_stage(sd, "random_growth_init", "grow_random", members, {"seed": int(seed)})
      s = _grown_stage(config, sd, "random_growth", init, seed)
      row("random_growth", "growth, random new blocks", s, seed, f_grown, 2 * ms + gs, _test_acc(init))
    if "small" in baselines or "net2net" in baselines:
      small = pipelines.stage(sd, "small", stage_config(config, model=half, steps=2 * ms, seed=seed))
      row("small", "small from scratch", small, seed, f_members, 2 * ms)
      if "net2net" in baselines:
        init = transform_stage(sd, "net2net_init", "grow_net2net", [small["workdir"]],
                               {"noise": float(config.net2net_noise), "seed": int(seed)})
        s = _grown_stage(config, sd, "net2net", init, seed)
        row("net2net", "growth by copying (Net2Net)", s, seed, f_grown, 2 * ms + gs, _test_acc(init))
    if "large" in baselines:
      s = pipelines.stage(sd, "large", stage_config(config, model=full, steps=large_steps, seed=seed))
      row("large", "large from scratch (same FLOPs)", s, seed, flops(full, large_steps), large_steps)
    if "large_long" in baselines:
      steps = 2 * ms + gs
      s = pipelines.stage(sd, "large_long", stage_config(config, model=full, steps=steps, seed=seed))
      row("large_long", "large from scratch (same steps)", s, seed, flops(full, steps), steps)

  # The ensemble row has no model of its own: give it the members' parameter counts.
  for r in rows:
    if r["name"] == "ensemble":
      mem = [x for x in rows if x["seed"] == r["seed"] and x["name"] in ("member0", "member1")]
      r["params"] = sum(x["params"] for x in mem)
      r["trainable"] = sum(x["trainable"] for x in mem)
  setup = {"seeds": list(config.seeds), "member_model": half, "full_model": full, "member_steps": ms,
           "grow_steps": gs, "large_steps": large_steps, "batch_size": bs, "grow_lr": float(config.grow_lr),
           "lr": float(config.optimizer.lr), "num_templates": int(config.num_templates),
           "macs_member": wrn.forward_macs(half, ds.num_classes, ds.input_shape),
           "macs_full": wrn.forward_macs(full, ds.num_classes, ds.input_shape), "wall_s": time.time() - t0}
  write_results(rows, setup, workdir)
  return {"workdir": os.path.abspath(workdir), "rows": len(rows), "wall_s": time.time() - t0,
          "results": os.path.join(os.path.abspath(workdir), "results.json")}


def _template(config, member: int, seed: int) -> dict:
  return {"name": "template_mixing", "num_templates": int(config.num_templates), "member": member,
          "coef_seed": int(seed)}


def _grown_stage(config, seed_dir: str, name: str, init: str, seed: int) -> dict:
  """Trains a grown network initialised from checkpoint `init` for grow_steps at grow_lr (no warmup)."""
  meta = checkpoint.load_meta(init)
  return pipelines.stage(seed_dir, name, stage_config(
      config, model=meta["model"], steps=int(config.grow_steps), seed=seed, lr=config.grow_lr, warmup=0,
      parameterization=meta.get("parameterization"), init_from=init))


# ----------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------


def aggregate(rows: list[dict]) -> list[dict]:
  """Mean and std of test accuracy (and mean FLOPs) per row name, in first-seen order."""
  out = []
  for name in dict.fromkeys(r["name"] for r in rows):
    rs = [r for r in rows if r["name"] == name]
    acc = np.array([r["test_acc"] for r in rs], float)
    grow = [r["acc_at_growth"] for r in rs if r["acc_at_growth"] is not None]
    out.append({"name": name, "method": rs[0]["method"], "params": rs[0]["params"],
                "trainable": rs[0]["trainable"], "flops": float(np.mean([r["flops"] for r in rs])),
                "train_steps": rs[0]["train_steps"], "n": len(rs), "mean": float(acc.mean()),
                "std": float(acc.std(ddof=1)) if len(rs) > 1 else 0.0,
                "at_growth": float(np.mean(grow)) if grow else None})
  return out


def _claims(agg: dict[str, dict]) -> list[str]:
  lines = []

  def cmp(a, b, what):
    if a in agg and b in agg:
      d = agg[a]["mean"] - agg[b]["mean"]
      noise = max(agg[a]["std"], agg[b]["std"])
      verdict = "beats" if d > noise else ("is worse than" if d < -noise else "is within one std of")
      lines.append(f"- {agg[a]['method']} {verdict} {what}: {agg[a]['mean']:.4f} vs {agg[b]['mean']:.4f} "
                   f"(difference {d:+.4f}, larger std {noise:.4f}).")

  cmp("mg_orthogonal", "random_growth", "random growth")
  cmp("mg_orthogonal", "net2net", "growth by copying (Net2Net)")
  cmp("mg_orthogonal", "large", "the large network from scratch at the same training FLOPs")
  cmp("mg_orthogonal", "large_long", "the large network from scratch trained as many steps")
  if "mg_orthogonal" in agg and "large_long" in agg:
    ratio = agg["mg_orthogonal"]["flops"] / agg["large_long"]["flops"]
    lines.append(f"- MixtureGrowth used {ratio:.2f}x the training FLOPs of the same-steps large network.")
  rules = [k for k in ("mg_orthogonal", "mg_copy", "mg_zero", "mg_random") if k in agg]
  if rules:
    best = max(rules, key=lambda k: agg[k]["mean"])
    lines.append("- Coefficient rule ablation: " + ", ".join(
        f"{k[3:]} {agg[k]['mean']:.4f}±{agg[k]['std']:.4f}" for k in rules) + f"; best: {best[3:]}.")
  if "ensemble" in agg and "mg_zero" in agg:
    lines.append(f"- Right after growth with zero coefficients the grown net is the members' logit ensemble "
                 f"({agg['ensemble']['mean']:.4f}); after training it reaches {agg['mg_zero']['mean']:.4f}.")
  return lines


def write_results(rows: list[dict], setup: dict, workdir: str) -> None:
  """Writes results.json, results.md and accuracy_vs_flops.png."""
  agg = aggregate(rows)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"rows": rows, "aggregate": agg, "setup": setup}, f, indent=2)
  by = {a["name"]: a for a in agg}
  lines = [
      "# MixtureGrowth on the 8x8 digits",
      "",
      "Command: `python -m jaxlab.main --config=ml_collections_configs/mixture_growth.py "
      "--workdir=runs/mixture_growth`",
      "",
      f"Seeds {setup['seeds']}; machine: 2-core CPU shared with other jobs; wall time {setup['wall_s']:.0f} s.",
      f"Members: WRN {setup['member_model']}, full: {setup['full_model']}; {setup['num_templates']} templates per "
      f"set; member steps {setup['member_steps']} each, grown steps {setup['grow_steps']} at lr {setup['grow_lr']} "
      f"(base lr {setup['lr']}), batch {setup['batch_size']}. Forward MACs per example: member "
      f"{setup['macs_member']:,}, full {setup['macs_full']:,}. Training FLOPs = 6 x MACs x examples, "
      "summed over a model's ancestry.",
      "",
      "| model | method | params | trainable | train FLOPs | steps | test acc (mean ± std) | acc at growth |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for a in agg:
    at = f"{a['at_growth']:.4f}" if a["at_growth"] is not None else ""
    lines.append(f"| {a['name']} | {a['method']} | {a['params']:,} | {a['trainable']:,} | {a['flops']:.3g} | "
                 f"{a['train_steps']} | {a['mean']:.4f} ± {a['std']:.4f} (n={a['n']}) | {at} |")
  lines += ["", "## What the numbers say (computed from the table)", ""] + _claims(by)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(agg, os.path.join(workdir, "accuracy_vs_flops.png"))


def plot(agg: list[dict], path: str) -> None:
  """Test accuracy (mean ± std over seeds) against training FLOPs, one marker per model."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for a in agg:
    marker = "*" if a["name"].startswith("mg_") else ("s" if a["name"].startswith("large") else "o")
    ax.errorbar(a["flops"], a["mean"], yerr=a["std"], fmt=marker, capsize=3, markersize=9 if marker == "*" else 6,
                label=f"{a['name']}")
  ax.set_xscale("log")
  ax.set_xlabel("training FLOPs (analytic, incl. members)")
  ax.set_ylabel("test accuracy")
  ax.set_title("MixtureGrowth vs baselines (digits 8x8)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
