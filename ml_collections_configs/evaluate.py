"""Evaluate a checkpoint on splits of its data set (model rebuilt from checkpoint meta).

    python -m jaxlab.main --config=ml_collections_configs/evaluate.py \
        --config.checkpoint=runs/digits_vit --config.splits=test,heldout --workdir=runs/eval
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.job = "evaluate"
  c.checkpoint = ""           # checkpoint workdir to evaluate
  c.splits = ("test",)        # splits of the checkpoint's data set
  c.batch_size = 256
  c.data_name = ""            # optional: evaluate on another registered data set
  return c
