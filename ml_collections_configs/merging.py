"""Model merging on conflicting digit tasks: task arithmetic, TIES, DARE-TIES, breadcrumbs, Model Stock, soup.

    python -m jaxlab.main --config=ml_collections_configs/merging.py --workdir=runs/merging
    python -m jaxlab.main --config=ml_collections_configs/merging.py:smoke --workdir=runs/merging_smoke

Arguments after `:`: `smoke` (tiny model, a few steps, one seed; under a minute on a CPU).
One digits ViT pre-trained on a mix of the tasks, fine-tuned separately on each task (the digits
inverted, rotated by 90 degrees, mirrored, pixel-permuted), merged with every method; 3 seeds; about 4 min
on 2 CPU cores (8 when shared with other jobs). Writes results.json,
results.md and merging.png into the workdir (jaxlab/pipelines/merging.py, docs/merging.md).
"""

import ml_collections

from jaxlab import configs


def get_config(arg: str | None = None):
  c = configs.base()
  c.job = "pipeline"
  c.pipeline = "merging"
  c.seed = 0
  c.model = configs.vit_digits_model()
  c.model.width = 32
  c.model.depth = 2
  c.model.num_heads = 4
  c.model.mlp_dim = 64
  c.model.patch_size = 4
  c.model.drop_path = 0.0
  c.data.name = "digits_task"
  c.data.batch_size = 64
  c.data.task = "identity"  # digits_task: the fixed input transformation (set per stage from merging.*)
  c.eval_splits = ("heldout",)
  c.final_eval_splits = ("heldout", "test")
  c.optimizer.weight_decay = 0.05
  c.log_every = 50
  c.progress = False

  m = c.merging = ml_collections.ConfigDict()
  m.pretrain_task = "mixed"  # pre-trained on every image under one of the transformations (or none), fixed per image
  m.tasks = ("invert", "rot90", "flip", "permute")  # one fine-tune per task
  m.seeds = (0, 1, 2)  # pre-training and fine-tuning seeds
  # 200 steps: with the fan-in init (issue 13) 400 steps gave a pre-trained model at 84% that left the fine-tunes
  # 8-10 points of gain (under min_gain); at 200 it knows each task a little (75%), the design's intent
  m.pretrain_steps = 200
  m.pretrain_lr = 3e-3  # the pretrain stage's optimizer.lr
  m.pretrain_warmup = 20
  m.finetune_steps = 200
  m.finetune_lr = 1e-3  # the fine-tune stages' optimizer.lr
  m.finetune_warmup = 20
  m.scales = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # lambda grid, chosen on the tasks' mean held-out accuracy
  m.ties_density = 0.2  # TIES paper's k = 20%
  m.dare_density = 0.5  # DARE keeps half, rescaled by 2
  m.breadcrumbs_density = 0.9  # breadcrumbs keeps 90% ...
  m.breadcrumbs_gamma = 0.01  # ... after dropping the largest 1%
  m.task_heads = True  # merges are evaluated on task t with ft_t's head (the papers' protocol); False: merged head
  m.min_gain = 0.10  # precondition: each fine-tune beats the pre-trained model by 10 points on its task
  m.min_effect = 0.01  # a claim "X beats task arithmetic" holds if X wins in every seed and by >= 1 point on average
  m.min_interference = 0.20  # precondition: own-task minus other-task accuracy of a fine-tune, on average
  if arg == "smoke":
    c.model.width = 16
    c.model.depth = 1
    c.model.num_heads = 2
    c.model.mlp_dim = 32
    m.tasks = ("invert", "rot90")
    m.seeds = (0,)
    m.pretrain_steps = 6
    m.pretrain_warmup = 1
    m.finetune_steps = 3
    m.finetune_warmup = 0
    m.scales = (0.5, 1.0)
    c.log_every = 2
  elif arg:
    raise ValueError(f"merging.py: unknown config argument {arg!r}; use 'smoke' or nothing")
  return c
