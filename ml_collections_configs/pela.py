"""PELA (CVPR 2024): compress a dense digits ViT by SVD, then train the low-rank model with distillation.

    python -m jaxlab.main --config=ml_collections_configs/pela.py --workdir=runs/pela
    python -m jaxlab.main --config=ml_collections_configs/pela.py:smoke --workdir=runs/pela_smoke

The top-level keys (model, data, optimizer, total_epochs, ...) train the dense
teacher with the default job's recipe (ml_collections_configs/digits_vit.py: no
shift augmentation, 40 epochs; tests/test_pela.py checks the keys are equal);
`pela.*` drives the rest of the pipeline (jaxlab/pipelines/pela.py):

  pela.teacher_path    dense 'vit' checkpoint to compress instead of training one per seed ('' = train them)
  pela.seeds           seed s trains dense teacher s and every student of s from it (teacher spread included)
  pela.ratios          compression ratios (rank r = floor(d_in d_out / (ratio (d_in + d_out))))
  pela.keep_dense      regexes of layer paths kept dense
  pela.variants        subset of svd_ft, pela_fd, pela_fd_wp (svd-only and dense_ft are always run)
  pela.steps           training steps of each student and of dense_ft (same for all)
  pela.lr              peak learning rate of that training (cosine, warmup)
  pela.warmup_steps    its warm-up steps
  pela.fd_weight       weight of feature distillation (feature_mse over every block's output)
  pela.wp_weight       weight of the weight perturbation regularizer (1: the official DeiT/Swin setting)
  pela.wp_eps          eps of the regularizer ((max |u v - K| - eps)^2)
  pela.wp_sweep        further pela_fd_wp runs at these weights (ascending), at ratio `sweep_ratio`: at weight 1
                       the term's gradient is ~1/100 of cross entropy's (docs/fairness.md), so the sweep looks
                       for the weight where it changes predictions; labelled as a sweep, not the paper's setting
  pela.min_changed     precondition of the weight-perturbation claim: fraction of test predictions that the
                       term changes (vs pela_fd) at some swept weight
  pela.min_teacher_acc precondition: the teacher's test accuracy reaches the default job's level (its seeds
                       0/1 score 96.4/95.8%, docs/fairness.md); below it the teacher is under-trained
  pela.throughput_batch, pela.throughput_reps: examples/s of each architecture, timed in interleaved rounds

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
  c.total_epochs = 40.0
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.weight_decay = 0.05
  c.objective.label_smoothing = 0.1
  c.objective.wp_eps = 0.0
  c.eval_every = 0
  c.checkpoint_every = 0
  c.log_every = 25
  c.progress = False

  c.pela = ml_collections.ConfigDict()
  c.pela.teacher_path = ""
  c.pela.seeds = (0, 1, 2)
  c.pela.ratios = (2.0, 3.0)
  c.pela.keep_dense = DEFAULT_KEEP_DENSE
  c.pela.variants = ("svd_ft", "pela_fd", "pela_fd_wp")
  c.pela.steps = 150
  c.pela.lr = 5e-4
  c.pela.warmup_steps = 10
  c.pela.fd_weight = 1.0
  c.pela.wp_weight = 1.0
  c.pela.wp_eps = 0.0
  c.pela.wp_sweep = (30.0, 300.0, 3000.0, 30000.0)
  c.pela.sweep_ratio = 2.0
  c.pela.min_changed = 0.01
  c.pela.min_teacher_acc = 0.945
  c.pela.throughput_batch = 256
  c.pela.throughput_reps = 20
  if arg == "smoke":
    c.total_epochs = 0.0
    c.total_steps = 6
    c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 16, 2, 2, 32
    c.model.patch_size = 4
    c.log_every = 3
    c.pela.ratios = (2.0,)
    c.pela.seeds = (0,)
    c.pela.steps = 3
    c.pela.warmup_steps = 1
    c.pela.wp_sweep = (100.0,)
    c.pela.throughput_reps = 2
  elif arg:
    raise ValueError(f"pela.py: unknown config argument {arg!r}; use 'smoke' or nothing")
  return c
