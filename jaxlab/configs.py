"""The base training config every experiment config starts from.

Every key is documented here; experiment configs in `ml_collections_configs/`
override what they need. Durations: exactly one of `total_steps` and
`total_epochs` is non-zero.
"""

from __future__ import annotations

import ml_collections


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "train"              # train | transform | evaluate | pipeline
  c.seed = 0                   # model init, data order, dropout
  c.total_steps = 0            # training length in steps ...
  c.total_epochs = 0.0         # ... or in epochs of the train split
  c.log_every = 50             # train metrics (JSONL, TensorBoard, progress bar)
  c.eval_every = 0             # eval on eval_splits[0] every N steps (0 = only at the end)
  c.checkpoint_every = 0       # checkpoint every N steps (0 = only at the end)
  c.keep_checkpoints = 2       # checkpoints kept in <workdir>/checkpoints
  c.eval_splits = ("validation",)
  c.final_eval_splits = ("test",)
  c.progress = True            # tqdm progress bar
  c.profile_steps = 0          # trace this many train steps (from the 2nd of the run) with jax.profiler into
  #                              <workdir>/profile (TensorBoard's profile plugin / XProf); 0 = off. docs/performance.md
  c.compilation_cache = "auto"  # train/pipeline jobs: persistent XLA cache ('auto', a directory, ''); compile_cache.py

  c.model = ml_collections.ConfigDict()
  c.model.name = "vit"         # see jaxlab.models.names()

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"       # see jaxlab.data.names()
  c.data.batch_size = 64       # global batch (divisible by the device count)
  c.data.eval_batch_size = 256
  c.data.aug_shift = 0         # random shift in pixels (images)
  c.data.aug_noise = 0.0       # Gaussian pixel noise std (images)
  c.data.tfds_name = ""        # data.name='tfds': the tfds data set (prepared with `tfds build <name>`)
  c.data.data_dir = ""         # data.name='tfds': tfds data_dir ('' = tfds default)
  # Input pipeline (jaxlab/data/pipeline.py, docs/data.md); the batch of step s depends only on (seed, s).
  c.data.workers = 0           # grain worker processes computing batches (0 = in this process)
  c.data.read_threads = 0      # with workers=0: grain threads computing batches ahead (0 = on the train loop)
  c.data.prefetch = 2          # batches placed on the devices ahead of the step that uses them
  # Images (tfds image sets; jaxlab/data/images.py). Unset keys (0, -1, '', ()) come from an imported
  # checkpoint's meta['preprocessing'] (init_from.path / the evaluated checkpoint), then the preset.
  c.data.preset = ""           # '' | 'deit' | 'cifar': fills the recipe's settings below
  c.data.image_size = 0        # model input size S (S x S); 0 = native size of a fixed-size set
  c.data.channels = 0          # 1 or 3 (grayscale <-> RGB conversion); 0 = the set's own
  c.data.mean = ()             # per-channel mean of [0, 1] pixels, applied on the device (default: ImageNet's)
  c.data.std = ()              # per-channel std (default: ImageNet's)
  c.data.interpolation = ""    # PIL filter for resizing: bilinear | bicubic | lanczos | ... ('' = bilinear)
  c.data.crop_pct = -1.0       # eval: resize the shorter side to S / crop_pct, center crop S (-1 = 0.875)
  c.data.crop = ""             # train crop: 'random_resized' (default) | 'pad' (CIFAR pad-and-crop)
  c.data.crop_padding = -1     # crop='pad': pixels of zero padding (-1 = 4)
  c.data.rrc_scale = ()        # random-resized-crop area range (default (0.08, 1.0))
  c.data.rrc_ratio = ()        # random-resized-crop aspect ratio range (default (3/4, 4/3))
  c.data.flip = -1             # random horizontal flip: 1 on, 0 off (-1 = preset, else off)
  c.data.randaugment = ""      # timm spec, e.g. 'rand-m9-mstd0.5-inc1' (DeiT); '' = off
  c.data.random_erase = -1.0   # per-example random-erasing probability (DeiT 0.25; -1 = preset, else 0)
  c.data.mixup = -1.0          # Mixup Beta alpha on the device (DeiT 0.8; 0 = off; -1 = preset, else off)
  c.data.cutmix = -1.0         # CutMix Beta alpha on the device (DeiT 1.0; 0 = off; -1 = preset, else off)
  c.data.mix_prob = -1.0       # probability a batch is mixed (-1 = 1.0)
  c.data.mix_switch_prob = -1.0  # with both: probability of CutMix rather than Mixup (-1 = 0.5)
  c.data.repeated_aug = 1      # repeated augmentation: copies of each sampled image per batch (1 = off; DeiT 3)
  c.data.lra_dir = ""          # data.name='lra_listops' | 'lra_pathfinder': LRA release directory (data/lra.py)
  c.data.difficulty = ""       # lra_pathfinder: easy | intermediate | hard ('' = hard, as LRA)
  c.data.image_key = "image"   # data.name='tfds': the feature holding the inputs
  c.data.label_key = "label"   # data.name='tfds': the feature holding the label
  c.data.split_map = ml_collections.ConfigDict()  # data.name='tfds': {our split: tfds split}; empty = the set's own
  c.data.aug_flip = False      # data.name='tfds', non-image sets: random horizontal flip
  # Generated sequence tasks (data.name='listops' | 'pathfinder' | 'seq_digits'; jaxlab/data/sequences.py):
  c.data.seed = 0              # seed of the generated examples (config.seed orders the batches, not this)
  c.data.min_length = 0        # listops: shortest sequence (0 = max_length // 4)
  c.data.max_depth = 10        # listops: operator nesting depth
  c.data.max_args = 10         # listops: arguments per operator
  c.data.upsample = 1          # seq_digits: each pixel repeated u x u (sequences of 64 u^2 pixels)
  c.data.path_length = 0       # pathfinder: steps of each path (0 = 1.25 image_size)
  c.data.num_distractors = 2   # pathfinder: distractor paths
  c.data.curvature = 0.35      # pathfinder: largest turn per step (radians)
  c.data.dash = 3              # pathfinder: dash length (pixels)
  c.data.gap = 1               # pathfinder: gap between dashes (pixels)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"   # adamw | sgd
  c.optimizer.lr = 1e-3
  c.optimizer.weight_decay = 0.05
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8       # adamw: epsilon of the second-moment denominator
  c.optimizer.momentum = 0.9   # sgd only
  c.optimizer.nesterov = False  # sgd only: Nesterov momentum
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = "cosine"  # cosine | linear | constant
  c.optimizer.min_lr_ratio = 0.0
  c.optimizer.grad_clip = 1.0  # global-norm clipping, 0 = off
  c.optimizer.lr_rules = ()    # ((regex, lr multiplier), ...), first match wins
  c.optimizer.no_decay = (r".*bias", r".*norm[^/]*/scale", r".*pos_embed", r".*cls_token")
  c.optimizer.frozen = ()      # regexes of parameters never updated

  c.parameterization = ml_collections.ConfigDict()
  c.parameterization.name = "identity"

  c.objective = ml_collections.ConfigDict()
  c.objective.weights = ml_collections.ConfigDict({"cross_entropy": 1.0})
  c.objective.label_smoothing = 0.0
  c.objective.teacher = ""     # checkpoint (workdir) of a frozen teacher
  c.objective.temperature = 1.0
  c.objective.distill_normalize = "batch"  # batch | numel (DeiT legacy)
  c.objective.prepare = ""     # batch preparer (e.g. masking) before the forward pass
  c.objective.eval = "classification"

  c.init_from = ml_collections.ConfigDict()
  c.init_from.path = ""        # checkpoint to initialise from (resume takes precedence)
  c.init_from.transform = ""   # optional transform applied to it first
  c.init_from.args = ml_collections.ConfigDict()
  c.init_from.dont_load = ()   # regexes of leaves kept at their fresh init (e.g. head)

  c.sharding = ml_collections.ConfigDict()
  c.sharding.num_devices = 0   # 0 = all devices
  c.sharding.fsdp = ()         # ((regex, axis), ...) parameters sharded over devices
  return c


def vit_digits_model() -> ml_collections.ConfigDict:
  """The default digits ViT: 2x2 patches of the 8x8 images, width 64, depth 4."""
  return ml_collections.ConfigDict(dict(
      name="vit", patch_size=2, width=64, depth=4, num_heads=4, mlp_dim=128, pool="gap",
      final_norm="tokens", dropout=0.0, attn_dropout=0.0, drop_path=0.0, ln_eps=1e-6,
      init_scheme="fan_in",  # 'fan_in' (kernels std 1/sqrt(fan_in)) | 'deit' (std 0.02, ImageNet widths); fairness.md
      # Performance keys (docs/performance.md); none changes the function the model computes beyond rounding:
      dtype="",              # compute dtype: '' = float32, 'bfloat16' = mixed precision (float32 softmax/logits)
      param_dtype="float32",  # parameter (master weight) dtype; the optimizer state follows it
      remat="",              # blocks' rematerialisation policy: '' | nothing_saveable | dots_saveable | ...
      scan_unroll=1,         # blocks per layer-scan iteration (1 = rolled loop, depth = fully unrolled)
      attention_impl="",     # jax.nn.dot_product_attention implementation: '' (auto) | xla | cudnn | einsum
  ))


def as_tuple(value, kind=str) -> tuple:
  """A tuple from a tuple/list or comma-separated strings.

  `--config.x.seeds=0,1` arrives as the string '0,1' and `--config.x.tasks=a,b` as ('a,b',) (ml_collections
  wraps a value that is not a Python literal); both become `(0, 1)` / `('a', 'b')` here. Every string item is
  split, so an item cannot contain a comma (write a regex in a list key without a `{m,n}` quantifier).
  """
  if isinstance(value, str):
    value = [value]
  out = []
  for v in value:
    out += [kind(x.strip()) for x in v.split(",") if x.strip()] if isinstance(v, str) else [kind(v)]
  return tuple(out)


def as_paths(value) -> tuple[str, ...]:
  """File or checkpoint paths from a config value: `as_tuple`, and brackets and quotes around each path dropped
  (`--config.inputs=(runs/a,runs/b)` is one string that is not a Python literal); empty items are dropped."""
  paths = (p.strip("()[]'\" ") for p in as_tuple(value if value else ()))
  return tuple(p for p in paths if p)
