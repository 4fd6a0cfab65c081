"""Generated sequence tasks (Long Range Arena style), built offline and deterministic per seed.

Three registered data sets, each with `train`, `validation`, `test` and `heldout` splits:

`listops` (discrete): ListOps as in Long Range Arena (Tay et al. 2021), with the
  LRA generator rules: a node is a value 0..9 with probability 1 - 0.25 (always a
  value at `max_depth`), otherwise one of `[MIN [MAX [MED [SM` applied to
  `randint(2, max_args)` sub-trees and closed by `]`; the label is the value of
  the expression (MED = int(np.median), SM = sum mod 10). Trees are kept when
  `min_length < tokens < max_length` (LRA: 500 < n < 2000, max_depth 10,
  max_args 10) and deduplicated. Tokens (the parentheses LRA writes are dropped,
  as the S4 data loader does): `<pad>`=0, `[MIN`=1, `[MAX`=2, `[MED`=3, `[SM`=4,
  `]`=5, digits 0..9 = 6..15; sequences are right-padded with 0 to `max_length`.
  `inputs` int32 [B, max_length]; `vocab_size` 16, `pad_id` 0.
`seq_digits` (continuous): scikit-learn's 8x8 digits read one pixel at a time
  (row-major), with exactly the split of `jaxlab.data.digits`. `data.upsample = u`
  bilinearly resizes each image to 8u x 8u first (u = 4 gives length 1024).
  `inputs` float32 [B, 64 u^2, 1] in [0, 1].
`pathfinder` (continuous): a small Pathfinder (Linsley et al. 2018; LRA's
  Pathfinder task) drawn here: two long dashed curves and short distractor
  dashes on an `image_size`^2 canvas, plus two 2x2 end markers. Label 1: both
  markers sit on the two ends of the same curve; label 0: each curve carries one
  marker. Flattened row-major: `inputs` float32 [B, image_size^2, 1].

`Dataset.info` carries `task`, `vocab_size` (0 for continuous tasks),
`input_channels`, `seq_len`, `pad_id` (-1 when there is no padding) and
`split_sizes`. Generated arrays are cached in memory per configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np

from jaxlab.data import base, digits

# ----------------------------------------------------------------------------
# ListOps
# ----------------------------------------------------------------------------

MIN, MAX, MED, SUM_MOD, END = "[MIN", "[MAX", "[MED", "[SM", "]"
OPERATORS = (MIN, MAX, MED, SUM_MOD)
VALUE_P = 0.25
LISTOPS_VOCAB = ("<pad>", MIN, MAX, MED, SUM_MOD, END) + tuple(str(v) for v in range(10))
LISTOPS_PAD = 0
TOKEN_ID = {t: i for i, t in enumerate(LISTOPS_VOCAB)}
_DIGIT0 = TOKEN_ID["0"]

_CACHE: dict[tuple, Any] = {}


class _TooLong(Exception):
  pass


def _uniforms(seed: int):
  """An endless stream of U[0, 1) floats drawn in chunks (much faster than `random.Random` per call)."""
  rng = np.random.default_rng(seed)
  while True:
    yield from rng.random(1 << 15).tolist()


def _emit_tree(u, depth: int, max_depth: int, max_args: int, out: list[int], limit: int) -> int:
  """Appends the token ids of one LRA ListOps tree to `out`; returns its value.

  The draws follow the LRA generator in order: a uniform deciding value vs
  operator (a value with probability 1 - VALUE_P, always at `max_depth`), the
  value, or the argument count `randint(2, max_args)`, the arguments, then the
  operator. A tree is abandoned (`_TooLong`) as soon as it exceeds `limit`
  tokens, which leaves the distribution of the accepted trees unchanged.
  """
  r = next(u) if depth < max_depth else 1.0
  if r > VALUE_P:
    value = int(next(u) * 10)
    out.append(_DIGIT0 + value)
    if len(out) > limit:
      raise _TooLong
    return value
  slot = len(out)
  out.append(-1)  # operator, drawn after its arguments as in LRA
  num_values = 2 + int(next(u) * (max_args - 1))
  vals = [_emit_tree(u, depth + 1, max_depth, max_args, out, limit) for _ in range(num_values)]
  op = OPERATORS[int(next(u) * len(OPERATORS))]
  out[slot] = TOKEN_ID[op]
  out.append(TOKEN_ID[END])
  if len(out) > limit:
    raise _TooLong
  return _apply_op(op, vals)


def _apply_op(op: str, vals: list[int]) -> int:
  if op == MIN:
    return min(vals)
  if op == MAX:
    return max(vals)
  if op == MED:  # int(np.median(vals)) for non-negative integers, without numpy's overhead
    v, m = sorted(vals), len(vals) // 2
    return v[m] if len(v) % 2 else (v[m - 1] + v[m]) // 2
  if op == SUM_MOD:
    return sum(vals) % 10
  raise ValueError(f"unknown ListOps operator {op!r}")


def listops_to_string(ids) -> str:
  """Readable form of a token id sequence (padding dropped), e.g. `[MAX 2 [MIN 4 7 ] 0 ]`."""
  return " ".join(LISTOPS_VOCAB[int(i)] for i in ids if int(i) != LISTOPS_PAD)


def generate_listops(n: int, *, seed: int, min_length: int, max_length: int, max_depth: int = 10,
                     max_args: int = 10, max_tries: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """`n` distinct ListOps examples as (int32 tokens [n, max_length], int32 labels [n]).

  Trees are drawn until `n` distinct ones with `min_length < tokens < max_length`
  are accepted (LRA keeps a set of trees, so duplicates are dropped here too).

  Raises:
    ValueError: for impossible length limits or when too few trees are accepted.
  """
  if not 1 <= min_length < max_length - 1:
    raise ValueError(f"listops: need 1 <= min_length < max_length - 1, got min_length={min_length}, "
                     f"max_length={max_length}")
  if max_args < 2 or max_depth < 1:
    raise ValueError(f"listops: need max_args >= 2 and max_depth >= 1, got {max_args}, {max_depth}")
  u = _uniforms(seed)
  # Accepted trees as uint8 bytes (ids < 16): a 96k-example LRA-length set costs ~0.1 GB here, not the
  # ~1.6 GB of Python int tuples.
  seen: set[bytes] = set()
  rows: list[bytes] = []
  labels = []
  tries, max_tries = 0, max_tries or 2000 * n + 10000
  while len(rows) < n:
    tries += 1
    if tries > max_tries:
      raise ValueError(f"listops: only {len(rows)} of {n} trees with {min_length} < length < {max_length} "
                       f"after {max_tries} draws; widen the length range or raise max_depth/max_args")
    out: list[int] = []
    try:
      value = _emit_tree(u, 1, max_depth, max_args, out, max_length - 1)
    except _TooLong:
      continue
    if len(out) <= min_length:
      continue
    ids = np.asarray(out, np.uint8).tobytes()
    if ids in seen:
      continue
    seen.add(ids)
    rows.append(ids)
    labels.append(value)
  del seen
  x = np.full((n, max_length), LISTOPS_PAD, np.int32)
  for i, ids in enumerate(rows):
    x[i, :len(ids)] = np.frombuffer(ids, np.uint8)
  return x, np.asarray(labels, np.int32)


# Sets of at least this many tokens (n * max_length; ~20 s of generation on one core) are cached on disk.
LISTOPS_CACHE_MIN_TOKENS = 10_000_000


def listops_cache_dir(cfg=None) -> str:
  """Where large ListOps sets are cached: `data.cache_dir` > `$JAXLAB_CACHE/listops` > `~/.cache/jaxlab/listops`."""
  return base.cache_dir(cfg, "listops")


def _cached_listops(cfg, n: int, **kw) -> tuple[np.ndarray, np.ndarray]:
  """`generate_listops(n, **kw)`, read from / written to the disk cache for large sets (`data.cache`)."""
  if not bool(cfg.get("cache", True)) or n * kw["max_length"] < LISTOPS_CACHE_MIN_TOKENS:
    return generate_listops(n, **kw)
  key = hashlib.sha256(json.dumps({"n": n, **kw, "format": 1}, sort_keys=True).encode()).hexdigest()[:16]
  path = os.path.join(listops_cache_dir(cfg), f"listops_{key}.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      return f["x"].astype(np.int32), f["y"].astype(np.int32)
  x, y = generate_listops(n, **kw)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz")
  with os.fdopen(fd, "wb") as f:
    np.savez_compressed(f, x=x.astype(np.uint8), y=y.astype(np.uint8))
  os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared like any generated data
  os.replace(tmp, path)  # atomic: concurrent builders never read a partial file
  return x, y


# ----------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------


def _sizes(cfg, defaults: dict[str, int]) -> dict[str, int]:
  out = {}
  for split, default in defaults.items():
    v = int(cfg.get(f"{split}_size", default))
    if v < 0 or (split != "heldout" and v == 0):
      raise ValueError(f"config.data.{split}_size: must be positive (heldout may be 0), got {v}")
    out[split] = v
  return out


def _split_arrays(x: np.ndarray, y: np.ndarray, sizes: dict[str, int]) -> dict[str, base.ArraySource]:
  """Consecutive blocks in the order test, validation, heldout, train (the examples are i.i.d.)."""
  out, start = {}, 0
  for split in ("test", "validation", "heldout", "train"):
    out[split] = base.ArraySource({"inputs": x[start:start + sizes[split]], "label": y[start:start + sizes[split]]})
    start += sizes[split]
  return out


def _info(task: str, *, vocab_size: int, channels: int, seq_len: int, pad_id: int, splits: dict, **extra) -> dict:
  return {"task": task, "vocab_size": int(vocab_size), "input_channels": int(channels), "seq_len": int(seq_len),
          "pad_id": int(pad_id), "split_sizes": {k: len(v) for k, v in splits.items()}, **extra}


LISTOPS_SIZES = {"train": 2000, "validation": 200, "test": 500, "heldout": 200}


@base.register("listops")
def build_listops(cfg) -> base.Dataset:
  """ListOps (see the module docstring). Keys: max_length (<= 2000 as LRA, any positive value works),
  min_length (default max_length // 4, LRA 500), max_depth (10), max_args (10), seed (0),
  {train,validation,test,heldout}_size (LRA: 96000 / 2000 / 2000), cache (True: sets of at least
  `LISTOPS_CACHE_MIN_TOKENS` tokens are kept as .npz in `listops_cache_dir`), cache_dir."""
  max_length = int(cfg.get("max_length", 2000))
  min_length = int(cfg.get("min_length", 0) or max_length // 4)
  max_depth, max_args = int(cfg.get("max_depth", 10)), int(cfg.get("max_args", 10))
  seed = int(cfg.get("seed", 0))
  sizes = _sizes(cfg, LISTOPS_SIZES)
  key = ("listops", max_length, min_length, max_depth, max_args, seed, tuple(sizes.items()))
  if key not in _CACHE:
    _CACHE[key] = _cached_listops(cfg, sum(sizes.values()), seed=seed, min_length=min_length,
                                  max_length=max_length, max_depth=max_depth, max_args=max_args)
  x, y = _CACHE[key]
  splits = _split_arrays(x, y, sizes)
  info = _info("listops", vocab_size=len(LISTOPS_VOCAB), channels=1, seq_len=max_length, pad_id=LISTOPS_PAD,
               splits=splits, vocab=list(LISTOPS_VOCAB), min_length=min_length)
  return base.Dataset(name="listops", num_classes=10, splits=splits, input_shape=(max_length,),
                      input_dtype=np.int32, info=info)


# ----------------------------------------------------------------------------
# Sequential digits
# ----------------------------------------------------------------------------


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] bilinear interpolation weights, pixel centres aligned (edges clamped)."""
  pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  pos = np.clip(pos, 0, n_in - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  w = pos - lo
  m = np.zeros((n_out, n_in), np.float64)
  m[np.arange(n_out), lo] += 1 - w
  m[np.arange(n_out), hi] += w
  return m


def upsample_images(x: np.ndarray, factor: int) -> np.ndarray:
  """Bilinear upsampling of [N, H, W] images by an integer factor (factor 1 returns a copy)."""
  if factor == 1:
    return x.copy()
  _, h, w = x.shape
  rh, rw = _resize_matrix(h, h * factor), _resize_matrix(w, w * factor)
  return np.einsum("ah,nhw,bw->nab", rh, x, rw).astype(x.dtype)


@base.register("seq_digits")
def build_seq_digits(cfg) -> base.Dataset:
  """Sequential digits: 64 pixels (or 64 u^2 with `data.upsample=u`) one at a time, digits' fixed split."""
  up = cfg.get("upsample", 1)
  up = 1 if up is None else int(up)
  if up < 1:
    raise ValueError(f"config.data.upsample: must be a positive integer, got {up}")
  key = ("seq_digits", up)
  if key not in _CACHE:
    x, y = digits.load_digits_arrays()
    img = upsample_images(x[..., 0], up)
    _CACHE[key] = (img.reshape(len(img), -1, 1).astype(np.float32), y)
  x, y = _CACHE[key]
  splits = {k: base.ArraySource({"inputs": x[i], "label": y[i]}) for k, i in digits.split_indices(len(x)).items()}
  info = _info("seq_digits", vocab_size=0, channels=1, seq_len=x.shape[1], pad_id=-1, splits=splits,
               upsample=up, image_size=8 * up)
  return base.Dataset(name="seq_digits", num_classes=10, splits=splits, input_shape=x.shape[1:],
                      input_dtype=np.float32, info=info)


# ----------------------------------------------------------------------------
# Pathfinder (small)
# ----------------------------------------------------------------------------


def _curves(rng: np.random.Generator, m: int, size: int, length: int, curvature: float) -> np.ndarray:
  """Points [m, length, 2] (x, y) of `m` smooth random walks with unit steps, reflected at the borders."""
  lo, hi = 1.0, size - 2.0
  p = rng.uniform(lo, hi, size=(m, 2))
  angle = rng.uniform(0, 2 * np.pi, size=m)
  turns = rng.normal(0.0, curvature, size=(length, m))
  pts = np.empty((m, length, 2))
  for i in range(length):
    pts[:, i] = p
    angle = angle + turns[i]
    q = p + np.stack([np.cos(angle), np.sin(angle)], -1)
    angle = np.where((q[:, 0] < lo) | (q[:, 0] > hi), np.pi - angle, angle)
    angle = np.where((q[:, 1] < lo) | (q[:, 1] > hi), -angle, angle)
    p = np.clip(p + np.stack([np.cos(angle), np.sin(angle)], -1), lo, hi)
  return pts


def _paint(img: np.ndarray, which: np.ndarray, pts: np.ndarray, dash: int, gap: int) -> None:
  """Paints dashed curves `pts` [m, length, 2] into images `img[which[j]]`."""
  on = (np.arange(pts.shape[1]) % (dash + gap)) < dash
  ij = np.rint(pts[:, on]).astype(int)
  img[np.repeat(which, ij.shape[1]), ij[..., 1].ravel(), ij[..., 0].ravel()] = 1.0


def _markers(img: np.ndarray, pts: np.ndarray) -> None:
  """2x2 markers at points `pts` [n, 2], one per image."""
  size = img.shape[1]
  r = np.clip(np.rint(pts[:, 1]).astype(int), 0, size - 2)
  c = np.clip(np.rint(pts[:, 0]).astype(int), 0, size - 2)
  n = np.arange(len(img))
  for dr in (0, 1):
    for dc in (0, 1):
      img[n, r + dr, c + dc] = 1.0


def generate_pathfinder(n: int, *, seed: int, image_size: int = 16, path_length: int = 0, num_distractors: int = 2,
                        curvature: float = 0.35, dash: int = 3, gap: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """`n` Pathfinder images as (float32 [n, image_size^2, 1], int32 labels [n]).

  Example i is positive when i is even, so every split of consecutive blocks is balanced.
  """
  if image_size < 8:
    raise ValueError(f"pathfinder: image_size must be >= 8, got {image_size}")
  length = path_length or int(1.25 * image_size)
  rng = np.random.default_rng(seed)
  x = np.zeros((n, image_size, image_size), np.float32)
  y = (np.arange(n) % 2 == 0).astype(np.int32)
  rows = np.arange(n)
  a = _curves(rng, n, image_size, length, curvature)
  b = _curves(rng, n, image_size, length, curvature)
  _paint(x, rows, a, dash, gap)
  _paint(x, rows, b, dash, gap)
  if num_distractors:
    d = _curves(rng, n * num_distractors, image_size, max(2, length // 4), curvature)
    _paint(x, np.repeat(rows, num_distractors), d, dash, gap)
  end_a = np.where(rng.random(n)[:, None] < 0.5, a[:, 0], a[:, -1])
  end_b = np.where(rng.random(n)[:, None] < 0.5, b[:, 0], b[:, -1])
  pos = y[:, None] == 1
  _markers(x, np.where(pos, a[:, 0], end_a))
  _markers(x, np.where(pos, a[:, -1], end_b))
  return x.reshape(n, -1, 1), y


PATHFINDER_SIZES = {"train": 2000, "validation": 200, "test": 500, "heldout": 200}


@base.register("pathfinder")
def build_pathfinder(cfg) -> base.Dataset:
  """Small Pathfinder (see the module docstring). Keys: image_size (16), path_length (1.25 image_size),
  num_distractors (2), curvature (0.35 rad per step), dash (3), gap (1), seed (0), {split}_size."""
  kw = dict(image_size=int(cfg.get("image_size", 16)), path_length=int(cfg.get("path_length", 0) or 0),
            num_distractors=int(cfg.get("num_distractors", 2)), curvature=float(cfg.get("curvature", 0.35)),
            dash=int(cfg.get("dash", 3)), gap=int(cfg.get("gap", 1)))
  seed = int(cfg.get("seed", 0))
  sizes = _sizes(cfg, PATHFINDER_SIZES)
  key = ("pathfinder", seed, tuple(sorted(kw.items())), tuple(sizes.items()))
  if key not in _CACHE:
    _CACHE[key] = generate_pathfinder(sum(sizes.values()), seed=seed, **kw)
  x, y = _CACHE[key]
  splits = _split_arrays(x, y, sizes)
  info = _info("pathfinder", vocab_size=0, channels=1, seq_len=x.shape[1], pad_id=-1, splits=splits, **kw)
  return base.Dataset(name="pathfinder", num_classes=2, splits=splits, input_shape=x.shape[1:],
                      input_dtype=np.float32, info=info)
