"""`drop_pretraining_head`: a self-pretrained checkpoint -> the fine-tuning model's initialisation.

As the "Never Train from Scratch" code (`train.py::load_pretrained_model`): the
per-position decoder of the pretraining model is dropped, and for value inputs
the Dense encoder's extra mask-channel input is removed (the row
`encoder/kernel[-1]`, Flax kernels being [in, out]; the mask flag is the last
channel that `mask_denoise` appends). Everything else (encoder, blocks, final
norm, batch statistics) is kept bit for bit. The output is a complete
`output='classify'` model: its decoder [d_model, num_classes] is freshly
initialised with `seed` so the checkpoint loads on its own; a fine-tuning run
that uses the transform through `config.init_from` usually lists `decoder/.*`
in `init_from.dont_load` so its own seed initialises the head.
"""

from __future__ import annotations

from typing import Literal

import jax
import numpy as np

from jaxlab import build, trees
from jaxlab.transforms.registry import Output, register

HEAD = r"decoder/.*"


def classify_model_config(model_cfg: dict, pool: str = "") -> dict:
  """The fine-tuning model config of a pretraining model config (classify output, no mask channel).

  Raises:
    ValueError: when the model is not a per-position (pretraining) model.
  """
  if model_cfg.get("output") != "per_position":
    raise ValueError(f"drop_pretraining_head: the checkpoint's model has output={model_cfg.get('output')!r}; "
                     "expected a pretraining model with output='per_position'")
  out = {**model_cfg, "output": "classify", "mask_channel": False, "out_dim": 0}
  if pool:
    out["pool"] = pool
  return out


@register("drop_pretraining_head",
          idea="drop the per-position decoder of a self-pretrained model and the encoder's mask-channel row",
          reference="Amos, Berant, Gupta: Never Train from Scratch, ICLR 2024 (arXiv:2310.02980)",
          inputs="1")
def drop_pretraining_head(inputs: list, *, seed: int = 0, pool: Literal["", "mean", "last"] = "") -> Output:
  """Turns a pretraining checkpoint into the classify model's weights (see the module docstring).

  Args:
    inputs: one `checkpoint.Loaded` of a model with `output='per_position'`.
    seed: seed of the fresh classification head
    pool: pooling of the classify model ('' keeps the checkpoint's)

  Returns:
    `Output` with identity-parameterized theta, model state and the classify model config.

  Raises:
    ValueError: for a model that is not a pretraining model, or weights that do not fit.
  """
  (loaded,) = inputs
  model_cfg = dict(loaded.meta["model"])
  new_cfg = classify_model_config(model_cfg, pool)
  data = loaded.meta["data"]
  flat = {k: v for k, v in trees.flatten(loaded.params).items() if not k.startswith("decoder/")}
  dropped = sorted(k for k in trees.flatten(loaded.params) if k.startswith("decoder/"))
  removed_row = False
  if int(model_cfg.get("vocab_size", 0)) == 0 and model_cfg.get("mask_channel", False):
    k = np.asarray(flat["encoder/kernel"])
    want = int(model_cfg.get("input_channels", 1)) + 1
    if k.shape[0] != want:
      raise ValueError(f"drop_pretraining_head: encoder/kernel has {k.shape[0]} input rows, expected "
                       f"input_channels + 1 = {want}")
    flat["encoder/kernel"] = k[:-1]
    removed_row = True
  module = build.model(new_cfg, data["num_classes"])
  fresh = build.init_variables(module, jax.random.key(seed), tuple(data["input_shape"]),
                               data.get("input_dtype", "float32"))
  fresh_params = fresh.pop("params")
  try:
    theta = trees.merge(trees.unflatten(flat), fresh_params, dont_load=(HEAD,))
    state = trees.merge(loaded.model_state, fresh, allow_missing=True) if fresh else {}
  except trees.TreeMismatchError as e:
    raise ValueError(f"drop_pretraining_head: {loaded.path}: {e}") from e
  report = {"dropped": dropped, "mask_channel_row_removed": removed_row,
            "kept_leaves": len(flat), "params": trees.count(theta)}
  return Output(theta=theta, model_state=state,
                meta={"model": new_cfg, "parameterization": {"name": "identity"}}, report=report)
