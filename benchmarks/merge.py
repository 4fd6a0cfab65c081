"""Merging benchmark: TIES and task arithmetic over N fine-tunes of a ViT-B-sized model in safetensors files.

    /work/main/.venv-bench/bin/python benchmarks/merge.py                 # 8 fine-tunes, ViT-B size, 3 repeats
    python benchmarks/merge.py --size small --repeats 1 --tools jaxlab,numpy   # quick check, no torch needed

The script writes a base model and `--models` fine-tunes (base + 0.01 N(0, 1), float32, seed 0) into a
temporary directory as `model.safetensors` + `config.json` in the Llama layout, so that mergekit reads them
as a model (hidden 768, 12 layers, MLP 2048 x 3 matrices, vocab 1000: 86.5M parameters, the size of a
ViT-B/16). Every tool reads the same files and writes the merge as safetensors:

  jaxlab          `jaxlab.transforms.merging` (the transforms' own code path) over a lazy sequence that reads
                  one whole file per index (`safetensors.numpy`): one pass for task arithmetic, two for TIES
  jaxlab_tensors  the same kernels one tensor at a time (`merging.merge_tensorwise`), reading single tensors
  numpy     plain numpy, tensor by tensor across the N + 1 files (the TIES reference formula)
  mergekit  `mergekit.merge.run_merge` with `ties` / `task_arithmetic` (when `mergekit` imports; the
            `bench` extra), on the CPU

Each run is a separate process; tools and methods are interleaved and repeated; the table gives the median
and the spread (min-max) of wall time, of the peak anonymous RSS (sampled `RssAnon`: what the tool holds)
and of the peak RSS (`ru_maxrss`, which also counts the pages of the memory-mapped input files every tool
reads through safetensors), and the largest difference between each tool's output and jaxlab's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SIZES = {  # Llama layout with ViT-B/16's parameter count (86.5M) or a small one for quick checks
  "vitb": dict(hidden=768, layers=12, intermediate=2048, heads=12, vocab=1000),
  "small": dict(hidden=128, layers=2, intermediate=256, heads=4, vocab=100),
}
METHODS = ("task_arithmetic", "ties")
DENSITY = 0.2


def tensor_shapes(hidden: int, layers: int, intermediate: int, vocab: int, **_) -> dict[str, tuple[int, ...]]:
  shapes = {"model.embed_tokens.weight": (vocab, hidden)}
  for i in range(layers):
    p = f"model.layers.{i}."
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
      shapes[p + f"self_attn.{n}.weight"] = (hidden, hidden)
    shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
    shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
    shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
    shapes[p + "input_layernorm.weight"] = (hidden,)
    shapes[p + "post_attention_layernorm.weight"] = (hidden,)
  shapes["model.norm.weight"] = (hidden,)
  shapes["lm_head.weight"] = (vocab, hidden)
  return shapes


def write_models(root: str, size: str, n: int) -> list[str]:
  """base + n fine-tunes as Llama-layout model directories; returns [base, ft_0, ...]."""
  from safetensors.numpy import save_file

  cfg = SIZES[size]
  shapes = tensor_shapes(**cfg)
  hf = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": cfg["hidden"],
    "intermediate_size": cfg["intermediate"],
    "num_hidden_layers": cfg["layers"],
    "num_attention_heads": cfg["heads"],
    "num_key_value_heads": cfg["heads"],
    "vocab_size": cfg["vocab"],
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
  }
  rng = np.random.default_rng(0)
  base = {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
  dirs = []
  for i in range(n + 1):
    d = os.path.join(root, "base" if i == 0 else f"ft_{i - 1}")
    os.makedirs(d)
    tensors = (
      base if i == 0 else {k: v + (0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()}
    )
    save_file(tensors, os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "config.json"), "w") as f:
      json.dump(hf, f)
    dirs.append(d)
    del tensors
  return dirs


# ----------------------------------------------------------------------------
# The three tools (each run in its own process by `--child`)
# ----------------------------------------------------------------------------


class SafetensorsInputs:
  """A lazy sequence of models for jaxlab's merging code: `[i]` reads file i whole (one model in memory)."""

  def __init__(self, dirs: list[str]):
    self.paths = list(dirs)
    self.metas = [{} for _ in dirs]

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i):
    import types

    from safetensors.numpy import load_file

    return types.SimpleNamespace(
      theta=load_file(os.path.join(self.paths[i], "model.safetensors")), model_state={}, meta={}, path=self.paths[i]
    )


def run_jaxlab(method: str, dirs: list[str], out: str) -> None:
  from safetensors.numpy import load_file, save_file

  from jaxlab.transforms import merging

  base = load_file(os.path.join(dirs[0], "model.safetensors"))
  kw = dict(method="magnitude", density=str(DENSITY), consensus=True, normalize=True) if method == "ties" else {}
  res = merging.generalized_task_arithmetic(
    SafetensorsInputs(dirs[1:]), base=None, base_theta=base, weights="", lam="1.0", layer_leaves=(), **kw
  )
  save_file({k: np.asarray(v) for k, v in res.theta.items()}, out)


def run_jaxlab_tensors(method: str, dirs: list[str], out: str) -> None:
  """jaxlab's kernels one tensor at a time (`merging.merge_tensorwise`), reading single tensors from the files."""
  from safetensors import safe_open
  from safetensors.numpy import save_file

  from jaxlab.transforms import merging

  files = [safe_open(os.path.join(d, "model.safetensors"), framework="numpy") for d in dirs]
  kw = dict(method="magnitude", density=str(DENSITY), consensus=True, normalize=True) if method == "ties" else {}
  merged = merging.merge_tensorwise(
    lambda i, name: files[i + 1].get_tensor(name),
    files[0].get_tensor,
    list(files[0].keys()),
    len(files) - 1,
    weights="",
    lam="1.0",
    **kw,
  )
  save_file(merged, out)


def run_numpy(method: str, dirs: list[str], out: str) -> None:
  """Tensor by tensor: reads one tensor of each of the N + 1 files, merges it, keeps the merged tensor."""
  from safetensors import safe_open
  from safetensors.numpy import save_file

  files = [safe_open(os.path.join(d, "model.safetensors"), framework="numpy") for d in dirs]
  merged = {}
  for name in files[0].keys():
    base = files[0].get_tensor(name)
    taus = np.stack([f.get_tensor(name) - base for f in files[1:]])
    if method == "ties":
      flat = np.abs(taus.reshape(len(taus), -1))
      k = flat.shape[1] - int(flat.shape[1] * DENSITY)
      kth = np.partition(flat, k - 1, axis=1)[:, k - 1 : k]  # TIES reference: keep |tau| >= k-th smallest
      taus = np.where((flat >= kth).reshape(taus.shape), taus, 0)
      total = taus.sum(0)
      sign = np.sign(total)
      sign[sign == 0] = np.sign(np.sign(total).sum())
      agree = np.where(sign > 0, taus > 0, taus < 0)
      merged[name] = base + (taus * agree).sum(0) / np.maximum(agree.sum(0), 1)
    else:
      merged[name] = base + taus.sum(0)
    del taus
  save_file(merged, out)


def run_mergekit(method: str, dirs: list[str], out: str) -> None:
  from mergekit.config import MergeConfiguration
  from mergekit.merge import run_merge
  from mergekit.options import MergeOptions

  params = {"weight": 1.0, **({"density": DENSITY} if method == "ties" else {})}
  cfg = {
    "merge_method": method,
    "base_model": dirs[0],
    "dtype": "float32",
    "parameters": {"normalize": method == "ties", "lambda": 1.0},
    "models": [{"model": d, "parameters": params} for d in dirs[1:]],
  }
  out_dir = out + ".d"
  run_merge(
    MergeConfiguration.model_validate(cfg),
    out_dir,
    options=MergeOptions(copy_tokenizer=False, lazy_unpickle=True, write_model_card=False, quiet=True),
  )
  shards = [f for f in os.listdir(out_dir) if f.endswith(".safetensors")]
  if len(shards) == 1:
    os.replace(os.path.join(out_dir, shards[0]), out)


TOOLS = {"jaxlab": run_jaxlab, "jaxlab_tensors": run_jaxlab_tensors, "numpy": run_numpy, "mergekit": run_mergekit}


def _rss_anon_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("RssAnon:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def child(tool: str, method: str, root: str, out: str) -> dict:
  """Runs one merge; peak RSS (`ru_maxrss`: includes the pages of the memory-mapped safetensors files that
  were read) and peak anonymous RSS (`RssAnon` sampled every 10 ms: the memory the tool itself holds)."""
  import threading

  dirs = [os.path.join(root, "base")] + sorted(os.path.join(root, d) for d in os.listdir(root) if d.startswith("ft_"))
  peak = [_rss_anon_mb()]
  done = threading.Event()

  def sample():
    while not done.wait(0.01):
      peak[0] = max(peak[0], _rss_anon_mb())

  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  t0 = time.perf_counter()
  TOOLS[tool](method, dirs, out)
  wall = time.perf_counter() - t0
  done.set()
  thread.join()
  peak[0] = max(peak[0], _rss_anon_mb())
  return {
    "tool": tool,
    "method": method,
    "wall_s": wall,
    "peak_anon_mb": peak[0],
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------


def available(tool: str) -> bool:
  if tool == "mergekit":
    try:
      import mergekit  # noqa: F401
    except ImportError:
      return False
  return True


def max_diff(a: str, b: str) -> float:
  from safetensors import safe_open

  fa, fb = safe_open(a, framework="numpy"), safe_open(b, framework="numpy")
  return max(float(np.max(np.abs(fa.get_tensor(k) - fb.get_tensor(k)))) for k in fa.keys())


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", choices=sorted(SIZES), default="vitb")
  ap.add_argument("--models", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--tools", default="jaxlab,jaxlab_tensors,numpy,mergekit")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--dir", default="", help="directory for the model files (default: a temporary one)")
  ap.add_argument("--json", default="", help="write the results here")
  ap.add_argument("--child", nargs=4, metavar=("TOOL", "METHOD", "ROOT", "OUT"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    print(json.dumps(child(*args.child)))
    return
  tools = [t for t in args.tools.split(",") if t]
  skipped = [t for t in tools if not available(t)]
  tools = [t for t in tools if t not in skipped]
  methods = [m for m in args.methods.split(",") if m]
  root = args.dir or tempfile.mkdtemp(prefix="jaxlab_merge_bench_")
  try:
    t0 = time.time()
    models_dir = os.path.join(root, "models")
    if not os.path.isdir(models_dir):  # written under another name first: an interrupted write is not reused
      os.makedirs(models_dir + ".partial", exist_ok=True)
      shutil.rmtree(models_dir + ".partial")
      os.makedirs(models_dir + ".partial")
      write_models(models_dir + ".partial", args.size, args.models)
      os.rename(models_dir + ".partial", models_dir)
    n_params = sum(int(np.prod(s)) for s in tensor_shapes(**SIZES[args.size]).values())
    print(
      f"{args.models} fine-tunes + base, {n_params / 1e6:.1f}M params each ({n_params * 4 / 2**20:.0f} MiB "
      f"float32), written in {time.time() - t0:.0f} s to {models_dir}",
      flush=True,
    )
    if skipped:
      print(f"not importable here, skipped: {', '.join(skipped)} (mergekit: pip install mergekit, the bench extra)")
    runs = []
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for r in range(args.repeats):
      for method in methods:
        for tool in tools if r % 2 == 0 else tools[::-1]:  # interleaved, order alternating between repeats
          out = os.path.join(root, f"out_{tool}_{method}.safetensors")
          proc = subprocess.run(
            [sys.executable, __file__, "--child", tool, method, models_dir, out],
            capture_output=True,
            text=True,
            env=env,
          )
          if proc.returncode != 0:
            raise RuntimeError(f"{tool} {method} failed:\n{proc.stderr[-3000:]}")
          res = json.loads(proc.stdout.strip().splitlines()[-1])
          runs.append(res)
          print(
            f"  repeat {r} {tool:14s} {method:16s} {res['wall_s']:7.2f} s  anon {res['peak_anon_mb']:6.0f} MB  "
            f"rss {res['peak_rss_mb']:6.0f} MB",
            flush=True,
          )
    rows = []
    for method in methods:
      ref = os.path.join(root, f"out_jaxlab_{method}.safetensors")
      for tool in tools:
        rs = [x for x in runs if x["tool"] == tool and x["method"] == method]
        w, m, a = [x["wall_s"] for x in rs], [x["peak_rss_mb"] for x in rs], [x["peak_anon_mb"] for x in rs]
        out = os.path.join(root, f"out_{tool}_{method}.safetensors")
        diff = max_diff(ref, out) if "jaxlab" in tools and tool != "jaxlab" and os.path.exists(out) else None
        rows.append(
          {
            "method": method,
            "tool": tool,
            "wall_s_median": statistics.median(w),
            "wall_s_min": min(w),
            "wall_s_max": max(w),
            "peak_anon_mb_median": statistics.median(a),
            "peak_anon_mb_min": min(a),
            "peak_anon_mb_max": max(a),
            "peak_rss_mb_median": statistics.median(m),
            "peak_rss_mb_min": min(m),
            "peak_rss_mb_max": max(m),
            "max_abs_diff_vs_jaxlab": diff,
            "repeats": len(rs),
          }
        )
    print(
      "\n| method | tool | wall s, median (min-max) | peak anonymous RSS MB, median (min-max) | "
      "peak RSS MB incl. mapped files, median (min-max) | max abs diff vs jaxlab |"
    )
    print("|---|---|---|---|---|---|")
    for x in rows:
      d = "-" if x["max_abs_diff_vs_jaxlab"] is None else f"{x['max_abs_diff_vs_jaxlab']:.1e}"
      print(
        f"| {x['method']} | {x['tool']} | {x['wall_s_median']:.2f} ({x['wall_s_min']:.2f}-{x['wall_s_max']:.2f}) "
        f"| {x['peak_anon_mb_median']:.0f} ({x['peak_anon_mb_min']:.0f}-{x['peak_anon_mb_max']:.0f}) "
        f"| {x['peak_rss_mb_median']:.0f} ({x['peak_rss_mb_min']:.0f}-{x['peak_rss_mb_max']:.0f}) | {d} |"
      )
    if args.json:
      with open(args.json, "w") as f:
        json.dump(
          {
            "size": args.size,
            "models": args.models,
            "params": n_params,
            "rows": rows,
            "runs": runs,
            "skipped": skipped,
            "cpus": os.cpu_count(),
          },
          f,
          indent=2,
        )
  finally:
    if not args.dir:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
