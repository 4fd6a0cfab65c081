"""WRN name map: the official MixtureGrowth code's `NormalWRN` (`models/normal_wrn.py`) <-> jaxlab `wrn`.

    conv_stem.weight [16, C, 3, 3]                 -> params stem/kernel [3, 3, C, 16]
    group_{g}.{b}.bn1 / bn2.{weight, bias}         -> params stage{g}_block{b}/bn1 / bn2/{scale, bias}
    group_{g}.{b}.bn1 / bn2.{running_mean, _var}   -> batch_stats stage{g}_block{b}/bn1 / bn2/{mean, var}
    group_{g}.{b}.conv1 / conv2 / shortcut.weight  -> params stage{g}_block{b}/conv1 / conv2 / shortcut/kernel
    last_act.0.{weight, bias, running_*}           -> params / batch_stats norm/...
    fc.{weight [K, C], bias}                       -> params head/{kernel [C, K], bias}

`num_batches_tracked` counters have no jaxlab counterpart and are skipped. The
official code's `bn2` exists only with `--use_bn` (jaxlab `mid_bn`). The stem
is 16 channels wide there, so `stem_width` is read from `conv_stem.weight`.
"""

from __future__ import annotations

import re

from jaxlab.interop.names import CONV, LINEAR, Entry
from jaxlab.interop.vit_maps import InferenceError

CIFAR_PREPROCESSING = {
  "mean": (0.5071, 0.4865, 0.4409),
  "std": (0.2673, 0.2564, 0.2762),
  "interpolation": "bilinear",
  "crop_pct": 1.0,
}
SKIP = (r".*num_batches_tracked",)


def infer(shapes: dict[str, tuple[int, ...]], given: dict) -> dict:
  """The jaxlab `wrn` config of a MixtureGrowth `NormalWRN` state dict (see `vit_maps.timm_infer`)."""
  if "conv_stem.weight" not in shapes:
    raise InferenceError("no conv_stem.weight: not a MixtureGrowth WRN state dict (set config.family)")
  stem, c = shapes["conv_stem.weight"][:2]
  n = len({int(m.group(1)) for k in shapes if (m := re.match(r"group_1\.(\d+)\.", k))})
  if not n:
    raise InferenceError("no group_1.{b}.* tensors")
  widen = shapes["group_1.0.conv1.weight"][0] / 16
  model = dict(
    name="wrn",
    depth=6 * n + 4,
    widen_factor=float(widen),
    stem_width=int(stem),
    mid_bn="group_1.0.bn2.weight" in shapes,
    head_bias="fc.bias" in shapes,
  )
  num_classes = shapes["fc.weight"][0] if "fc.weight" in shapes else 0
  size = int(given.get("image_size") or 32)
  return {
    "model": model,
    "num_classes": int(given.get("num_classes") or num_classes),
    "input_shape": [size, size, int(c)],
    "grid": None,
  }


def _bn(ours: str, theirs: str) -> list[Entry]:
  return [
    Entry(f"{ours}/scale", (f"{theirs}.weight",)),
    Entry(f"{ours}/bias", (f"{theirs}.bias",)),
    Entry(f"{ours}/mean", (f"{theirs}.running_mean",), collection="batch_stats"),
    Entry(f"{ours}/var", (f"{theirs}.running_var",), collection="batch_stats"),
  ]


def entries(model: dict, num_classes: int, param_names: set[str]) -> list[Entry]:
  """The name map of a jaxlab `wrn` config; `param_names` are the model's `collection/path` leaves."""
  n = (int(model["depth"]) - 4) // 6
  e = [Entry("stem/kernel", ("conv_stem.weight",), CONV)]
  for g in (1, 2, 3):
    for b in range(n):
      ours, theirs = f"stage{g}_block{b}", f"group_{g}.{b}"
      e += _bn(f"{ours}/bn1", f"{theirs}.bn1")
      if model.get("mid_bn"):
        e += _bn(f"{ours}/bn2", f"{theirs}.bn2")
      e += [
        Entry(f"{ours}/conv1/kernel", (f"{theirs}.conv1.weight",), CONV),
        Entry(f"{ours}/conv2/kernel", (f"{theirs}.conv2.weight",), CONV),
      ]
      if f"params/{ours}/shortcut/kernel" in param_names:
        e.append(Entry(f"{ours}/shortcut/kernel", (f"{theirs}.shortcut.weight",), CONV))
  e += _bn("norm", "last_act.0")
  if num_classes > 0:
    e.append(Entry("head/kernel", ("fc.weight",), LINEAR))
    if model.get("head_bias", True):
      e.append(Entry("head/bias", ("fc.bias",)))
  return e
