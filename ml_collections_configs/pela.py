"""PELA (CVPR 2024): compress a dense digits ViT by SVD, then train the low-rank model with distillation.

    python -m jaxlab.main --config=ml_collections_configs/pela.py --workdir=runs/pela
    python -m jaxlab.main --config=ml_collections_configs/pela.py:smoke --workdir=runs/pela_smoke

The top-level keys (model, data, optimizer, total_epochs, ...) train the dense
teacher; `pela.*` drives the rest of the pipeline (jaxlab/pipelines/pela.py):

  pela.teacher_path    dense 'vit' checkpoint to compress instead of training one ('' = train it)
  pela.dense_seed      seed of the dense model trained here
  pela.ratios          compression ratios (rank r = floor(d_in d_out / (ratio (d_in + d_out))))
  pela.keep_dense      regexes of layer paths kept dense
  pela.seeds           seeds of every trained low-rank variant
  pela.variants        subset of svd_ft, pela_fd, pela_fd_wp (svd-only is always evaluated)
  pela.steps           training steps of each low-rank variant (same for all)
  pela.lr              peak learning rate of the low-rank training (cosine, warmup)
  pela.warmup_steps    warm-up steps of the low-rank training
  pela.fd_weight       weight of feature distillation (feature_mse over every block's output)
  pela.wp_weight       weight of the weight perturbation regularizer
  pela.wp_eps          eps of the regularizer ((max |u v - K| - eps)^2)
  pela.finetune_steps  > 0: further fine-tune PELA checkpoints with the task loss only (ordinary checkpoints)
  pela.finetune_variants  which variants get that fine-tuning stage (rows '<variant>+ft')
  pela.eval_batch_size, pela.throughput_batch, pela.throughput_reps: evaluation and speed measurement

Arguments after `:`: `smoke` (tiny model, a few steps, one seed, under a minute on a CPU).
"""

import ml_collections

from jaxlab import configs
from jaxlab.models.lowrank_vit import DEFAULT_KEEP_DENSE


def get_config(arg: str | None = None):
  c = configs.base()
  c.job = "pipeline"
  c.pipeline = "pela"
  c.model = configs.vit_digits_model()
  c.data.batch_size = 64
  c.data.aug_shift = 1
  c.total_epochs = 40.0
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 50
  c.objective.label_smoothing = 0.1
  c.objective.wp_eps = 0.0
  c.eval_every = 0
  c.checkpoint_every = 0
  c.log_every = 25
  c.progress = False

  c.pela = ml_collections.ConfigDict()
  c.pela.teacher_path = ""
  c.pela.dense_seed = 0
  c.pela.ratios = (1.5, 2.0, 3.0)
  c.pela.keep_dense = DEFAULT_KEEP_DENSE
  c.pela.seeds = (0, 1, 2)
  c.pela.variants = ("svd_ft", "pela_fd", "pela_fd_wp")
  c.pela.steps = 150
  c.pela.lr = 5e-4
  c.pela.warmup_steps = 10
  c.pela.fd_weight = 1.0
  c.pela.wp_weight = 1.0
  c.pela.wp_eps = 0.0
  c.pela.finetune_steps = 0
  c.pela.finetune_variants = ("pela_fd", "pela_fd_wp")
  c.pela.eval_batch_size = 360
  c.pela.throughput_batch = 256
  c.pela.throughput_reps = 10
  if arg == "smoke":
    c.total_epochs = 0.0
    c.total_steps = 6
    c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 16, 2, 2, 32
    c.model.patch_size = 4
    c.log_every = 3
    c.pela.ratios = (2.0,)
    c.pela.seeds = (0,)
    c.pela.variants = ("svd_ft", "pela_fd_wp")
    c.pela.steps = 3
    c.pela.warmup_steps = 1
    c.pela.finetune_steps = 2
    c.pela.finetune_variants = ("pela_fd_wp",)
    c.pela.throughput_reps = 2
  elif arg:
    raise ValueError(f"pela.py: unknown config argument {arg!r}; use 'smoke' or nothing")
  return c
