"""Learngene experiment, SWS (stage-wise weight sharing, arXiv:2404.16897), on digits.

    python -m jaxlab.main --config=ml_collections_configs/sws.py --workdir=runs/learngene
    python -m jaxlab.main --config=ml_collections_configs/sws.py:smoke --workdir=runs/learngene_smoke

Teacher -> auxiliary net by soft distillation -> descendants of several depths fine-tuned briefly,
against the same architectures from scratch (same and several times the budget). Every key is in
`jaxlab.pipelines.learngene.default_config` (`config.learngene.*`); `--config.learngene.methods=tleg,sws`
runs both methods in one workdir (shared teacher and scratch baselines).

Arguments after `:`: `smoke` (tiny sizes, well under a minute).
"""

from jaxlab.pipelines import learngene


def get_config(arg: str | None = None):
  if arg not in (None, "", "smoke"):
    raise ValueError(f"sws.py: unknown config argument {arg!r}; use 'smoke' or nothing")
  return learngene.default_config(methods=("sws",), smoke=arg == "smoke")
