"""MixtureGrowth's template mixing: every conv and the classifier are linear mixtures of templates.

A layer of the grown (full-width) network is tiled into blocks of half width.
Block `i` is `W_i = sum_t c_i[t] * T_set(i)[t]` with template set
`set(i) = [0, 1, 0, 1][i]`, and the blocks are placed (rows = output halves,
cols = input halves, as the official code) as

    inner conv:  [[W_0, W_2],      stem (input not split): [[W_0],    classifier (output not split): [W_0 | W_1]
                  [W_3, W_1]]                               [W_1]]

so member 0 is the half-width network made of the `W_0` blocks (template set
0), member 1 the one made of the `W_1` blocks (set 1); they share nothing.

Design: the Flax model is a plain dense `wrn` of the materialized width (a
member is a half-width WRN, stem 8 for the paper's 16). This
parameterization turns templates + coefficients into its dense kernels, so
the training loop, checkpoints and BatchNorm handling need nothing special.
Each member trains as its own run and checkpoint (its BatchNorm is the
member's own, in its checkpoint's `batch_stats`); the `grow_mixture`
transform combines two member checkpoints into a grown one.

`config.parameterization` keys:
  name: 'template_mixing'
  num_templates: templates per set and layer (2 in the official CIFAR runs).
  member: 0 or 1 (a half-width member using template set 0 or 1), or -1 (the
      grown network, which holds both sets and four coefficient vectors).
  coef_seed: seed of the per-layer orthogonal coefficient matrices. Shared by
      both members and the grown network so that growth can restore the
      never-trained rows of the construction-time matrix (`c_2`).

theta mirrors the model's params; each mixed `kernel` leaf becomes
`{'templates': ..., 'coefs': ...}`:

    member:  templates [n, *kernel_shape],   coefs [n]
    grown:   templates [2, n, *block_shape], coefs [4, n] (inner convs) or [2, n] (stem, classifier)

Every other leaf (BatchNorm scale/bias, classifier bias) is passed through.

Initialisation as the official code: templates are Kaiming-normal on the
*stacked* torch tensor, whose fan-in is the product of the whole block shape
(`C_out/2 * C_in/2 * k * k` for an inner conv, `K * C/2` for the
classifier), so std = sqrt(2 / prod(block shape)), about sqrt(C_out/2) times
smaller than a dense conv's. Coefficients are the rows of an orthogonal
`[num_blocks, n]` matrix. Put `.*coefs` in `config.optimizer.no_decay` (no
weight decay on coefficients, as the official code).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import parameterizations, trees

MEMBER_SETS = (0, 1, 0, 1)  # template set of block i
GROWN = -1


def layer_kind(name: str) -> str | None:
  """'stem', 'head', 'inner' for mixed kernels (by `/`-name), None for pass-through leaves."""
  if not name.endswith("kernel"):
    return None
  if name == "stem/kernel":
    return "stem"
  if name == "head/kernel":
    return "head"
  return "inner"


def num_blocks(kind: str) -> int:
  """Coefficient vectors of a grown layer: 4 for inner convs (2x2 tiling), 2 for stem and classifier."""
  return 4 if kind == "inner" else 2


def block_shape(kind: str, full_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of one block of a full-width kernel (Flax layout: conv [k, k, C_in, C_out], dense [C_in, K]).

  Raises:
    ValueError: when a split dimension is odd.
  """
  shape = list(full_shape)
  split = {"stem": (-1,), "head": (0,), "inner": (-2, -1)}[kind]
  for ax in split:
    if shape[ax] % 2:
      raise ValueError(f"template_mixing: cannot halve dimension {ax} of a {kind} kernel of shape {full_shape}")
    shape[ax] //= 2
  return tuple(shape)


def kaiming_std(shape: tuple[int, ...]) -> float:
  """torch `kaiming_normal_` std of a stacked template tensor: sqrt(2 / prod(block shape))."""
  return float(np.sqrt(2.0 / max(int(np.prod(shape)), 1)))


def coefficient_matrix(coef_seed: int, name: str, rows: int, n: int) -> jax.Array:
  """The construction-time orthogonal `[rows, n]` coefficient matrix of layer `name`."""
  key = jax.random.fold_in(jax.random.key(int(coef_seed)), zlib.crc32(name.encode()) & 0x7FFFFFFF)
  return jax.nn.initializers.orthogonal()(key, (rows, n), jnp.float32)


def init_templates(rng, name: str, template_set: int, n: int, shape: tuple[int, ...]) -> jax.Array:
  """`n` Kaiming-normal templates of one set (the key depends on rng, set and layer name)."""
  key = jax.random.fold_in(jax.random.fold_in(rng, template_set), zlib.crc32(name.encode()) & 0x7FFFFFFF)
  return kaiming_std(shape) * jax.random.normal(key, (n, *shape), jnp.float32)


def mix(coefs: jax.Array, templates: jax.Array) -> jax.Array:
  """`sum_t coefs[t] * templates[t]`."""
  return jnp.tensordot(coefs, templates, axes=1)


def assemble(kind: str, blocks: list[jax.Array]) -> jax.Array:
  """Places blocks `W_0..W_3` into the full kernel (Flax layout) as the official 'diag' growth."""
  if kind == "stem":  # output channels concatenated
    return jnp.concatenate(blocks[:2], axis=-1)
  if kind == "head":  # input features concatenated: logits = member 0 + member 1
    return jnp.concatenate(blocks[:2], axis=0)
  w0, w1, w2, w3 = blocks
  top = jnp.concatenate([w0, w3], axis=-1)      # input half 0 -> output halves (0, 1)
  bottom = jnp.concatenate([w2, w1], axis=-1)   # input half 1 -> output halves (0, 1)
  return jnp.concatenate([top, bottom], axis=-2)


def is_mixed(node) -> bool:
  return isinstance(node, dict) and set(node) == {"templates", "coefs"}


def coefficients(theta) -> dict[str, np.ndarray]:
  """`{layer name: coefficients}` of a template theta ([n] for a member, [blocks, n] grown)."""
  flat = trees.flatten(theta)
  return {k[: -len("/coefs")]: np.asarray(v) for k, v in flat.items() if k.endswith("/coefs")}


@parameterizations.register("template_mixing")
class TemplateMixing:
  """Kernels of a dense WRN as mixtures of per-layer templates (MixtureGrowth)."""

  def __init__(self, model_cfg=None, num_templates: int = 2, member: int = 0, coef_seed: int = 0):
    del model_cfg
    if int(num_templates) < 1:
      raise ValueError(f"config.parameterization.num_templates={num_templates}: must be >= 1")
    if int(member) not in (0, 1, GROWN):
      raise ValueError(f"config.parameterization.member={member}: use 0, 1 (half-width members) or -1 (grown)")
    self.num_templates = int(num_templates)
    self.member = int(member)
    self.coef_seed = int(coef_seed)

  @property
  def grown(self) -> bool:
    return self.member == GROWN

  def init(self, rng, params):
    """Templates (Kaiming on the stacked tensor) and orthogonal coefficients for every kernel."""
    n = self.num_templates

    def one(name, leaf):
      kind = layer_kind(name)
      if kind is None:
        return leaf
      rows = num_blocks(kind)
      matrix = coefficient_matrix(self.coef_seed, name, rows, n)
      if not self.grown:
        return {"templates": init_templates(rng, name, self.member, n, tuple(leaf.shape)),
                "coefs": matrix[self.member]}
      shape = block_shape(kind, tuple(leaf.shape))
      return {"templates": jnp.stack([init_templates(rng, name, s, n, shape) for s in (0, 1)]),
              "coefs": matrix}

    return trees.unflatten({k: one(k, v) for k, v in trees.flatten(params).items()})

  def materialize(self, theta):
    """Dense model params: member kernels `c . T`, grown kernels assembled from 2 or 4 blocks."""
    def walk(node, prefix):
      if is_mixed(node):
        if not self.grown:
          return mix(node["coefs"], node["templates"])
        kind = layer_kind(prefix)
        t, c = node["templates"], node["coefs"]
        blocks = [mix(c[i], t[MEMBER_SETS[i]]) for i in range(c.shape[0])]
        return assemble(kind, blocks)
      if isinstance(node, dict):
        return {k: walk(v, f"{prefix}/{k}" if prefix else k) for k, v in node.items()}
      return node

    return walk(dict(theta), "")
