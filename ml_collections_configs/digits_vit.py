"""Default job: a small DeiT-style ViT on the built-in scikit-learn digits.

    python -m jaxlab.main --config=ml_collections_configs/digits_vit.py --workdir=runs/digits_vit
    python -m jaxlab.main --config=ml_collections_configs/digits_vit.py:smoke --workdir=runs/smoke

Arguments after `:`: `smoke` (a few steps, seconds on a CPU).
"""

from jaxlab import configs


def get_config(arg: str | None = None):
  c = configs.base()
  c.model = configs.vit_digits_model()
  c.data.batch_size = 64
  c.data.aug_shift = 0         # a 1-pixel shift of an 8x8 digit costs ~14 points of accuracy (measured)
  c.total_epochs = 40.0
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.weight_decay = 0.05
  c.objective.label_smoothing = 0.1
  c.eval_every = 200
  c.checkpoint_every = 200
  c.log_every = 10
  if arg == "smoke":
    c.total_epochs = 0.0
    c.total_steps = 6
    c.model.depth = 2
    c.model.width = 32
    c.model.mlp_dim = 64
    c.eval_every = 3
    c.checkpoint_every = 3
    c.log_every = 2
  elif arg:
    raise ValueError(f"digits_vit.py: unknown config argument {arg!r}; use 'smoke' or nothing")
  return c
