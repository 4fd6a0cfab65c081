"""Learngene experiment, TLEG (arXiv:2312.05614) and SWS (arXiv:2404.16897), on digits.

    python -m jaxlab.main --config=ml_collections_configs/learngene.py --workdir=runs/learngene
    python -m jaxlab.main --config=ml_collections_configs/learngene.py:methods=sws --workdir=runs/sws
    python -m jaxlab.main --config=ml_collections_configs/learngene.py:smoke --workdir=runs/learngene_smoke

Teacher -> auxiliary net by soft distillation -> descendants of several depths fine-tuned briefly, against the
same architectures from scratch (same and several times the budget). Both methods in one workdir share the
teacher and the scratch baselines. Stages: jaxlab/pipelines/learngene.py; results: docs/learngene.md.

Arguments after `:`, comma separated: `methods=tleg,sws` (or just `tleg` / `sws`; default both) and `smoke`
(tiny sizes, well under a minute), e.g. `learngene.py:methods=tleg,smoke`.

Every stage trains the top-level keys (data, optimizer, ...) with its section's model, steps and learning rate:
`learngene.teacher`, `.aux` (+ `.distill`), `.finetune` (descendants) and `.scratch` (baselines). Every net starts
from the default `model.init_scheme='fan_in'` (docs/fairness.md: DeiT's std 0.02 leaves width-32 nets near chance).

Fair regime (issue 13): the claims rest on 3 aux seeds (descendant seed i starts from aux seed i); the teacher and
aux nets are checked against plain cross-entropy nets of their sizes at their budgets (`plain`, `tolerance`), every
net against the majority class (`learned_margin`), and the long scratch arm must learn too.
"""

import ml_collections

from jaxlab import configs

METHODS = ("tleg", "sws")


def _parse(arg: str | None) -> tuple[tuple[str, ...], bool]:
  tokens = [t.strip() for t in (arg or "").replace("methods=", "").split(",") if t.strip()]
  unknown = [t for t in tokens if t not in (*METHODS, "smoke")]
  if unknown:
    raise ValueError(f"learngene.py: unknown config argument {unknown[0]!r}; use 'methods=tleg,sws' "
                     "(or tleg / sws) and/or 'smoke', comma separated")
  return tuple(t for t in METHODS if t in tokens) or METHODS, "smoke" in tokens


def get_config(arg: str | None = None):
  methods, smoke = _parse(arg)
  c = configs.base()
  c.job = "pipeline"
  c.pipeline = "learngene"
  c.progress = False
  c.log_every = 50
  c.keep_checkpoints = 1
  c.data.batch_size = 64
  c.data.aug_shift = 0                 # a 1-pixel shift of an 8x8 digit costs ~14 points (digits_vit.py)
  c.objective.label_smoothing = 0.0
  c.optimizer.grad_clip = 1.0

  g = c.learngene = ml_collections.ConfigDict()
  g.methods = methods                  # 'tleg' and/or 'sws'
  g.depths = (3, 5, 8)                 # descendant depths (sws: only depths >= its number of stages); 8 = aux
  g.seeds = (0, 1, 2)                  # descendant / scratch seeds
  g.teacher_path = ""                  # an existing teacher checkpoint; '' trains one (stage 'teacher')
  g.teacher = ml_collections.ConfigDict(dict(
      model=dict(name="vit", patch_size=2, width=64, depth=4, num_heads=4, mlp_dim=128, pool="gap",
                 final_norm="tokens", drop_path=0.1, ln_eps=1e-6, init_scheme="fan_in"),
      steps=600, lr=2e-3, warmup=30, label_smoothing=0.1))
  g.plain = dict(drop_path=0.0)        # the plain nets: teacher / aux model with these, cross entropy, no smoothing
  # The auxiliary net: the descendants' width, depth = the largest descendant (TLEG: 12 for 3..12).
  g.aux = ml_collections.ConfigDict(dict(
      model=dict(name="vit", patch_size=2, width=32, depth=8, num_heads=2, mlp_dim=64, pool="gap",
                 final_norm="tokens", drop_path=0.0, ln_eps=1e-5, init_scheme="fan_in"),
      steps=600, lr=2e-3, warmup=30,
      seeds=(0, 1, 2),                 # aux seeds (each distilled from the one teacher); plain_aux uses them too
      coefficient="l/L",               # tleg: 'l/L' (official) or 'l/(L-1)'
      stages=(3, 2, 3)))               # sws: layers per stage of the aux net (sum = aux depth)
  g.distill = ml_collections.ConfigDict(dict(
      soft_distill=1.0, cross_entropy=0.0,   # pure soft distillation (alpha = 1) as the official runs
      temperature=1.0, normalize="batch"))   # 'numel' = DeiT legacy B*K normalisation
  g.finetune = ml_collections.ConfigDict(dict(
      steps=80, lr=1e-3, warmup=0,
      head="transfer",                 # 'transfer' | 'reinit'
      final_norm="pooled",             # descendants: timm fc_norm after pooling (official) | 'tokens'
      ln_eps=1e-6,                     # descendant LN eps (official 1e-6); 0 keeps the aux's
      sws_rule="even"))                # sws depth split: 'even' | 'proportional'
  # scratch baselines: warmup scales with the budget; `long_factor` x the fine-tuning steps for the long arm
  g.scratch = ml_collections.ConfigDict(dict(lr=2e-3, warmup=8, long_factor=4))
  g.eval_expanded = True               # also test each expansion before fine-tuning (steps = 0)
  g.learned_margin = 0.05              # a net "learned": its mean test accuracy >= majority class + this
  g.tolerance = 0.02                   # teacher / aux nets may be at most this below the plain net of their size

  if smoke:
    g.depths = (2,)
    g.seeds = (0,)
    g.teacher.model.update(width=16, depth=1, num_heads=2, mlp_dim=32)
    g.teacher.steps, g.teacher.warmup = 8, 0
    g.aux.model.update(width=16, depth=4, num_heads=2, mlp_dim=32)
    g.aux.steps, g.aux.warmup, g.aux.seeds = 8, 0, (0,)
    g.aux.stages = (2, 2)
    g.finetune.steps = 4
    g.scratch.warmup = 0
    g.scratch.long_factor = 2
    c.log_every = 4
  return c
