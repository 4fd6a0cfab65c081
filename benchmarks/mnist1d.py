"""MNIST-1D: data generation vs cache, and train-step time of the zoo in jaxlab (JAX) vs plain PyTorch.

    python benchmarks/mnist1d.py                      # batch 100, 300 timed steps per model
    python benchmarks/mnist1d.py --steps 100 --models mlp,cnn1d --torch-threads 0

1. Data: the `mnist1d` package's generator on its defaults (5000 signals) against
   reading jaxlab's `.npz` cache of the same arrays (what every run after the first does).
2. One training step (forward, backward, Adam update; batch 100 of [40, 1] signals) of each
   baseline: the registered Flax model under `jax.jit` against an equivalent PyTorch module
   written here with the same layer shapes and parameter count as the paper's reference
   models (eager PyTorch, `torch.optim.Adam`). Median over `--steps` steps after a warm-up
   (the JAX warm-up includes compilation, reported separately).
Prints figures and ratios only (no asserts). Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
# This file is named mnist1d.py: drop its folder from sys.path so `import mnist1d` finds the package.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.modules.pop("mnist1d", None)
sys.path.insert(0, os.path.dirname(_HERE))


def bench_data(repeats: int = 3) -> None:
  from jaxlab.data import mnist1d
  args = mnist1d.generator_args()
  gen = []
  for _ in range(repeats):
    t = time.perf_counter()
    mnist1d.generate(args)
    gen.append(time.perf_counter() - t)
  with tempfile.TemporaryDirectory() as d:
    cfg = {"cache_dir": d}
    mnist1d.load_arrays(cfg)  # writes the cache
    load = []
    for _ in range(repeats):
      t = time.perf_counter()
      mnist1d.load_arrays(cfg)
      load.append(time.perf_counter() - t)
  g, c = min(gen), min(load)
  print(f"data: generate {g * 1e3:.0f} ms, cached load {c * 1e3:.1f} ms, cache is {g / c:.0f}x faster")


def torch_model(name: str):
  import torch
  from torch import nn

  class Flat(nn.Module):
    def forward(self, x):
      return x.reshape(x.shape[0], -1)

  class ResMLP(nn.Module):
    def __init__(self):
      super().__init__()
      self.fc1, self.fc2, self.head = nn.Linear(40, 100), nn.Linear(100, 100), nn.Linear(100, 10)

    def forward(self, x):
      h = torch.relu(self.fc1(x.reshape(x.shape[0], -1)))
      return self.head(h + torch.relu(self.fc2(h)))

  class BiGRU(nn.Module):
    def __init__(self):
      super().__init__()
      self.rnn = nn.GRU(1, 6, batch_first=True, bidirectional=True)
      self.head = nn.Linear(40 * 12, 10)

    def forward(self, x):
      out, _ = self.rnn(x)
      return self.head(out.reshape(out.shape[0], -1))

  class CNN(nn.Module):
    def __init__(self):
      super().__init__()
      self.convs = nn.Sequential(nn.Conv1d(1, 25, 5, 2, 1), nn.ReLU(), nn.Conv1d(25, 25, 3, 2, 1), nn.ReLU(),
                                 nn.Conv1d(25, 25, 3, 2, 1), nn.ReLU())
      self.head = nn.Linear(125, 10)

    def forward(self, x):
      return self.head(self.convs(x.transpose(1, 2)).reshape(x.shape[0], -1))

  return {"logreg": lambda: nn.Sequential(Flat(), nn.Linear(40, 10)), "mlp": ResMLP, "cnn1d": CNN,
          "gru": BiGRU}[name]()


def bench_torch(name: str, x: np.ndarray, y: np.ndarray, steps: int) -> tuple[float, int]:
  import torch
  model = torch_model(name)
  opt = torch.optim.Adam(model.parameters(), 1e-2)
  xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
  loss_fn = torch.nn.CrossEntropyLoss()

  def step():
    loss = loss_fn(model(xt), yt)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss

  for _ in range(5):
    step()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return float(np.median(times)), sum(p.numel() for p in model.parameters())


def bench_jax(name: str, x: np.ndarray, y: np.ndarray, steps: int) -> tuple[float, float, int]:
  import jax
  import optax

  from jaxlab import models, trees
  m = models.build({"name": name}, 10)
  params = m.init(jax.random.key(0), x)["params"]
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  @jax.jit
  def step(p, o, xb, yb):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(m.apply({"params": p}, xb), yb).mean()
    g = jax.grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  xb, yb = jax.device_put(x), jax.device_put(y)
  t = time.perf_counter()
  params, opt = jax.block_until_ready(step(params, opt, xb, yb))
  compile_s = time.perf_counter() - t
  for _ in range(5):
    params, opt = step(params, opt, xb, yb)
  jax.block_until_ready(params)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    params, opt = jax.block_until_ready(step(params, opt, xb, yb))
    times.append(time.perf_counter() - t)
  return float(np.median(times)), compile_s, trees.count(params)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch", type=int, default=100)
  ap.add_argument("--models", default="logreg,mlp,cnn1d,gru")
  ap.add_argument("--torch-threads", type=int, default=1,
                  help="PyTorch intra-op threads (0 = its default); its OpenMP threads spin-wait, which is "
                       "very slow on a loaded shared machine")
  a = ap.parse_args()
  import jax
  import torch
  if a.torch_threads:
    torch.set_num_threads(a.torch_threads)
  print(f"machine: {os.cpu_count()} CPU cores; jax {jax.__version__} ({jax.devices()[0].platform}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  bench_data()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((a.batch, 40, 1)).astype(np.float32)
  y = rng.integers(0, 10, a.batch).astype(np.int32)
  print(f"train step, batch {a.batch}, median of {a.steps} steps:")
  print(f"{'model':8s} {'params jax/torch':>18s} {'jax ms':>8s} {'torch ms':>9s} {'torch/jax':>10s} "
        f"{'jax compile s':>14s}")
  for name in a.models.split(","):
    tj, comp, pj = bench_jax(name, x, y, a.steps)
    tt, pt = bench_torch(name, x, y, a.steps)
    print(f"{name:8s} {pj:>8,d} / {pt:<8,d} {tj * 1e3:8.3f} {tt * 1e3:9.3f} {tt / tj:10.2f} {comp:14.2f}")


if __name__ == "__main__":
  main()
