"""S4D kernel + FFT convolution: jaxlab (chunked Vandermonde, jit) vs plain PyTorch (naive Vandermonde).

    python benchmarks/s4d.py                 # L = 1k, 4k, 16k; H = 256, N = 64 (32 complex modes), batch 2
    python benchmarks/s4d.py --lengths 1024,4096 --batch 1 --repeats 3

For each length L: time per forward call (kernel from the parameters, then the causal FFT convolution
padded to 2L, plus D u) after a warm-up, throughput in positions/s, and peak memory. The PyTorch
reference is the official minimal S4D layer's computation (`models/s4/s4d.py`): it materialises
exp(dtA * l) as a [H, N/2, L] complex tensor. Peak memory is each measurement's peak resident set
size (ru_maxrss) above the process's resident size just before the measurement, measured in a
fresh subprocess per (framework, L). Also: step-mode generation speed of a causal `s4d_seq`
(tokens/s with a carried state, `lax.scan` over steps) against regenerating by re-running the
convolutional model on the whole prefix for every new token. Prints figures and ratios only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

H, N = 256, 64


def _rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _params_np(seed=0):
  import numpy as np
  rng = np.random.default_rng(seed)
  m = N // 2
  return {
      "log_dt": rng.uniform(math.log(1e-3), math.log(1e-1), H).astype(np.float32),
      "log_A_real": np.full((H, m), math.log(0.5), np.float32),
      "A_imag": np.tile(np.pi * np.arange(m, dtype=np.float32), (H, 1)),
      "B": np.stack([np.ones((H, m)), np.zeros((H, m))], -1).astype(np.float32),
      "C": (rng.standard_normal((1, H, m, 2)) * math.sqrt(0.5)).astype(np.float32),
      "D": rng.standard_normal(H).astype(np.float32),
  }


def measure_jax(length: int, batch: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxlab.models import s4d
  p = {k: jnp.asarray(v) for k, v in _params_np().items()}
  u = jnp.asarray(np.random.default_rng(1).standard_normal((batch, length, H)).astype(np.float32))

  @jax.jit
  def forward(p, u):
    k = s4d.ssm_kernel(p, u.shape[1], "zoh", chunk_size=1024)[0]
    return s4d.causal_conv(u, k) + p["D"] * u

  base = _rss_mb()
  forward(p, u).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    forward(p, u).block_until_ready()
    times.append(time.perf_counter() - t)
  temp = forward.lower(p, u).compile().memory_analysis()
  return {"s": min(times), "peak_mb": _peak_mb() - base,
          "xla_temp_mb": getattr(temp, "temp_size_in_bytes", 0) / 2**20}


def measure_torch(length: int, batch: int, repeats: int) -> dict:
  import numpy as np
  import torch
  torch.set_grad_enabled(False)
  p = {k: torch.as_tensor(v) for k, v in _params_np().items()}
  u = torch.as_tensor(np.random.default_rng(1).standard_normal((batch, length, H)).astype(np.float32))

  def forward(p, u):
    # the official minimal S4D layer, written out: naive Vandermonde over a [H, N/2, L] tensor
    dt = torch.exp(p["log_dt"])
    a = -torch.exp(p["log_A_real"]) + 1j * p["A_imag"]
    c = torch.view_as_complex(p["C"][0].contiguous()) * torch.view_as_complex(p["B"].contiguous())
    dta = a * dt[:, None]
    k = dta.unsqueeze(-1) * torch.arange(u.shape[1])
    c = c * (torch.exp(dta) - 1.0) / a
    k = 2 * torch.einsum("hn,hnl->hl", c, torch.exp(k)).real
    x = u.transpose(1, 2)
    n = 2 * x.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :x.shape[-1]]
    return (y + x * p["D"][:, None]).transpose(1, 2)

  base = _rss_mb()
  forward(p, u)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    forward(p, u)
    times.append(time.perf_counter() - t)
  return {"s": min(times), "peak_mb": _peak_mb() - base, "threads": torch.get_num_threads()}


def measure_generation(tokens: int, d_model: int, layers: int) -> dict:
  import jax
  import jax.numpy as jnp

  from jaxlab import models
  from jaxlab.models import sequence
  cfg = dict(name="s4d_seq", d_model=d_model, n_layers=layers, d_state=N, causal=True, vocab_size=16,
             output="per_position", out_dim=17, norm="layer")
  model = models.build(cfg, 2)
  v = model.init(jax.random.key(0), jnp.zeros((1, tokens), jnp.int32))

  @jax.jit
  def generate_step_mode(v, first):
    def body(carry, _):
      tok, state = carry
      logits, state = model.apply(v, tok, state=state)
      nxt = jnp.argmax(logits[:, :16], -1).astype(jnp.int32)
      return (nxt, state), nxt
    _, out = jax.lax.scan(body, (first, sequence.initial_state(cfg, 1)), None, length=tokens)
    return out

  @jax.jit
  def next_token_conv(v, seq, t):
    logits = model.apply(v, seq)            # the whole (zero padded) prefix, causal model
    return jnp.argmax(logits[0, t, :16]).astype(jnp.int32)

  first = jnp.zeros((1,), jnp.int32)
  generate_step_mode(v, first).block_until_ready()
  t = time.perf_counter()
  out_step = generate_step_mode(v, first).block_until_ready()
  step_s = time.perf_counter() - t
  seq = jnp.zeros((1, tokens), jnp.int32)
  next_token_conv(v, seq, 0).block_until_ready()
  t = time.perf_counter()
  tok = first[0]
  gen = []
  for i in range(tokens):
    seq = seq.at[0, i].set(tok)
    tok = next_token_conv(v, seq, i)
    gen.append(tok)
  conv_s = time.perf_counter() - t
  same = bool(jnp.all(jnp.stack(gen) == out_step[:, 0]))
  return {"step_tokens_per_s": tokens / step_s, "conv_tokens_per_s": tokens / conv_s, "same_tokens": same}


def _child(kind: str, length: int, batch: int, repeats: int) -> dict:
  cmd = [sys.executable, __file__, "--child", kind, "--lengths", str(length), "--batch", str(batch),
         "--repeats", str(repeats)]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--lengths", default="1024,4096,16384")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--gen_tokens", type=int, default=256)
  ap.add_argument("--gen_d_model", type=int, default=256)
  ap.add_argument("--gen_layers", type=int, default=4)
  ap.add_argument("--child", default="")
  a = ap.parse_args()
  lengths = [int(x) for x in a.lengths.split(",")]
  if a.child:
    fn = {"jax": measure_jax, "torch": measure_torch}[a.child]
    print(json.dumps(fn(lengths[0], a.batch, a.repeats)))
    return
  import jax
  print(f"S4D kernel + FFT conv forward, H={H}, N={N} ({N // 2} complex modes), batch {a.batch}; "
        f"{os.cpu_count()} CPU cores, jax backend {jax.default_backend()}")
  print(f"{'L':>6} | {'jax ms':>8} {'torch ms':>9} {'speedup':>8} | {'jax Mpos/s':>10} {'torch Mpos/s':>12} | "
        f"{'jax peak MB':>11} {'torch peak MB':>13} {'mem ratio':>9} | {'xla temp MB':>11}")
  for length in lengths:
    j = _child("jax", length, a.batch, a.repeats)
    t = _child("torch", length, a.batch, a.repeats)
    if "error" in j or "error" in t:
      print(f"{length:>6} | failed: jax {j.get('error', 'ok')}; torch {t.get('error', 'ok')}")
      continue
    pos = a.batch * length
    print(f"{length:>6} | {1e3 * j['s']:8.1f} {1e3 * t['s']:9.1f} {t['s'] / j['s']:7.2f}x | "
          f"{pos / j['s'] / 1e3:10.1f} {pos / t['s'] / 1e3:12.1f} | {j['peak_mb']:11.0f} {t['peak_mb']:13.0f} "
          f"{t['peak_mb'] / max(j['peak_mb'], 1e-9):8.2f}x | {j['xla_temp_mb']:11.0f}")
  g = measure_generation(a.gen_tokens, a.gen_d_model, a.gen_layers)
  print(f"\nGeneration, causal s4d_seq d_model {a.gen_d_model}, {a.gen_layers} layers, N={N}, {a.gen_tokens} tokens, "
        f"batch 1 (greedy):")
  print(f"  step mode (carried state, lax.scan): {g['step_tokens_per_s']:10.1f} tokens/s")
  print(f"  conv mode (re-run on the prefix):    {g['conv_tokens_per_s']:10.1f} tokens/s")
  print(f"  ratio step/conv: {g['step_tokens_per_s'] / g['conv_tokens_per_s']:.1f}x; "
        f"same greedy tokens: {g['same_tokens']}")


if __name__ == "__main__":
  main()
