"""The `s4d` pipeline: S4D-Lin / Inv / LegS with ZOH and bilinear discretization on the sequence tasks.

Each (task, init, disc, seed) is one training stage `<workdir>/<task>/<init>_<disc>/seed<k>` through
the one training loop (done stages are skipped on re-run). The SSM parameters (A, dt, B) get
learning rate min(`s4d.ssm_lr`, lr) and no weight decay (`jaxlab.models.s4d.optimizer_rules`).
Outputs in the workdir: `results.json` (one row per run: name, task, model, init, disc, pretraining,
seed, test_acc, val_acc, params, wall_s), `results.md` (mean +- std table and what it says about the
paper's claims), `accuracy.png` and `kernels.png` (layer-0 kernels at init and after training).
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import numpy as np

from jaxlab import build, checkpoint, data, pipelines
from jaxlab.models import s4d as s4d_lib


def stage_config(config, task: str, init: str, disc: str, seed: int, info: dict):
  """The training config of one run (a copy of `config` with task, model and optimizer rules filled in)."""
  c = config.copy_and_resolve_references()
  c.unlock()  # main.py locks the config; this copy gains data keys
  c.job = "train"
  c.seed = int(seed)
  c.data.update(config.s4d.data[task])
  c.model.init, c.model.disc = init, disc
  c.model.vocab_size = int(info.get("vocab_size", 0))
  c.model.input_channels = int(info.get("input_channels", 1))
  rules, no_decay = s4d_lib.optimizer_rules(float(config.optimizer.lr), float(config.s4d.ssm_lr))
  c.optimizer.lr_rules = tuple(rules) + tuple(tuple(r) for r in config.optimizer.lr_rules)
  c.optimizer.no_decay = tuple(config.optimizer.no_decay) + tuple(no_decay)
  del c.s4d
  del c.pipeline
  return c


def _runs(s) -> list[tuple[str, str, str, int]]:
  out = []
  for task in s.tasks:
    discs = tuple(s.discs) if task in tuple(s.disc_tasks) else tuple(s.discs)[:1]
    for init in s.inits:
      for disc in discs:
        for seed in s.seeds:
          out.append((task, init, disc, int(seed)))
  return out


@pipelines.register("s4d")
def run(config, workdir: str) -> dict:
  """Trains every (task, init, disc, seed) of `config.s4d`, then writes results and plots.

  Raises:
    ValueError: for an unknown task name or an init/disc the layer does not know.
  """
  config = pipelines.normalized(config, "s4d", dict(tasks=str, inits=str, discs=str, disc_tasks=str, seeds=int))
  s = config.s4d
  for task in s.tasks:
    if task not in s.data:
      raise ValueError(f"config.s4d.tasks: no data config for task {task!r} in config.s4d.data")
  for init in s.inits:
    s4d_lib.init_ab(init, 4)
  for disc in s.discs:
    if disc not in s4d_lib.DISCS:
      raise ValueError(f"config.s4d.discs: unknown discretization {disc!r}; choose from {s4d_lib.DISCS}")
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  datasets = {task: data.get_dataset(s.data[task]) for task in s.tasks}
  infos = {task: ds.info for task, ds in datasets.items()}
  chance = {task: 1.0 / ds.num_classes for task, ds in datasets.items()}
  rows = []
  for task, init, disc, seed in _runs(s):
    name = f"{task}/{init}_{disc}/seed{seed}"
    summary = pipelines.stage(workdir, name, stage_config(config, task, init, disc, seed, infos[task]))
    rows.append({"name": name, "task": task, "model": "s4d_seq", "init": init, "disc": disc,
                 "pretraining": "none", "seed": seed, "test_acc": summary.get("test_accuracy"),
                 "val_acc": summary.get("validation_accuracy"), "params": summary.get("params"),
                 "wall_s": summary.get("wall_s"), "steps": summary.get("steps")})
  result = {"rows": rows, "wall_s": time.time() - t0, "command": pipelines.command("s4d.py", workdir),
            "machine": f"{platform.machine()} CPU x{os.cpu_count()} ({jax.default_backend()})"}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(result, f, indent=2)
  table = aggregate(rows)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(config, table, result, chance))
  if s.get("plot", True):
    plot_accuracy(table, os.path.join(workdir, "accuracy.png"))
    if s.kernel_task in tuple(s.tasks):
      plot_kernels(config, workdir, infos[s.kernel_task], os.path.join(workdir, "kernels.png"))
  means = {f"{r['task']}/{r['init']}_{r['disc']}": r["mean"] for r in table}
  return {"workdir": os.path.abspath(workdir), "runs": len(rows), **means}


def aggregate(rows: list[dict]) -> list[dict]:
  """Mean and std of test accuracy per (task, init, disc), in run order."""
  groups: dict[tuple, list[float]] = {}
  for r in rows:
    groups.setdefault((r["task"], r["init"], r["disc"]), []).append(float(r["test_acc"]))
  return [{"task": t, "init": i, "disc": d, "mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
          for (t, i, d), v in groups.items()]


def _claims(table: list[dict], chance: dict[str, float] | None = None) -> list[str]:
  """Sentences about the paper's claims, computed from the table.

  `chance` (task -> 1 / number of classes): a task where every variant is within 2 points (or two
  seed std) of chance gets no claim, since nothing was learned and equal accuracies say nothing.
  """
  out = []
  by = {(r["task"], r["init"], r["disc"]): r for r in table}
  tasks = list(dict.fromkeys(r["task"] for r in table))
  for task in tasks:
    if pipelines.at_chance([r for r in table if r["task"] == task], (chance or {}).get(task)):
      out.append(f"- {task}: every variant is at chance ({100 * chance[task]:.0f}%): no model learned the task "
                 "at this budget, so the task says nothing about the claims.")
      continue
    inv, legs, lin = (by.get((task, i, "zoh")) for i in ("inv", "legs", "lin"))
    if inv and legs:
      gap = abs(inv["mean"] - legs["mean"])
      noise = max(inv["std"], legs["std"], 1e-9)
      verdict = "within" if gap <= 2 * noise else "outside"
      line = (f"- {task}: |Inv - LegS| = {100 * gap:.1f} points, {verdict} two seed std "
              f"({100 * noise:.1f})")
      if lin:
        line += f"; Lin - mean(Inv, LegS) = {100 * (lin['mean'] - (inv['mean'] + legs['mean']) / 2):+.1f} points"
      out.append(line + ".")
    for init in ("lin", "inv", "legs"):
      z, b = by.get((task, init, "zoh")), by.get((task, init, "bilinear"))
      if z and b:
        out.append(f"- {task}, {init}: bilinear - ZOH = {100 * (b['mean'] - z['mean']):+.1f} points "
                   f"(seed std {100 * max(z['std'], b['std']):.1f}).")
  return out


def markdown(config, table: list[dict], result: dict, chance: dict[str, float] | None = None) -> str:
  """results.md: command, setup, table and the claims check."""
  s = config.s4d
  m = config.model
  lines = [
      "# S4D: initialisations and discretizations on the built-in sequence tasks", "",
      f"Command: `{result['command']}`", "",
      f"Seeds: {', '.join(str(x) for x in s.seeds)}. Machine: {result['machine']}, shared with other jobs; "
      f"training wall time {sum(r.get('wall_s') or 0.0 for r in result['rows']) / 60:.1f} min (sum over runs).", "",
      f"Model: `s4d_seq`, d_model {m.d_model}, {m.n_layers} layers, d_state {m.d_state}, "
      f"{'bidirectional' if not m.causal else 'causal'}, {'pre' if m.prenorm else 'post'}-{m.norm} norm, "
      f"mean pooling; {config.total_steps} steps of batch {config.data.batch_size}, AdamW lr "
      f"{config.optimizer.lr} (wd {config.optimizer.weight_decay}), SSM params (A, dt, B) lr "
      f"{min(float(s.ssm_lr), float(config.optimizer.lr))} without weight decay, cosine schedule.", "",
      "Tasks: " + "; ".join(_task_line(t, s.data[t]) for t in s.tasks) + ".", "",
      "| task | init | disc | test accuracy (mean +- std) | runs |",
      "|---|---|---|---|---|",
  ]
  for r in table:
    lines.append(f"| {r['task']} | {r['init']} | {r['disc']} | {100 * r['mean']:.1f} +- {100 * r['std']:.1f} "
                 f"| {r['n']} |")
  lines += ["", "## What the numbers say", "",
            "Paper (S4D, LRA): S4D-Inv and S4D-LegS perform close to each other (and to S4D-Lin except on "
            "Path-X); ZOH vs bilinear \"should make little difference\". At this scale:", ""]
  lines += _claims(table, chance)
  lines += ["", "These are short CPU runs of small models on small generated tasks, so they test the "
            "implementation and the qualitative claims, not the LRA numbers. `accuracy.png`: accuracy by task "
            "and variant; `kernels.png`: layer-0 kernels of seed 0 at init and after training.", ""]
  return "\n".join(lines)


def _task_line(task: str, dcfg) -> str:
  d = dict(dcfg)
  if task == "listops":
    return f"listops (length {d.get('max_length')}, {d.get('train_size')} train)"
  if task == "pathfinder":
    return f"pathfinder ({d.get('image_size')}x{d.get('image_size')} pixels one at a time, {d.get('train_size')} train)"
  if task == "seq_digits":
    up = int(d.get("upsample", 1) or 1)
    return f"seq_digits ({64 * up * up} pixels one at a time)"
  return task


def plot_accuracy(table: list[dict], path: str) -> None:
  """Grouped bars: test accuracy (mean +- std over seeds) per task and (init, disc)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tasks = list(dict.fromkeys(r["task"] for r in table))
  variants = list(dict.fromkeys(f"{r['init']}/{r['disc']}" for r in table))
  fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(tasks), 3.4))
  width = 0.8 / max(len(variants), 1)
  for j, v in enumerate(variants):
    xs, ys, es = [], [], []
    for i, t in enumerate(tasks):
      r = next((r for r in table if r["task"] == t and f"{r['init']}/{r['disc']}" == v), None)
      if r:
        xs.append(i + (j - (len(variants) - 1) / 2) * width)
        ys.append(100 * r["mean"])
        es.append(100 * r["std"])
    ax.bar(xs, ys, width, yerr=es, label=v, capsize=2)
  ax.set_xticks(range(len(tasks)))
  ax.set_xticklabels(tasks)
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("S4D initialisation / discretization")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def initial_params(stage_cfg, info_shape, dtype):
  """The exact initial params of a training run (same rng split as `train.train_and_evaluate`)."""
  module = build.model(stage_cfg.model, 10)
  init_rng = jax.random.split(jax.random.key(int(stage_cfg.seed)), 3)[0]
  return jax.jit(lambda r: build.init_variables(module, r, info_shape, dtype)["params"])(init_rng)


_kernel = jax.jit(s4d_lib.ssm_kernel, static_argnums=(1, 2))
_PRETTY = {"lin": "Lin", "inv": "Inv", "legs": "LegS", "real": "Real"}


def plot_kernels(config, workdir: str, info: dict, path: str) -> None:
  """Layer-0 kernels (first channels) of seed 0 per init, at init and after training."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  s = config.s4d
  task = s.kernel_task
  disc = tuple(s.discs)[0]
  seed = int(tuple(s.seeds)[0])
  ds = data.get_dataset(s.data[task])
  length = int(info.get("seq_len", ds.input_shape[0]))
  inits = list(s.inits)
  fig, axes = plt.subplots(len(inits), 2, figsize=(8, 1.9 * len(inits)), squeeze=False)
  for i, init in enumerate(inits):
    sc = stage_config(config, task, init, disc, seed, info)
    before = initial_params(sc, ds.input_shape, ds.input_dtype)
    after = checkpoint.load(os.path.join(workdir, f"{task}/{init}_{disc}/seed{seed}")).params
    for j, (params, label) in enumerate(((before, "at init"), (after, "trained"))):
      p = s4d_lib.layer_params_at(params, 0)
      k = np.asarray(_kernel(p, length, disc))[0]
      ax = axes[i, j]
      for ch in range(min(int(s.kernel_channels), k.shape[0])):
        ax.plot(k[ch], lw=0.9)
      ax.set_title(f"S4D-{_PRETTY.get(init, init)} ({disc}), layer 0, {label}", fontsize=8)
      ax.tick_params(labelsize=7)
  for ax in axes[-1]:
    ax.set_xlabel(f"lag l ({task})", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
