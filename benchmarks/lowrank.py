"""Benchmark of the PELA low-rank ViT: forward throughput and the cost of `lowrank_svd`.

    python benchmarks/lowrank.py                      # ViT-S/16 at 64 px for throughput, ViT-B for the SVD
    python benchmarks/lowrank.py --size=B --image=112 --batch=16

1. Forward throughput (jit-compiled, inference) of the dense ViT and of the low-rank ViT at each ratio, timed
   in `--reps` interleaved rounds (each round times every model once, so a change of machine load hits every
   model alike): median and min-max examples/s, with parameter counts and analytic forward FLOPs.
2. Time of `lowrank_svd`'s core (`compress_params`: jit-compiled SVD vmapped over
   depth) on a ViT-B-sized tree of random weights, first call (with compilation)
   and second call, against a per-layer Python loop of `torch.linalg.svd` (the
   official code's approach, which loops over layers with numpy SVDs).
Prints figures and ratios only; no assertions.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import build, trees
from jaxlab.models import lowrank_vit, vit
from jaxlab.transforms import lowrank


def _time(fn, reps: int) -> float:
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


def throughput(size: str, image: int, patch: int, batch: int, ratios, reps: int) -> None:
  base = dict(name="vit", size=size, patch_size=patch, pool="cls")
  shape = (image, image, 3)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, *shape)), jnp.float32)
  print(f"== forward throughput: ViT-{size}/{patch}, {image}x{image} images, batch {batch}, {reps} interleaved rounds")
  models = {}
  for ratio in (None, *ratios):
    cfg = dict(base) if ratio is None else {**base, "name": "lowrank_vit", "ratio": ratio}
    module = build.model(cfg, 1000)
    params = build.init_variables(module, jax.random.key(0), shape)["params"]
    fwd = jax.jit(lambda p, x, m=module: m.apply({"params": p}, x, train=False))
    jax.block_until_ready(fwd(params, x))  # compile outside the timed rounds
    models["dense" if ratio is None else f"low-rank ratio {ratio:g}"] = (fwd, params)
  times = {k: [] for k in models}
  for _ in range(max(1, reps)):
    for k, (fwd, params) in models.items():
      t = time.perf_counter()
      jax.block_until_ready(fwd(params, x))
      times[k].append(time.perf_counter() - t)
  print(f"{'model':<22}{'params':>14}{'kept':>7}{'GFLOPs/img':>12}{'img/s median':>14}{'min-max':>16}{'speed-up':>10}")
  dense_n, dense_ips = trees.count(models["dense"][1]), batch / np.median(times["dense"])
  for k, (_, params) in models.items():
    n, ips = trees.count(params), batch / np.median(times[k])
    spread = f"{batch / max(times[k]):.1f}-{batch / min(times[k]):.1f}"
    print(f"{k:<22}{n:>14,}{n / dense_n:>7.2f}{lowrank_vit.forward_flops(params) / 1e9:>12.3f}{ips:>14.1f}"
          f"{spread:>16}{ips / dense_ips:>9.2f}x")


def svd_time(reps: int, torch_threads: int) -> None:
  import torch
  torch.set_num_threads(torch_threads)
  cfg = dict(name="vit", size="B", patch_size=16, pool="cls")
  lr_cfg = {**cfg, "name": "lowrank_vit", "ratio": 2.0}
  shape = (224, 224, 3)
  abstract = build.abstract_params(cfg, 1000, shape)
  rng = np.random.default_rng(0)
  dense = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.02), abstract)
  target = build.abstract_params(lr_cfg, 1000, shape)
  n = trees.count(dense)
  print(f"\n== lowrank_svd on a ViT-B-sized tree of random weights ({n:,} params, ratio 2, 12 x 4 matrices)")
  t0 = time.perf_counter()
  out, _, _ = lowrank.compress_params(dense, target)
  jax.block_until_ready(out)
  first = time.perf_counter() - t0
  jax_best = _time(lambda: lowrank.compress_params(dense, target)[0], reps)
  print(f"jax compress_params (jit + vmap over depth): first call {first:.2f} s (with compile), "
        f"best of {reps}: {jax_best:.2f} s")

  flat = trees.flatten(dense)
  ranks = lowrank_vit.layer_ranks(lr_cfg)
  kernels = {layer: torch.from_numpy(np.asarray(flat[f"{layer}/kernel"])) for layer in ranks}

  def torch_loop():
    outs = []
    for layer, r in ranks.items():
      k = kernels[layer]
      for d in range(k.shape[0]):  # one SVD per layer, as the official per-module loop
        w = k[d].T.contiguous()  # torch layout [d_out, d_in]
        u, s, vh = torch.linalg.svd(w.T, full_matrices=False)
        sq = s[:r].sqrt()
        outs.append(((u[:, :r] * sq).contiguous(), (sq[:, None] * vh[:r]).contiguous()))
    return outs

  torch_loop()
  t_best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    torch_loop()
    t_best = min(t_best, time.perf_counter() - t)
  print(f"torch per-layer loop of torch.linalg.svd ({torch_threads} threads): best of {reps}: {t_best:.2f} s")
  print(f"ratio torch / jax: {t_best / jax_best:.2f}")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="S", choices=sorted(vit.SIZES))
  p.add_argument("--image", type=int, default=64)
  p.add_argument("--patch", type=int, default=16)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--ratios", default="1.5,2,3")
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--svd_reps", type=int, default=2)
  p.add_argument("--skip_svd", action="store_true")
  p.add_argument("--skip_throughput", action="store_true")
  a = p.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores")
  if not a.skip_throughput:
    throughput(a.size, a.image, a.patch, a.batch, [float(r) for r in a.ratios.split(",")], a.reps)
  if not a.skip_svd:
    svd_time(a.svd_reps, os.cpu_count() or 1)


if __name__ == "__main__":
  main()
