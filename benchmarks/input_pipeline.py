"""Examples/s of the training input pipeline, next to the train step it has to feed.

Four measurements (and a cross-check), each repeated `--repeats` times in interleaved rounds (so load from
other processes hits every variant alike); each prints its rounds, the median and the range:

1. DeiT input at 224x224: JPEG-encoded images of varied sizes (generated here: smooth random colour fields
   plus noise, sides uniform in [--min_side, --max_side], PIL JPEG quality 90, like ImageNet files) read
   through the real `data.TrainBatches` with `data.preset='deit'`: decode, random-resized-crop (bicubic),
   flip, RandAugment rand-m9-mstd0.5-inc1 on the host, uint8 to the device, then normalise, random erasing
   and Mixup/CutMix on the device; with 0, 1 and 2 grain worker processes (worker start-up excluded: the
   first batch of each run is not timed).
2. The built-in digits: the time the training loop spends fetching a batch from `data.TrainBatches` (as
   train.py does), against the digits ViT train step itself and against the previous inline loop
   (`train_batch` + `put_batch` on the main thread).
3. The train step of ViT-Ti and ViT-S at 224x224 (16x16 patches, 1000 classes, float32) on this machine,
   the rate the input has to keep up with here.
4. Where the input would stop keeping up with a GPU: the host CPU time per example of (1) (process time,
   which other processes' load barely changes) against training rates derived from the DeiT paper's V100
   throughput (see GPU_TRAIN_IMAGES_PER_S): the cores (= workers) needed to feed one GPU.
5. (`--sections 5`, bench venv only) a cross-check against timm: every RandAugment op pixel-exact against
   timm's `AugmentOp`, and the eval resize + center crop against timm's eval transform.

    python benchmarks/input_pipeline.py                  # all four, defaults below
    python benchmarks/input_pipeline.py --skip_vit --repeats 5
    python benchmarks/input_pipeline.py --sections 2 --repeats 7   # only the digits overhead
    .venv-bench/bin/python benchmarks/input_pipeline.py --sections 5  # RandAugment ops vs timm (bench venv)
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np

# Training images/s of one V100 estimated from the DeiT paper's inference throughput (Touvron et al. 2021,
# Table 1: DeiT-Ti 2536, DeiT-S 940 images/s at 224, one 16 GB V100) divided by 3 (a training step is about
# forward + 2x backward). A newer GPU multiplies these (an H100 runs a bf16 ViT step several times faster).
GPU_TRAIN_IMAGES_PER_S = {"Ti": 2536 / 3, "S": 940 / 3}
VIT_SIZES = {"Ti": (192, 12, 3, 768), "S": (384, 12, 6, 1536)}


def jpeg_examples(n: int, min_side: int, max_side: int, seed: int = 0) -> list[dict]:
  """`n` JPEG-encoded RGB images of random sizes with labels 0..999."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    small = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.int16)
    img = np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    out.append({"image": buf.getvalue(), "label": np.int32(i % 1000)})
  return out


class ListSource:
  """A random-access source over a list of examples (what `tfds.data_source` looks like to the pipeline)."""

  def __init__(self, rows):
    self.rows = rows

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    return self.rows[int(i)]


def deit_dataset(rows, image_size: int):
  from jaxlab import data
  from jaxlab.data import images

  settings = images.resolve({"preset": "deit", "image_size": image_size})
  settings["channels"] = 3
  return data.Dataset(
    name="bench_jpeg",
    num_classes=1000,
    splits={"train": ListSource(rows)},
    input_shape=(image_size, image_size, 3),
    train_transform=images.TrainTransform(settings),
    eval_transform=images.EvalTransform(settings),
    normalize=(settings["mean"], settings["std"]),
    info={"preprocessing": settings},
  )


def time_pipeline(ds, workers: int, batch: int, batches: int, seed: int) -> float:
  """Examples/s of `data.TrainBatches` over `batches` batches after an untimed first one."""
  import jax

  from jaxlab import data, sharding

  mesh = sharding.make_mesh()
  with data.TrainBatches(
    ds, {"workers": workers, "prefetch": 2}, start=0, total=batches + 1, batch_size=batch, seed=seed, mesh=mesh
  ) as it:
    jax.block_until_ready(next(it))
    t = time.perf_counter()
    for b in it:
      jax.block_until_ready(b)
    return batches * batch / (time.perf_counter() - t)


def digits_overhead(steps: int):
  """Three timers for the default digits ViT (batch 64), each returning ms per step.

  `step`: the train step on one batch already on the device; `fetch_new`: main-thread time spent in
  `next(TrainBatches)` while the same steps run (the pipeline's cost to the loop); `fetch_old`: the
  previous loop's inline `dataset.train_batch` + `put_batch` per step, for comparison.
  """
  import jax

  from jaxlab import build, configs, data, optim, sharding, train

  cfg = configs.base()
  cfg.model = configs.vit_digits_model()
  ds = data.get_dataset(cfg.data)
  module = build.model(cfg.model, ds.num_classes)
  params = build.init_variables(module, jax.random.key(0), ds.input_shape)["params"]
  tx, _ = optim.build(cfg.optimizer, params, 10_000)
  param = build.parameterization(None, cfg.model)
  step = jax.jit(train.make_train_step(module, param, tx, cfg.objective), donate_argnums=(0,))
  mesh = sharding.make_mesh()
  state = {
    "step": jax.numpy.zeros((), jax.numpy.int32),
    "theta": params,
    "opt_state": tx.init(params),
    "model_state": {},
  }
  state = jax.device_put(state, sharding.replicated(mesh))
  rng = jax.random.key(0)
  fixed = sharding.put_batch(ds.train_batch(0, 64, 0), mesh)
  state, _ = step(state, fixed, rng)
  box = [state, 0]

  def fetch_new():
    s, start = box
    fetch = 0.0
    with data.TrainBatches(ds, cfg.data, start=start, total=start + steps, batch_size=64, seed=0, mesh=mesh) as it:
      for _ in range(steps):
        t = time.perf_counter()
        b = next(it)
        fetch += time.perf_counter() - t
        s, m = step(s, b, rng)
      jax.block_until_ready(s)
    box[0], box[1] = s, start + steps
    return fetch / steps * 1e3

  def fetch_old():
    s, start = box
    fetch = 0.0
    for i in range(start, start + steps):
      t = time.perf_counter()
      b = sharding.put_batch(ds.train_batch(i, 64, 0), mesh)
      fetch += time.perf_counter() - t
      s, m = step(s, b, rng)
    jax.block_until_ready(s)
    box[0], box[1] = s, start + steps
    return fetch / steps * 1e3

  def step_only():
    s = box[0]
    jax.block_until_ready(s)
    t = time.perf_counter()
    for _ in range(steps):
      s, m = step(s, fixed, rng)
    jax.block_until_ready(s)
    box[0] = s
    return (time.perf_counter() - t) / steps * 1e3

  return step_only, fetch_new, fetch_old


def vit_step_rate(size: str, batch: int, image: int, steps: int) -> float:
  """Examples/s of the jaxlab ViT train step at `image`^2, 16x16 patches, 1000 classes (float32)."""
  import jax

  from jaxlab import build, configs, optim, sharding, train

  cfg = configs.base()
  cfg.model = configs.vit_digits_model()
  w, d, h, m = VIT_SIZES[size]
  cfg.model.update(dict(width=w, depth=d, num_heads=h, mlp_dim=m, patch_size=16))
  module = build.model(cfg.model, 1000)
  params = build.init_variables(module, jax.random.key(0), (image, image, 3))["params"]
  tx, _ = optim.build(cfg.optimizer, params, 1000)
  step = jax.jit(
    train.make_train_step(module, build.parameterization(None, cfg.model), tx, cfg.objective), donate_argnums=(0,)
  )
  mesh = sharding.make_mesh()
  state = jax.device_put(
    {"step": jax.numpy.zeros((), jax.numpy.int32), "theta": params, "opt_state": tx.init(params), "model_state": {}},
    sharding.replicated(mesh),
  )
  x = np.random.default_rng(0).standard_normal((batch, image, image, 3)).astype(np.float32)
  b = sharding.put_batch({"inputs": x, "label": np.zeros((batch,), np.int32)}, mesh)
  rng = jax.random.key(0)
  state, _ = step(state, b, rng)
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(steps):
    state, _ = step(state, b, rng)
  jax.block_until_ready(state)
  return steps * batch / (time.perf_counter() - t)


def randaugment_vs_timm(levels=(0.0, 3.0, 9.0, 10.0), draws: int = 40) -> list:
  """Every RandAugment op of jaxlab against timm's `AugmentOp` on one image (needs the `bench` venv's timm).

  Signed ops draw their sign at random, so each side is run with `draws` seeds and jaxlab's set of outputs
  must lie inside timm's. Returns the mismatching (op, level) pairs; timm's own failures are printed.
  """
  import dataclasses
  import random

  from PIL import Image
  from timm.data import auto_augment as aa

  from jaxlab.data import randaugment as ra

  img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 28, 3), dtype=np.uint8))
  hp = dict(aa._HPARAMS_DEFAULT, img_mean=(125, 123, 114), interpolation=Image.BICUBIC)
  spec = dataclasses.replace(ra.parse("rand-m9-mstd0.5-inc1"), resample=Image.BICUBIC, fill=(125, 123, 114))
  bad = []
  for name in sorted(set(ra.INCREASING_OPS) | set(ra.DEFAULT_OPS)):
    for level in levels:
      op = aa.AugmentOp(name, prob=1.0, magnitude=level, hparams=hp)
      try:
        theirs = set()
        for s in range(draws):
          random.seed(s)
          theirs.add(np.asarray(op(img)).tobytes())
      except ValueError as e:  # e.g. Pillow >= 11 refuses posterize to 0 bits, which timm's levels reach
        print(f"  timm fails on {name} at magnitude {level}: {e}")
        continue
      mine = {np.asarray(ra._op(name, img, level, np.random.default_rng(s), spec)).tobytes() for s in range(draws)}
      if not mine <= theirs:
        bad.append((name, level))
  return bad


def eval_crop_vs_timm(size: int = 224, crop_pct: float = 0.875, shapes=((375, 500), (500, 333), (224, 224), (97, 310))):
  """jaxlab's eval resize + center crop against timm's eval transform (its Resize and CenterCrop on PIL)."""
  from PIL import Image
  from timm.data import create_transform

  from jaxlab.data import images

  tf = create_transform(size, is_training=False, interpolation="bicubic", crop_pct=crop_pct)
  resize_crop = tf.transforms[:2]  # Resize, CenterCrop (then ToTensor, Normalize)
  worst = 0
  for h, w in shapes:
    x = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    theirs = Image.fromarray(x)
    for t in resize_crop:
      theirs = t(theirs)
    mine = images.eval_resize_crop(x, size, crop_pct, "bicubic")
    worst = max(worst, int(np.abs(np.asarray(theirs).astype(int) - mine.astype(int)).max()))
  return worst


def resized_crop_vs_torchvision(size: int = 224) -> int:
  """jaxlab's train crop + resize against torchvision's `resized_crop` for the same boxes (max pixel diff)."""
  from PIL import Image
  from torchvision.transforms import InterpolationMode
  from torchvision.transforms import functional as tvf

  from jaxlab.data import images

  img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8))
  rng, worst = np.random.default_rng(2), 0
  for _ in range(8):
    top, left, h, w = images.random_resized_crop_box(rng, 300, 400, (0.08, 1.0), (3 / 4, 4 / 3))
    theirs = np.asarray(tvf.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BICUBIC))
    mine = np.asarray(images.resized_crop(img, (top, left, h, w), size, Image.BICUBIC))
    worst = max(worst, int(np.abs(theirs.astype(int) - mine.astype(int)).max()))
  return worst


def summary(name: str, values: list[float], unit: str) -> float:
  med = statistics.median(values)
  print(
    f"  {name:<28} median {med:9.2f} {unit}  range [{min(values):.2f}, {max(values):.2f}]  "
    f"rounds {', '.join(f'{v:.2f}' for v in values)}"
  )
  return med


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=256, help="JPEG images generated for the DeiT input")
  p.add_argument("--min_side", type=int, default=200)
  p.add_argument("--max_side", type=int, default=500)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--batches", type=int, default=6, help="timed batches per pipeline run")
  p.add_argument("--workers", default="0,1,2")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--digits_steps", type=int, default=100)
  p.add_argument("--vit_batch", type=int, default=8)
  p.add_argument("--vit_steps", type=int, default=3)
  p.add_argument("--skip_vit", action="store_true")
  p.add_argument("--sections", default="1,2,3,4", help="which measurements to run (4 needs 1)")
  a = p.parse_args()

  import os

  import jax

  print(
    f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs; {a.repeats} interleaved rounds"
  )

  sections = set(a.sections.split(","))
  med: dict[int, float] = {}
  cpu_per_example = 0.0
  if "1" in sections:
    t = time.perf_counter()
    rows = jpeg_examples(a.images, a.min_side, a.max_side)
    mean_kb = np.mean([len(r["image"]) for r in rows]) / 1024
    print(
      f"\n1. DeiT input, {a.image_size}x{a.image_size}: {a.images} JPEGs of sides {a.min_side}..{a.max_side} "
      f"(mean {mean_kb:.0f} KiB, made in {time.perf_counter() - t:.1f} s), batch {a.batch}, {a.batches} timed "
      "batches per run"
    )
    ds = deit_dataset(rows, a.image_size)
    workers = [int(w) for w in a.workers.split(",")]
    rates: dict[int, list[float]] = {w: [] for w in workers}
    for r in range(a.repeats):
      for w in workers:
        rates[w].append(time_pipeline(ds, w, a.batch, a.batches, seed=r))
    med = {w: summary(f"workers={w}", rates[w], "examples/s") for w in workers}
    cpu_ms = []
    for r in range(a.repeats):  # CPU time of the host work per example: little affected by other processes
      t_cpu = time.process_time()
      for step in range(a.batches):
        ds.train_batch(step, a.batch, r)
      cpu_ms.append((time.process_time() - t_cpu) / (a.batches * a.batch) * 1e3)
    cpu_per_example = summary("host CPU time per example", cpu_ms, "ms") / 1e3

  if "2" in sections:
    print(f"\n2. Digits ViT (default config, batch 64), {a.digits_steps} steps per round")
    timers = dict(
      zip(
        ("train step (fixed batch)", "fetch: TrainBatches", "fetch: old inline loop"),
        digits_overhead(a.digits_steps),
        strict=True,
      )
    )
    ms: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(a.repeats):
      for k, fn in timers.items():
        ms[k].append(fn())
    meds = {k: summary(k, v, "ms/step") for k, v in ms.items()}
    steps_ms = ms["train step (fixed batch)"]
    for k in ("fetch: TrainBatches", "fetch: old inline loop"):
      pct = [f / st * 100 for f, st in zip(ms[k], steps_ms, strict=True)]
      print(
        f"  {k}: {statistics.median(pct):.1f}% of the step (median of rounds; range {min(pct):.1f}..{max(pct):.1f}%)"
      )
    del meds

  if "3" in sections and not a.skip_vit:
    print(
      f"\n3. ViT train step at {a.image_size}x{a.image_size} on this machine (float32, batch {a.vit_batch}, "
      f"{a.vit_steps} steps per round)"
    )
    step_rate = {}
    for size in VIT_SIZES:
      vals = [vit_step_rate(size, a.vit_batch, a.image_size, a.vit_steps) for _ in range(a.repeats)]
      step_rate[size] = summary(f"ViT-{size} train step", vals, "examples/s")
    best = max(med.values()) if med else 0.0
    for size, rate in step_rate.items():
      verdict = "keeps up" if best >= rate else "is the bottleneck"
      print(f"  ViT-{size}: the input ({best:.1f} ex/s at its best worker count) {verdict} (step {rate:.1f} ex/s)")

  if "5" in sections:
    print("\n5. Against timm: RandAugment ops (pixel-exact, 21 ops x 4 magnitudes) and the eval crop:")
    bad = randaugment_vs_timm()
    print(f"  mismatches: {bad if bad else 'none'}")
    worst = eval_crop_vs_timm()
    print(f"  eval resize + center crop (224, crop_pct 0.875, bicubic) vs timm's: max pixel difference {worst}")
    worst = resized_crop_vs_torchvision()
    print(
      f"  train crop + resize (8 random boxes, bicubic) vs torchvision's resized_crop: max pixel difference {worst}"
    )

  if "4" in sections and med:
    print("\n4. Against a GPU (DeiT paper V100 figures / 3 for a training step):")
    for size, gpu in GPU_TRAIN_IMAGES_PER_S.items():
      print(
        f"  ViT-{size}: ~{gpu:.0f} images/s per V100 needs {gpu * cpu_per_example:.1f} CPU cores of host "
        f"preprocessing at {cpu_per_example * 1e3:.1f} ms CPU per image (workers >= that many, one core each)"
      )


if __name__ == "__main__":
  main()
