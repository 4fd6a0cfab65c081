"""Import / export speed and peak memory of a ViT-B/16-sized timm checkpoint (86M parameters, random weights).

    python benchmarks/interop.py                      # jaxlab only (CI venv)
    .venv-bench/bin/python benchmarks/interop.py      # next to safetensors.torch.load_file + torch.save
    .venv-bench/bin/python benchmarks/interop.py --check_timm   # instead: timm loads jaxlab's exports (safetensors
                                                                #   and .pth), same logits

Each measurement runs in a fresh process (so peak RSS is its own), the variants are interleaved and repeated
(`--repeats`; imports and jax's backend start-up happen before the clock starts), and the table gives the
median and the spread (min-max) of the wall seconds, GB/s of the file size, and peak RSS (and the peak minus
the current RSS after imports, i.e. what the work itself added). Variants:

  jaxlab read+convert   `jobs.import_file` (safetensors -> stacked jaxlab tree in numpy, no hash)
  jaxlab import job     `jobs.run_import`: the same plus the sha256 of the file and the Orbax checkpoint write
  jaxlab export         load the checkpoint, unstack to timm names, write safetensors
  torch load_file       `safetensors.torch.load_file` (lazy: tensors over a memory map, pages read on use)
  torch load_clone      the same with every tensor cloned (materialized in memory, as jaxlab's import is)
  torch load+save       `load_file` + `torch.save` of the state dict (the peer of a whole conversion)

Targets (issue 14): jaxlab import at least as fast as torch's load; peak RSS under 2x the file size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import numpy as np

VIT_B = dict(width=768, depth=12, mlp=3072, patch=16, image=224, classes=1000)


def write_vit_b(path: str, seed: int = 0) -> int:
  """A random ViT-B/16 state dict in timm naming, written with safetensors.numpy; returns the parameter count."""
  from safetensors.numpy import save_file

  rng = np.random.default_rng(seed)
  d, m, k = VIT_B["width"], VIT_B["mlp"], VIT_B["classes"]
  grid = VIT_B["image"] // VIT_B["patch"]

  def r(*shape):
    return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

  sd = {
    "cls_token": r(1, 1, d),
    "pos_embed": r(1, grid * grid + 1, d),
    "patch_embed.proj.weight": r(d, 3, VIT_B["patch"], VIT_B["patch"]),
    "patch_embed.proj.bias": r(d),
    "norm.weight": 1 + r(d),
    "norm.bias": r(d),
    "head.weight": r(k, d),
    "head.bias": r(k),
  }
  for i in range(VIT_B["depth"]):
    b = f"blocks.{i}."
    sd.update(
      {
        b + "norm1.weight": 1 + r(d),
        b + "norm1.bias": r(d),
        b + "attn.qkv.weight": r(3 * d, d),
        b + "attn.qkv.bias": r(3 * d),
        b + "attn.proj.weight": r(d, d),
        b + "attn.proj.bias": r(d),
        b + "norm2.weight": 1 + r(d),
        b + "norm2.bias": r(d),
        b + "mlp.fc1.weight": r(m, d),
        b + "mlp.fc1.bias": r(m),
        b + "mlp.fc2.weight": r(d, m),
        b + "mlp.fc2.bias": r(d),
      }
    )
  save_file(sd, path)
  return sum(v.size for v in sd.values())


_CHILD = r"""
import json, os, resource, sys, time
variant, src, work = sys.argv[1], sys.argv[2], sys.argv[3]
def rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def current_rss_mb():
  with open("/proc/self/status") as f:
    return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024
if variant.startswith("torch"):
  import torch, safetensors.torch
else:
  import jax
  from jaxlab import checkpoint
  from jaxlab.interop import jobs
  jax.devices()  # start the XLA backend here: process start-up, like importing torch
base = current_rss_mb()
r0 = resource.getrusage(resource.RUSAGE_SELF)
t = time.perf_counter()
if variant == "jaxlab_read_convert":
  imp = jobs.import_file(src, num_heads=12, compute_sha256=False)
elif variant == "jaxlab_import_job":
  import ml_collections
  jobs.run_import(ml_collections.ConfigDict(dict(source=src, num_heads=12)), os.path.join(work, "ckpt"))
elif variant == "jaxlab_export":
  loaded = checkpoint.load(os.path.join(work, "ckpt"), host=True)  # as the export job
  tensors, meta = jobs.export_tensors(loaded, "timm")
  jobs.write_safetensors(tensors, os.path.join(work, "export.safetensors"), meta)
elif variant == "torch_load_file":
  sd = safetensors.torch.load_file(src)
elif variant == "torch_load_clone":
  sd = {k: v.clone() for k, v in safetensors.torch.load_file(src).items()}
elif variant == "torch_load_save":
  sd = safetensors.torch.load_file(src)
  torch.save(sd, os.path.join(work, "torch.pth"))
wall = time.perf_counter() - t
r1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime  # all threads of the process
print(json.dumps({"s": wall, "cpu": cpu, "peak_mb": rss_mb(), "base_mb": base}))
"""


def _loadavg() -> str:
  try:
    with open("/proc/loadavg") as f:
      return " ".join(f.read().split()[:3])
  except OSError:  # not Linux
    return "n/a"


def run_child(variant: str, src: str, work: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", _CHILD, variant, src, work], capture_output=True, text=True, env=env)
  if r.returncode != 0:
    raise RuntimeError(f"{variant} failed: {r.stderr[-2000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def check_timm(work: str) -> None:
  """timm loads a jaxlab export through pretrained_cfg_overlay and gives jaxlab's logits (needs torch, timm)."""
  import timm
  import torch

  from jaxlab import checkpoint
  from jaxlab.interop import jobs, pth

  fix = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "timm")
  x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
  for name, arch in (
    ("vit_token.safetensors", "vit_tiny_patch16_224"),
    ("vit_avg.safetensors", "vit_tiny_patch16_224"),
    ("deit3_ls.safetensors", "deit3_small_patch16_224"),
    ("deit_distilled.pth", "deit_tiny_distilled_patch16_224"),
  ):
    imp = jobs.import_file(os.path.join(fix, name), num_heads=2)
    ckpt = os.path.join(work, "chk_" + name)
    checkpoint.save_weights(ckpt, 0, imp.theta, imp.meta, imp.model_state)
    loaded = checkpoint.load(ckpt)
    tensors, meta = jobs.export_tensors(loaded, "timm")
    ours = np.asarray(loaded.apply(x.transpose(0, 2, 3, 1)))
    kw = {k: v for k, v in json.loads(meta["timm_kwargs"]).items() if not k.startswith("_")}
    for ext in ("safetensors", "pth"):  # the .pth: torch.save's archive, written by jaxlab without torch
      out = os.path.join(work, f"{name}.export.{ext}")
      if ext == "safetensors":
        jobs.write_safetensors(tensors, out, meta)
      else:
        pth.write_state_dict(tensors, out)
      overlay = dict(file=out, num_classes=kw["num_classes"])  # else timm drops a head of another class count
      model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kw).eval()
      with torch.no_grad():
        theirs = model(torch.from_numpy(x)).numpy()
      print(f"timm {arch} <- jaxlab export of {name} as .{ext}: max |logits diff| {np.abs(theirs - ours).max():.2e}")


def main():
  """Runs the benchmark (and the optional timm check) and prints the table."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--check_timm", action="store_true")
  parser.add_argument("--tmp", default=None, help="directory for the ~350 MB files (default: a temp dir)")
  args = parser.parse_args()
  work = tempfile.mkdtemp(dir=args.tmp)
  try:
    if args.check_timm:
      check_timm(work)  # only the check: with torch imported here, the children's peak RSS would be off
      return
    src = os.path.join(work, "vit_b16.safetensors")
    n = write_vit_b(src)
    size = os.path.getsize(src)
    print(f"ViT-B/16 random weights: {n / 1e6:.1f}M parameters, file {size / 1e9:.3f} GB")
    # find_spec, not import: Linux keeps a process's peak RSS across fork + exec, so a parent holding torch would
    # raise every child's measured peak to its own size
    if importlib.util.find_spec("torch") is not None:
      peers = ["torch_load_file", "torch_load_clone", "torch_load_save"]
    else:
      peers = []
      print("torch not installed: jaxlab only (pip install -e .[bench] for the comparison)")
    variants = ["jaxlab_read_convert", "jaxlab_import_job", "jaxlab_export", *peers]
    results = {v: [] for v in variants}
    loads = []
    for r in range(args.repeats):
      for v in variants:  # interleaved; the import job writes the checkpoint the export reads
        if v == "jaxlab_import_job":
          shutil.rmtree(os.path.join(work, "ckpt"), ignore_errors=True)
        results[v].append(run_child(v, src, work))
      loads.append(_loadavg())
      times = ", ".join(f"{v} {rs[-1]['s']:.2f} s" for v, rs in results.items())
      print(f"round {r + 1}: load average {loads[-1]}; {times}", flush=True)
    print(
      f"{'variant':22s} {'seconds (median, min-max)':>27s} {'GB/s':>6s} {'CPU s':>6s} {'peak RSS GB':>12s} "
      f"{'added GB':>9s} {'added / file':>13s}"
    )
    for v, rs in results.items():
      s = [r["s"] for r in rs]
      peak = statistics.median(r["peak_mb"] for r in rs) / 1024
      added = statistics.median(r["peak_mb"] - r["base_mb"] for r in rs) / 1024
      print(
        f"{v:22s} {statistics.median(s):10.2f} ({min(s):.2f}-{max(s):.2f})        "
        f"{size / 1e9 / statistics.median(s):6.2f} {statistics.median(r['cpu'] for r in rs):6.2f} {peak:12.2f} "
        f"{added:9.2f} {added * 2**30 / size:12.2f}x"
      )
    # the other helpers' jobs load this machine: the ratio within each round is the robust comparison
    for ours, theirs in (("jaxlab_read_convert", "torch_load_clone"), ("jaxlab_import_job", "torch_load_save")):
      if theirs in results:
        q = [a["s"] / b["s"] for a, b in zip(results[ours], results[theirs])]
        print(
          f"{ours} / {theirs}, seconds per round: median {statistics.median(q):.2f} ({min(q):.2f}-{max(q):.2f}), "
          f"rounds faster: {sum(x < 1 for x in q)} of {len(q)}"
        )
    print(f"load average (1, 5, 15 min) after each round: {'; '.join(loads)}")
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
