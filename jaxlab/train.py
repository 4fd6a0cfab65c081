"""The one training loop.

`train_and_evaluate(config, workdir)` trains `model + parameterization +
objective + data + optimizer (+ init_from)` and returns a summary dict. Every
method in jaxlab trains through this function; the method modules only
register parameterizations, loss terms, models, data sets and transforms.
It reads as a page of named steps: set up the run, initialise (or restore)
the state, compile the steps, run the loop, evaluate, save, summarise.
Evaluation lives in `jaxlab.evaluate` (its names are re-exported here).

Init precedence: resume from `<workdir>/checkpoints` > `config.init_from.path`
(+ optional transform) > from scratch. The batch of step `s` and the dropout
key of step `s` depend only on `(seed, s)`, so a killed run that is started
again with the same command ends with bitwise the same parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxlab import build, checkpoint, data, objectives, optim, profiling, sharding, transforms, trees, validate
from jaxlab import evaluate as evaluation
from jaxlab.evaluate import evaluate, evaluate_checkpoint, jit_eval_step, make_eval_step  # noqa: F401  (re-exported)


class NonFiniteError(FloatingPointError):
  """Loss or gradients became NaN/Inf; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------
# Durations
# ----------------------------------------------------------------------------


resolve_steps = validate.resolve_steps  # steps from total_steps / total_epochs (checked there)


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------


# Evaluation lives in jaxlab.evaluate (`evaluate`, `evaluate_checkpoint`, `jit_eval_step`, `make_eval_step` are
# imported above for the callers that know them from train).
_apply = evaluation.apply_model


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX tries `import torch` at import time only to accept torch tensors; where torch is installed
  (the `bench` extra) that costs seconds per process. We log numbers, so torch is hidden while it imports.
  """
  import sys
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def make_train_step(module, param, tx, obj_cfg, teacher=None):
  """Returns a pure `step(state, batch) -> (state, metrics)`."""
  need = objectives.needs(obj_cfg)
  preparer = objectives.get_preparer(obj_cfg)
  want_features = "features" in need

  def loss_fn(theta, model_state, batch, rng):
    prep_rng, drop_rng = jax.random.split(rng)
    if preparer is not None:
      batch = preparer(batch, prep_rng, obj_cfg)
    params = param.materialize(theta)
    logits, new_state, feats = evaluation.apply_model(module, params, model_state, batch["inputs"], train=True,
                                                      rng=drop_rng, features=want_features)
    ctx = objectives.Context(logits=logits, batch=batch, features=feats, params=params, theta=theta,
                             rng=rng)
    if teacher is not None:
      t_logits, _, t_feats = evaluation.apply_model(teacher.module, teacher.params, teacher.model_state,
                                                    batch["inputs"], train=False, features=want_features)
      ctx.teacher_logits, ctx.teacher_features = t_logits, t_feats
      ctx.teacher_params = teacher.params
    loss, metrics = objectives.total_loss(ctx, obj_cfg)
    if logits.ndim == 2 and "label" in batch:
      metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, (new_state, metrics)

  def step(state, batch, base_rng):
    rng = jax.random.fold_in(base_rng, state["step"])
    (loss, (new_model_state, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["theta"], state["model_state"], batch, rng)
    gnorm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    updates, new_opt = tx.update(grads, state["opt_state"], state["theta"])
    new_theta = optax.apply_updates(state["theta"], updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = {
        "step": state["step"] + 1,
        "theta": keep(new_theta, state["theta"]),
        "opt_state": keep(new_opt, state["opt_state"]),
        "model_state": keep(new_model_state, state["model_state"]),
    }
    metrics = {**metrics, "loss": loss, "grad_norm": gnorm, "finite": finite}
    return new_state, metrics

  return step


# ----------------------------------------------------------------------------
# State initialisation
# ----------------------------------------------------------------------------


def _init_from(config, theta, model_state):
  """Overrides freshly initialised weights with those of `config.init_from`."""
  ic = config.get("init_from")
  if not ic or not ic.get("path"):
    return theta, model_state, None
  loaded = checkpoint.load(ic.path)
  provenance = {"init_from": os.path.abspath(ic.path), "step": loaded.step}
  if ic.get("transform"):
    out = transforms.apply(ic.transform, [loaded], build.to_dict(ic.get("args")))
    src_theta, src_state, src_param_name = out.theta, out.model_state, out.meta.get(
        "parameterization", {}).get("name", "identity")
    src_params = build.parameterization(out.meta.get("parameterization"), out.meta["model"]).materialize(
        src_theta)
    provenance["transform"] = ic.transform
  else:
    src_theta, src_state = loaded.theta, loaded.model_state
    src_param_name = (loaded.meta.get("parameterization") or {}).get("name", "identity")
    src_params = loaded.params
  ours = (config.get("parameterization") or {}).get("name", "identity") or "identity"
  source = src_theta if src_param_name == ours else src_params
  dont_load = tuple(ic.get("dont_load", ()))
  try:
    theta = trees.merge(source, theta, dont_load=dont_load)
    if model_state:
      model_state = trees.merge(src_state, model_state, dont_load=dont_load, allow_missing=True)
  except trees.TreeMismatchError as e:
    raise checkpoint.CheckpointError(f"config.init_from.path={ic.path}: {e}; make config.model match "
                                     "the checkpoint or list leaves in config.init_from.dont_load") from e
  return theta, model_state, provenance


def make_meta(config, dataset, step: int, metrics: dict | None = None, provenance: dict | None = None) -> dict:
  return {
      "model": build.to_dict(config.model),
      "parameterization": build.to_dict(config.get("parameterization")) or {"name": "identity"},
      "data": {"name": dataset.name, "num_classes": dataset.num_classes,
               "input_shape": list(dataset.input_shape),
               "input_dtype": np.dtype(dataset.input_dtype).name,
               "config": build.to_dict(config.data), **dataset.info},
      "objective": build.to_dict(config.get("objective")),
      "step": int(step),
      "metrics": metrics or {},
      "provenance": provenance or {},
      "versions": checkpoint.versions(),
      "config": json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else {},
  }


# ----------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------


class MetricWriter:
  """Metrics as JSON lines (`metrics.jsonl`) and TensorBoard events in the workdir, and the progress bar.

  Args:
    workdir: where `metrics.jsonl` and `tensorboard/` are written.
    enabled: write anything at all (only process 0 ever writes).
    total, start: the run's last step and the step it starts from (the bar's range).
    progress: show a tqdm progress bar (`config.progress`).
  """

  def __init__(self, workdir: str, enabled: bool = True, *, total: int = 0, start: int = 0,
               progress: bool = False):
    self.enabled = enabled and jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self.pbar = None
    if self.enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      try:
        self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))
      except ImportError:  # pragma: no cover
        self._tb = None
    if progress and jax.process_index() == 0:
      from tqdm.auto import tqdm
      self.pbar = tqdm(total=total, initial=start, desc=os.path.basename(os.path.abspath(workdir)),
                       dynamic_ncols=True, leave=True)

  def write(self, step: int, metrics: dict, prefix: str = ""):
    if not self.enabled:
      return
    row = {"step": int(step), **{f"{prefix}{k}": float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step":
          self._tb.add_scalar(k, v, step)

  def write_train(self, step: int, metrics: dict, last_eval: dict):
    """Train metrics of the steps up to `step`, also shown on the bar (with the last validation accuracy)."""
    self.write(step, metrics, prefix="train/")
    if self.pbar is not None:
      post = {"loss": f"{metrics['loss']:.4f}", "ex/s": f"{metrics['examples_per_s']:.0f}"}
      if "accuracy" in metrics:
        post["acc"] = f"{metrics['accuracy']:.3f}"
      if last_eval:
        post["val"] = f"{last_eval.get('accuracy', float('nan')):.3f}"
      self.pbar.set_postfix(post, refresh=False)

  def advance(self):
    """One step done (the bar)."""
    if self.pbar is not None:
      self.pbar.update(1)

  def close_progress(self):
    """Closes the bar (first, on an error: the error is then printed on a line of its own)."""
    if self.pbar is not None:
      self.pbar.close()
      self.pbar = None

  def close(self):
    self.close_progress()
    if self._jsonl:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


# ----------------------------------------------------------------------------
# The run: a page of named steps
# ----------------------------------------------------------------------------


class _Opened:
  """What a training run opened (checkpoint manager, metric writer and bar, input workers), closed on every error
  path: the bar first, so the error is printed on a line of its own, then the other closers, then the checkpoint
  manager (its pending save finishes, and no orbax thread outlives the interpreter), then the metric files."""

  def __init__(self):
    self.mngr = None
    self.writer = None
    self.others: list = []  # more closers, called first (e.g. the input pipeline's workers)

  def close_after_error(self):
    if self.writer is not None:
      self.writer.close_progress()
    for close in self.others:
      try:
        close()
      except Exception:  # noqa: BLE001  (closing after a failure: the first error is the one to report)
        logging.debug("closing after an error", exc_info=True)
    if self.mngr is not None:
      self.mngr.close(raise_errors=False)
    if self.writer is not None:
      self.writer.close()


@dataclasses.dataclass
class _Run:
  """What the steps of one run share: the data, its length, the devices, the model and its parameterization."""
  config: Any
  workdir: str
  dataset: data.Dataset
  total: int
  mesh: Any
  batch_size: int
  module: Any
  param: Any
  init_rng: Any
  param_rng: Any
  step_rng: Any


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains and evaluates; returns a summary (test accuracy, params, wall time, ...).

  Every check that needs no training (`validate.train_run`: sizes, steps, data, devices, inputs, whether the
  workdir's checkpoint can be resumed with this config) runs before anything is written.

  Raises:
    NonFiniteError: when loss or gradients become NaN/Inf; the last good checkpoint is kept and named.
    CheckpointSaveError: when a checkpoint cannot be written; the earlier ones are kept.
    ValueError / CheckpointError: for bad config or inputs, with the key named.
  """
  opened = _Opened()
  try:
    return _train_and_evaluate(config, workdir, opened)
  except BaseException:
    opened.close_after_error()
    raise


def _train_and_evaluate(config, workdir: str, opened: _Opened) -> dict[str, Any]:
  """The body of `train_and_evaluate`; what it opens goes into `opened`.

  Raises:
    NonFiniteError: when loss or gradients become NaN/Inf (no checkpoint of it).
    ValueError / CheckpointError: for bad config or inputs, with the key named.
  """
  t0 = time.time()
  validate.train_run(config, workdir)  # a refusal leaves no trace: nothing is written before this
  os.makedirs(workdir, exist_ok=True)
  run = _set_up(config, workdir)
  state, state_sh, tx, sched, provenance, n_params = _initial_state(run)
  mngr = opened.mngr = checkpoint.Manager(workdir, max_to_keep=config.get("keep_checkpoints", 2))
  state, start, provenance = _restore_or_keep(mngr, state, state_sh, provenance)
  train_step, eval_step, materialize = _compiled_steps(run, tx)
  writer = opened.writer = MetricWriter(workdir, total=run.total, start=start,
                                        progress=bool(config.get("progress", True)))

  def run_eval(state, splits, step):
    return _evaluate_splits(run, materialize, eval_step, state, splits, step, writer)

  state = _train_loop(run, state, start, train_step, sched, run_eval, mngr, writer, provenance, opened)
  results = run_eval(state, _final_splits(config), run.total) if run.total > 0 else {}
  flat = {f"{s}/{k}": v for s, m in results.items() for k, v in m.items()}
  if run.total not in mngr.all_steps():  # a finished run started again only re-evaluates
    _save(mngr, state, config, run.dataset, run.total, flat, provenance)
  mngr.close()
  writer.close()
  return _write_summary(run, results, n_params, trees.count(state["theta"]), time.time() - t0)


def _set_up(config, workdir: str) -> _Run:
  """The data set, the number of steps, the device mesh, the model, the parameterization and the run's keys."""
  dataset = data.get_dataset(config.data, data.checkpoint_meta_for(config))  # + an imported model's preprocessing
  total = resolve_steps(config, dataset.num_examples("train"))
  mesh = sharding.make_mesh(config.get("sharding", {}).get("num_devices") or None)
  n_dev = mesh.shape["data"]
  bs = int(config.data.batch_size)
  if bs % n_dev or bs % jax.process_count():
    raise ValueError(f"config.data.batch_size={bs} must be divisible by the {n_dev} devices")
  module = build.model(config.model, dataset.num_classes)
  param = build.parameterization(config.get("parameterization"), config.model)
  init_rng, param_rng, step_rng = jax.random.split(jax.random.key(int(config.seed)), 3)
  return _Run(config, workdir, dataset, total, mesh, bs, module, param, init_rng, param_rng, step_rng)


def _initial_state(run: _Run):
  """A fresh state (model init, the parameterization's theta, `config.init_from` weights, optimizer state), its
  shardings, the optimizer and its schedule, the init provenance and the model's parameter count."""
  config = run.config
  variables = build.init_variables(run.module, run.init_rng, run.dataset.input_shape, run.dataset.input_dtype)
  params = variables.pop("params")
  model_state = variables
  theta = run.param.init(run.param_rng, params)
  theta, model_state, provenance = _init_from(config, theta, model_state)
  tx, sched = optim.build(config.optimizer, theta, run.total)
  state = {"step": jnp.zeros((), jnp.int32), "theta": theta, "opt_state": tx.init(theta),
           "model_state": model_state}
  fsdp = tuple(tuple(r) for r in config.get("sharding", {}).get("fsdp", ()))
  state_sh = {"step": sharding.replicated(run.mesh),
              "theta": sharding.param_shardings(state["theta"], run.mesh, fsdp),
              "opt_state": sharding.param_shardings(state["opt_state"], run.mesh, ()),
              "model_state": sharding.param_shardings(state["model_state"], run.mesh, ())}
  return state, state_sh, tx, sched, provenance, trees.count(params)


def _restore_or_keep(mngr, state, state_sh, provenance):
  """The workdir's latest checkpoint (resume) if there is one, else `state`; placed on the devices.

  Returns:
    `(state, start step, provenance)`.

  Raises:
    CheckpointReadError: the checkpoint does not fit this config.
  """
  start = mngr.latest_step()
  if start is None:
    return jax.device_put(state, state_sh), 0, provenance
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=s),
                          state, state_sh)
  weights_t = {"theta": abstract["theta"]}
  if state["model_state"]:
    weights_t["model_state"] = abstract["model_state"]
  try:
    restored = mngr.restore(start, weights_t, abstract["opt_state"])
  except Exception as e:
    raise checkpoint.CheckpointReadError(
        f"{mngr.directory}: cannot resume step {start} with this config ({str(e).splitlines()[0][:200]}); "
        "use a fresh --workdir or the config that wrote it") from e
  state = {"step": jnp.asarray(start, jnp.int32), "theta": restored["weights"]["theta"],
           "opt_state": restored["opt_state"], "model_state": dict(restored["weights"].get("model_state", {}))}
  logging.info("resumed from %s at step %d", mngr.directory, start)
  return jax.device_put(state, state_sh), int(start), restored["meta"].get("provenance", provenance)


def _compiled_steps(run: _Run, tx):
  """The jitted train step (state donated), eval step and `materialize` of the run."""
  obj_cfg = run.config.get("objective") or {}
  teacher = checkpoint.load(obj_cfg.teacher) if obj_cfg.get("teacher") else None
  train_step = jax.jit(make_train_step(run.module, run.param, tx, obj_cfg, teacher), donate_argnums=(0,))
  eval_fn = objectives.get_eval(obj_cfg)
  eval_prep = objectives.get_preparer(obj_cfg) if obj_cfg.get("eval_prepare", False) else None
  if eval_prep:
    eval_step = jax.jit(make_eval_step(run.module, eval_fn, eval_prep, obj_cfg))
  else:
    eval_step = jit_eval_step(run.module, eval_fn)
  return train_step, eval_step, jax.jit(run.param.materialize)


def _evaluate_splits(run: _Run, materialize, eval_step, state, splits, step: int, writer: MetricWriter) -> dict:
  """Metrics of the current state on each of `splits`, also written at `step`."""
  p = materialize(state["theta"])
  batch_size = int(run.config.data.get("eval_batch_size", 256))
  out = {}
  for split in splits:
    m = evaluate(run.module, p, state["model_state"], run.dataset, split, batch_size, mesh=run.mesh,
                 eval_step=eval_step)
    out[split] = m
    writer.write(step, {k: v for k, v in m.items() if k != "count"}, prefix=f"{split}/")
  return out


def _final_splits(config) -> tuple[str, ...]:
  return tuple(dict.fromkeys(tuple(config.get("eval_splits", ("validation",)))
                            + tuple(config.get("final_eval_splits", ("test",)))))


def _train_loop(run: _Run, state, start: int, train_step, sched, run_eval, mngr, writer: MetricWriter,
                provenance, opened: _Opened):
  """Steps `start..total`: train metrics every `log_every` steps, evaluation every `eval_every`
  (`run_eval(state, splits, step)`), checkpoints every `checkpoint_every`; returns the final state (the state
  passed in is donated to the first step). The batch of step s comes from `(seed, s)` alone."""
  config, total, bs = run.config, run.total, run.batch_size
  log_every = int(config.get("log_every", 50))
  eval_every = int(config.get("eval_every", 0) or 0)
  ckpt_every = int(config.get("checkpoint_every", 0) or 0)
  eval_splits = tuple(config.get("eval_splits", ("validation",)))
  last_eval: dict = {}
  t_log, n_log = time.time(), 0
  pending: list = []
  batches = data.TrainBatches(run.dataset, config.data, start=start, total=total, batch_size=bs,
                              seed=int(config.seed), mesh=run.mesh)
  tracer = profiling.StepTracer(run.workdir, int(config.get("profile_steps", 0) or 0), start, total)
  opened.others += [batches.close, lambda: tracer.close(state)]  # input workers, profiler: also on an error
  try:
    for step in range(start, total):
      tracer.step(step, state)  # config.profile_steps: jax.profiler trace of a few steps
      state, metrics = train_step(state, next(batches), run.step_rng)  # batch of (seed, step), already on device
      pending.append(metrics)
      n_log += bs
      done = step + 1
      if done % log_every == 0 or done == total:
        host = jax.device_get(pending)
        pending = []
        _check_finite(host, done, mngr)
        m = {k: float(np.mean([h[k] for h in host])) for k in host[-1] if k != "finite"}
        m["lr"] = float(sched(done - 1))
        m["examples_per_s"] = n_log / max(time.time() - t_log, 1e-9)
        t_log, n_log = time.time(), 0
        writer.write_train(done, m, last_eval)
      writer.advance()
      if eval_every and done % eval_every == 0 and done != total:
        last_eval = run_eval(state, eval_splits[:1], done)[eval_splits[0]] if eval_splits else {}
      if ckpt_every and done % ckpt_every == 0 and done != total:
        _check_finite(jax.device_get(pending), done, mngr)  # never checkpoint a state after a non-finite step
        _save(mngr, state, config, run.dataset, done, {}, provenance)
  except KeyboardInterrupt:
    tracer.close(state)
    batches.close()
    mngr.close()
    writer.close_progress()
    raise
  tracer.close(state)
  batches.close()
  writer.close_progress()
  return state


def _write_summary(run: _Run, results: dict, n_params: int, n_theta: int, wall_s: float) -> dict:
  """The run's summary (also `<workdir>/summary.json`, the mark of a finished run)."""
  summary = {
      "workdir": os.path.abspath(run.workdir),
      "steps": run.total,
      "params": n_params,
      "trainable": n_theta,
      "wall_s": wall_s,
      **{f"{s}_accuracy": m.get("accuracy") for s, m in results.items()},
      "metrics": results,
  }
  if jax.process_index() == 0:
    with open(os.path.join(run.workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def _check_finite(host_metrics: list[dict], done: int, mngr) -> None:
  """Raises NonFiniteError naming the first non-finite step of the last `len(host_metrics)` steps before
  `done`, and the last good checkpoint (its pending save is finished first, so the step named is on disk)."""
  flags = [bool(m["finite"]) for m in host_metrics]
  if all(flags):
    return
  i = flags.index(False)
  bad, step = host_metrics[i], done - len(flags) + i + 1
  try:
    mngr.wait()
  except checkpoint.CheckpointError:
    pass
  steps = mngr.all_steps()
  kept = (f"the last good checkpoint, step {steps[-1]}, is kept in {mngr.directory} (a restart resumes from it)"
          if steps else "there is no last good checkpoint (none had been written yet)")
  raise NonFiniteError(f"non-finite loss or gradients at step {step} (loss={float(bad['loss'])}, "
                       f"grad_norm={float(bad['grad_norm'])}); {kept}. Lower config.optimizer.lr or set "
                       "config.optimizer.grad_clip")


def _save(mngr, state, config, dataset, step, metrics, provenance):
  meta = make_meta(config, dataset, step, metrics, provenance)
  weights = {"theta": state["theta"]}
  if state["model_state"]:
    weights["model_state"] = state["model_state"]
  mngr.save(step, weights, meta, opt_state=state["opt_state"])
