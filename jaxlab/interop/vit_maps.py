"""ViT name maps: timm (`VisionTransformer`, DeiT, DeiT-III) and big_vision / AugReg `.npz` <-> jaxlab `vit`.

timm keys (blocks on jaxlab's depth axis `i`):

    patch_embed.proj.{weight [D, C, p, p], bias}   -> patch_embed/{kernel [p, p, C, D], bias}
    cls_token, dist_token [1, 1, D]                 -> cls_token, dist_token
    pos_embed [1, T, D]                             -> pos_embed
    blocks.{i}.norm1 / norm2.{weight, bias}         -> blocks/norm1 / norm2/{scale, bias}
    blocks.{i}.attn.qkv / attn.proj.{weight, bias}  -> blocks/attn/qkv / proj/{kernel (transposed), bias}
    blocks.{i}.ls1.gamma / ls2.gamma                -> blocks/ls1 / ls2/scale
    blocks.{i}.mlp.fc1 / mlp.fc2.{weight, bias}     -> blocks/mlp/fc1 / fc2/{kernel (transposed), bias}
    norm.{weight, bias} (token pooling) or
    fc_norm.{weight, bias} (average pooling)        -> norm/{scale, bias} (final_norm 'tokens' / 'pooled')
    head / head_dist.{weight, bias}                 -> head / head_dist/{kernel (transposed), bias}

big_vision keys (an optional `params/` or `opt/target/` prefix; blocks as `encoderblock_{i}` or, when the
model was trained with `scan=True`, one `encoderblock` with a leading depth axis):

    embedding/{kernel [p, p, C, D], bias}, cls, pos_embedding (AugReg: Transformer/posembed_input/pos_embedding)
    Transformer/encoderblock_{i}/LayerNorm_0, LayerNorm_1            (AugReg: LayerNorm_0, LayerNorm_2)
    .../MultiHeadDotProductAttention_0/{query,key,value}/{kernel [D, H, d], bias [H, d]}, out/{kernel, bias}
    .../MlpBlock_0/Dense_0, Dense_1                                   (AugReg: MultiHeadDotProductAttention_1,
                                                                        MlpBlock_3)
    Transformer/encoder_norm, head

Config inference reads only names and shapes. Heads come from the usual head size of 64 unless given.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np

from jaxlab.interop.names import CONV, LINEAR, Conversion, Entry
from jaxlab.models import vit as vit_model

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class InferenceError(ValueError):
  """The model config cannot be read off the tensors; the message names the config key to give."""


def _block_count(keys, pattern: str) -> int:
  idx = sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})
  if not idx:
    return 0
  if idx != list(range(len(idx))):
    raise InferenceError(f"block indices are not contiguous from 0: {idx[:10]}")
  return len(idx)


def _heads(width: int, given: int) -> int:
  if given:
    if width % given:
      raise InferenceError(f"config.num_heads={given} does not divide the width {width}")
    return int(given)
  if width % 64:
    raise InferenceError(f"width {width} is not a multiple of the usual head size 64; give config.num_heads")
  return width // 64


def _grid(tokens: int, n_prefix: int) -> tuple[int, bool]:
  """(grid side, no_embed_class) from the number of position embeddings and prefix tokens."""
  with_prefix = tokens - n_prefix
  if n_prefix and with_prefix > 0 and math.isqrt(with_prefix) ** 2 == with_prefix:
    return math.isqrt(with_prefix), False
  if math.isqrt(tokens) ** 2 == tokens:
    return math.isqrt(tokens), bool(n_prefix)
  raise InferenceError(
    f"pos_embed has {tokens} positions, not a square grid (+ {n_prefix} prefix tokens); "
    "non-square grids are not supported"
  )


def vit_param_shapes(module, input_shape) -> dict[str, jax.ShapeDtypeStruct] | None:
  """`params/<path>` -> shape and dtype of a plain image ViT's variables, computed from its fields without
  tracing it (what `jax.eval_shape` of its init gives, in a fraction of the time: tracing a ViT-B costs about
  half a second in a fresh process). None for anything else (another model, a 1D input, a custom dense
  factory): the caller traces the model then. `tests/test_interop.py` checks the two agree.

  Raises:
    ValueError: a config the model itself refuses when called (pool, final_norm, tokens, heads).
  """
  m = module
  if type(m) is not vit_model.ViT or m.dense_factory is not vit_model.dense or len(input_shape) != 3:
    return None
  has_cls = m.has_class_token()
  if m.final_norm not in ("tokens", "pooled"):
    raise ValueError(f"model.final_norm must be 'tokens' or 'pooled', got {m.final_norm!r}")
  d, mlp, depth, p, k = int(m.width), int(m.mlp_dim), int(m.depth), int(m.patch_size), int(m.num_classes)
  if m.num_heads <= 0 or d % m.num_heads:
    raise ValueError(f"model.num_heads={m.num_heads} does not divide the width {d}")
  if depth < 1:
    return None
  h, w, c = (int(x) for x in input_shape)
  prefix = int(has_cls) + int(bool(m.distilled))
  tokens = (h // p) * (w // p) + (0 if m.no_embed_class else prefix)
  shapes = {"patch_embed/kernel": (p, p, c, d), "patch_embed/bias": (d,), "pos_embed": (1, tokens, d)}
  if has_cls:
    shapes["cls_token"] = (1, 1, d)
  if m.distilled:
    shapes["dist_token"] = (1, 1, d)
  block = {
    "norm1/scale": (d,),
    "norm1/bias": (d,),
    "attn/qkv/kernel": (d, 3 * d),
    "attn/qkv/bias": (3 * d,),
    "attn/proj/kernel": (d, d),
    "attn/proj/bias": (d,),
    "norm2/scale": (d,),
    "norm2/bias": (d,),
    "mlp/fc1/kernel": (d, mlp),
    "mlp/fc1/bias": (mlp,),
    "mlp/fc2/kernel": (mlp, d),
    "mlp/fc2/bias": (d,),
  }
  if m.layer_scale:
    block.update({"ls1/scale": (d,), "ls2/scale": (d,)})
  shapes.update({f"blocks/{n}": (depth, *s) for n, s in block.items()})
  shapes.update({"norm/scale": (d,), "norm/bias": (d,)})
  if k > 0:
    for head in ("head", "head_dist") if m.distilled else ("head",):
      shapes.update({f"{head}/kernel": (d, k), f"{head}/bias": (k,)})
  dtype = np.dtype(m.param_dtype)
  return {f"params/{n}": jax.ShapeDtypeStruct(s, dtype) for n, s in shapes.items()}


# ----------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------


def timm_infer(shapes: dict[str, tuple[int, ...]], given: dict) -> dict:
  """The jaxlab `vit` model config, class count and input shape of a timm ViT state dict.

  Args:
    shapes: key -> shape of every tensor in the file.
    given: explicit config values (`num_heads`, `num_classes`, `pool`, `ln_eps`; 0 / '' = infer).

  Returns:
    `{'model': model config, 'num_classes': K, 'input_shape': [H, W, C], 'grid': g}` where `input_shape` is
    the size the checkpoint was trained at.

  Raises:
    InferenceError: a required tensor is absent or shapes are inconsistent.
  """
  if "patch_embed.proj.weight" not in shapes:
    raise InferenceError("no patch_embed.proj.weight: not a timm ViT state dict (set config.family)")
  d, c, p, p2 = shapes["patch_embed.proj.weight"]
  if p != p2:
    raise InferenceError(f"non-square patches {p}x{p2} are not supported")
  depth = _block_count(shapes, r"blocks\.(\d+)\.")
  if not depth:
    raise InferenceError("no blocks.{i}.* tensors")
  has_cls, distilled = "cls_token" in shapes, "dist_token" in shapes
  if "pos_embed" not in shapes:
    raise InferenceError("no pos_embed: ViTs without absolute position embeddings are not supported")
  grid, no_embed_class = _grid(shapes["pos_embed"][1], has_cls + distilled)
  fc_norm = "fc_norm.weight" in shapes
  pool = given.get("pool") or ("gap" if fc_norm or not has_cls else "cls")
  final_norm = "pooled" if fc_norm else "tokens"
  heads_from = "head.weight"
  num_classes = shapes[heads_from][0] if heads_from in shapes else 0
  model = dict(
    name="vit",
    patch_size=int(p),
    width=int(d),
    depth=depth,
    num_heads=_heads(d, given.get("num_heads")),
    mlp_dim=int(shapes["blocks.0.mlp.fc1.weight"][0]) if "blocks.0.mlp.fc1.weight" in shapes else 4 * d,
    pool=pool,
    final_norm=final_norm,
    dropout=0.0,
    attn_dropout=0.0,
    drop_path=0.0,
    ln_eps=float(given.get("ln_eps") or 1e-6),
    class_token=has_cls,
    distilled=distilled,
    layer_scale=1e-5 if "blocks.0.ls1.gamma" in shapes else 0.0,
    no_embed_class=no_embed_class,
  )
  return {
    "model": model,
    "num_classes": int(given.get("num_classes") or num_classes),
    "input_shape": [grid * p, grid * p, int(c)],
    "grid": grid,
  }


def timm_entries(model: dict, num_classes: int) -> list[Entry]:
  """The timm name map of a jaxlab `vit` model config."""
  e = [
    Entry("patch_embed/kernel", ("patch_embed.proj.weight",), CONV),
    Entry("patch_embed/bias", ("patch_embed.proj.bias",)),
    Entry("pos_embed", ("pos_embed",)),
  ]
  if model.get("class_token", model.get("pool") == "cls"):
    e.append(Entry("cls_token", ("cls_token",)))
  if model.get("distilled"):
    e.append(Entry("dist_token", ("dist_token",)))
  for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2")):
    e += [
      Entry(f"blocks/{ours}/scale", (f"blocks.{{i}}.{theirs}.weight",), stacked=True),
      Entry(f"blocks/{ours}/bias", (f"blocks.{{i}}.{theirs}.bias",), stacked=True),
    ]
  for ours, theirs in (
    ("attn/qkv", "attn.qkv"),
    ("attn/proj", "attn.proj"),
    ("mlp/fc1", "mlp.fc1"),
    ("mlp/fc2", "mlp.fc2"),
  ):
    e += [
      Entry(f"blocks/{ours}/kernel", (f"blocks.{{i}}.{theirs}.weight",), LINEAR, stacked=True),
      Entry(f"blocks/{ours}/bias", (f"blocks.{{i}}.{theirs}.bias",), stacked=True),
    ]
  if model.get("layer_scale"):
    e += [Entry(f"blocks/{ls}/scale", (f"blocks.{{i}}.{ls}.gamma",), stacked=True) for ls in ("ls1", "ls2")]
  norm = "fc_norm" if model.get("final_norm") == "pooled" else "norm"
  e += [Entry("norm/scale", (f"{norm}.weight",)), Entry("norm/bias", (f"{norm}.bias",))]
  if num_classes > 0:
    for head in ("head", "head_dist") if model.get("distilled") else ("head",):
      e += [Entry(f"{head}/kernel", (f"{head}.weight",), LINEAR), Entry(f"{head}/bias", (f"{head}.bias",))]
  return e


TIMM_PREPROCESSING = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bicubic", "crop_pct": 0.875}


# ----------------------------------------------------------------------------
# big_vision / AugReg
# ----------------------------------------------------------------------------


def _qkv_to_ours(xs):
  """[D, H, d] query/key/value kernels (or [H, d] biases) -> one qkv kernel [D, 3D] (bias [3D])."""
  if xs[0].ndim == 3:
    return np.concatenate([x.reshape(x.shape[0], -1) for x in xs], axis=1)
  return np.concatenate([x.reshape(-1) for x in xs], axis=0)


def _qkv_to_theirs(x, heads):
  d = x.shape[0] if x.ndim == 2 else x.shape[0] // 3
  parts = [x[..., j * d : (j + 1) * d] for j in range(3)]
  if x.ndim == 2:
    return [p.reshape(d, heads, d // heads) for p in parts]
  return [p.reshape(heads, d // heads) for p in parts]


def big_vision_prefix(keys) -> str:
  for prefix in ("params/img/", "params/", "opt/target/", ""):
    if f"{prefix}embedding/kernel" in keys:
      return prefix
  raise InferenceError("no embedding/kernel: not a big_vision ViT .npz (set config.family)")


def big_vision_layout(keys) -> dict:
  """Prefix, scan, AugReg (vit_jax) or big_vision sub-module numbering of a big_vision ViT's keys."""
  prefix = big_vision_prefix(keys)
  t = prefix + "Transformer/"
  scan = f"{t}encoderblock/LayerNorm_0/scale" in keys
  augreg = any(k.startswith(t) and "MultiHeadDotProductAttention_1" in k for k in keys)
  return {
    "prefix": prefix,
    "scan": scan,
    "augreg": augreg,
    "pos": prefix + ("Transformer/posembed_input/pos_embedding" if augreg else "pos_embedding"),
  }


def big_vision_infer(shapes: dict[str, tuple[int, ...]], given: dict) -> dict:
  """The jaxlab `vit` config of a big_vision / AugReg ViT `.npz` (see `timm_infer` for the result)."""
  lay = big_vision_layout(shapes)
  pre, t = lay["prefix"], lay["prefix"] + "Transformer/"
  p, p2, c, d = shapes[pre + "embedding/kernel"]
  if p != p2:
    raise InferenceError(f"non-square patches {p}x{p2} are not supported")
  if lay["scan"]:
    depth = shapes[f"{t}encoderblock/LayerNorm_0/scale"][0]
  else:
    depth = _block_count(shapes, re.escape(t) + r"encoderblock_(\d+)/")
  has_cls = pre + "cls" in shapes
  if lay["pos"] not in shapes:
    raise InferenceError(f"no {lay['pos']}: ViTs without learned position embeddings are not supported")
  tokens = shapes[lay["pos"]][1]
  grid, no_embed_class = _grid(tokens, int(has_cls))
  mlp_key = _bv_block_key(lay, 0, "MlpBlock", "Dense_0/kernel")
  mlp_dim = shapes[mlp_key][-1] if mlp_key in shapes else 4 * d
  head = pre + "head/kernel"
  num_classes = shapes[head][-1] if head in shapes else 0
  model = dict(
    name="vit",
    patch_size=int(p),
    width=int(d),
    depth=int(depth),
    num_heads=_heads(d, given.get("num_heads")),
    mlp_dim=int(mlp_dim),
    pool=given.get("pool") or ("cls" if has_cls else "gap"),
    final_norm="tokens",
    dropout=0.0,
    attn_dropout=0.0,
    drop_path=0.0,
    ln_eps=float(given.get("ln_eps") or 1e-6),
    class_token=has_cls,
    distilled=False,
    layer_scale=0.0,
    no_embed_class=no_embed_class,
  )
  return {
    "model": model,
    "num_classes": int(given.get("num_classes") or num_classes),
    "input_shape": [grid * p, grid * p, int(c)],
    "grid": grid,
  }


_BV_SUB = {
  "big_vision": {
    "ln1": "LayerNorm_0",
    "ln2": "LayerNorm_1",
    "MultiHead": "MultiHeadDotProductAttention_0",
    "MlpBlock": "MlpBlock_0",
  },
  "augreg": {
    "ln1": "LayerNorm_0",
    "ln2": "LayerNorm_2",
    "MultiHead": "MultiHeadDotProductAttention_1",
    "MlpBlock": "MlpBlock_3",
  },
}


def _bv_block_key(lay: dict, i, sub: str, leaf: str) -> str:
  names_ = _BV_SUB["augreg" if lay["augreg"] else "big_vision"]
  block = "encoderblock" if lay["scan"] else f"encoderblock_{i}"
  return f"{lay['prefix']}Transformer/{block}/{names_[sub]}/{leaf}"


def big_vision_entries(model: dict, num_classes: int, lay: dict) -> list[Entry]:
  """The big_vision name map of a jaxlab `vit` config (`lay` from `big_vision_layout`). Import only.

  With `scan`, a block tensor already has the depth axis, so its entry is not `stacked`.
  """
  pre, heads = lay["prefix"], model["num_heads"]
  qkv = Conversion("qkv_heads", _qkv_to_ours, lambda x: _qkv_to_theirs(x, heads))
  out_conv = Conversion(
    "out_heads",
    lambda xs: xs[0].reshape(-1, xs[0].shape[-1]),
    lambda x: [x.reshape(heads, x.shape[0] // heads, x.shape[1])],
  )
  if lay["scan"]:  # the same conversions with the depth axis in front
    qkv = Conversion(
      "qkv_heads_scan", lambda xs: np.stack([_qkv_to_ours([x[j] for x in xs]) for j in range(xs[0].shape[0])]), None
    )
    out_conv = Conversion("out_heads_scan", lambda xs: xs[0].reshape(xs[0].shape[0], -1, xs[0].shape[-1]), None)
  i = "{i}"
  stacked = not lay["scan"]
  e = [
    Entry("patch_embed/kernel", (pre + "embedding/kernel",)),
    Entry("patch_embed/bias", (pre + "embedding/bias",)),
    Entry("pos_embed", (lay["pos"],)),
  ]
  if model.get("class_token"):
    e.append(Entry("cls_token", (pre + "cls",)))
  for ours, sub in (("norm1", "ln1"), ("norm2", "ln2")):
    e += [
      Entry(f"blocks/{ours}/{leaf}", (_bv_block_key(lay, i, sub, leaf),), stacked=stacked) for leaf in ("scale", "bias")
    ]
  mha = [_bv_block_key(lay, i, "MultiHead", f"{n}/") for n in ("query", "key", "value")]
  e += [
    Entry("blocks/attn/qkv/kernel", tuple(m + "kernel" for m in mha), qkv, stacked=stacked),
    Entry("blocks/attn/qkv/bias", tuple(m + "bias" for m in mha), qkv, stacked=stacked),
    Entry("blocks/attn/proj/kernel", (_bv_block_key(lay, i, "MultiHead", "out/kernel"),), out_conv, stacked=stacked),
    Entry("blocks/attn/proj/bias", (_bv_block_key(lay, i, "MultiHead", "out/bias"),), stacked=stacked),
  ]
  for j, fc in enumerate(("fc1", "fc2")):
    e += [
      Entry(f"blocks/mlp/{fc}/{leaf}", (_bv_block_key(lay, i, "MlpBlock", f"Dense_{j}/{leaf}"),), stacked=stacked)
      for leaf in ("kernel", "bias")
    ]
  e += [
    Entry("norm/scale", (pre + "Transformer/encoder_norm/scale",)),
    Entry("norm/bias", (pre + "Transformer/encoder_norm/bias",)),
  ]
  if num_classes > 0:
    e += [Entry("head/kernel", (pre + "head/kernel",)), Entry("head/bias", (pre + "head/bias",))]
  return e


BIG_VISION_PREPROCESSING = {"mean": INCEPTION_MEAN, "std": INCEPTION_STD, "interpolation": "bilinear", "crop_pct": 1.0}
