"""S4D initialisations and discretizations on the built-in sequence tasks, several seeds.

    python -m jaxlab.main --config=ml_collections_configs/s4d.py --workdir=runs/s4d
    python -m jaxlab.main --config=ml_collections_configs/s4d.py:smoke --workdir=runs/s4d_smoke

Arguments after `:`: `smoke` (one seed, two tiny runs, a few steps; seconds on a CPU).
Runs `s4d_seq` with every init in `s4d.inits` on every task in `s4d.tasks`, with
every discretization in `s4d.discs` on the tasks in `s4d.disc_tasks` (the first
discretization only elsewhere), for every seed in `s4d.seeds`; then writes
results.json, results.md, accuracy.png and kernels.png (learned S4D kernels at
init and after training) into the workdir. See jaxlab/pipelines/s4d.py and docs/s4d.md.
"""

import ml_collections

from jaxlab import configs


def get_config(arg: str | None = None):
  c = configs.base()
  c.job = "pipeline"
  c.pipeline = "s4d"
  c.total_steps = 300
  c.data.batch_size = 32
  c.data.eval_batch_size = 500
  c.optimizer.lr = 0.01          # official minimal S4D example: AdamW 0.01, wd 0.01, SSM params lr 0.001
  c.optimizer.weight_decay = 0.01
  c.optimizer.warmup_steps = 30
  c.optimizer.grad_clip = 1.0
  c.log_every = 100
  c.progress = False
  c.eval_splits = ("validation",)
  c.final_eval_splits = ("test",)

  s = c.s4d = ml_collections.ConfigDict()
  # add "pathfinder" with "--config.s4d.tasks=('seq_digits','listops','pathfinder')"
  s.tasks = ("seq_digits", "listops")
  s.inits = ("lin", "inv", "legs")
  s.discs = ("zoh", "bilinear")
  s.disc_tasks = ("seq_digits",)  # tasks run with every disc; the others with discs[0] only
  s.seeds = (0, 1, 2)
  s.ssm_lr = 1e-3                 # A, dt, B: their own peak lr, min(ssm_lr, optimizer.lr), and no weight decay
  s.kernel_task = "seq_digits"    # task whose learned kernels (seed 0) are plotted
  s.kernel_channels = 4           # channels of layer 0 drawn per panel
  s.plot = True
  s.data = ml_collections.ConfigDict({
      "seq_digits": ml_collections.ConfigDict(dict(name="seq_digits", upsample=1)),
      # ListOps at the longest this CPU trains 9 runs of in the budget: 64 < tokens < 256 (LRA: 500-2000), 10k
      # training examples (LRA: 96k; at 300 steps of batch 32 each is seen about once), LRA's 2k test examples
      "listops": ml_collections.ConfigDict(dict(name="listops", max_length=256, min_length=64, max_depth=10,
                                                max_args=10, seed=0, train_size=10000, validation_size=500,
                                                test_size=2000, heldout_size=0)),
      "pathfinder": ml_collections.ConfigDict(dict(name="pathfinder", image_size=16, seed=0, train_size=2000,
                                                   validation_size=200, test_size=500, heldout_size=0)),
  })
  # init / disc / vocab_size / input_channels are set per stage by the pipeline (from s4d.* and the data set's info)
  c.model = ml_collections.ConfigDict(dict(
      name="s4d_seq", d_model=64, n_layers=2, dropout=0.0, prenorm=True, norm="layer", pool="mean",
      output="classify", causal=False, d_state=64, init="lin", disc="zoh", dt_min=1e-3, dt_max=1e-1,
      chunk_size=1024, vocab_size=0, input_channels=1))
  if arg == "smoke":
    c.total_steps = 4
    s.tasks = ("seq_digits",)
    s.inits = ("lin", "legs")
    s.discs = ("zoh",)
    s.disc_tasks = ()
    s.seeds = (0,)
    c.model.d_model = 8
    c.model.n_layers = 1
    c.model.d_state = 8
    c.data.batch_size = 16
    c.data.eval_batch_size = 400
    c.optimizer.warmup_steps = 1
    c.log_every = 2
  elif arg:
    raise ValueError(f"s4d.py: unknown config argument {arg!r}; use 'smoke' or nothing")
  return c
