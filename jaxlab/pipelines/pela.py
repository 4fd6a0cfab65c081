"""The PELA experiment: dense ViT -> SVD compression -> intermediate training with distillation.

Stages per seed s (the config's top-level keys train the dense model with the default job's recipe):
`seed<s>/dense` (teacher s, or the shared `pela.teacher_path`), `seed<s>/dense_ft` (the teacher trained `pela.steps`
more with the task loss: the extra-training control), `seed<s>/r<ratio>/svd` (`lowrank_svd`, no training),
`seed<s>/r<ratio>/<variant>` (VARIANTS: SVD init, `pela.steps` at `pela.lr`, the variant's objective) and
`seed<s>/r<ratio>/wp<w>` (pela_fd_wp at weight w of `pela.wp_sweep`, ratio `pela.sweep_ratio`). The students of a
seed share steps, optimizer and data order. Keys: `ml_collections_configs/pela.py`. Writes results.json/md, pela.png.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from jaxlab import checkpoint, evaluate, pipelines, trees
from jaxlab.experiments import Experiment, Report, TrainStage, TransformStage, aggregate, errorbars, lookup, pm
from jaxlab.experiments.measure import interleaved_throughput
from jaxlab.losses import diagnostics
from jaxlab.models.lowrank_vit import forward_flops

VARIANTS = {"svd_ft": (False, False), "pela_fd": (True, False), "pela_fd_wp": (True, True)}  # (distill, perturb)


def student(p, name, seed, model, init, teacher, fd=False, wp=None) -> TrainStage:
  """A training stage from checkpoint `init`: task loss, + feature distillation (`fd`), + weight perturbation `wp`."""
  weights = {"cross_entropy": 1.0, **({"feature_mse": float(p.fd_weight)} if fd else {}),
             **({"weight_perturbation": float(wp)} if wp else {})}
  return TrainStage(name, {"seed": seed, "model": model, "total_epochs": 0.0, "total_steps": int(p.steps),
                           "optimizer.lr": float(p.lr), "optimizer.warmup_steps": int(p.warmup_steps),
                           "init_from.path": init, "objective.weights": weights, "objective.wp_eps": float(p.wp_eps),
                           "objective.teacher": teacher if len(weights) > 1 else ""})


@pipelines.register("pela")
def run(config, workdir: str) -> dict:
  """Runs the PELA experiment of `config.pela`; ValueError: empty seeds/ratios, unknown variant, non-'vit' teacher."""
  exp = Experiment(config, workdir, "pela", lists={"seeds": int, "ratios": float, "variants": str, "wp_sweep": float})
  p, rows, paths, diag = exp.section, [], {}, {}
  if not p.seeds or not p.ratios or set(p.variants) - set(VARIANTS):
    raise ValueError(f"config.pela: seeds and ratios must be non-empty, variants within {sorted(VARIANTS)}")

  def add(name, ratio, seed, path, summ=None, **kw):
    acc = (summ or {}).get("test_accuracy") or evaluate.evaluate_checkpoint(path, "test")["accuracy"]
    paths.setdefault((name, ratio), path)
    rows.append({"name": name, "ratio": float(ratio), "seed": seed, "test_acc": float(acc), "workdir": path,
                 "params": trees.count(checkpoint.load(path).params), "pred": exp.predictions(path), **kw})

  for seed in p.seeds:
    sd, dense = f"seed{seed}", p.teacher_path or exp.path(f"seed{seed}/dense")
    add("dense", 1.0, seed, dense, None if p.teacher_path else exp.run(TrainStage(f"{sd}/dense", {"seed": seed})))
    if (teacher := checkpoint.load_meta(dense)["model"]).get("name") != "vit":
      raise ValueError(f"config.pela.teacher_path={dense}: expected a dense 'vit' checkpoint")
    add("dense_ft", 1.0, seed, exp.path(f"{sd}/dense_ft"), exp.run(student(p, f"{sd}/dense_ft", seed, teacher,
                                                                          dense, "")), steps=int(p.steps))
    for ratio in p.ratios:
      r = f"{sd}/r{ratio:g}"
      exp.run(TransformStage(f"{r}/svd", "lowrank_svd", [dense], {"ratio": ratio, "keep_dense": tuple(p.keep_dense)}))
      add("svd", ratio, seed, svd := exp.path(f"{r}/svd"))
      model = checkpoint.load_meta(svd)["model"]
      arms = [(v, VARIANTS[v][0], p.wp_weight if VARIANTS[v][1] else None) for v in p.variants]
      arms += [(f"wp{w:g}", True, w) for w in p.wp_sweep] if abs(ratio - p.sweep_ratio) < 1e-9 else []
      for name, fd, wp in arms:
        add(name, ratio, seed, exp.path(f"{r}/{name}"), exp.run(student(p, f"{r}/{name}", seed, model, svd, dense, fd,
                                                                        wp)), steps=int(p.steps), wp_weight=wp)
      if seed == p.seeds[0] and abs(ratio - p.sweep_ratio) < 1e-9 and "pela_fd_wp" in p.variants:
        obj = ml_collections.ConfigDict(checkpoint.load_meta(exp.path(f"{r}/pela_fd_wp"))["config"]["objective"])
        diag = {at: diagnostics.checkpoint_gradient_ratios(c, obj, dense) for at, c in (
            ("SVD init", svd), ("after training", exp.path(f"{r}/pela_fd_wp")))}
  speed = interleaved_throughput({k: checkpoint.load(v) for k, v in paths.items() if k[0] in ("dense", "svd")},
                                 int(p.throughput_batch), int(p.throughput_reps))
  return report(exp, rows, paths, speed, diag)


def report(exp: Experiment, rows: list[dict], paths: dict, speed: dict, diag: dict) -> dict:
  """Tables (accuracy, speed, loss terms, sweep), preconditions, claims and plot of the PELA experiment."""
  p, rep = exp.section, Report(exp, f"PELA on {exp.base.data.name}: low-rank compression + feature distillation")
  by = {(r["name"], r["ratio"], r["seed"]): r for r in rows}
  diff = {k: int((r["pred"] != by[("pela_fd", k[1], k[2])]["pred"]).sum()) for k, r in by.items()
          if ("pela_fd", k[1], k[2]) in by}  # test predictions that differ from feature distillation alone
  rep.rows = [{**{k: v for k, v in r.items() if k != "pred"}, "diff_vs_fd": diff.get(k)} for k, r in by.items()]
  agg, base = aggregate(rep.rows, by=("name", "ratio", "params")), rep.baseline("test")
  dense, dft = lookup(agg, name="dense"), lookup(agg, name="dense_ft")
  nd = {g: float(np.mean([d for k, d in diff.items() if k[:2] == g])) for g in {k[:2] for k in diff}}  # (name, ratio)
  rep.text(f"- {exp.base.data.name} test split: {base['n']} examples (majority class {100 * base['accuracy']:.1f}%). "
           f"Seed s trains teacher s (the default job's recipe) and every student of s from it: {p.steps} steps at lr "
           f"{p.lr:g}; `dense_ft` trains the teacher as many steps more (task loss), so 'Δ vs dense_ft' is not extra "
           f"training. Weights: distillation {p.fd_weight:g}, weight perturbation {p.wp_weight:g} (eps {p.wp_eps:g}; "
           f"the official DeiT/Swin setting); `wp<w>` rows sweep it at ratio {p.sweep_ratio:g} (not the paper's).")
  rep.table(("model", "ratio", "params", "kept", "test acc (%)", "Δ vs dense", "Δ vs dense_ft", "preds ≠ pela_fd"),
            [(a["name"], f"{a['ratio']:g}", f"{a['params']:,}", f"{a['params'] / dense['params']:.2f}", pm(a, 100, 2),
              f"{100 * (a['mean'] - dense['mean']):+.2f}", f"{100 * (a['mean'] - dft['mean']):+.2f}",
              "" if (a["name"], a["ratio"]) not in nd else f"{nd[(a['name'], a['ratio'])]:.1f}") for a in agg]
            + [("majority class", "", "", "", f"{100 * base['accuracy']:.2f}", "", "", "")], caption="Test accuracy")
  rep.table(("model", "ratio", "params", "forward FLOPs (analytic)", "examples/s median", "min-max"),
            [(k[0], f"{k[1]:g}", f"{trees.count(ld.params):,}", f"{forward_flops(ld.params):,.0f}",
              f"{v['median']:,.0f}", f"{v['min']:,.0f}-{v['max']:,.0f}") for k, v in speed.items()
             if (ld := checkpoint.load(paths[k]))],
            seeds=False, caption=f"Forward pass, batch {p.throughput_batch}, jit-compiled; {p.throughput_reps} "
            "interleaved rounds (each times every model once, so load changes hit all alike); one checkpoint each")
  if diag:
    rep.table(("at", "term", "weight", "value", "grad ratio to CE", "cosine with CE", "entries touched"),
              [(at, t, f"{d['weight']:g}", f"{d['value']:.4g}", f"{d['ratio']:.3g}", f"{d['cosine']:.2f}",
                f"{100 * d['touched']:.1f}%") for at, terms in diag.items() for t, d in terms.items()], seeds=False,
              caption=f"Loss-term gradients of pela_fd_wp, ratio {p.sweep_ratio:g}, seed {p.seeds[0]}, 64 examples "
                      "(a term's ratio scales with its weight)")
    rep.extra["term_ratios"] = diag
  pre = [rep.learned("dense teacher", dense["mean"]), rep.precondition(
      "dense teacher reaches the default job's level (ml_collections_configs/digits_vit.py, same recipe and budget)",
      dense["mean"], float(p.min_teacher_acc))]
  for ratio in p.ratios:
    ft, fd = lookup(agg, name="svd_ft", ratio=ratio), lookup(agg, name="pela_fd", ratio=ratio)
    if ft and fd:
      d, noise = fd["mean"] - ft["mean"], max(fd["std"], ft["std"])
      rep.claim(f"Ratio {ratio:g}: feature distillation beats the task loss alone", d > noise, f"pela_fd minus svd_ft"
                f" {100 * d:+.2f} points (holds above the larger seed std, {100 * noise:.2f})", requires=pre)
  sweep = sorted((a for a in agg if a["name"][:2] == "wp" or a["name"] == "pela_fd_wp"), key=lambda a: float(
      p.wp_weight if a["name"] == "pela_fd_wp" else a["name"][2:]))  # by weight
  moved = [a for a in sweep if nd.get((a["name"], a["ratio"]), 0) >= p.min_changed * base["n"]]
  if (fd := lookup(agg, name="pela_fd", ratio=p.sweep_ratio)) and sweep:
    q = rep.precondition(f"weight perturbation changes at least {100 * p.min_changed:g}% of the test predictions of "
                         "pela_fd at some swept weight (mean count)", max(nd.get((a["name"], a["ratio"]), 0) for a in
                                                                          sweep), p.min_changed * base["n"])
    w = moved[0] if moved else {"name": "-", "mean": fd["mean"], "std": 0.0}
    rep.claim("Adding weight perturbation beats feature distillation alone", w["mean"] - fd["mean"] > max(
        w["std"], fd["std"]), f"{w['name']} (the smallest weight that changes predictions) minus pela_fd: "
        f"{100 * (w['mean'] - fd['mean']):+.2f} points", requires=pre + [q])
  if best := max((a for a in agg if a["name"] in ("pela_fd", "pela_fd_wp") and abs(a["ratio"] - 2.0) < 1e-9),
                 key=lambda a: a["mean"], default=None):
    drop = dft["mean"] - best["mean"]
    rep.claim("About half the parameters for under a point of accuracy (best PELA student at ratio 2 vs the dense "
              "model given the same extra training)", drop < 0.01, f"{best['name']} keeps "
              f"{100 * best['params'] / dense['params']:.0f}% of the parameters, {100 * drop:+.2f} points below "
              f"dense_ft (one test image = {100 / base['n']:.2f} points)", requires=pre)

  rep.figure("pela.png", lambda ax: (errorbars(ax, [a for a in agg if a["name"][:2] != "wp"], x="params",
                                                series="name"), ax.set(xlabel="parameters", ylabel="test accuracy (%)"),
                                     ax.legend(fontsize=8)))
  res = rep.write()
  return {"workdir": os.path.abspath(exp.workdir), "wall_s": res["wall_s"], "verdicts": [c["verdict"] for c in
                                                                                         res["claims"]]}
