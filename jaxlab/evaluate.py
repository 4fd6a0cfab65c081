"""The `evaluate` job: any checkpoint on any split of its data set.

    python -m jaxlab.main --config=ml_collections_configs/evaluate.py \
        --config.checkpoint=runs/digits_vit --config.split=test --workdir=runs/eval
"""

from __future__ import annotations

import json
import os

from jaxlab import checkpoint, train


def run(config, workdir: str) -> dict:
  if not config.get("checkpoint"):
    raise ValueError("config.checkpoint: give the checkpoint (workdir) to evaluate")
  data_cfg = None
  meta = checkpoint.load_meta(config.checkpoint)
  if config.get("data_name"):
    data_cfg = dict(meta["data"]["config"], name=config.data_name)
  result = {}
  for split in tuple(config.splits):
    m = train.evaluate_checkpoint(config.checkpoint, split, int(config.batch_size), data_cfg=data_cfg)
    result[split] = m
    print(f"{config.checkpoint} {split}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in m.items()))
  out = {"checkpoint": os.path.abspath(config.checkpoint), "step": meta["step"], "metrics": result}
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(out, f, indent=2)
  return {"workdir": os.path.abspath(workdir), **{f"{s}_accuracy": m.get("accuracy") for s, m in result.items()}}
