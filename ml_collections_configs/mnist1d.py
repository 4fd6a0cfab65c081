"""MNIST-1D baselines: logistic regression, MLP, 1D CNN, GRU and a 1D-patch ViT, 3 seeds each.

    python -m jaxlab.main --config=ml_collections_configs/mnist1d.py --workdir=runs/mnist1d
    python -m jaxlab.main --config=ml_collections_configs/mnist1d.py:smoke --workdir=runs/mnist1d_smoke

The paper's protocol (greydanus/mnist1d `train.py`): all 4000 training signals
(so `data.validation_size = data.heldout_size = 0` here), Adam at a constant
learning rate 1e-2, batch 100, no weight decay, no clipping. The ViT gets a
transformer-friendly optimizer (lr 1e-3, warmup + cosine, weight decay) and
half the steps (it is the slowest model on a CPU) via `mnist1d.run_overrides.vit`.
4000 steps of batch 100 are 100 epochs (the paper's script runs 8000). Any key can be overridden, e.g.
`--config.total_steps=2000 --config.mnist1d.models="('mlp','cnn1d')" --config.mnist1d.seeds="(0,1)"`.

Arguments after `:`: `smoke` (2 steps per model, one seed, seconds on a CPU).
"""

import ml_collections

from jaxlab import configs
from jaxlab.data import mnist1d
from jaxlab.models import zoo


def get_config(arg: str | None = None):
  c = configs.base()
  c.job = "pipeline"
  c.pipeline = "mnist1d"
  c.data = mnist1d.data_config(batch_size=100, eval_batch_size=500, validation_size=0, heldout_size=0)
  c.eval_splits = ()
  c.final_eval_splits = ("train", "test")
  c.total_steps = 4000
  c.log_every = 500
  c.eval_every = 0
  c.checkpoint_every = 0
  c.keep_checkpoints = 1
  c.progress = False
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-2
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  c.optimizer.grad_clip = 0.0
  c.objective.label_smoothing = 0.0

  z = c.mnist1d = ml_collections.ConfigDict()
  z.models = ("logreg", "mlp", "cnn1d", "gru", "vit")  # names of model_configs, one stage per model x seed
  z.seeds = (0, 1, 2)  # config.seed of each run (init, data order)
  z.model_configs = ml_collections.ConfigDict({  # the config.model of each model's runs
      **{k: dict(v) for k, v in zoo.PAPER_MODELS.items()},
      "vit": zoo.vit1d_config(),
  })
  # nested keys of the base config that one model's runs change (the ViT's own optimizer and budget)
  z.run_overrides = ml_collections.ConfigDict({
      "vit": {"total_steps": 2000,
              "optimizer": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 200, "weight_decay": 0.05,
                            "grad_clip": 1.0}},
  })
  if arg == "smoke":
    c.total_steps = 2
    c.log_every = 1
    z.seeds = (0,)
    z.run_overrides.vit.total_steps = 2
    z.run_overrides.vit.optimizer.warmup_steps = 1
  elif arg:
    raise ValueError(f"mnist1d.py: unknown config argument {arg!r}; use 'smoke' or nothing")
  return c
