"""A low-rank ViT for PELA: the dense ViT with selected Dense layers factorized into two factors.

The model is `jaxlab.models.vit.ViT` itself with a different `dense_factory`, so
nothing of the ViT is copied. A factorized layer computes `y = (x @ u) @ v + bias`:
the first factor `u` [d_in, r] has no bias, the second `v` [r, d_out] carries the
original bias (the official PELA convention, `nn.Sequential(Linear(d_in, r,
bias=False), Linear(r, d_out))`).

Parameter paths (every block leaf has a leading depth axis of size `depth`); a
layer matched by `keep_dense` keeps the dense ViT's `{kernel, bias}` instead:

    blocks/attn/qkv/{u [L, D, r_qkv], v [L, r_qkv, 3D], bias [L, 3D]}
    blocks/attn/proj/{u [L, D, r_proj], v [L, r_proj, D], bias [L, D]}
    blocks/mlp/fc1/{u [L, D, r_fc1], v [L, r_fc1, M], bias [L, M]}
    blocks/mlp/fc2/{u [L, M, r_fc2], v [L, r_fc2, D], bias [L, D]}
    everything else exactly as in `jaxlab/models/vit.py` (patch_embed, cls_token,
    pos_embed, blocks/norm1, blocks/norm2, norm, head)

Rank rule (official `DeiT/low_rank.py`): `r = floor(d_in * d_out / (ratio * (d_in + d_out)))`,
so each factorized weight has about `1 / ratio` of the dense weight's entries.
It is capped at `min(d_in, d_out)` (full rank, exact), and `rank > 0` overrides
the rule for every factorized layer.

Model config keys (on top of the `vit` keys): `ratio` (float > 0, default 2.0),
`rank` (int, 0 = use the ratio rule), `keep_dense` (regexes over the layer paths
`blocks/attn/qkv`, `blocks/attn/proj`, `blocks/mlp/fc1`, `blocks/mlp/fc2`, `head`,
`patch_embed`, first match wins, `re.fullmatch` as everywhere in jaxlab). The
head, patch embedding and norms are never factorized in this ViT (the head and
the convolutional patch embedding are built outside `dense_factory`), which is
what the default `keep_dense` says.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxlab import trees
from jaxlab.configs import as_tuple
from jaxlab.models import registry, vit

# Local Dense names inside the ViT block -> full layer path used by `keep_dense`.
LAYER_PATHS = {
    "qkv": "blocks/attn/qkv",
    "proj": "blocks/attn/proj",
    "fc1": "blocks/mlp/fc1",
    "fc2": "blocks/mlp/fc2",
}
DEFAULT_KEEP_DENSE = ("head", "patch_embed", ".*norm.*")


def rank_for(d_in: int, d_out: int, ratio: float, rank: int = 0) -> int:
  """The PELA rank of a `d_in -> d_out` layer: `floor(d_in d_out / (ratio (d_in + d_out)))`, capped at full rank.

  Args:
    d_in: input features.
    d_out: output features.
    ratio: compression ratio of the layer's weight (> 0).
    rank: explicit rank overriding the rule when > 0.

  Returns:
    The rank, at least 1 and at most `min(d_in, d_out)`.

  Raises:
    ValueError: for a non-positive ratio or a rule that gives rank 0.
  """
  if rank and rank > 0:
    return int(min(rank, d_in, d_out))
  if not ratio or ratio <= 0:
    raise ValueError(f"model.ratio must be > 0 (got {ratio!r})")
  r = math.floor(d_in * d_out / (ratio * (d_in + d_out)))
  if r < 1:
    raise ValueError(f"model.ratio={ratio}: a {d_in}->{d_out} layer would get rank 0; lower the ratio "
                     "or keep the layer dense (model.keep_dense)")
  return int(min(r, d_in, d_out))


class LowRankDense(nn.Module):
  """`y = (x @ u) @ v + bias` with `u` [d_in, r] and `v` [r, features]; `r` from `rank_for`."""
  features: int
  ratio: float = 2.0
  rank: int = 0
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  init_scheme: str = vit.DEFAULT_INIT_SCHEME  # factor init: `vit.factor_init`

  @nn.compact
  def __call__(self, x):
    d_in = x.shape[-1]
    r = rank_for(d_in, self.features, self.ratio, self.rank)
    u = self.param("u", vit.factor_init(self.init_scheme, r), (d_in, r), self.param_dtype)
    v = self.param("v", vit.factor_init(self.init_scheme, r), (r, self.features), self.param_dtype)
    b = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
    x, u, v, b = nn.dtypes.promote_dtype(x, u, v, b, dtype=self.dtype)
    y = jnp.dot(jnp.dot(x, u), v)
    return y + b if b is not None else y


@dataclasses.dataclass(frozen=True)
class LowRankFactory:
  """A ViT `dense_factory`: factorized Dense for the block layers not matched by `keep_dense`."""
  ratio: float = 2.0
  rank: int = 0
  keep_dense: tuple[str, ...] = DEFAULT_KEEP_DENSE

  def factorized(self, name: str) -> bool:
    """Whether the Dense layer with local name `name` is factorized."""
    path = LAYER_PATHS.get(name, name)
    return trees.first_match(path, self.keep_dense) is None

  def __call__(self, features: int, name: str, use_bias: bool = True, dtype=None,
               param_dtype=jnp.float32, init_scheme: str = vit.DEFAULT_INIT_SCHEME) -> nn.Module:
    if not self.factorized(name):
      return vit.dense(features, name, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                       init_scheme=init_scheme)
    return LowRankDense(features, self.ratio, self.rank, use_bias, dtype, param_dtype, init_scheme, name=name)


def split_config(cfg) -> tuple[dict, LowRankFactory]:
  """Splits a `lowrank_vit` model config into the plain `vit` config and the factory.

  Raises:
    ValueError: for a bad ratio, rank or keep_dense.
  """
  kw = dict(cfg)
  ratio = kw.pop("ratio", None)
  ratio = 2.0 if ratio is None else float(ratio)
  rank = int(kw.pop("rank", 0) or 0)
  keep = kw.pop("keep_dense", DEFAULT_KEEP_DENSE)
  if keep is None:
    keep = DEFAULT_KEEP_DENSE
  keep = as_tuple(keep)  # 'a,b' from the command line
  for pattern in keep:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"config.model.keep_dense: {pattern!r} is not a valid regex ({e})") from e
  if ratio <= 0:
    raise ValueError(f"config.model.ratio must be > 0, got {ratio}")
  if rank < 0:
    raise ValueError(f"config.model.rank must be >= 0 (0 = ratio rule), got {rank}")
  kw["name"] = "vit"
  return kw, LowRankFactory(ratio=ratio, rank=rank, keep_dense=keep)


@registry.register("lowrank_vit")
def build_lowrank_vit(cfg, num_classes: int) -> vit.ViT:
  """Builds the ViT of `cfg` (all `vit` keys) with factorized Dense layers (`ratio`, `rank`, `keep_dense`)."""
  vit_cfg, factory = split_config(cfg)
  return vit.build_vit(vit_cfg, num_classes).clone(dense_factory=factory)


def layer_ranks(model_cfg) -> dict[str, int]:
  """Rank of each factorized layer path of a `lowrank_vit` config (from its shapes, no weights).

  Args:
    model_cfg: a `lowrank_vit` model config (needs `width`/`mlp_dim` or `size`).

  Returns:
    `{layer path: rank}` for the factorized layers.
  """
  vit_cfg, factory = split_config(model_cfg)
  size = vit_cfg.get("size")
  width, mlp = vit_cfg.get("width"), vit_cfg.get("mlp_dim")
  if size:
    w, _, _, m = vit.SIZES[size]
    width, mlp = width or w, mlp or m
  shapes = {"qkv": (width, 3 * width), "proj": (width, width), "fc1": (width, mlp), "fc2": (mlp, width)}
  return {LAYER_PATHS[n]: rank_for(a, b, factory.ratio, factory.rank) for n, (a, b) in shapes.items()
          if factory.factorized(n)}


def forward_flops(params) -> float:
  """Analytic forward FLOPs per example (2 x multiply-adds) of a dense or low-rank ViT from its params.

  Every Dense kernel and low-rank factor (`kernel`, `u`, `v` leaves, the patch embedding included) is applied once
  per token; attention adds two N x N x width products per layer (scores and the weighted sum); the head is applied
  once (pooled). N and the width come from `pos_embed` ([1, N, width]), the depth from the stacked blocks' leading
  axis. Norms, softmax, biases and GELU are not counted.
  """
  flat = trees.flatten(params)
  _, n, width = flat["pos_embed"].shape
  depth = flat["blocks/norm1/scale"].shape[0]
  per_token = sum(v.size for k, v in flat.items() if k.rsplit("/", 1)[-1] in ("kernel", "u", "v") and k[:5] != "head/")
  return 2.0 * (n * per_token + 2 * depth * n * n * width + flat["head/kernel"].size)
