"""Throughput of the sequence-task generators and the self-pretraining preparers (prints, no asserts).

    python benchmarks/ntfs.py [--quick]

Figures: examples generated per second for ListOps at several lengths (LRA:
500 < n < 2000), Pathfinder at 16^2 and 32^2, sequential digits upsampled; and
the jitted `mask_denoise` / loss cost per batch against a forward pass of a
small S4D model on the same batch (the ratio is the masking overhead).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import build, objectives
from jaxlab.data import sequences
from jaxlab.losses import pretraining


def _best(fn, repeat: int = 3) -> float:
  times = []
  for _ in range(repeat):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def generators(quick: bool):
  print("== generators (examples per second, best of 3) ==")
  n = 100 if quick else 300
  for lo, hi in ((16, 64), (32, 128), (128, 512), (500, 2000)):
    m = max(10, n // (4 if hi >= 2000 else 1))
    t = _best(lambda lo=lo, hi=hi, m=m: sequences.generate_listops(m, seed=0, min_length=lo, max_length=hi))
    print(f"listops {lo} < L < {hi}: {m / t:8.0f} ex/s  ({1e3 * t / m:.2f} ms/example)")
  for size in (16, 32):
    t = _best(lambda size=size: sequences.generate_pathfinder(4 * n, seed=0, image_size=size))
    print(f"pathfinder {size}x{size}: {4 * n / t:8.0f} ex/s")
  from jaxlab.data import digits
  x, _ = digits.load_digits_arrays()
  for u in (1, 4):
    t = _best(lambda u=u: sequences.upsample_images(x[..., 0], u))
    print(f"seq_digits upsample {u} (L={64 * u * u}): {len(x) / t:8.0f} ex/s")


def masking(quick: bool):
  print("== masking vs forward pass (jitted, per batch of 32) ==")
  length = 512 if quick else 2048
  x = jnp.asarray(np.random.default_rng(0).integers(1, 16, size=(32, length)), jnp.int32)
  cfg = {"mask_rate": 0.1, "mask_id": 16, "pad_id": 0}
  prep = jax.jit(lambda b, k: pretraining.mask_denoise(b, k, cfg))
  model_cfg = dict(name="s4d_seq", d_model=64, n_layers=2, d_state=32, vocab_size=16, output="per_position",
                   out_dim=16)
  module = build.model(model_cfg, 10)
  variables = build.init_variables(module, jax.random.key(0), (length,), np.int32)
  fwd = jax.jit(lambda v, inp: module.apply(v, inp, train=False))

  def loss(v, b):
    logits = module.apply(v, b["inputs"], train=False)
    return pretraining.denoise_ce(objectives.Context(logits=logits, batch=b), {})
  loss = jax.jit(loss)
  key = jax.random.key(1)
  b = prep({"inputs": x}, key)
  jax.block_until_ready((b, fwd(variables, b["inputs"]), loss(variables, b)))
  r = 20 if quick else 50
  t_prep = _best(lambda: [jax.block_until_ready(prep({"inputs": x}, key)) for _ in range(r)]) / r
  t_fwd = _best(lambda: [jax.block_until_ready(fwd(variables, b["inputs"])) for _ in range(r)]) / r
  t_loss = _best(lambda: [jax.block_until_ready(loss(variables, b)) for _ in range(r)]) / r
  print(f"L={length}: mask_denoise {1e3 * t_prep:.3f} ms, forward {1e3 * t_fwd:.3f} ms, "
        f"forward + denoise_ce {1e3 * t_loss:.3f} ms; masking / forward = {t_prep / t_fwd:.3f}, "
        f"loss overhead = {(t_loss - t_fwd) / t_fwd:+.3f}")


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args()
  print(f"jax {jax.__version__}, devices {jax.devices()}")
  generators(args.quick)
  masking(args.quick)
