"""Model soups: weight averages of fine-tunes of one pre-trained model (Wortsman et al., ICML 2022).

Transforms registered here:
  uniform_soup   streaming weighted mean of N checkpoints (BatchNorm statistics
                 averaged, or recomputed on training batches)
  greedy_soup    paper Recipe 1: sort by held-out accuracy, add an ingredient
                 only if the held-out accuracy of the running mean improves
  interpolate    WiSE-FT weight-space interpolation (1 - alpha) theta_0 + alpha theta_1
  materialize    any parameterization (e.g. a trained learned soup) to plain params

The learned soup is a parameterization (`jaxlab/parameterizations/soup_mixture.py`)
trained with the one training loop, then turned into a plain checkpoint with
`materialize`. `logit_ensemble` evaluates the output-space baseline.

Memory: the streaming transforms hold the float32 running sum plus one input
at a time; the engine hands them a lazy `Inputs` sequence, so a soup of N
checkpoints needs about two models of memory whatever N is.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import checkpoint, data, objectives, sharding, trees
from jaxlab.transforms.registry import Output, register

SOUPS_REF = "Wortsman et al., Model soups, ICML 2022, arXiv:2203.05482"
WISE_FT_REF = "Wortsman et al., Robust fine-tuning of zero-shot models (WiSE-FT), CVPR 2022, arXiv:2109.01903"


# ----------------------------------------------------------------------------
# Pure, jit-compiled tree arithmetic
# ----------------------------------------------------------------------------


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


@jax.jit
def scale_tree(tree, w):
  """`w * tree` in float32 (non-float leaves are kept as they are)."""
  return jax.tree.map(lambda x: x.astype(jnp.float32) * w if _is_float(x) else x, tree)


@functools.partial(jax.jit, donate_argnums=0)
def axpby(acc, tree, a, b):
  """`a * acc + b * tree` leaf by leaf in acc's dtype; `acc` is donated (updated in place)."""
  return jax.tree.map(lambda u, v: a * u + b * v.astype(u.dtype) if _is_float(u) else u, acc, tree)


def cast_like(tree, dtypes):
  """Casts every leaf of `tree` to the dtype at the same place in `dtypes`."""
  return jax.tree.map(lambda x, d: x.astype(d), tree, dtypes)


def mean_trees(tree_list: Sequence, weights: Sequence[float] | None = None):
  """Weighted mean of trees with identical structure (weights default to uniform), in their dtype.

  Raises:
    ValueError: for an empty list or weights of the wrong length.
  """
  if not tree_list:
    raise ValueError("mean_trees: no trees given")
  w = normalized_weights(weights, len(tree_list))
  dtypes = jax.tree.map(lambda x: jnp.result_type(x), tree_list[0])
  acc = scale_tree(tree_list[0], w[0])
  for t, wi in zip(tree_list[1:], w[1:], strict=True):
    acc = axpby(acc, t, 1.0, wi)
  return cast_like(acc, dtypes)


def normalized_weights(weights, n: int) -> list[float]:
  """Non-negative weights scaled to sum 1; empty/None means uniform 1/n.

  Raises:
    ValueError: wrong number of weights, a negative weight, or all zero.
  """
  if not weights:
    return [1.0 / n] * n
  w = [float(x) for x in weights]
  if len(w) != n:
    raise ValueError(f"weights: got {len(w)} weights for {n} input checkpoints")
  if min(w) < 0 or sum(w) <= 0:
    raise ValueError(f"weights: must be non-negative and not all zero, got {w}")
  return [x / sum(w) for x in w]


# ----------------------------------------------------------------------------
# Ingredients: the engine's lazy inputs, loaded checkpoints, or extra paths
# ----------------------------------------------------------------------------


def _weights_tree(ld) -> dict:
  return {"theta": ld.theta, "model_state": dict(ld.model_state)}


def _ingredients(inputs, more_inputs: Sequence[str] = ()):
  """Yields `(path, Loaded)` one at a time: the inputs, then extra checkpoint paths."""
  for i in range(len(inputs)):
    ld = inputs[i]
    yield str(getattr(ld, "path", i)), ld
    del ld
  for p in more_inputs:
    yield p, checkpoint.load(p)


def _check_tree(ref: dict, tree: dict, ref_path: str, path: str) -> None:
  d = trees.diff(ref, tree)
  if d:
    raise trees.mismatch_error(f"soup: {path} does not have the same parameter tree as {ref_path}", d)


class Ingredient:
  """What a soup keeps of its first ingredient: meta, module and parameterization (not its weights)."""

  def __init__(self, path: str, ld):
    self.path, self.meta, self.module, self.parameterization = path, ld.meta, ld.module, ld.parameterization


def stream_weighted_sum(inputs, weights: Sequence[float], more_inputs: Sequence[str] = ()):
  """sum_i weights[i] * {'theta', 'model_state'}_i, loading one ingredient at a time.

  The running sum is kept in float32 and cast back to the inputs' dtypes at the
  end; every ingredient's tree is checked against the first one's.

  Returns:
    (sum tree in the inputs' dtypes, `Ingredient` of the first input, number of ingredients).

  Raises:
    ValueError: no ingredients, or a number of weights that does not match.
    trees.TreeMismatchError: an ingredient whose tree differs from the first's.
  """
  n = len(inputs) + len(more_inputs)
  if n == 0:
    raise ValueError("soup: no input checkpoints given")
  if len(weights) != n:
    raise ValueError(f"soup: got {len(weights)} weights for {n} ingredients")
  acc = dtypes = first = ref = None
  i = -1
  for path, ld in _ingredients(inputs, more_inputs):  # no enumerate: its cached tuple would keep `ld` alive
    i += 1
    tree = _weights_tree(ld)
    if acc is None:
      ref = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
      dtypes = jax.tree.map(lambda x: x.dtype, tree)
      acc = scale_tree(tree, float(weights[0]))
      first = Ingredient(path, ld)
    else:
      _check_tree(ref, tree, first.path, path)
      acc = axpby(acc, tree, 1.0, float(weights[i]))
    del tree, ld
  return cast_like(acc, dtypes), first, n


def stream_mean(inputs, weights=None, more_inputs: Sequence[str] = ()):
  """Weighted mean (weights normalised, default uniform) of the ingredients, loading one at a time.

  Returns:
    (mean `{'theta', 'model_state'}` in the inputs' dtypes, `Ingredient` of the first input, n).
  """
  n = len(inputs) + len(more_inputs)
  if n == 0:
    raise ValueError("soup: no input checkpoints given")
  return stream_weighted_sum(inputs, normalized_weights(weights, n), more_inputs)


# ----------------------------------------------------------------------------
# Evaluation helpers (held-out accuracy for greedy soups, logit ensembles)
# ----------------------------------------------------------------------------


def _mesh_for(tree):
  leaves = jax.tree.leaves(tree)
  devices = leaves[0].devices() if leaves and hasattr(leaves[0], "devices") else {jax.devices()[0]}
  return sharding.make_mesh(len(devices) if len(devices) > 1 else 1)


class Evaluator:
  """Accuracy of (params, model_state) of one architecture on one split; compiled once.

  Args:
    module: the Flax module (same for every candidate).
    dataset: a `data.Dataset`.
    split: the split to evaluate on (e.g. 'heldout').
    batch_size: eval batch size.
  """

  def __init__(self, module, dataset, split: str, batch_size: int = 256):
    from jaxlab import evaluate  # local: the data layer is imported only when a soup evaluates
    dataset.split(split)  # clear error for an unknown split before any work
    self.module, self.dataset, self.split, self.batch_size = module, dataset, split, batch_size
    self._evaluate = evaluate.evaluate
    self._step = evaluate.jit_eval_step(module, objectives.get_eval({}))
    self.calls = 0

  def __call__(self, params, model_state) -> float:
    self.calls += 1
    m = self._evaluate(self.module, params, model_state, self.dataset, self.split, self.batch_size,
                       mesh=_mesh_for(params), eval_step=self._step)
    return float(m["accuracy"])


def _dataset_of(meta: dict, data_name: str = ""):
  cfg = dict(meta["data"]["config"])
  cfg.pop("train_split", None)
  if data_name:
    cfg["name"] = data_name
  return data.get_dataset(cfg)


# ----------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------


@register(
    "uniform_soup", idea="Average the weights of N fine-tunes of one pre-trained model (streaming, ~2 models "
    "of memory); BatchNorm statistics averaged or recomputed", reference=SOUPS_REF, inputs="N", streaming=True,
    averages=True)
def uniform_soup(inputs, *, weights: tuple = (), more_inputs: tuple = (), recompute_batch_stats: int = 0,
                 batch_size: int = 64) -> Output:
  """theta_soup = sum_i w_i theta_i (w_i = 1/N by default), streaming over the inputs.

  Args:
    inputs: the ingredient checkpoints.
    weights: optional per-input weights, normalised to sum 1 (empty = uniform 1/N)
    more_inputs: extra ingredient checkpoint paths (e.g. with init_from, which has one)
    recompute_batch_stats: if > 0, recompute BatchNorm statistics on this many training batches (cumulative
      average) instead of averaging them
    batch_size: batch size for recomputing BatchNorm statistics
  """
  if recompute_batch_stats < 0:
    raise ValueError(f"uniform_soup: recompute_batch_stats must be >= 0, got {recompute_batch_stats}")
  mean, first, n = stream_mean(inputs, weights, tuple(more_inputs))
  model_state = mean["model_state"]
  report = {"num_ingredients": n, "weights": normalized_weights(weights, n)}
  if recompute_batch_stats and "batch_stats" in model_state:
    params = first.parameterization.materialize(mean["theta"])
    dataset = _dataset_of(first.meta)
    model_state = recompute_batch_stats_fn(first.module, params, model_state, dataset,
                                           recompute_batch_stats, batch_size)
    report["batch_stats"] = f"recomputed on {recompute_batch_stats} training batches of {batch_size}"
  elif "batch_stats" in model_state:
    report["batch_stats"] = "averaged"
  return Output(theta=mean["theta"], model_state=model_state, report=report)


def recompute_batch_stats_fn(module, params, model_state: dict, dataset, num_batches: int, batch_size: int,
                             seed: int = 0) -> dict:
  """BatchNorm running statistics recomputed as the plain average over `num_batches` training batches.

  Flax's running statistics follow `r <- m r + (1 - m) s` for a batch statistic
  `s`. One train-mode pass from `r = 0` gives `(1 - m) s`, one from `r = 1`
  gives `m + (1 - m) s`; together they give `s` without knowing the momentum,
  so every BatchNorm layer gets the cumulative mean of its batch statistics
  (as SWA's `bn_update` with momentum None).
  """
  stats = model_state["batch_stats"]
  others = {k: v for k, v in model_state.items() if k != "batch_stats"}

  @jax.jit
  def batch_stat(x, rng):
    def run(fill):
      state = jax.tree.map(lambda s: jnp.full_like(s, fill), stats)
      _, new = module.apply({"params": params, **others, "batch_stats": state}, x, train=True,
                            mutable=["batch_stats"], rngs={"dropout": rng})
      return new["batch_stats"]
    zero, one = run(0.0), run(1.0)
    return jax.tree.map(lambda z, o: z / (1.0 - (o - z)), zero, one)

  total = None
  for step in range(num_batches):
    batch = dataset.train_batch(step, batch_size, seed)
    s = batch_stat(jnp.asarray(batch["inputs"]), jax.random.key(step))
    total = s if total is None else jax.tree.map(jnp.add, total, s)
  return {**others, "batch_stats": jax.tree.map(lambda t, r: (t / num_batches).astype(r.dtype), total, stats)}


GreedyTies = Literal["official", "input"]
GREEDY_TIES = get_args(GreedyTies)


def greedy_order(accs, ties: str = "official") -> list[int]:
  """The order in which greedy soup tries the ingredients: held-out accuracy descending.

  Ties matter with small held-out splits (180 images give many equal accuracies), and the first ingredient is
  the soup's start. 'official': the official code sorts the (name, accuracy) pairs ascending with a stable sort
  and reverses the list, so among equal accuracies the later input comes first. 'input': the earlier input
  comes first.

  Raises:
    ValueError: for an unknown `ties` rule.
  """
  if ties not in GREEDY_TIES:
    raise ValueError(f"greedy_soup: ties must be one of {list(GREEDY_TIES)}, got {ties!r}")
  n = len(accs)
  if ties == "official":
    return sorted(range(n), key=lambda i: (-float(accs[i]), -i))
  return sorted(range(n), key=lambda i: (-float(accs[i]), i))


@register(
    "greedy_soup", idea="Add ingredients in order of held-out accuracy, keeping one only if the soup's held-out "
    "accuracy improves (never worse than the best ingredient on that split)", reference=SOUPS_REF + " (Recipe 1)",
    inputs="N", streaming=True, averages=True)
def greedy_soup(inputs, *, split: str = "heldout", accept: Literal[">", ">="] = ">", batch_size: int = 256,
                data_name: str = "", ties: GreedyTies = "official") -> Output:
  """Greedy soup: one pass over the ingredients sorted by held-out accuracy (descending; ties: `greedy_order`).

  Args:
    inputs: the ingredient checkpoints.
    split: split of the inputs' data set used to rank and accept ingredients
    accept: '>' strict improvement (official code) or '>=' (paper's Recipe 1)
    batch_size: eval batch size
    data_name: evaluate on another registered data set (default: the inputs' own)
    ties: order of ingredients with equal held-out accuracy: 'official' (the official code's ascending sort then
      reverse: the later input first) or 'input' (the earlier input first)
  """
  evaluator = ref = None
  paths, accs = [], []
  i = -1
  for path, ld in _ingredients(inputs):  # pass 1: rank, one ingredient in memory
    i += 1
    tree = _weights_tree(ld)
    if i == 0:
      evaluator = Evaluator(ld.module, _dataset_of(ld.meta, data_name), split, batch_size)
      ref = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
    else:
      _check_tree(ref, tree, paths[0], path)
    paths.append(path)
    accs.append(evaluator(ld.params, ld.model_state))
    del ld, tree
  order = greedy_order(accs, ties)
  best = inputs[order[0]]
  param = best.parameterization
  dtypes = jax.tree.map(lambda x: x.dtype, _weights_tree(best))
  soup = scale_tree(_weights_tree(best), 1.0)
  del best
  chosen, best_acc, history = [order[0]], accs[order[0]], []
  for i in order[1:]:
    k = len(chosen)
    ld = inputs[i]
    cand = axpby(jax.tree.map(jnp.copy, soup), _weights_tree(ld), k / (k + 1), 1.0 / (k + 1))
    del ld
    cand_w = cast_like(cand, dtypes)
    acc = evaluator(param.materialize(cand_w["theta"]), cand_w["model_state"])
    take = acc > best_acc or (accept == ">=" and acc >= best_acc)
    history.append({"path": paths[i], "ingredient_acc": accs[i], "soup_acc": acc, "accepted": bool(take)})
    if take:
      soup, best_acc = cand, acc
      chosen.append(i)
    del cand, cand_w
  out = cast_like(soup, dtypes)
  report = {"split": split, "accept": accept, "ties": ties, "order": order, "num_ingredients": len(chosen),
            "chosen": [paths[i] for i in chosen],
            "chosen_index": chosen, "ingredient_acc": dict(zip(paths, accs, strict=True)), "soup_acc": best_acc,
            "best_ingredient_acc": max(accs), "history": history}
  return Output(theta=out["theta"], model_state=out["model_state"], report=report)


@register(
    "interpolate", idea="Weight-space interpolation (1 - alpha) theta_0 + alpha theta_1 of two fine-tunes (or "
    "pre-trained and fine-tuned, WiSE-FT)", reference=WISE_FT_REF, inputs="2", streaming=True, averages=True)
def interpolate(inputs, *, alpha: float = 0.5) -> Output:
  """theta = (1 - alpha) theta_0 + alpha theta_1 (alpha outside [0, 1] extrapolates).

  Args:
    inputs: two checkpoints of one architecture.
    alpha: mixing coefficient: 0 gives the first input, 1 the second
  """
  out, _, _ = stream_weighted_sum(inputs, (1.0 - alpha, alpha))
  return Output(theta=out["theta"], model_state=out["model_state"], report={"alpha": alpha})


@register(
    "materialize", idea="Replace a checkpoint's parameterization (learned soup, TLEG, ...) by the plain model "
    "params it materializes (identity parameterization)", reference="jaxlab (DESIGN.md: parameterizations)",
    inputs="1")
def materialize(inputs) -> Output:
  """params = parameterization.materialize(theta); the output trains and evaluates as a plain model."""
  ld = inputs[0]
  params = jax.jit(ld.parameterization.materialize)(ld.theta)
  return Output(theta=params, model_state=ld.model_state, meta={"parameterization": {"name": "identity"}},
                report={"from_parameterization": (ld.meta.get("parameterization") or {}).get("name", "identity")})


# ----------------------------------------------------------------------------
# Output-space baseline
# ----------------------------------------------------------------------------


def logit_ensemble(paths: Sequence[str], splits: Sequence[str] = ("test",), batch_size: int = 256,
                   data_name: str = "") -> dict[str, dict[str, float]]:
  """Accuracy of the mean of the models' logits, loading one model at a time.

  Args:
    paths: checkpoint workdirs (same data set and classes).
    splits: splits of the first checkpoint's data set.
    batch_size: eval batch size.
    data_name: evaluate on another registered data set.

  Returns:
    `{split: {'accuracy', 'count', 'num_models'}}`.

  Raises:
    ValueError: no paths.
  """
  paths = list(paths)
  if not paths:
    raise ValueError("logit_ensemble: no checkpoints given")
  dataset = _dataset_of(checkpoint.load_meta(paths[0]), data_name)
  sums = {s: None for s in splits}
  labels = {}
  for p in paths:
    ld = checkpoint.load(p)
    fwd = jax.jit(lambda params, state, x, ld=ld: ld.module.apply({"params": params, **state}, x, train=False))
    params = ld.params
    for s in splits:
      out, lab = [], []
      for batch in dataset.eval_batches(s, batch_size):
        keep = batch["mask"] > 0
        out.append(np.asarray(fwd(params, ld.model_state, jnp.asarray(batch["inputs"])), np.float64)[keep])
        lab.append(batch["label"][keep])
      logits = np.concatenate(out)
      labels[s] = np.concatenate(lab)
      sums[s] = logits if sums[s] is None else sums[s] + logits
    del ld, params
  return {s: {"accuracy": float(np.mean(np.argmax(sums[s], -1) == labels[s])), "count": int(len(labels[s])),
              "num_models": len(paths)} for s in splits}
