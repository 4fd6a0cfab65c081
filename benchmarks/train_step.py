"""Examples/s, TFLOP/s and MFU of the jaxlab ViT train step; on a CPU, side by side with the same step in PyTorch.

CPU (the default there): ViT-Ti dims (width 192, depth 12, 3 heads, MLP 768), 32x32x3 inputs, 4x4 patches ->
64 tokens, 10 classes, batch 32; the same model, AdamW and clipping in PyTorch eager. Both steps are built
once and timed in alternation (`--repeats` rounds of `--steps` steps each), so load from other processes hits
both alike; it prints each round, the median and range of each, and the median of the per-round ratios.

    python benchmarks/train_step.py                      # CPU: jaxlab vs PyTorch, ViT-Ti, batch 32
    python benchmarks/train_step.py --breakdown          # + building blocks timed in both frameworks
    python benchmarks/train_step.py --memory --size B    # + XLA's memory analysis with and without remat
    python benchmarks/train_step.py --host_devices 2     # data parallel over 2 host devices (batch split)
    python benchmarks/train_step.py --host_devices 2 --malloc_hugepages --remat nothing_saveable --scan_unroll 12
                                                         # the fast CPU recipe (docs/performance.md)

PyTorch runs in a worker process of its own, driven round by round over a pipe, so that jaxlab-only process
settings (`--host_devices`, `--malloc_hugepages`) leave it as it was started.

Accelerator (the default when jax's backend is a GPU or TPU): ViT-S and ViT-B, bfloat16 compute (float32
master weights), 224x224 images in 16x16 patches (196 tokens), 1000 classes, batch 256; prints examples/s,
analytic TFLOP/s and MFU against the device's dense bf16 peak (looked up from its device kind, or
`--peak_tflops`), and the peak memory from XLA's memory analysis:

    python benchmarks/train_step.py                      # on a GPU/TPU machine: ViT-S and ViT-B, bf16
    python benchmarks/train_step.py --sizes B --batch 512 --remat dots_saveable

FLOPs are analytic (3x the forward matmuls, attention included; XLA's cost analysis counts a scanned layer
once), so MFU here is model FLOPs utilisation: recomputation under remat is not counted as useful work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

# Dense (no sparsity) bf16 peak TFLOP/s per chip, from the vendors' data sheets. First substring match of the
# device kind wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
  ("H100 PCIe", 756.0),
  ("H100", 989.0),  # SXM / HBM3
  ("H200", 989.0),
  ("GH200", 989.0),
  ("B200", 2250.0),
  ("A100", 312.0),
  ("L40S", 362.0),
  ("L4", 121.0),
  ("A10G", 70.0),
  ("A10", 125.0),
  ("TPU v6 lite", 918.0),  # v6e
  ("TPU v5 lite", 197.0),  # v5e
  ("TPU v5", 459.0),  # v5p
  ("TPU v4", 275.0),
)

SIZES = {"digits": (64, 4, 4, 128), "Ti": (192, 12, 3, 768), "S": (384, 12, 6, 1536), "B": (768, 12, 12, 3072)}


def peak_tflops(device_kind: str, dtype: str) -> float:
  """The dense bf16/fp16 peak of `device_kind` (jax's `Device.device_kind`) in TFLOP/s; 0 when unknown/float32."""
  if dtype not in ("bfloat16", "float16"):
    return 0.0
  for name, peak in PEAK_BF16_TFLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return 0.0


def model_flops(width, depth, mlp, batch, tokens, patch, channels=3, classes=10) -> float:
  """Train-step FLOPs: 3x the forward's matmul FLOPs (forward, and backward for inputs and weights)."""
  per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
  forward = depth * per_layer + 2 * tokens * patch * patch * channels * width + 2 * width * classes
  return 3.0 * batch * forward


# ----------------------------------------------------------------------------------------------------------
# jaxlab
# ----------------------------------------------------------------------------------------------------------


def _model_config(a, size):
  from jaxlab import configs

  width, depth, heads, mlp = SIZES[size]
  m = configs.vit_digits_model()
  m.update(
    dict(
      width=width,
      depth=depth,
      num_heads=heads,
      mlp_dim=mlp,
      patch_size=a.patch,
      dtype=a.dtype,
      remat=a.remat,
      scan_unroll=min(a.scan_unroll, depth),
      attention_impl=a.attention_impl,
    )
  )
  return m


def _step_and_state(a, size, abstract=False):
  """The jitted jaxlab train step (real `train.make_train_step`) and its initial state (or its shapes)."""
  import jax
  import jax.numpy as jnp

  from jaxlab import configs, models, optim, parameterizations, train

  cfg = configs.base()
  module = models.build(_model_config(a, size).to_dict(), a.classes)
  x = np.zeros((1, a.image, a.image, 3), np.float32)
  param = parameterizations.build({"name": "identity"})

  def init():
    params = module.init({"params": jax.random.key(0)}, x)["params"]
    tx, _ = optim.build(cfg.optimizer, params, 1000)
    return {"step": jnp.zeros((), jnp.int32), "theta": params, "opt_state": tx.init(params), "model_state": {}}

  shapes = jax.eval_shape(init)
  tx, _ = optim.build(cfg.optimizer, shapes["theta"], 1000)
  step = jax.jit(train.make_train_step(module, param, tx, cfg.objective), donate_argnums=(0,))
  return step, (shapes if abstract else jax.jit(init)())


def _batch(a, abstract=False):
  import jax

  from jaxlab import sharding

  if abstract:
    return {
      "inputs": jax.ShapeDtypeStruct((a.batch, a.image, a.image, 3), np.float32),
      "label": jax.ShapeDtypeStruct((a.batch,), np.int32),
    }
  x = np.random.default_rng(0).standard_normal((a.batch, a.image, a.image, 3)).astype(np.float32)
  y = np.random.default_rng(1).integers(0, a.classes, a.batch).astype(np.int32)
  return sharding.put_batch({"inputs": x, "label": y}, sharding.make_mesh())


def jaxlab_runner(a, size):
  """A function running `n` jaxlab train steps and returning their seconds (state kept between calls)."""
  import jax

  from jaxlab import sharding, trees

  step, state = _step_and_state(a, size)
  mesh = sharding.make_mesh()
  state = jax.device_put(state, sharding.replicated(mesh))
  batch, rng = _batch(a), jax.random.key(0)
  box = [state]

  def run(n):
    s = box[0]
    jax.block_until_ready(s)
    t = time.perf_counter()
    for _ in range(n):
      s, _ = step(s, batch, rng)
    jax.block_until_ready(s)
    box[0] = s
    return time.perf_counter() - t

  run(2)  # compile and warm up
  return run, trees.count(state["theta"])


def memory_report(a, size):
  """XLA's memory analysis of the compiled train step for each remat policy (compiled only, never run)."""
  import jax

  rng = jax.random.key(0)
  print(
    f"XLA memory analysis, ViT-{size} train step, batch {a.batch}, {(a.image // a.patch) ** 2} tokens, "
    f"{a.dtype or 'float32'} compute ({jax.devices()[0].device_kind}):"
  )
  print(f"  {'remat':18s} {'temp (activations) MiB':>23s} {'arguments MiB':>14s} {'peak memory MiB':>16s}")
  out = {}
  for remat in [r for r in a.memory_remats.split(",") if r]:
    remat = "" if remat == "none" else remat
    a_r = argparse.Namespace(**{**vars(a), "remat": remat})
    step, state = _step_and_state(a_r, size, abstract=True)
    m = step.lower(state, _batch(a_r, abstract=True), rng).compile().memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    out[remat or "none"] = peak
    print(
      f"  {remat or 'none':18s} {m.temp_size_in_bytes / 2**20:23.1f} {m.argument_size_in_bytes / 2**20:14.1f} "
      f"{peak / 2**20:16.1f}",
      flush=True,
    )
  return out


# ----------------------------------------------------------------------------------------------------------
# PyTorch (CPU reference)
# ----------------------------------------------------------------------------------------------------------


def torch_runner(a, size):
  """The same ViT + AdamW + clipping in PyTorch eager; returns (run(n) -> seconds, version, threads)."""
  import torch
  from torch import nn

  width, depth, heads, mlp = SIZES[size]
  image, patch = a.image, a.patch

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
      self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
      self.fc1, self.fc2 = nn.Linear(width, mlp), nn.Linear(mlp, width)

    def forward(self, x):
      b, t, d = x.shape
      q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
      att = torch.nn.functional.scaled_dot_product_attention(q, k, v)
      x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
      return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))

  class ViT(nn.Module):
    def __init__(self):
      super().__init__()
      self.patch = nn.Conv2d(3, width, patch, patch)
      self.pos = nn.Parameter(torch.zeros(1, (image // patch) ** 2, width))
      self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
      self.norm, self.head = nn.LayerNorm(width, eps=1e-6), nn.Linear(width, a.classes)

    def forward(self, x):
      x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
      return self.head(self.norm(self.blocks(x)).mean(1))

  torch.manual_seed(0)
  model = ViT()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
  x = torch.randn(a.batch, 3, image, image)
  y = torch.randint(0, a.classes, (a.batch,))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  def run(n):
    t = time.perf_counter()
    for _ in range(n):
      step()
    return time.perf_counter() - t

  run(3)
  return run, torch.__version__, torch.get_num_threads()


_TUNABLES_MARK = "_JAXLAB_BENCH_SET_TUNABLES"  # set when this script put GLIBC_TUNABLES into its own environment
_HUGEPAGES = "glibc.malloc.hugetlb=1"


def torch_env() -> dict:
  """The PyTorch worker's environment: this process's, less what the script set for jaxlab alone.

  `--host_devices` (XLA_FLAGS) never reaches the worker; `--malloc_hugepages` is jaxlab's setting only when the
  script set it (a GLIBC_TUNABLES given by the caller applies to both sides).
  """
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  if env.pop(_TUNABLES_MARK, None):
    env.pop("GLIBC_TUNABLES", None)
  return env


class TorchWorker:
  """`torch_runner` in a process of its own (`torch_env()`), driven round by round over a pipe.

  So jaxlab-only process settings (host devices, glibc malloc tunables, which must be set before a process
  starts) do not touch PyTorch, and the rounds still alternate with jaxlab's.
  """

  def __init__(self, a, size):
    import json
    import subprocess

    args = json.dumps({"batch": a.batch, "image": a.image, "patch": a.patch, "classes": a.classes, "size": size})
    self.proc = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "--_torch_worker", args],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      env=torch_env(),
    )
    first = self.proc.stdout.readline().split()
    if not first or first[0] != "ready":
      self.proc.wait()
      raise ImportError("the PyTorch worker did not start (is torch installed? pip install -e '.[bench]')")
    self.version, self.threads = first[1], int(first[2])

  def __call__(self, n: int) -> float:
    self.proc.stdin.write(f"{n}\n")
    self.proc.stdin.flush()
    return float(self.proc.stdout.readline())

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def torch_worker_main(spec: str) -> None:
  """The worker's loop: build the PyTorch step, answer each line `n` with the seconds of `n` steps."""
  import json

  d = json.loads(spec)
  run, version, threads = torch_runner(argparse.Namespace(**d), d["size"])
  print("ready", version, threads, flush=True)
  for line in sys.stdin:
    print(run(int(line)), flush=True)


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------


def _time(fn, reps=30):
  fn()
  t = time.perf_counter()
  for _ in range(reps):
    fn()
  return (time.perf_counter() - t) / reps


def breakdown(width, heads, mlp, batch, tokens):
  """Milliseconds of the train step's building blocks in jax (jit) and torch, same shapes."""
  import jax
  import torch

  from jaxlab.models import vit

  rng = np.random.default_rng(0)
  rows = batch * tokens
  dh = width // heads
  x, w = rng.random((rows, width), np.float32), rng.random((width, mlp), np.float32)
  h = rng.random((rows, mlp), np.float32)
  q = rng.random((batch, tokens, heads, dh), np.float32)
  dpa = jax.nn.dot_product_attention
  jfns = {
    "matmul [B*T,D]x[D,M]": (jax.jit(lambda a, b: a @ b), (x, w)),
    "attention fwd (dpa)": (jax.jit(dpa), (q, q, q)),
    "attention fwd (einsum)": (jax.jit(vit.einsum_attention), (q, q, q)),
    "attention fwd+bwd (dpa)": (jax.jit(jax.grad(lambda q, k, v: dpa(q, k, v).sum(), argnums=(0, 1, 2))), (q, q, q)),
    "gelu (erf) [B*T,M]": (jax.jit(lambda a: jax.nn.gelu(a, approximate=False)), (h,)),
    "gelu (erf) fwd+bwd": (jax.jit(jax.grad(lambda a: jax.nn.gelu(a, approximate=False).sum())), (h,)),
    "layernorm [B*T,D]": (
      jax.jit(lambda a: (a - a.mean(-1, keepdims=True)) * jax.lax.rsqrt(a.var(-1, keepdims=True) + 1e-6)),
      (x,),
    ),
  }
  tq = torch.from_numpy(q).permute(0, 2, 1, 3).contiguous().requires_grad_(True)
  th = torch.from_numpy(h).requires_grad_(True)
  sdpa = torch.nn.functional.scaled_dot_product_attention

  def tattn_bwd():
    tq.grad = None
    sdpa(tq, tq, tq).sum().backward()

  def tgelu_bwd():
    th.grad = None
    torch.nn.functional.gelu(th).sum().backward()

  tfns = {
    "matmul [B*T,D]x[D,M]": lambda: torch.from_numpy(x) @ torch.from_numpy(w),
    "attention fwd (dpa)": lambda: sdpa(tq.detach(), tq.detach(), tq.detach()),
    "attention fwd (einsum)": lambda: sdpa(tq.detach(), tq.detach(), tq.detach()),
    "attention fwd+bwd (dpa)": tattn_bwd,
    "gelu (erf) [B*T,M]": lambda: torch.nn.functional.gelu(th.detach()),
    "gelu (erf) fwd+bwd": tgelu_bwd,
    "layernorm [B*T,D]": lambda: torch.nn.functional.layer_norm(torch.from_numpy(x), (width,)),
  }
  print(f"{'building block':26s} {'jax ms':>8s} {'torch ms':>9s} {'jax/torch time':>15s}")
  for name, (fn, args) in jfns.items():
    dev = [jax.device_put(v) for v in args]
    tj = _time(lambda fn=fn, dev=dev: jax.block_until_ready(fn(*dev)))
    with torch.no_grad() if "bwd" not in name else torch.enable_grad():
      tt = _time(tfns[name])
    print(f"{name:26s} {tj * 1e3:8.2f} {tt * 1e3:9.2f} {tj / tt:14.2f}x")


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------


def _spread(xs):
  return f"median {statistics.median(xs):8.1f}  [{min(xs):.1f}-{max(xs):.1f}]"


def _variant(a, item: str) -> argparse.Namespace:
  """`a` with `key=value,key=value` overrides of --dtype/--remat/--scan_unroll/--attention_impl."""
  out = argparse.Namespace(**vars(a))
  for kv in item.split(","):
    key, _, value = kv.partition("=")
    if key not in ("dtype", "remat", "scan_unroll", "attention_impl"):
      sys.exit(f"error: --variants: unknown key {key!r} in {item!r}; use dtype, remat, scan_unroll, attention_impl")
    setattr(out, key, int(value) if key == "scan_unroll" else value)
  return out


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--sizes", default="", help="comma-separated ViT sizes (Ti,S,B,digits); default by backend")
  ap.add_argument("--size", default="", help="alias of --sizes for one size")
  ap.add_argument("--batch", type=int, default=0, help="global batch (default 32 on CPU, 256 on accelerators)")
  ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
  ap.add_argument("--repeats", type=int, default=5, help="timed rounds (jaxlab and PyTorch alternate); 0 = none")
  ap.add_argument("--image", type=int, default=0, help="image side (default 32 on CPU, 224 on accelerators)")
  ap.add_argument("--patch", type=int, default=0, help="patch side (default 4 on CPU, 16 on accelerators)")
  ap.add_argument("--classes", type=int, default=0, help="classes (default 10 on CPU, 1000 on accelerators)")
  ap.add_argument("--dtype", default=None, help="compute dtype: '' (float32) or bfloat16 (accelerator default)")
  ap.add_argument("--remat", default="", help="model.remat policy of the blocks ('' = none)")
  ap.add_argument("--scan_unroll", type=int, default=1, help="model.scan_unroll")
  ap.add_argument("--attention_impl", default="", help="model.attention_impl: '' | xla | cudnn | einsum")
  ap.add_argument(
    "--host_devices",
    type=int,
    default=0,
    help="CPU: split the batch over this many host devices (XLA_FLAGS host device count)",
  )
  ap.add_argument(
    "--malloc_hugepages",
    action="store_true",
    help=f"CPU: run jaxlab's side with GLIBC_TUNABLES={_HUGEPAGES} (the script restarts itself with it; "
    "PyTorch's worker process keeps the environment it was started with)",
  )
  ap.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (default: looked up)")
  ap.add_argument(
    "--variants",
    default="",
    help="more jaxlab settings timed in the same rounds, e.g. 'scan_unroll=12;attention_impl=einsum'",
  )
  ap.add_argument("--jax_only", action="store_true", help="do not run PyTorch")
  ap.add_argument("--memory", action="store_true", help="also print XLA's memory analysis with/without remat")
  ap.add_argument(
    "--memory_remats", default="none,dots_saveable,nothing_saveable", help="remat policies --memory compares"
  )
  ap.add_argument("--breakdown", action="store_true", help="also time the building blocks in both frameworks")
  return ap.parse_args(argv)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["--_torch_worker"]:
    return torch_worker_main(argv[1])
  a = parse_args(argv)
  if a.malloc_hugepages and _HUGEPAGES not in os.environ.get("GLIBC_TUNABLES", ""):
    # glibc reads its tunables when a process starts: restart this script with them, jaxlab's side only.
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), _HUGEPAGES) if t)
    env[_TUNABLES_MARK] = "1"
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)
  if a.host_devices > 1:  # must be set before jax initialises its backends
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={a.host_devices}"
    ).strip()
  import jax

  accel = jax.default_backend() != "cpu"
  a.sizes = [s for s in (a.sizes or a.size or ("S,B" if accel else "Ti")).split(",") if s]
  a.batch = a.batch or (256 if accel else 32)
  a.image, a.patch = a.image or (224 if accel else 32), a.patch or (16 if accel else 4)
  a.classes = a.classes or (1000 if accel else 10)
  a.dtype = ("bfloat16" if accel else "") if a.dtype is None else a.dtype
  a.jax_only = a.jax_only or accel
  for s in a.sizes:
    if s not in SIZES:
      sys.exit(f"error: --sizes: unknown ViT size {s!r}; choose from {', '.join(SIZES)}")
  kind = jax.devices()[0].device_kind
  peak = a.peak_tflops or peak_tflops(kind, a.dtype or "float32")
  tokens = (a.image // a.patch) ** 2
  print(
    f"device: {kind} x{jax.device_count()} ({jax.default_backend()}), jax {jax.__version__}; batch {a.batch}, "
    f"{tokens} tokens, compute {a.dtype or 'float32'}, remat {a.remat or 'none'}, scan_unroll {a.scan_unroll}, "
    f"attention {a.attention_impl or 'auto'}; {a.repeats} rounds of {a.steps} steps"
    + (f"; GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}" if os.environ.get("GLIBC_TUNABLES") else ""),
    flush=True,
  )
  for size in a.sizes:
    width, depth, _, mlp = SIZES[size]
    flops = model_flops(width, depth, mlp, a.batch, tokens, a.patch, classes=a.classes)
    if a.repeats <= 0:  # --repeats 0: no timing (e.g. only --memory)
      if a.memory:
        memory_report(a, size)
      continue
    jrun, n_params = jaxlab_runner(a, size)
    runners = {"jaxlab": jrun}
    for item in [v for v in a.variants.split(";") if v]:  # other jaxlab settings, timed in the same rounds
      runners[f"jaxlab {item}"] = jaxlab_runner(_variant(a, item), size)[0]
    worker = None
    if not a.jax_only:
      try:
        worker = TorchWorker(a, size)
        runners["pytorch"] = worker
        print(
          f"PyTorch {worker.version} eager, {worker.threads} threads, in its own process "
          f"(GLIBC_TUNABLES={torch_env().get('GLIBC_TUNABLES', '')!r}); jaxlab: "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
          flush=True,
        )
      except ImportError as e:
        print(f"{e}: jaxlab only")
    rates = {k: [] for k in runners}
    for r in range(a.repeats):
      for k, run in runners.items():
        rates[k].append(a.batch * a.steps / run(a.steps))
      print(f"  round {r + 1}: " + "   ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()) + " ex/s", flush=True)
    print(f"ViT-{size} ({n_params:,} params, {flops / 1e9:.1f} GFLOP per step, analytic)")
    for k, v in rates.items():
      tflops = statistics.median(v) / a.batch * flops / 1e12
      line = f"  {k:28s} examples/s: {_spread(v)};  {tflops:.3f} TFLOP/s"
      if peak and k != "pytorch":
        line += f";  MFU {tflops / peak:.1%} of {peak:.0f} TFLOP/s"
      if "pytorch" in rates and k != "pytorch":
        ratios = [j / t for j, t in zip(v, rates["pytorch"], strict=True)]
        line += f";  / pytorch: median {statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"
      print(line, flush=True)
    if worker is not None:
      worker.close()
    if a.memory:
      memory_report(a, size)
  if a.breakdown:
    width, _, heads, mlp = SIZES[a.sizes[0]]
    breakdown(width, heads, mlp, a.batch, tokens)


if __name__ == "__main__":
  main()
