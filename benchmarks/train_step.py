"""Examples/s of the jaxlab ViT train step against the same model + AdamW in plain PyTorch.

Same shapes (ViT-Ti dims: width 192, depth 12, 3 heads, MLP 768; 32x32x3 inputs,
4x4 patches -> 64 tokens; 10 classes), same optimizer (AdamW, clip 1.0), one
process on this machine. Prints both figures and the ratio. On a GPU it also
prints model FLOPs utilisation (pass --peak_tflops).

    python benchmarks/train_step.py [--batch 32] [--steps 20] [--size Ti] [--breakdown]

`--breakdown` also times the step's building blocks at the same shapes in both
frameworks (dense matmul, attention core forward and backward, exact GELU,
LayerNorm), to show where a gap comes from.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jaxlab import configs, models, optim, parameterizations, train, trees
from jaxlab.models.vit import SIZES


def model_flops(width, depth, mlp, batch, tokens, patch, channels=3, classes=10) -> float:
  """Train-step FLOPs: 3x the forward's matmul FLOPs (forward, and backward for inputs and weights)."""
  per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
  forward = depth * per_layer + 2 * tokens * patch * patch * channels * width + 2 * width * classes
  return 3.0 * batch * forward


def jaxlab_rate(width, depth, heads, mlp, batch, steps, image, patch):
  cfg = configs.base()
  cfg.model = configs.vit_digits_model()
  cfg.model.update(dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, patch_size=patch))
  module = models.build(cfg.model.to_dict(), 10)
  x = np.random.default_rng(0).standard_normal((batch, image, image, 3)).astype(np.float32)
  y = np.random.default_rng(1).integers(0, 10, batch).astype(np.int32)
  params = module.init({"params": jax.random.key(0)}, x[:1])["params"]
  param = parameterizations.build({"name": "identity"})
  tx, _ = optim.build(cfg.optimizer, params, 1000)
  state = {"step": jax.numpy.zeros((), jax.numpy.int32), "theta": params, "opt_state": tx.init(params),
           "model_state": {}}
  step = jax.jit(train.make_train_step(module, param, tx, cfg.objective), donate_argnums=(0,))
  batch_d = {"inputs": jax.device_put(x), "label": jax.device_put(y)}
  rng = jax.random.key(0)
  compiled = step.lower(state, batch_d, rng).compile()
  del compiled  # XLA's cost analysis counts a scanned layer once, so the FLOPs are counted analytically
  flops = model_flops(width, depth, mlp, batch, (image // patch) ** 2, patch)
  for _ in range(3):
    state, m = step(state, batch_d, rng)
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch_d, rng)
  jax.block_until_ready(state)
  dt = time.perf_counter() - t
  return batch * steps / dt, flops, trees.count(params)


def torch_rate(width, depth, heads, mlp, batch, steps, image, patch):
  import torch
  from torch import nn

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
      self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
      self.fc1, self.fc2 = nn.Linear(width, mlp), nn.Linear(mlp, width)

    def forward(self, x):
      b, t, d = x.shape
      q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
      a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
      x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
      return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))

  class ViT(nn.Module):
    def __init__(self):
      super().__init__()
      self.patch = nn.Conv2d(3, width, patch, patch)
      self.pos = nn.Parameter(torch.zeros(1, (image // patch) ** 2, width))
      self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
      self.norm, self.head = nn.LayerNorm(width, eps=1e-6), nn.Linear(width, 10)

    def forward(self, x):
      x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
      return self.head(self.norm(self.blocks(x)).mean(1))

  torch.manual_seed(0)
  model = ViT()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
  x = torch.randn(batch, 3, image, image)
  y = torch.randint(0, 10, (batch,))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  for _ in range(3):
    step()
  t = time.perf_counter()
  for _ in range(steps):
    step()
  return batch * steps / (time.perf_counter() - t), torch.__version__, torch.get_num_threads()


def _time(fn, reps=30):
  fn()
  t = time.perf_counter()
  for _ in range(reps):
    fn()
  return (time.perf_counter() - t) / reps


def breakdown(width, heads, mlp, batch, tokens):
  """Milliseconds of the train step's building blocks in jax (jit) and torch, same shapes."""
  import jax.numpy as jnp
  import torch

  rng = np.random.default_rng(0)
  rows = batch * tokens
  dh = width // heads
  x, w = rng.random((rows, width), np.float32), rng.random((width, mlp), np.float32)
  h = rng.random((rows, mlp), np.float32)
  q = rng.random((batch, tokens, heads, dh), np.float32)

  def jattn(q, k, v):
    a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh).astype(np.float32), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", a, v)

  jfns = {
      "matmul [B*T,D]x[D,M]": (jax.jit(lambda a, b: a @ b), (x, w)),
      "attention fwd": (jax.jit(jattn), (q, q, q)),
      "attention fwd+bwd": (jax.jit(jax.grad(lambda q, k, v: jattn(q, k, v).sum(), argnums=(0, 1, 2))), (q, q, q)),
      "gelu (erf) [B*T,M]": (jax.jit(lambda a: jax.nn.gelu(a, approximate=False)), (h,)),
      "layernorm [B*T,D]": (jax.jit(lambda a: (a - a.mean(-1, keepdims=True)) * jax.lax.rsqrt(
          a.var(-1, keepdims=True) + 1e-6)), (x,)),
  }
  tq = torch.from_numpy(q).permute(0, 2, 1, 3).contiguous().requires_grad_(True)

  def tattn_bwd():
    tq.grad = None
    torch.nn.functional.scaled_dot_product_attention(tq, tq, tq).sum().backward()

  tfns = {
      "matmul [B*T,D]x[D,M]": lambda: torch.from_numpy(x) @ torch.from_numpy(w),
      "attention fwd": lambda: torch.nn.functional.scaled_dot_product_attention(tq.detach(), tq.detach(),
                                                                                tq.detach()),
      "attention fwd+bwd": tattn_bwd,
      "gelu (erf) [B*T,M]": lambda: torch.nn.functional.gelu(torch.from_numpy(h)),
      "layernorm [B*T,D]": lambda: torch.nn.functional.layer_norm(torch.from_numpy(x), (width,)),
  }
  print(f"{'building block':24s} {'jax ms':>8s} {'torch ms':>9s} {'jax/torch time':>15s}")
  for name, (fn, args) in jfns.items():
    dev = [jax.device_put(a) for a in args]
    tj = _time(lambda fn=fn, dev=dev: jax.block_until_ready(fn(*dev)))
    with torch.no_grad() if "bwd" not in name else torch.enable_grad():
      tt = _time(tfns[name])
    print(f"{name:24s} {tj * 1e3:8.2f} {tt * 1e3:9.2f} {tj / tt:14.2f}x")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="Ti", choices=sorted(SIZES))
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--image", type=int, default=32)
  ap.add_argument("--patch", type=int, default=4)
  ap.add_argument("--peak_tflops", type=float, default=0.0, help="accelerator peak (for MFU)")
  ap.add_argument("--breakdown", action="store_true", help="also time the building blocks in both frameworks")
  a = ap.parse_args()
  width, depth, heads, mlp = SIZES[a.size]
  shape = (width, depth, heads, mlp, a.batch, a.steps, a.image, a.patch)
  jr, flops, n = jaxlab_rate(*shape)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; ViT-{a.size} ({n:,} params), batch {a.batch}, "
        f"{(a.image // a.patch) ** 2} tokens")
  print(f"jaxlab  train step: {jr:9.1f} examples/s  ({flops / 1e9:.1f} GFLOP per step, analytic; "
        f"{jr / a.batch * flops / 1e9:.1f} GFLOP/s)")
  if a.peak_tflops:
    print(f"jaxlab  MFU: {jr / a.batch * flops / (a.peak_tflops * 1e12):.1%}")
  try:
    tr, tv, threads = torch_rate(*shape)
  except ImportError:
    print("torch not installed: pip install -e '.[bench]'")
    return
  print(f"pytorch train step: {tr:9.1f} examples/s  (torch {tv}, {threads} threads)")
  print(f"ratio jaxlab / pytorch: {jr / tr:.2f}x")
  if a.breakdown:
    breakdown(width, heads, mlp, a.batch, (a.image // a.patch) ** 2)


if __name__ == "__main__":
  main()
