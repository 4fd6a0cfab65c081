"""Model soups on digits: one pre-trained ViT, a fine-tuning sweep, uniform/greedy/learned soups, ensembles.

    python -m jaxlab.main --config=ml_collections_configs/soups.py --workdir=runs/soups
    python -m jaxlab.main --config=ml_collections_configs/soups.py:smoke --workdir=runs/soups_smoke

Arguments after `:`: `smoke` (tiny model, a few steps; under a minute on a CPU).
Writes results.json, results.md and soups.png into the workdir (see
jaxlab/pipelines/soups.py and docs/soups.md). The top-level keys are what every
stage trains; `soups.*` names each stage's steps and learning rate (`pretrain_lr`,
the sweep's `lr_range`, `learned_lr`) and the sweep.

Fair regime (issue 13): the whole experiment (pre-training, sweep, soups) runs once per seed in `seeds`; the
pre-trained model must be as good as the same model trained `long_factor` x longer (`tolerance`) and beat the
majority class (`learned_margin`), and the fine-tunes must move it (`min_moved`) before any claim is tested.
"""

import ml_collections

from jaxlab import configs


def get_config(arg: str | None = None):
  c = configs.base()
  c.job = "pipeline"
  c.pipeline = "soups"
  c.seed = 0
  c.model = configs.vit_digits_model()
  c.model.width = 32
  c.model.depth = 2
  c.model.num_heads = 4
  c.model.mlp_dim = 64
  c.model.patch_size = 4          # 4 tokens of 4x4 pixels: learns digits much faster than 2x2 patches on a CPU
  c.model.drop_path = 0.0
  c.data.batch_size = 64
  c.data.aug_shift = 0             # a 1-pixel shift of an 8x8 digit costs ~14 points (digits_vit.py); sweep varies it
  c.data.train_split = "train"    # the split a stage trains on (the learned soup trains on 'heldout')
  c.optimizer.weight_decay = 0.05
  c.objective.label_smoothing = 0.0
  c.eval_splits = ("heldout",)   # every stage: periodic eval on held-out, final eval on all three result splits
  c.final_eval_splits = ("heldout", "test", "test_shift")
  c.log_every = 25
  c.progress = False

  s = c.soups = ml_collections.ConfigDict()
  s.seeds = (0, 1, 2)             # one pre-trained model, sweep and set of soups per seed
  s.pretrain_steps = 600          # shared pre-trained model (from scratch on the train split): 96.9% test (seed 0)
  s.pretrain_lr = 3e-3
  s.pretrain_warmup = 50
  s.long_factor = 3               # plain_long: the same model from scratch for 3 x pretrain_steps (the yardstick)
  s.tolerance = 0.01              # the pre-trained model may be at most this below plain_long (test accuracy)
  s.learned_margin = 0.05         # ... and must beat the test split's majority class by this
  s.min_moved = 0.01              # the (non-high-lr) fine-tunes must change this share of test predictions (median)
  s.num_ingredients = 8           # random-search fine-tunes (plus the high-lr one below)
  s.finetune_steps = 150
  s.finetune_warmup = 10
  s.lr_range = (5e-4, 5e-3)       # log-uniform fine-tuning learning rate
  s.wd_range = (0.0, 0.2)
  s.label_smoothing_max = 0.2     # half of the fine-tunes get label smoothing in [0, max]
  s.aug_shift_choices = (0, 1)
  s.aug_noise_max = 0.15          # half of the fine-tunes get Gaussian pixel noise in [0, max]
  s.high_lr = 3e-2                # one extra fine-tune at this learning rate (0 = none)
  s.greedy_accept = ">="          # the paper's Recipe 1 ('>' official code: near ceiling it kept 1 ingredient, docs)
  s.learned_granularity = "tensor"  # 'tensor' (per tensor and layer) or 'model'
  s.learned_steps = 50            # on the 180-image heldout split
  s.learned_lr = 0.05             # AdamW, no weight decay (as learned_bylayer.py)
  s.learned_batch_size = 60
  # the learned-soup stage's fixed settings (sections of the base config it overrides)
  s.learned_stage = ml_collections.ConfigDict(dict(
      optimizer=dict(weight_decay=0.0, warmup_steps=0, schedule="constant", grad_clip=0.0),
      objective=dict(label_smoothing=0.0), model=dict(drop_path=0.0),
      data=dict(aug_shift=0, aug_noise=0.0, train_split="heldout")))
  s.interp_alphas = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
  if arg == "smoke":
    c.model.width = 16
    c.model.depth = 1
    c.model.num_heads = 2
    c.model.mlp_dim = 32
    c.model.patch_size = 4
    s.pretrain_steps = 8
    s.seeds = (0,)
    s.long_factor = 2
    s.pretrain_warmup = 2
    s.num_ingredients = 1          # + the high-lr fine-tune: two ingredients
    s.finetune_steps = 3
    s.finetune_warmup = 0
    s.learned_steps = 2
    s.interp_alphas = (0.0, 0.5, 1.0)
    c.log_every = 2
  elif arg:
    raise ValueError(f"soups.py: unknown config argument {arg!r}; use 'smoke' or nothing")
  return c
