"""Learngene parameterizations of the ViT's block stack: TLEG linear expansion and SWS stage sharing.

Both act only on `params['blocks']` (every block tensor, stacked on a leading
depth axis by the ViT's `nn.scan`); the patch embedding, position embedding,
final norm and head stay single ordinary copies.

`linear_learngene` (TLEG, arXiv:2312.05614). For every block tensor theta
holds the pair (A, B) without a depth axis, and layer l of the depth-L
network is

    theta_l = A + c_l * B,    c_l = l / L,   l = 0, ..., L-1       (default, 'l/L')

exactly as the official code (`RepeatedModuleList` sets `repeated_id /
repeated_times`; `gene_tranfer` uses `i / num_layers`): layer 0 is A, the
coefficient 1 is never reached, and every depth samples the same segment of
the line. `coefficient='l/(L-1)'` is a named alternative that spans A..A+B
(depth 1 gives coefficient 0). Initialisation: A is layer 0 of the ViT's fresh
init and B's kernels are drawn with the same scheme (`model.init_scheme`:
'deit' gives the official code's truncated normal std 0.02 for A and B,
'fan_in', the default, std 1/sqrt(fan_in); docs/fairness.md), every bias 0,
LayerNorm scale A = 1 and B = 0. Trainable tree:

    theta = {'learngene': {'A': blocks_tree, 'B': blocks_tree}, 'patch_embed', 'pos_embed', 'norm', 'head'}

with `blocks_tree` the ViT block tree without the depth axis
(`attn/qkv/kernel [D, 3D]`, ...), so names like `learngene/A/attn/qkv/bias`
keep matching the optimizer's no-decay rules (A and B weight matrices decay,
biases and LN parameters do not, as timm does for the official runs).
Gradients: dL/dA = sum_l dL/dtheta_l and dL/dB = sum_l c_l dL/dtheta_l,
by autodiff through `materialize`.

`stage_sharing` (SWS, arXiv:2404.16897). The network's layers form stages of
`stages` layers each (default (3, 3, 4, 3, 3), 16 layers, the paper's Aux-Net)
and every layer of a stage uses that stage's one block:

    theta = {'stages': blocks_tree with a leading stage axis [S, ...], 'patch_embed', ...}

`materialize` gathers along the stage axis with the layer -> stage index
(`[0,0,0,1,1,1,2,2,2,2,...]`). Each stage block is initialised like an
ordinary ViT layer (the first layer of its stage in a fresh init).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import parameterizations, trees

COEFFICIENTS = ("l/L", "l/(L-1)")
SWS_DEFAULT_STAGES = (3, 3, 4, 3, 3)


def model_depth(model_cfg: dict | None) -> int:
  """The ViT depth a model config describes (`depth`, else the default of its `size`).

  Raises:
    ValueError: when the config gives neither.
  """
  model_cfg = dict(model_cfg or {})
  depth = model_cfg.get("depth")
  if depth is None and model_cfg.get("size"):
    from jaxlab.models.vit import SIZES
    depth = SIZES[model_cfg["size"]][1]
  if depth is None:
    raise ValueError("learngene parameterizations need config.model.depth (the number of layers to build)")
  return int(depth)


def coefficients(depth: int, coefficient: str = "l/L") -> np.ndarray:
  """The per-layer coefficients c_l of a depth-`depth` linear expansion, float32 [depth].

  Args:
    depth: number of layers L (>= 1).
    coefficient: 'l/L' (official TLEG code: l / L) or 'l/(L-1)' (spans A..A+B).

  Returns:
    `c` with layer l = A + c[l] * B.

  Raises:
    ValueError: for depth < 1 or an unknown coefficient rule.
  """
  if int(depth) < 1:
    raise ValueError(f"learngene depth must be >= 1, got {depth}")
  if coefficient not in COEFFICIENTS:
    raise ValueError(f"learngene coefficient must be one of {list(COEFFICIENTS)}, got {coefficient!r}")
  layer = np.arange(int(depth), dtype=np.float32)
  if coefficient == "l/L":
    return layer / np.float32(depth)
  return layer / np.float32(max(int(depth) - 1, 1))


def expand_linear(gene: dict, depth: int, coefficient: str = "l/L") -> Any:
  """Stacks `A + c_l * B` for l < depth on a leading depth axis (one vectorized op per tensor).

  Args:
    gene: `{'A': tree, 'B': tree}` with identical structure.
    depth: number of layers to produce.
    coefficient: see `coefficients`.

  Returns:
    A tree like `A` whose leaves have a leading axis of size `depth`.
  """
  c = jnp.asarray(coefficients(depth, coefficient))
  return jax.tree.map(lambda a, b: a[None] + c.reshape((-1,) + (1,) * a.ndim).astype(a.dtype) * b[None],
                      gene["A"], gene["B"])


def layer_to_stage(stages: Sequence[int]) -> np.ndarray:
  """Stage index of every layer, e.g. (2, 1, 3) -> [0, 0, 1, 2, 2, 2].

  Raises:
    ValueError: for an empty split or a stage with fewer than one layer.
  """
  stages = tuple(int(s) for s in stages)
  if not stages or min(stages) < 1:
    raise ValueError(f"stage split {list(stages)}: every stage needs at least one layer")
  return np.repeat(np.arange(len(stages)), stages).astype(np.int32)


def expand_stages_tree(stage_blocks: Any, stages: Sequence[int]) -> Any:
  """Gathers each layer's stage block: leaves [S, ...] -> [sum(stages), ...]."""
  idx = jnp.asarray(layer_to_stage(stages))
  num = len(tuple(stages))
  for leaf in jax.tree.leaves(stage_blocks):
    if leaf.shape[0] != num:
      raise ValueError(f"stage split {list(stages)} has {num} stages but the stage blocks have "
                       f"{leaf.shape[0]}")
  return jax.tree.map(lambda s: jnp.take(s, idx, axis=0), stage_blocks)


def _check_blocks(params) -> None:
  if "blocks" not in params:
    raise ValueError("learngene parameterizations need a model whose params have a 'blocks' stack (the ViT); "
                     f"got top-level keys {sorted(params)}")


@parameterizations.register("linear_learngene")
class LinearLearngene:
  """TLEG: every block tensor of layer l is `A + c_l * B` (see the module docstring).

  Args:
    model_cfg: the model config (its `depth` is L).
    coefficient: 'l/L' (official, default) or 'l/(L-1)'.
  """

  def __init__(self, model_cfg: dict | None = None, coefficient: str = "l/L"):
    from jaxlab.models import vit
    self.depth = model_depth(model_cfg)
    coefficients(self.depth, coefficient)  # validates
    self.coefficient = coefficient
    self.kernel_init = vit.kernel_init(dict(model_cfg or {}).get("init_scheme") or "")

  def init(self, rng, params: dict) -> dict:
    """A = layer 0 of a fresh init (kernels by the model's init scheme, zero biases, unit LN scales); B: kernels
    drawn by the same scheme (each with its own [d_in, d_out] fan-in), everything else 0."""
    _check_blocks(params)
    blocks = params["blocks"]
    a = jax.tree.map(lambda x: x[0], blocks)
    names = list(trees.flatten(a))
    keys = dict(zip(names, jax.random.split(rng, len(names)), strict=True))

    def init_b(name, x):
      if name.endswith("kernel"):
        return self.kernel_init(keys[name], x.shape, x.dtype)
      return jnp.zeros_like(x)

    b = trees.map_with_names(init_b, a)
    theta = {k: v for k, v in params.items() if k != "blocks"}
    theta["learngene"] = {"A": a, "B": b}
    return theta

  def materialize(self, theta: dict) -> dict:
    params = {k: v for k, v in theta.items() if k != "learngene"}
    params["blocks"] = expand_linear(theta["learngene"], self.depth, self.coefficient)
    return params


@parameterizations.register("stage_sharing")
class StageSharing:
  """SWS: layers grouped into stages, each stage one shared block (see the module docstring).

  Args:
    model_cfg: the model config; its depth must equal `sum(stages)`.
    stages: layers per stage, default (3, 3, 4, 3, 3).

  Raises:
    ValueError: when the stages do not cover the model depth or a stage is empty.
  """

  def __init__(self, model_cfg: dict | None = None, stages: Sequence[int] = SWS_DEFAULT_STAGES):
    self.depth = model_depth(model_cfg)
    self.stages = tuple(int(s) for s in stages)
    layer_to_stage(self.stages)
    if sum(self.stages) != self.depth:
      raise ValueError(f"config.parameterization.stages={list(self.stages)} covers {sum(self.stages)} layers "
                       f"but config.model.depth={self.depth}; make the stage sizes sum to the depth")

  def init(self, rng, params: dict) -> dict:
    """Each stage's block is the fresh init of the first layer of that stage."""
    del rng
    _check_blocks(params)
    first = np.cumsum((0,) + self.stages[:-1])
    theta = {k: v for k, v in params.items() if k != "blocks"}
    theta["stages"] = jax.tree.map(lambda x: x[first], params["blocks"])
    return theta

  def materialize(self, theta: dict) -> dict:
    params = {k: v for k, v in theta.items() if k != "stages"}
    params["blocks"] = expand_stages_tree(theta["stages"], self.stages)
    return params
