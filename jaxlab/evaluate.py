"""Evaluation: the forward pass, exact metrics over a split, and the `evaluate` job.

Training (`jaxlab.train`) and transforms that rank candidates (`jaxlab.transforms.soups`) both evaluate through
this module, so neither imports the other. The job evaluates any checkpoint on any split of its data set:

    python -m jaxlab.main --config=ml_collections_configs/evaluate.py \
        --config.checkpoint=runs/digits_vit --config.split=test --workdir=runs/eval
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from jaxlab import build, checkpoint, configs, data, objectives, sharding


def apply_model(module, params, model_state, inputs, *, train, rng=None, features=False):
  """Runs the model; returns (logits as float32, new model_state, the sown features or None)."""
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


def make_eval_step(module, eval_fn, preparer=None, obj_cfg=None):
  """Returns `step(params, model_state, batch) -> metric sums`; `preparer` (e.g. masking for a denoising
  eval) is applied first with a fixed key, so eval masks are the same on every call."""
  def step(params, model_state, batch):
    if preparer is not None:
      batch = preparer(batch, jax.random.key(0), obj_cfg)
    logits, _, _ = apply_model(module, params, model_state, batch["inputs"], train=False)
    return eval_fn(logits, batch)
  return step


@build.per_architecture
def jit_eval_step(module, eval_fn):
  """The jitted eval step of `module` (no preparer), shared by every evaluation of the same architecture."""
  return jax.jit(make_eval_step(module, eval_fn))


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


def run(config, workdir: str) -> dict:
  """The `evaluate` job: `config.checkpoint` on each of `config.splits`; writes `<workdir>/eval.json`."""
  if not config.get("checkpoint"):
    raise ValueError("config.checkpoint: give the checkpoint (workdir) to evaluate")
  data_cfg = None
  meta = checkpoint.load_meta(config.checkpoint)
  if config.get("data_name"):
    data_cfg = dict(meta["data"]["config"], name=config.data_name)
  result = {}
  for split in configs.as_tuple(config.splits):  # '--config.splits=test,heldout' is one string
    m = evaluate_checkpoint(config.checkpoint, split, int(config.batch_size), data_cfg=data_cfg)
    result[split] = m
    print(f"{config.checkpoint} {split}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in m.items()))
  out = {"checkpoint": os.path.abspath(config.checkpoint), "step": meta["step"], "metrics": result}
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(out, f, indent=2)
  return {"workdir": os.path.abspath(workdir), **{f"{s}_accuracy": m.get("accuracy") for s, m in result.items()}}
