"""Learngene benchmarks: expansion cost, training-step overhead, and the papers' stored-parameter arithmetic.

    python benchmarks/learngene.py [--quick]

Prints figures and ratios (no asserts):
  1. `expand_learngene_params` (one jit-compiled vectorized op per tensor) against a Python loop over
     layers (the official code's way: one `A + c B` per layer, then stack), for a DeiT-Ti-sized
     learngene expanded to depth 12.
  2. Train-step time of an auxiliary net with the `linear_learngene` / `stage_sharing`
     parameterizations against the same ViT trained plainly (`identity`): the cost of
     materializing the blocks inside every step.
  3. Stored parameters at ImageNet shapes (224 px, patch 16, 1000 classes) from `jax.eval_shape`:
     TLEG learngene (A, B + single copies) against the sum of Des-3..12, and SWS (5 stage blocks +
     single copies) against Des-6..15; the papers' "19x" and "20x".
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import build, optim, parameterizations, train, trees
from jaxlab.parameterizations import learngene as lg
from jaxlab.transforms import learngene as tlg


def _time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile / warm up
  t = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / repeats


def bench_expansion(repeats: int) -> None:
  width, mlp, depth = 192, 768, 12
  module = build.model(dict(name="vit", patch_size=16, width=width, depth=1, num_heads=3, mlp_dim=mlp), 1000)
  shapes = build.abstract_variables(module, (224, 224, 3))["params"]
  blocks = jax.tree.map(lambda s: jnp.ones(s.shape[1:], s.dtype), shapes["blocks"])
  theta = {"learngene": {"A": blocks, "B": jax.tree.map(lambda x: 0.5 * x, blocks)}}

  def loop():
    layers = [jax.tree.map(lambda a, b, c=layer / depth: a + c * b, blocks, theta["learngene"]["B"])
              for layer in range(depth)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)

  t_jit = _time(lambda: tlg.expand_learngene_params(theta, depth), repeats)
  t_loop = _time(loop, repeats)
  n = trees.count(theta["learngene"])
  print(f"[1] expand a DeiT-Ti learngene ({n / 1e6:.2f} M params in A, B) to depth {depth}: "
        f"jit {1e3 * t_jit:.2f} ms, python loop over layers {1e3 * t_loop:.2f} ms, ratio {t_loop / t_jit:.1f}x")


def bench_train_step(repeats: int) -> None:
  model = dict(name="vit", patch_size=2, width=64, depth=8, num_heads=4, mlp_dim=128, pool="gap",
               final_norm="tokens", drop_path=0.0)
  module = build.model(model, 10)
  params = build.init_variables(module, jax.random.key(0), (8, 8, 1))["params"]
  batch = {"inputs": jax.random.uniform(jax.random.key(1), (64, 8, 8, 1)),
           "label": jnp.arange(64) % 10}
  import ml_collections
  opt_cfg = ml_collections.ConfigDict(dict(name="adamw", lr=1e-3, weight_decay=0.05, warmup_steps=0,
                                           schedule="cosine", grad_clip=1.0))
  times = {}
  for pcfg in ({"name": "identity"}, {"name": "linear_learngene"},
               {"name": "stage_sharing", "stages": (3, 2, 3)}):
    param = parameterizations.build(dict(pcfg), model)
    theta = param.init(jax.random.key(2), params)
    tx, _ = optim.build(opt_cfg, theta, 1000)
    step = jax.jit(train.make_train_step(module, param, tx, {"weights": {"cross_entropy": 1.0}}))
    state = {"step": jnp.zeros((), jnp.int32), "theta": theta, "opt_state": tx.init(theta), "model_state": {}}
    key = jax.random.key(3)
    times[pcfg["name"]] = _time(lambda s=step, st=state, k=key: s(st, batch, k)[0]["theta"], repeats)
    print(f"[2] train step, digits ViT width 64 depth 8, batch 64, {pcfg['name']:>16}: "
          f"{1e3 * times[pcfg['name']]:.2f} ms ({trees.count(theta):,} trainable)")
  for name in ("linear_learngene", "stage_sharing"):
    print(f"    {name} / identity step time: {times[name] / times['identity']:.2f}x")


def bench_stored_params() -> None:
  sizes = {"Ti": (192, 3, 768), "S": (384, 6, 1536), "B": (768, 12, 3072)}
  for size, (w, h, m) in sizes.items():
    def count(depth, w=w, h=h, m=m):
      module = build.model(dict(name="vit", patch_size=16, width=w, depth=depth, num_heads=h, mlp_dim=m,
                                pool="gap", final_norm="pooled"), 1000)
      return build.abstract_variables(module, (224, 224, 3))["params"]
    one = count(1)
    block = trees.count(one["blocks"])
    shared = trees.count({k: v for k, v in one.items() if k != "blocks"})
    tleg_des = sum(trees.count(count(d)) for d in range(3, 13))
    sws_des = sum(trees.count(count(d)) for d in range(6, 16))
    tleg_store, sws_store = 2 * block + shared, 5 * block + shared
    print(f"[3] {size}: block {block / 1e6:.2f} M, single copies {shared / 1e6:.2f} M | TLEG learngene+shared "
          f"{tleg_store / 1e6:.2f} M vs Des-3..12 {tleg_des / 1e6:.1f} M: {tleg_des / tleg_store:.1f}x | SWS "
          f"{sws_store / 1e6:.2f} M vs Des-6..15 {sws_des / 1e6:.1f} M: {sws_des / sws_store:.1f}x")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="fewer repeats")
  args = ap.parse_args()
  repeats = 5 if args.quick else 20
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {len(jax.devices())} device(s); "
        f"coefficients at depth 4: {np.round(lg.coefficients(4), 3).tolist()}")
  bench_expansion(repeats)
  bench_train_step(repeats)
  bench_stored_params()


if __name__ == "__main__":
  main()
