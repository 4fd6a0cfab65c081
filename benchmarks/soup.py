"""Uniform soup throughput and peak memory: jaxlab's streaming soup vs PyTorch state-dict averaging.

    python benchmarks/soup.py [--sizes 2,8,32] [--model B]

A ViT-B-sized tree (random float32 weights, ~86M parameters, ~344 MB) is
averaged over N ingredients, one ingredient at a time as a checkpoint stream
would deliver them: jaxlab's `soups.scale_tree` / `soups.axpby` (jit-compiled,
running sum donated in place) against the PyTorch idiom (`acc[k].add_(sd[k],
alpha=w)` over a state dict). To time the arithmetic only, the N ingredients
cycle through two pre-built trees (no disk I/O, no generation in the timed
loop). Each (framework, N) runs in its own process so that its peak resident
memory (ru_maxrss) can be reported: the increase over the process's memory
after building its two input trees is the soup's own footprint.

Printed: seconds, ingredient GB/s (N x model bytes / seconds), peak extra
memory in model sizes, the jax/torch time ratio, and a plain memory copy's
GB/s (numpy copy of one model-sized buffer) on this machine for reference.
Results vary with machine load; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vit_shapes(size: str) -> dict[str, tuple[tuple[int, ...], str]]:
  """`{leaf name: (shape, dtype)}` of a ViT of `size` for 224x224 images, 16x16 patches, 1000 classes."""
  import jax
  sys.path.insert(0, REPO)
  from jaxlab import build, trees
  cfg = {"name": "vit", "size": size, "patch_size": 16, "pool": "cls"}
  module = build.model(cfg, 1000)
  abstract = build.abstract_variables(module, (224, 224, 3))["params"]
  del jax
  return {k: (tuple(v.shape), str(v.dtype)) for k, v in trees.flatten(abstract).items()}


def _max_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(framework: str, n: int, size: str) -> dict:
  shapes = vit_shapes(size)
  rng = np.random.default_rng(0)
  model_bytes = sum(int(np.prod(s)) * 4 for s, _ in shapes.values())
  w = 1.0 / n
  if framework == "jax":
    import jax
    sys.path.insert(0, REPO)
    from jaxlab.transforms import soups
    # leaf by leaf, so no second host copy of a whole tree ever exists
    ingredients = [{k: jax.device_put(rng.standard_normal(s, dtype=np.float32)) for k, (s, _) in shapes.items()}
                   for _ in range(2)]
    jax.block_until_ready(ingredients)
    base_rss = _rss_bytes()
    warm = soups.axpby(soups.scale_tree(ingredients[0], w), ingredients[1], 1.0, w)  # compile both
    jax.block_until_ready(warm)
    del warm
    t0 = time.perf_counter()
    acc = soups.scale_tree(ingredients[0], w)
    for i in range(1, n):
      acc = soups.axpby(acc, ingredients[i % 2], 1.0, w)
    jax.block_until_ready(acc)
    seconds = time.perf_counter() - t0
    check = float(np.asarray(acc["head/kernel"]).ravel()[0])
  else:
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    ingredients = [{k: torch.from_numpy(rng.standard_normal(s, dtype=np.float32)) for k, (s, _) in shapes.items()}
                   for _ in range(2)]
    base_rss = _rss_bytes()
    t0 = time.perf_counter()
    acc = {k: v.clone().mul_(w) for k, v in ingredients[0].items()}
    for i in range(1, n):
      sd = ingredients[i % 2]
      for k in acc:
        acc[k].add_(sd[k], alpha=w)
    seconds = time.perf_counter() - t0
    check = float(acc["head/kernel"].reshape(-1)[0])
  peak_extra = max(_max_rss_bytes() - base_rss, 0)
  return {"framework": framework, "n": n, "seconds": seconds, "model_bytes": model_bytes,
          "gb_per_s": n * model_bytes / seconds / 1e9, "peak_extra_models": peak_extra / model_bytes, "check": check}


def memcpy_gb_per_s(size: str) -> float:
  """GB/s of a plain numpy copy of one model-sized float32 buffer (bytes copied / second, best of 5)."""
  n = sum(int(np.prod(s)) for s, _ in vit_shapes(size).values())
  src = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
  dst = np.empty_like(src)
  best = float("inf")
  for _ in range(5):
    t0 = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - t0)
  return src.nbytes / best / 1e9


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="2,8,32")
  ap.add_argument("--model", default="B")
  ap.add_argument("--worker", default="")
  ap.add_argument("--n", type=int, default=2)
  args = ap.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.n, args.model)))
    return
  params = sum(int(np.prod(s)) for s, _ in vit_shapes(args.model).values())
  print(f"ViT-{args.model}: {params / 1e6:.1f}M float32 parameters ({params * 4 / 1e6:.0f} MB) per ingredient; "
        f"{os.cpu_count()} CPU cores")
  copy = memcpy_gb_per_s(args.model)
  print(f"plain memory copy (numpy, one model): {copy:.2f} GB/s")
  print(f"{'N':>4} {'jax s':>8} {'torch s':>8} {'jax/torch':>9} {'jax GB/s':>9} {'torch GB/s':>10} "
        f"{'jax peak+':>10} {'torch peak+':>11}")
  rows = []
  for n in (int(x) for x in args.sizes.split(",")):
    res = {}
    for fw in ("jax", "torch"):
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", fw, "--n", str(n),
                             "--model", args.model], capture_output=True, text=True)
      if proc.returncode != 0:
        print(f"{fw} N={n} failed: {proc.stderr.strip().splitlines()[-1:]}")
        continue
      res[fw] = json.loads(proc.stdout.strip().splitlines()[-1])
    if len(res) < 2:
      continue
    j, t = res["jax"], res["torch"]
    rows.append({"n": n, "jax": j, "torch": t})
    print(f"{n:>4} {j['seconds']:8.3f} {t['seconds']:8.3f} {j['seconds'] / t['seconds']:9.2f} "
          f"{j['gb_per_s']:9.2f} {t['gb_per_s']:10.2f} {j['peak_extra_models']:9.2f}x {t['peak_extra_models']:10.2f}x")
  print("GB/s = N x model bytes / seconds (each step also reads and writes the running sum); "
        "peak+ = peak resident memory above the two input trees, in model sizes")


if __name__ == "__main__":
  main()
