"""Never Train from Scratch: S4D and Transformer, from scratch vs self-pretrained, matched labelled steps, 3 seeds.

    python -m jaxlab.main --config=ml_collections_configs/ntfs.py --workdir=runs/ntfs
    python -m jaxlab.main --config=ml_collections_configs/ntfs.py:smoke --workdir=runs/ntfs_smoke

Arguments after `:`: `smoke` (one seed, a few steps, tiny data; under a minute on a CPU).
Every task is generated offline (jaxlab/data/sequences.py). Each model trains
`finetune_steps` labelled steps from scratch, or pretrains on the task's own
training inputs for `pretrain_steps` and then fine-tunes for the same
`finetune_steps` labelled steps (see jaxlab/pipelines/ntfs.py and docs/ntfs.md).
"""

import ml_collections

from jaxlab import configs


def get_config(arg: str | None = None):
  c = configs.base()
  c.job = "pipeline"
  c.pipeline = "ntfs"
  c.data.batch_size = 32
  c.data.eval_batch_size = 500
  c.optimizer.lr = 3e-3
  c.optimizer.weight_decay = 0.01
  c.optimizer.warmup_steps = 20
  c.optimizer.grad_clip = 1.0
  c.log_every = 50
  c.progress = False
  c.eval_every = 0
  c.checkpoint_every = 0
  c.keep_checkpoints = 1
  # the pretraining stage's objective keys (set per stage from ntfs.* and the data set's info)
  c.objective.mask_rate = 0.15
  c.objective.mask_id = -1
  c.objective.pad_id = -1
  c.objective.eval_prepare = False

  n = c.ntfs = ml_collections.ConfigDict()
  n.tasks = ("listops", "seq_digits")
  n.models = ("s4d_seq", "transformer_seq")
  n.seeds = (0, 1, 2)
  # 600 pretraining steps: at 150 (issue 13) the pretraining did not beat the trivial predictors (ListOps masked
  # accuracy 16.0% vs 15.3% for always `]`); at 600 both models clear them on seed 0 (docs/ntfs.md)
  n.pretrain_steps = 600
  # labelled steps of BOTH arms (scratch and SPT fine-tuning). At 150 the scratch S4D is far from trained (70.5% on
  # seq_digits) and SPT lowered both models by 11-13 points; at 600 both arms train to 91-95% (docs/ntfs.md)
  n.finetune_steps = 600
  n.objective = "denoise"         # denoise (bidirectional models) | causal (next element; causal models)
  n.pixel_loss = "l1"             # l1 | ce (256-way cross entropy on grey levels)
  n.mask_rate = ml_collections.ConfigDict({"listops": 0.10, "seq_digits": 0.5, "pathfinder": 0.5})  # NTFS rates
  n.ssm_lr = 1e-3                 # S4D's A, dt, B: peak lr min(ssm_lr, the stage's lr), no weight decay
  # scratch trains at optimizer.lr; the SPT arm's two stages at their own rates:
  n.pretrain_lr = 1e-2            # spt_pretrain (ListOps S4D masked accuracy at 600 steps: 18.3% vs 17.1% at 3e-3)
  n.finetune_lr = 3e-3            # spt_finetune
  n.plot = True
  n.data = ml_collections.ConfigDict({
      "listops": ml_collections.ConfigDict(dict(name="listops", max_length=128, min_length=32, max_depth=10,
                                                max_args=10, seed=0, train_size=2000, validation_size=200,
                                                test_size=500, heldout_size=0)),
      "seq_digits": ml_collections.ConfigDict(dict(name="seq_digits", upsample=1)),
      "pathfinder": ml_collections.ConfigDict(dict(name="pathfinder", image_size=16, seed=0, train_size=2000,
                                                   validation_size=200, test_size=500, heldout_size=0)),
  })
  common = dict(d_model=32, n_layers=2, dropout=0.0, prenorm=True, norm="layer", pool="mean", causal=False)
  n.model = ml_collections.ConfigDict({
      "s4d_seq": ml_collections.ConfigDict(dict(**common, d_state=16, init="lin", disc="zoh")),
      "transformer_seq": ml_collections.ConfigDict(dict(**common, num_heads=4, mlp_dim=64, max_len=0)),
  })
  if arg == "smoke":
    n.tasks = ("listops",)
    n.seeds = (0,)
    n.pretrain_steps = 3
    n.finetune_steps = 3
    n.data.listops.max_length = 48
    n.data.listops.min_length = 8
    n.data.listops.train_size = 64
    n.data.listops.validation_size = 32
    n.data.listops.test_size = 32
    c.data.batch_size = 16
    c.data.eval_batch_size = 64
    for m in n.model.values():
      m.d_model = 16
      m.n_layers = 1
    n.model.s4d_seq.d_state = 8
    n.model.transformer_seq.mlp_dim = 32
    c.optimizer.warmup_steps = 1
    c.log_every = 3
  elif arg:
    raise ValueError(f"ntfs.py: unknown config argument {arg!r}; use 'smoke' or nothing")
  return c
