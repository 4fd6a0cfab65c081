"""`lowrank_svd`: a dense ViT checkpoint to a `lowrank_vit` checkpoint by truncated SVD (PELA step 1).

For every factorized layer the dense kernel `K` [d_in, d_out] (Flax layout, `K = W^T`
of the torch weight) is split as `K = U S V^T`, and the first `r` singular
triplets give `u = U_r sqrt(S_r)` [d_in, r] and `v = sqrt(S_r) V_r^T` [r, d_out],
the square roots of the singular values shared between the two factors as in the
official `DeiT/low_rank.py`. `u @ v` is the best rank-r approximation of `K`
(Eckart-Young): its Frobenius error is the norm of the dropped singular values.
The bias goes to the second factor unchanged. The SVD runs in float32, jit-compiled
and `vmap`ped over the depth axis of the stacked blocks. Everything that is not
factorized (patch embedding, tokens, norms, head, layers in `keep_dense`) is copied.

    python -m jaxlab.main --config=ml_collections_configs/transform.py \
        --config.transform=lowrank_svd --config.inputs=runs/dense --config.args.ratio=2 --workdir=runs/lowrank
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import build, transforms, trees
from jaxlab.models import lowrank_vit


@functools.partial(jax.jit, static_argnames=("rank",))
def svd_factors(kernel: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Rank-`rank` factors of a kernel [..., d_in, d_out], vmapped over leading axes.

  Args:
    kernel: dense kernel(s); leading axes (e.g. depth) are batched.
    rank: number of singular triplets kept (1 <= rank <= min(d_in, d_out)).

  Returns:
    `(u [..., d_in, r], v [..., r, d_out], dropped [...])` where `dropped` is the
    Frobenius norm of the discarded singular values (the truncation error).
  """
  def one(k):
    u, s, vt = jnp.linalg.svd(k.astype(jnp.float32), full_matrices=False)
    sq = jnp.sqrt(s[:rank])
    dropped = jnp.sqrt(jnp.sum(s[rank:] ** 2))
    return (u[:, :rank] * sq[None, :]).astype(k.dtype), (sq[:, None] * vt[:rank]).astype(k.dtype), dropped

  fn = one
  for _ in range(kernel.ndim - 2):
    fn = jax.vmap(fn)
  return fn(kernel)


@jax.jit
def _relative_error(kernel, u, v):
  k = kernel.astype(jnp.float32)
  approx = jnp.einsum("...ir,...ro->...io", u.astype(jnp.float32), v.astype(jnp.float32))
  return jnp.linalg.norm((k - approx).ravel()) / jnp.maximum(jnp.linalg.norm(k.ravel()), 1e-30)


def _layer_type(layer: str) -> str:
  return re.sub(r"^.*/", "", layer)


def compress_params(dense: dict, target: dict) -> tuple[dict, dict[str, float], dict[str, float]]:
  """Fills the structure of `target` (low-rank abstract params) from `dense` params.

  Args:
    dense: params of the dense ViT.
    target: params (or ShapeDtypeStructs) of the low-rank ViT; a layer with leaves
      `<layer>/u`, `<layer>/v` is factorized from `<layer>/kernel` of `dense`.

  Returns:
    `(params, relative_error, dropped_norm)`: the low-rank params, and per factorized
    layer path the relative Frobenius error `||K - u v|| / ||K||` over all depths
    and the norm of the dropped singular values.

  Raises:
    trees.TreeMismatchError: when a leaf is missing or mis-shaped, naming it.
  """
  src, tgt = trees.flatten(dense), trees.flatten(target)
  out, errors, dropped = {}, {}, {}
  problems = []
  for name, spec in tgt.items():
    if name.endswith("/v"):
      continue
    if name.endswith("/u"):
      layer = name[:-2]
      kname = f"{layer}/kernel"
      if kname not in src:
        problems.append(f"missing {kname} for factorized layer {layer}")
        continue
      kernel = jnp.asarray(src[kname])
      d_in, rank = spec.shape[-2:]
      d_out = tgt[f"{layer}/v"].shape[-1]
      if kernel.shape[-2:] != (d_in, d_out) or kernel.shape[:-2] != spec.shape[:-2]:
        problems.append(trees.shape_difference(kname, list(spec.shape[:-2]) + [d_in, d_out], kernel,
                                               ("factors need", "checkpoint")))
        continue
      u, v, drop = svd_factors(kernel, rank=int(rank))
      out[name], out[f"{layer}/v"] = u, v
      errors[layer] = float(_relative_error(kernel, u, v))
      dropped[layer] = float(jnp.sqrt(jnp.sum(drop ** 2)))
      continue
    if name not in src:
      problems.append(f"missing {name}")
    elif tuple(np.shape(src[name])) != tuple(spec.shape):
      problems.append(trees.shape_difference(name, spec.shape, src[name], ("model", "checkpoint")))
    else:
      out[name] = src[name]
  if problems:
    raise trees.mismatch_error("lowrank_svd: the checkpoint does not fit the low-rank model", problems)
  return trees.unflatten(out), errors, dropped


@transforms.register(
    "lowrank_svd",
    idea="factorize every block Dense (qkv, proj, fc1, fc2) by truncated SVD, rank "
         "floor(d_in d_out / (ratio (d_in + d_out))), sqrt(S) split between the two factors",
    reference="PELA, Guo et al., CVPR 2024, arXiv:2310.10700; github.com/guoyang9/PELA (DeiT/low_rank.py)",
    inputs="1")
def lowrank_svd(inputs: list, *, ratio: float = 2.0, keep_dense: tuple = lowrank_vit.DEFAULT_KEEP_DENSE,
                rank: int = 0) -> transforms.Output:
  """Compresses one dense `vit` checkpoint into a `lowrank_vit` one.

  Args:
    inputs: one loaded dense ViT checkpoint.
    ratio: per-layer compression ratio of the factorized weights (> 0)
    keep_dense: regexes of layer paths kept dense (e.g. blocks/attn/proj)
    rank: explicit rank for every factorized layer (0 = ratio rule)

  Returns:
    The low-rank params (identity parameterization), the model state, the new
    model config, and a report with parameter counts, ranks and relative errors.

  Raises:
    ValueError: for a non-ViT input or a bad ratio.
  """
  src = inputs[0]
  model_cfg = dict(src.meta["model"])
  if model_cfg.get("name") != "vit":
    raise ValueError(f"lowrank_svd: {src.path} holds model {model_cfg.get('name')!r}; only dense 'vit' "
                     "checkpoints can be compressed")
  if ratio <= 0:
    raise ValueError(f"lowrank_svd: ratio must be > 0, got {ratio}")
  new_cfg = {**model_cfg, "name": "lowrank_vit", "ratio": float(ratio), "rank": int(rank),
             "keep_dense": list(keep_dense)}
  data = src.meta["data"]
  target = build.abstract_params(new_cfg, data["num_classes"], tuple(data["input_shape"]))
  dense = src.params
  params, errors, dropped = compress_params(dense, target)
  n_before, n_after = trees.count(dense), trees.count(params)
  by_type: dict[str, list[float]] = {}
  for layer, e in errors.items():
    by_type.setdefault(_layer_type(layer), []).append(e)
  report = {
      "params_before": n_before,
      "params_after": n_after,
      "kept_fraction": n_after / max(n_before, 1),
      "ranks": {layer: int(trees.flatten(params)[f"{layer}/u"].shape[-1]) for layer in errors},
      "relative_error": {k: float(np.mean(v)) for k, v in by_type.items()},
      "dropped_singular_norm": dropped,
  }
  rule = f"rank={int(rank)}" if rank else f"ratio={ratio:g}"
  print(f"lowrank_svd({rule}): params {n_before:,} -> {n_after:,} "
        f"({100 * report['kept_fraction']:.1f}% kept); relative error "
        + ", ".join(f"{k} {v:.4f} (rank {report['ranks'].get(_full(k, errors), '?')})"
                    for k, v in report["relative_error"].items()), flush=True)
  return transforms.Output(theta=params, model_state=dict(src.model_state),
                           meta={"model": new_cfg, "parameterization": {"name": "identity"}}, report=report)


def _full(layer_type: str, errors: dict) -> str:
  return next((k for k in errors if _layer_type(k) == layer_type), layer_type)


def spectra(params: dict, layers: tuple[str, ...] = tuple(lowrank_vit.LAYER_PATHS.values())) -> dict[str, np.ndarray]:
  """Singular values of each dense layer's kernel, per depth index: `{layer: [L, min(d_in, d_out)]}`.

  Args:
    params: dense ViT params (layers with `<layer>/kernel`).
    layers: layer paths to analyse; missing ones are skipped.

  Returns:
    Descending singular values per layer path and depth.
  """
  flat = trees.flatten(params)
  out = {}
  for layer in layers:
    k = flat.get(f"{layer}/kernel")
    if k is not None:
      out[layer] = np.asarray(jax.jit(jnp.linalg.svdvals)(jnp.asarray(k, jnp.float32)))
  return out


def expected_kept_fraction(d_in: int, d_out: int, ratio: float) -> float:
  """Fraction of a weight's entries kept by the rank rule (about 1 / ratio)."""
  r = lowrank_vit.rank_for(d_in, d_out, ratio)
  return r * (d_in + d_out) / (d_in * d_out)


