"""Learngene transforms: a trained auxiliary checkpoint -> an ordinary ViT checkpoint of any depth.

`expand_learngene` (TLEG) builds layer l of a depth-L descendant as
`A + (l / L) * B` from a `linear_learngene` checkpoint; `expand_stages` (SWS)
copies each stage's block of a `stage_sharing` checkpoint into that stage's
share of the target depth. Both output a plain ViT (`identity`
parameterization) that fine-tunes like any other checkpoint.

The single copies (patch embedding, position embedding, final norm) are
copied. The head is copied (`head='transfer'`, what the official code does on
ImageNet, the data set the Aux-Net trained on) or newly initialised
(`head='reinit'`, the official choice for downstream data sets).

Final norm: the auxiliary nets apply the final LayerNorm to every token before
mean pooling (`final_norm='tokens'`), the official descendants (timm
`global_pool='avg'` -> `fc_norm`) after pooling (`final_norm='pooled'`), with
LN eps 1e-5 -> 1e-6. The defaults follow the official descendants;
`final_norm='tokens', ln_eps=0` (keep the source's eps) gives a descendant
that at the auxiliary depth computes exactly the auxiliary network.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import build, trees
from jaxlab.models import vit
from jaxlab.parameterizations import learngene as lg
from jaxlab.transforms import Output, register

SplitRule = Literal["even", "proportional", "array_split"]
SPLIT_RULES = get_args(SplitRule)

# Doc lines of the descendant parameters both expansions take (their defaults are in the signatures).
_COMMON_DOCS = {
    "head": "'transfer' copies the auxiliary head, 'reinit' draws a new one (seed)",
    "final_norm": "descendant final LayerNorm: 'pooled' (timm fc_norm, official descendants) or 'tokens' (as the "
                  "auxiliary net)",
    "ln_eps": "LayerNorm eps of the descendant (official 1e-6); 0 keeps the source's",
    "seed": "random seed of a re-initialised head",
}


class NotALearngeneError(ValueError):
  """The input checkpoint was not trained with the parameterization the transform expects."""


def _require(loaded, want: str):
  pcfg = loaded.meta.get("parameterization") or {}
  name = pcfg.get("name") or "identity"
  if name != want:
    raise NotALearngeneError(
        f"{loaded.path}: not a {want} checkpoint (its parameterization is {name!r}); train an auxiliary "
        f"network with config.parameterization.name='{want}' first")
  theta = loaded.theta
  key = "learngene" if want == "linear_learngene" else "stages"
  if key not in theta:
    raise NotALearngeneError(f"{loaded.path}: parameterization {want!r} but no '{key}' tree in its weights")
  return pcfg


@functools.partial(jax.jit, static_argnames=("depth", "coefficient"))
def expand_learngene_params(theta: dict, depth: int, coefficient: str = "l/L") -> dict:
  """Plain ViT params of depth `depth` from a `linear_learngene` theta (jit-compiled, one vectorized op).

  Args:
    theta: `{'learngene': {'A', 'B'}, ...single copies}`.
    depth: target number of layers L; layer l is `A + c_l * B` with c_l = l/L (or l/(L-1)).
    coefficient: 'l/L' (official) or 'l/(L-1)'.

  Returns:
    Params with `blocks` leaves of leading size `depth` and the single copies unchanged.
  """
  params = {k: v for k, v in theta.items() if k != "learngene"}
  params["blocks"] = lg.expand_linear(theta["learngene"], depth, coefficient)
  return params


@functools.partial(jax.jit, static_argnames=("layers_per_stage",))
def expand_stage_params(theta: dict, layers_per_stage: tuple[int, ...]) -> dict:
  """Plain ViT params from a `stage_sharing` theta: stage s's block copied `layers_per_stage[s]` times.

  Args:
    theta: `{'stages': tree with leading stage axis, ...single copies}`.
    layers_per_stage: copies per stage, in stage order (contiguous layers).

  Returns:
    Params with `blocks` leaves of leading size `sum(layers_per_stage)`.
  """
  params = {k: v for k, v in theta.items() if k != "stages"}
  params["blocks"] = lg.expand_stages_tree(theta["stages"], layers_per_stage)
  return params


def split_depth(depth: int, aux_stages: Sequence[int], rule: str = "even") -> tuple[int, ...]:
  """How many layers each stage gets at `depth` (every stage at least one, stage order kept).

  'even' starts from the auxiliary layout and moves one layer at a time: to
  shrink, one layer leaves the largest stage (ties: the latest), to grow, one
  joins the smallest stage (ties: the earliest). At the auxiliary depth it is
  the auxiliary net's own layout (so that descendant computes the auxiliary
  net); from equal stages it is np.array_split (remainder to the earliest
  stages); and it gives the only split the official SWS code ships (an
  explicit `--layers-source`), 12 layers from [3, 3, 4, 3, 3] -> [3, 3, 2, 2, 2].
  'array_split' is np.array_split of `depth` whatever the auxiliary layout
  (the 'even' rule before issue 13: 8 layers of (3, 2, 3) gave (3, 3, 2)).
  'proportional' follows the auxiliary stage sizes (largest remainder, ties
  to earlier stages), each stage at least one layer.

  Raises:
    ValueError: for depth < number of stages or an unknown rule.
  """
  aux_stages = tuple(int(s) for s in aux_stages)
  num = len(aux_stages)
  if rule not in SPLIT_RULES:
    raise ValueError(f"expand_stages: rule must be one of {list(SPLIT_RULES)}, got {rule!r}")
  if int(depth) < num:
    raise ValueError(f"expand_stages: depth {depth} is below the {num} stages of the learngene; every stage "
                     f"needs at least one layer, so use depth >= {num}")
  depth = int(depth)
  if rule == "array_split":
    return tuple(int(len(a)) for a in np.array_split(np.arange(depth), num))
  if rule == "even":
    counts = list(aux_stages)
    while sum(counts) > depth:
      big = max(counts)
      counts[max(i for i, c in enumerate(counts) if c == big)] -= 1
    while sum(counts) < depth:
      counts[counts.index(min(counts))] += 1
    return tuple(int(c) for c in counts)
  counts = np.ones(num, dtype=np.int64)
  rest = depth - num
  share = np.asarray(aux_stages, np.float64) / sum(aux_stages) * rest
  counts += np.floor(share).astype(np.int64)
  left = depth - int(counts.sum())
  order = sorted(range(num), key=lambda i: (-(share[i] - np.floor(share[i])), i))
  for i in order[:left]:
    counts[i] += 1
  return tuple(int(c) for c in counts)


def _descendant(loaded, params: dict, depth: int, head: str, final_norm: str, ln_eps: float, seed: int):
  model_cfg = dict(loaded.meta["model"])
  model_cfg.update(depth=int(depth), final_norm=final_norm)
  if ln_eps > 0:
    model_cfg["ln_eps"] = float(ln_eps)
  if head == "reinit" and "head" in params:
    k = jax.random.key(seed)
    params = dict(params)
    kinit = vit.kernel_init(model_cfg.get("init_scheme") or "")  # the descendant's own init scheme
    params["head"] = {"kernel": kinit(k, params["head"]["kernel"].shape, params["head"]["kernel"].dtype),
                      "bias": jnp.zeros_like(params["head"]["bias"])}
  data = loaded.meta["data"]
  module = build.model(model_cfg, data["num_classes"])
  want = build.abstract_variables(module, tuple(data["input_shape"]), data.get("input_dtype", "float32"))
  trees.check_same_structure(want["params"], params, f"expanded depth-{depth} params")
  return params, model_cfg


@register("expand_learngene", idea="TLEG: layer l of a depth-L ViT is A + (l/L) B of a linear learngene",
          reference="arXiv:2312.05614 (TLEG, AAAI 2024); github.com/AlphaXia/TLEG utils.gene_tranfer",
          inputs="1", docs=_COMMON_DOCS)
def expand_learngene(inputs, *, depth: int, coefficient: str = "", head: Literal["transfer", "reinit"] = "transfer",
                     final_norm: Literal["pooled", "tokens"] = "pooled", ln_eps: float = 1e-6,
                     seed: int = 0) -> Output:
  """Expands a `linear_learngene` checkpoint into an ordinary ViT of `depth` layers.

  Args:
    inputs: one loaded `linear_learngene` checkpoint.
    depth: target number of layers (>= 1)
    coefficient: 'l/L' (official) or 'l/(L-1)'; '' uses the learngene's own
    head, final_norm, ln_eps, seed: see the module docstring (`_COMMON_DOCS`).

  Returns:
    An `Output` with plain ViT params, `identity` parameterization and the descendant model config.

  Raises:
    NotALearngeneError: the input is not a `linear_learngene` checkpoint.
    ValueError: depth < 1 or an unknown coefficient rule.
  """
  (loaded,) = inputs
  pcfg = _require(loaded, "linear_learngene")
  coefficient = coefficient or pcfg.get("coefficient", "l/L")
  c = lg.coefficients(depth, coefficient)
  params = expand_learngene_params(loaded.theta, int(depth), coefficient)
  params, model_cfg = _descendant(loaded, params, depth, head, final_norm, ln_eps, seed)
  gene = loaded.theta["learngene"]
  report = {"depth": int(depth), "coefficient": coefficient, "coefficients": [float(x) for x in c],
            "learngene_params": trees.count(gene),
            "shared_params": trees.count({k: v for k, v in loaded.theta.items() if k != "learngene"}),
            "descendant_params": trees.count(params)}
  return Output(theta=params, model_state=dict(loaded.model_state),
                meta={"model": model_cfg, "parameterization": {"name": "identity"}}, report=report)


@register("expand_stages", idea="SWS: each stage's shared block initialises that stage's layers of any depth",
          reference="arXiv:2404.16897 (SWS, IJCAI 2024); github.com/AlphaXia/SWS utils.gene_tranfer_1",
          inputs="1", docs=_COMMON_DOCS)
def expand_stages(inputs, *, depth: int = 0, layers_per_stage: tuple = (), rule: SplitRule = "even",
                  head: Literal["transfer", "reinit"] = "transfer",
                  final_norm: Literal["pooled", "tokens"] = "pooled", ln_eps: float = 1e-6, seed: int = 0) -> Output:
  """Expands a `stage_sharing` checkpoint into an ordinary ViT, stage order kept, layers contiguous.

  Args:
    inputs: one loaded `stage_sharing` checkpoint.
    depth: target number of layers (>= number of stages); 0 = sum of layers_per_stage
    layers_per_stage: explicit copies per stage (overrides rule)
    rule: split rule when layers_per_stage is empty
    head, final_norm, ln_eps, seed: see the module docstring (`_COMMON_DOCS`).

  Returns:
    An `Output` with plain ViT params, `identity` parameterization and the descendant model config.

  Raises:
    NotALearngeneError: the input is not a `stage_sharing` checkpoint.
    ValueError: a split that does not cover the depth, has the wrong number of stages or an empty stage.
  """
  (loaded,) = inputs
  pcfg = _require(loaded, "stage_sharing")
  aux_stages = tuple(int(s) for s in pcfg.get("stages", lg.SWS_DEFAULT_STAGES))
  if layers_per_stage:
    split = tuple(int(s) for s in layers_per_stage)
    if len(split) != len(aux_stages):
      raise ValueError(f"expand_stages: layers_per_stage={list(split)} has {len(split)} entries but the "
                       f"learngene has {len(aux_stages)} stages")
    if min(split) < 1:
      raise ValueError(f"expand_stages: layers_per_stage={list(split)}: every stage needs at least one layer")
    if depth and sum(split) != depth:
      raise ValueError(f"expand_stages: layers_per_stage={list(split)} covers {sum(split)} layers, "
                       f"not depth {depth}")
    depth = sum(split)
  else:
    if not depth:
      raise ValueError("expand_stages: give depth (split by rule) or layers_per_stage")
    split = split_depth(depth, aux_stages, rule)
  params = expand_stage_params(loaded.theta, split)
  params, model_cfg = _descendant(loaded, params, depth, head, final_norm, ln_eps, seed)
  report = {"depth": int(depth), "layers_per_stage": list(split),
            "layer_to_stage": [int(s) for s in lg.layer_to_stage(split)],
            "learngene_params": trees.count(loaded.theta["stages"]),
            "shared_params": trees.count({k: v for k, v in loaded.theta.items() if k != "stages"}),
            "descendant_params": trees.count(params)}
  return Output(theta=params, model_state=dict(loaded.model_state),
                meta={"model": model_cfg, "parameterization": {"name": "identity"}}, report=report)
