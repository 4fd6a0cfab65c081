"""The one training loop.

`train_and_evaluate(config, workdir)` trains `model + parameterization +
objective + data + optimizer (+ init_from)` and returns a summary dict. Every
method in jaxlab trains through this function; the method modules only
register parameterizations, loss terms, models, data sets and transforms.

Init precedence: resume from `<workdir>/checkpoints` > `config.init_from.path`
(+ optional transform) > from scratch. The batch of step `s` and the dropout
key of step `s` depend only on `(seed, s)`, so a killed run that is started
again with the same command ends with bitwise the same parameters.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxlab import build, checkpoint, data, objectives, optim, profiling, sharding, trees, validate


class NonFiniteError(FloatingPointError):
  """Loss or gradients became NaN/Inf; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------
# Durations
# ----------------------------------------------------------------------------


resolve_steps = validate.resolve_steps  # steps from total_steps / total_epochs (checked there)


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------


def _apply(module, params, model_state, inputs, *, train, rng=None, features=False):
  """Runs the model; returns (logits, new model_state, features or None)."""
  mutable = list(model_state) if train else []
  if features:
    mutable.append("intermediates")
  rngs = {"dropout": rng} if rng is not None else None
  out = module.apply({"params": params, **model_state}, inputs, train=train, rngs=rngs,
                     mutable=mutable if mutable else False)
  if not mutable:
    return _float32(out), model_state, None
  logits, new_vars = out
  logits = _float32(logits)
  new_vars = dict(new_vars)
  feats = new_vars.pop("intermediates", None)
  new_state = {k: new_vars[k] for k in model_state} if train else model_state
  return logits, new_state, feats


def _float32(tree):
  """Floating leaves below float32 (a bfloat16 model's outputs) as float32: losses and metrics are float32."""
  def cast(x):
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
      return x.astype(jnp.float32)
    return x
  return jax.tree.map(cast, tree)


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
    logits, new_state, feats = _apply(module, params, model_state, batch["inputs"], train=True,
                                      rng=drop_rng, features=want_features)
    ctx = objectives.Context(logits=logits, batch=batch, features=feats, params=params, theta=theta,
                             rng=rng)
    if teacher is not None:
      t_logits, _, t_feats = _apply(teacher.module, teacher.params, teacher.model_state, batch["inputs"],
                                    train=False, features=want_features)
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


@build.per_architecture
def jit_eval_step(module, eval_fn):
  """The jitted eval step of `module` (no preparer), shared by every evaluation of the same architecture."""
  return jax.jit(make_eval_step(module, eval_fn))


def make_eval_step(module, eval_fn, preparer=None, obj_cfg=None):
  """Returns `step(params, model_state, batch) -> metric sums`; `preparer` (e.g. masking for a denoising
  eval) is applied first with a fixed key, so eval masks are the same on every call."""
  def step(params, model_state, batch):
    if preparer is not None:
      batch = preparer(batch, jax.random.key(0), obj_cfg)
    logits, _, _ = _apply(module, params, model_state, batch["inputs"], train=False)
    return eval_fn(logits, batch)
  return step


def evaluate(module, params, model_state, dataset: data.Dataset, split: str, batch_size: int, *,
             mesh=None, eval_fn=None, eval_step=None) -> dict[str, float]:
  """Exact metrics of a model over every example of `split` (padding masked out)."""
  mesh = mesh or sharding.make_mesh()
  eval_fn = eval_fn or objectives.get_eval({})
  eval_step = eval_step or jit_eval_step(module, eval_fn)
  n_dev = mesh.shape["data"]
  batch_size = max(n_dev, (batch_size // n_dev) * n_dev)
  totals: dict[str, float] = {}
  for batch in dataset.eval_batches(split, batch_size, process_index=jax.process_index(),
                                    process_count=jax.process_count()):
    sums = jax.device_get(eval_step(params, model_state, dataset.device_preprocess(sharding.put_batch(batch, mesh))))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return objectives.finalize_eval(totals)


def evaluate_checkpoint(path: str, split: str = "test", batch_size: int = 256, data_cfg=None,
                        step: int | None = None) -> dict[str, float]:
  """Loads a checkpoint from its meta alone and evaluates it on `split` of its data set."""
  loaded = checkpoint.load(path, step)
  dcfg = data_cfg if data_cfg is not None else loaded.meta["data"]["config"]
  ds = data.get_dataset(dcfg, loaded.meta)
  return evaluate(loaded.module, loaded.params, loaded.model_state, ds, split, batch_size)


# ----------------------------------------------------------------------------
# State initialisation
# ----------------------------------------------------------------------------


def _init_from(config, theta, model_state):
  """Overrides freshly initialised weights with those of `config.init_from`."""
  ic = config.get("init_from")
  if not ic or not ic.get("path"):
    return theta, model_state, None
  from jaxlab import transforms  # local import: transforms import train helpers
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
  """Metrics as JSON lines (`metrics.jsonl`) and TensorBoard events in the workdir."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self.enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      try:
        self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))
      except ImportError:  # pragma: no cover
        self._tb = None

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

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


class _Opened:
  """What a training run opened (checkpoint manager, progress bar, metric files), closed on every error path:
  the bar first, so the error is printed on a line of its own, then the checkpoint manager (its pending save
  finishes, and no orbax thread outlives the interpreter), then the metric files."""

  def __init__(self):
    self.pbar = None
    self.mngr = None
    self.writer = None
    self.others: list = []  # more closers, called first (e.g. the input pipeline's workers)

  def close_after_error(self):
    if self.pbar is not None:
      self.pbar.close()
    for close in self.others:
      try:
        close()
      except Exception:  # noqa: BLE001  (closing after a failure: the first error is the one to report)
        logging.debug("closing after an error", exc_info=True)
    if self.mngr is not None:
      self.mngr.close(raise_errors=False)
    if self.writer is not None:
      self.writer.close()


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
  dataset = data.get_dataset(config.data, data.checkpoint_meta_for(config))  # + an imported model's preprocessing
  total = resolve_steps(config, dataset.num_examples("train"))
  mesh = sharding.make_mesh(config.get("sharding", {}).get("num_devices") or None)
  n_dev = mesh.shape["data"]
  bs = int(config.data.batch_size)
  if bs % n_dev or bs % jax.process_count():
    raise ValueError(f"config.data.batch_size={bs} must be divisible by the {n_dev} devices")

  module = build.model(config.model, dataset.num_classes)
  param = build.parameterization(config.get("parameterization"), config.model)
  rng = jax.random.key(int(config.seed))
  init_rng, param_rng, step_rng = jax.random.split(rng, 3)
  variables = build.init_variables(module, init_rng, dataset.input_shape, dataset.input_dtype)
  params = variables.pop("params")
  model_state = variables
  theta = param.init(param_rng, params)
  theta, model_state, provenance = _init_from(config, theta, model_state)
  tx, sched = optim.build(config.optimizer, theta, total)
  state = {"step": jnp.zeros((), jnp.int32), "theta": theta, "opt_state": tx.init(theta),
           "model_state": model_state}

  fsdp = tuple(tuple(r) for r in config.get("sharding", {}).get("fsdp", ()))
  state_sh = {"step": sharding.replicated(mesh),
              "theta": sharding.param_shardings(state["theta"], mesh, fsdp),
              "opt_state": sharding.param_shardings(state["opt_state"], mesh, ()),
              "model_state": sharding.param_shardings(state["model_state"], mesh, ())}

  mngr = opened.mngr = checkpoint.Manager(workdir, max_to_keep=config.get("keep_checkpoints", 2))
  start = mngr.latest_step()
  if start is not None:
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=s),
                            state, state_sh)
    weights_t = {"theta": abstract["theta"]}
    if model_state:
      weights_t["model_state"] = abstract["model_state"]
    try:
      restored = mngr.restore(start, weights_t, abstract["opt_state"])
    except Exception as e:
      raise checkpoint.CheckpointReadError(
          f"{mngr.directory}: cannot resume step {start} with this config ({str(e).splitlines()[0][:200]}); "
          "use a fresh --workdir or the config that wrote it") from e
    state = {"step": jnp.asarray(start, jnp.int32), "theta": restored["weights"]["theta"],
             "opt_state": restored["opt_state"],
             "model_state": dict(restored["weights"].get("model_state", {}))}
    provenance = restored["meta"].get("provenance", provenance)
    logging.info("resumed from %s at step %d", mngr.directory, start)
    start = int(start)
  else:
    start = 0
  state = jax.device_put(state, state_sh)

  teacher = None
  if config.get("objective", {}).get("teacher"):
    teacher = checkpoint.load(config.objective.teacher)
  obj_cfg = config.get("objective") or {}
  train_step = jax.jit(make_train_step(module, param, tx, obj_cfg, teacher), donate_argnums=(0,))
  eval_fn = objectives.get_eval(obj_cfg)
  eval_prep = objectives.get_preparer(obj_cfg) if obj_cfg.get("eval_prepare", False) else None
  eval_step = jax.jit(make_eval_step(module, eval_fn, eval_prep, obj_cfg)) if eval_prep else jit_eval_step(
      module, eval_fn)
  materialize = jax.jit(param.materialize)
  eval_bs = int(config.data.get("eval_batch_size", 256))
  eval_splits = tuple(config.get("eval_splits", ("validation",)))

  def run_eval(splits, step):
    p = materialize(state["theta"])
    out = {}
    for split in splits:
      m = evaluate(module, p, state["model_state"], dataset, split, eval_bs, mesh=mesh, eval_step=eval_step)
      out[split] = m
      writer.write(step, {k: v for k, v in m.items() if k != "count"}, prefix=f"{split}/")
    return out

  n_params = trees.count(params)
  n_theta = trees.count(state["theta"])
  writer = opened.writer = MetricWriter(workdir)
  log_every = int(config.get("log_every", 50))
  eval_every = int(config.get("eval_every", 0) or 0)
  ckpt_every = int(config.get("checkpoint_every", 0) or 0)
  seed = int(config.seed)
  pbar = None
  if config.get("progress", True) and jax.process_index() == 0:
    from tqdm.auto import tqdm
    pbar = tqdm(total=total, initial=start, desc=os.path.basename(os.path.abspath(workdir)),
                dynamic_ncols=True, leave=True)
    opened.pbar = pbar
  last_eval: dict = {}
  t_log, n_log = time.time(), 0
  pending: list = []
  batches = data.TrainBatches(dataset, config.data, start=start, total=total, batch_size=bs, seed=seed, mesh=mesh)
  tracer = profiling.StepTracer(workdir, int(config.get("profile_steps", 0) or 0), start, total)
  opened.others += [batches.close, lambda: tracer.close(state)]  # input workers, profiler: also on an error
  try:
    for step in range(start, total):
      tracer.step(step, state)  # config.profile_steps: jax.profiler trace of a few steps
      state, metrics = train_step(state, next(batches), step_rng)  # batch of (seed, step), already on device
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
        writer.write(done, m, prefix="train/")
        if pbar is not None:
          post = {"loss": f"{m['loss']:.4f}", "ex/s": f"{m['examples_per_s']:.0f}"}
          if "accuracy" in m:
            post["acc"] = f"{m['accuracy']:.3f}"
          if last_eval:
            post["val"] = f"{last_eval.get('accuracy', float('nan')):.3f}"
          pbar.set_postfix(post, refresh=False)
      if pbar is not None:
        pbar.update(1)
      if eval_every and done % eval_every == 0 and done != total:
        last_eval = run_eval(eval_splits[:1], done)[eval_splits[0]] if eval_splits else {}
      if ckpt_every and done % ckpt_every == 0 and done != total:
        _check_finite(jax.device_get(pending), done, mngr)  # never checkpoint a state after a non-finite step
        _save(mngr, state, config, dataset, done, {}, provenance)
  except KeyboardInterrupt:
    tracer.close(state)
    batches.close()
    mngr.close()
    if pbar is not None:
      pbar.close()
    raise
  tracer.close(state)
  batches.close()
  if pbar is not None:
    pbar.close()
  final_splits = tuple(dict.fromkeys(eval_splits + tuple(config.get("final_eval_splits", ("test",)))))
  results = run_eval(final_splits, total) if total > 0 else {}
  flat = {f"{s}/{k}": v for s, m in results.items() for k, v in m.items()}
  if total not in mngr.all_steps():  # a finished run started again only re-evaluates
    _save(mngr, state, config, dataset, total, flat, provenance)
  mngr.close()
  writer.close()
  summary = {
      "workdir": os.path.abspath(workdir),
      "steps": total,
      "params": n_params,
      "trainable": n_theta,
      "wall_s": time.time() - t0,
      **{f"{s}_accuracy": m.get("accuracy") for s, m in results.items()},
      "metrics": results,
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
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
