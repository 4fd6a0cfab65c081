"""S4D on a Long Range Arena task read from the official release directory (jaxlab/data/lra.py, docs/data.md).

    wget https://storage.googleapis.com/long-range-arena/lra_release.gz && tar xzf lra_release.gz
    python -m jaxlab.main --config=ml_collections_configs/lra.py:listops --workdir=runs/lra_listops \
        --config.data.lra_dir=$PWD/lra_release
    python -m jaxlab.main --config=ml_collections_configs/lra.py:pathfinder --workdir=runs/lra_pathfinder \
        --config.data.lra_dir=$PWD/lra_release --config.data.workers=4

Arguments after `:`: `listops` (default), `pathfinder`, `smoke` (ListOps, a tiny model and a few steps on
whatever release directory is given: the tests run it on a few generated files in the release layout).
ListOps pools over real tokens only (`model.pool_pad_id=0`). The model is the bidirectional S4D of
docs/s4d.md at LRA-like width, trained with the S4D recipe of the `s4d` and `ntfs` experiments: the SSM
parameters (A, dt, B) at lr min(`SSM_LR`, lr) = 0.001 without weight decay (`s4d.optimizer_rules`; the S4D
paper's LRA configs), everything else at lr 0.01 with weight decay 0.05. No accuracy is claimed for these
settings here (no run on the full release was made on this machine).
"""

import ml_collections

from jaxlab import configs
from jaxlab.models import s4d

SSM_LR = 1e-3  # the S4D paper's SSM learning rate


def get_config(arg: str | None = None):
  task = arg or "listops"
  if task not in ("listops", "pathfinder", "smoke"):
    raise ValueError(f"lra.py: unknown config argument {arg!r}; use 'listops', 'pathfinder' or 'smoke'")
  c = configs.base()
  c.data.name = "lra_pathfinder" if task == "pathfinder" else "lra_listops"
  c.data.lra_dir = ""  # required: the extracted lra_release/ directory
  c.data.max_length = 2000  # ListOps: LRA's maximum length (longer sources are truncated)
  c.data.image_size = 32  # Pathfinder resolution (32, 64, 128, 256 in the release)
  c.data.batch_size = 32
  c.data.eval_batch_size = 256
  c.total_epochs = 40.0
  c.optimizer.lr = 0.01
  c.optimizer.weight_decay = 0.05
  c.optimizer.warmup_steps = 500
  c.log_every = 100
  c.eval_every = 2000
  c.checkpoint_every = 2000
  c.model = ml_collections.ConfigDict(
    dict(
      name="s4d_seq",
      d_model=128,
      n_layers=6,
      dropout=0.0,
      prenorm=True,
      norm="layer",
      pool="mean",
      output="classify",
      causal=False,
      d_state=64,
      init="lin",
      disc="zoh",
      dt_min=1e-3,
      dt_max=1e-1,
      chunk_size=1024,
      vocab_size=0 if task == "pathfinder" else 16,  # ListOps: the 16 ids of jaxlab.data.sequences
      input_channels=1,
      pool_pad_id=-1 if task == "pathfinder" else 0,
    )
  )  # ListOps: mean over real tokens (true lengths)
  # A, dt, B: peak lr min(SSM_LR, lr), no weight decay (as in s4d.py and ntfs.py). The rule is a multiplier of
  # the global schedule, so a --config.optimizer.lr override moves the SSM group with it (ratio 0.1).
  rules, no_decay = s4d.optimizer_rules(c.optimizer.lr, SSM_LR)
  c.optimizer.lr_rules = rules
  c.optimizer.no_decay = tuple(c.optimizer.no_decay) + no_decay
  if task == "smoke":
    c.data.max_length = 64
    c.data.batch_size = 2
    c.data.eval_batch_size = 4
    c.total_epochs = 0.0
    c.total_steps = 3
    c.eval_every = 0
    c.checkpoint_every = 0
    c.log_every = 1
    c.optimizer.warmup_steps = 1
    c.model.update(dict(d_model=8, n_layers=1, d_state=4))
  return c
