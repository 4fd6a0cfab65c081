"""Name maps between foreign state dicts and jaxlab trees: one `Entry` per jaxlab leaf.

An entry says which foreign tensor(s) make one jaxlab leaf and how:

    Entry("blocks/attn/qkv/kernel", ("blocks.{i}.attn.qkv.weight",), LINEAR, stacked=True)

`stacked` leaves have jaxlab's leading depth axis: the foreign keys contain
`{i}` and are read for `i = 0 .. depth-1` and stacked on import (unstacked on
export). `Conversion`s are pairs of array functions written with array methods
only (`.transpose`, `.reshape`), so that they work on numpy arrays and, through
`jax.eval_shape`, on shapes alone: the expected foreign shapes are known before
any tensor is read, which lets the import job list missing, unexpected and
mis-shaped tensors in one error without reading the file's data.

`collection` says where the leaf goes: `params` (the trainable tree) or another
Flax collection such as `batch_stats` (BatchNorm running statistics).
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from jaxlab import trees
from jaxlab.configs import as_tuple


@dataclasses.dataclass(frozen=True)
class Conversion:
  """`to_ours(list of foreign arrays) -> jaxlab array` and its inverse `to_theirs(array) -> list`."""

  name: str
  to_ours: Callable[[list], object]
  to_theirs: Callable[[object], list]


SAME = Conversion("same", lambda xs: xs[0], lambda x: [x])
# torch Linear weight [out, in] <-> Flax Dense kernel [in, out]
LINEAR = Conversion("linear", lambda xs: xs[0].transpose(1, 0), lambda x: [x.transpose(1, 0)])
# torch Conv2d weight [out, in, kh, kw] <-> Flax Conv kernel [kh, kw, in, out]
CONV = Conversion("conv", lambda xs: xs[0].transpose(2, 3, 1, 0), lambda x: [x.transpose(3, 2, 0, 1)])


@dataclasses.dataclass(frozen=True)
class Entry:
  """One jaxlab leaf (`ours`, a `/` path in `collection`) and the foreign key(s) it is made of."""

  ours: str
  theirs: tuple[str, ...]
  conversion: Conversion = SAME
  stacked: bool = False
  collection: str = "params"

  def keys(self, depth: int) -> list[str]:
    """The foreign keys of this entry, layer by layer for stacked entries."""
    if not self.stacked:
      return list(self.theirs)
    return [k.format(i=i) for i in range(depth) for k in self.theirs]

  def layer_keys(self, i: int) -> list[str]:
    return [k.format(i=i) for k in self.theirs]


def expected_shapes(
  entries: Sequence[Entry], ours: dict[str, jax.ShapeDtypeStruct], depth: int
) -> dict[str, tuple[int, ...] | None]:
  """Foreign key -> the shape it must have for the jaxlab leaves `ours` (`collection/path` -> struct).

  The shape is None for import-only conversions (checked after conversion instead).
  """
  out = {}
  for e in entries:
    target = ours.get(f"{e.collection}/{e.ours}")
    if target is None:
      continue
    shape = target.shape[1:] if e.stacked else target.shape
    keys = [e.layer_keys(i) for i in range(depth)] if e.stacked else [list(e.theirs)]
    if e.conversion.to_theirs is None:  # import-only conversion: shapes are checked after conversion
      theirs = [None] * len(e.theirs)
    else:
      theirs = [
        tuple(s.shape) for s in jax.eval_shape(e.conversion.to_theirs, jax.ShapeDtypeStruct(shape, target.dtype))
      ]
    for layer in keys:
      for k, s in zip(layer, theirs):
        out[k] = s
  return out


class NameMapError(ValueError):
  """A foreign file whose tensors do not match the name map (missing, unexpected or mis-shaped)."""


def _listing(items: Sequence[str], n: int = 4) -> str:
  more = f" and {len(items) - n} more" if len(items) > n else ""
  return ", ".join(items[:n]) + more


def check(
  path: str,
  present: dict[str, tuple[int, ...]],
  expected: dict[str, tuple[int, ...]],
  skip_unexpected: Sequence[str] = (),
  allow_missing: Sequence[str] = (),
  map_name: str = "",
) -> tuple[list[str], list[str]]:
  """Strict comparison of a file's tensors with a name map's expectation.

  Args:
    path: the file (for the message).
    present: foreign key -> shape in the file.
    expected: foreign key -> shape the jaxlab model needs.
    skip_unexpected: regexes (`re.fullmatch`) of file keys that may be left unused.
    allow_missing: foreign keys whose absence (or other shape) is allowed (their jaxlab leaves are initialised
      fresh by the caller).
    map_name: the name map, for the message.

  Returns:
    `(skipped, missing_allowed)`: the file keys left unused and the expected keys not taken from the file.

  Raises:
    NameMapError: one line naming the first few missing, unexpected and mis-shaped tensors and the config
      keys that allow them.
  """
  allowed = set(allow_missing)
  missing = [k for k in expected if k not in present and k not in allowed]
  unexpected = [k for k in present if k not in expected and trees.first_match(k, skip_unexpected) is None]
  shaped = [
    f"{k} {list(present[k])} (model needs {list(expected[k])})"
    for k in expected
    if k in present and expected[k] is not None and tuple(present[k]) != tuple(expected[k]) and k not in allowed
  ]
  if missing or unexpected or shaped:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if shaped:
      parts.append(f"{len(shaped)} mis-shaped: {_listing(shaped, 3)}")
    raise NameMapError(
      f"{path}: tensors do not match the {map_name or 'name'} map ({'; '.join(parts)}); check "
      "config.family and the model keys (num_heads, image_size, num_classes, ...), or allow them with "
      "config.skip_unexpected (regexes of file keys to ignore) / config.init_missing (regexes of jaxlab "
      "paths to initialise fresh, e.g. 'params/head/.*')"
    )
  skipped = [k for k in present if k not in expected]
  missing_allowed = [
    k for k in expected if k not in present or (expected[k] is not None and tuple(present[k]) != tuple(expected[k]))
  ]
  return skipped, missing_allowed


def copy_into(dst: np.ndarray, src: np.ndarray, block: int = 256) -> np.ndarray:
  """`dst[...] = src` (casting); a large transposed 2D view is copied in square tiles.

  numpy copies a transposed view element by element in the destination's order, reading the source with a
  large stride (a cache miss per element); tiles of 256 x 256 keep both sides in cache, 4-7x faster for the
  kernels of a ViT-B on this machine.
  """
  if src.ndim == 2 and src.size >= 1 << 16 and not src.flags.c_contiguous:
    n, m = src.shape
    for r in range(0, n, block):
      for c in range(0, m, block):
        dst[r : r + block, c : c + block] = src[r : r + block, c : c + block]
  else:
    dst[...] = src
  return dst


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
  """`np.empty(shape, dtype)` whose data start on an `align`-byte boundary.

  jax aliases such a numpy array on a CPU (`jax.device_put` makes no copy), where numpy's own large arrays
  (16 bytes past a page boundary) are copied: for the import job that copy was a second model in memory.
  """
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + align, np.uint8)
  start = (-raw.ctypes.data) % align
  return raw[start : start + nbytes].view(dtype).reshape(shape)


def import_tree(
  source,
  entries: Sequence[Entry],
  depth: int,
  fresh: dict[str, np.ndarray],
  take_fresh: set[str],
  dtypes: dict[str, np.dtype],
  threads: int = 0,
) -> dict[str, np.ndarray]:
  """Builds the flat jaxlab tree (`collection/path` -> array) from a `TensorSource`, one tensor at a time.

  Stacked leaves are filled layer by layer into one preallocated array, so peak memory stays near the size of
  the output. A tensor taken as it is (no conversion, same dtype) is read straight into its place in the output;
  one that is transposed or converted is read into a reused scratch buffer per shape (no fresh pages per
  tensor) and copied into place from there. Leaves in `take_fresh` come from `fresh` (freshly initialised)
  instead of the file.

  With a source that reads safely from several threads (`thread_safe`), the layers of stacked leaves are read
  and converted on `threads` threads (0: up to 2 where the machine has the cores): reading (`preadv`) and
  numpy's copies release the GIL, so the transposes of a ViT-B's kernels run about twice as fast on two cores.
  Each thread has its own scratch buffers, so memory grows by a few tensors at most.
  """
  local = threading.local()

  views = hasattr(source, "view") and hasattr(source, "release") and not os.environ.get("JAXLAB_NO_VIEWS")

  def read(keys: list[str]) -> list[np.ndarray]:
    if views:  # arrays over a memory map: the conversion copies them into place, then `release` them
      return [source.view(k) for k in keys]
    if len(keys) != 1:  # several inputs to one conversion must not share a buffer
      return [source.get(k) for k in keys]
    scratch = local.__dict__.setdefault("scratch", {})
    shape, dtype = tuple(source.shape(keys[0])), np.dtype(source.dtype(keys[0]))
    buf = scratch.setdefault((shape, dtype.str), np.empty(shape, dtype))  # reused: copied out before the next read
    return [source.get(keys[0], out=buf)]

  def direct(e: Entry, dtype: np.dtype) -> bool:  # read straight into the output: no conversion, no cast
    key = e.theirs[0].format(i=0) if e.stacked else e.theirs[0]
    return e.conversion is SAME and len(e.theirs) == 1 and np.dtype(source.dtype(key)) == dtype

  def fill(arr: np.ndarray, e: Entry, i: int) -> None:
    if direct(e, arr.dtype):
      layer = source.get(e.layer_keys(i)[0], out=arr[i])
      if not np.shares_memory(layer, arr[i]):  # a reader that returned an array of its own (npz)
        copy_into(arr[i], layer)
    else:
      convert_into(arr[i], e.layer_keys(i), e.conversion)

  def convert_into(dst, keys: list[str], conversion: Conversion, depth: int = 0) -> np.ndarray:
    """Converts `keys` into `dst`: an array, or a dtype for a fresh one (with `depth`: a stacked one, of which
    this is layer 0)."""
    value = np.asarray(conversion.to_ours(read(keys)))
    if isinstance(dst, np.dtype):
      dst = aligned_empty((depth, *value.shape) if depth else value.shape, dst)
    copy_into(dst[0] if depth else dst, value)
    del value
    if views:
      for k in keys:
        source.release(k)
    return dst

  if threads <= 0:
    threads = min(2, os.cpu_count() or 1)
  pool = ThreadPoolExecutor(threads) if threads > 1 and getattr(source, "thread_safe", False) else None
  pending = []
  out = {}
  try:
    for e in entries:
      name = f"{e.collection}/{e.ours}"
      if name in take_fresh:
        out[name] = np.asarray(fresh[name])
        continue
      dtype = np.dtype(dtypes.get(name, np.float32))
      if not e.stacked:
        if direct(e, dtype):
          out[name] = source.get(e.theirs[0], out=aligned_empty(source.shape(e.theirs[0]), dtype))
        else:
          out[name] = convert_into(dtype, list(e.theirs), e.conversion)
        continue
      # the first layer gives the shape of the stacked array (a conversion may change it)
      arr = out[name] = convert_into(dtype, e.layer_keys(0), e.conversion, depth)
      for i in range(1, depth):
        if pool is None:
          fill(arr, e, i)
        else:
          pending.append(pool.submit(fill, arr, e, i))
    for f in pending:
      f.result()
  finally:
    if pool is not None:
      pool.shutdown(wait=True, cancel_futures=True)
  return out


def export_tensors(flat: dict[str, np.ndarray], entries: Sequence[Entry], depth: int) -> dict[str, np.ndarray]:
  """The foreign state dict (key -> array, often a strided view of `flat`) of a flat jaxlab tree, blocks unstacked."""
  out = {}
  for e in entries:
    arr = np.asarray(flat[f"{e.collection}/{e.ours}"])
    layers = [(arr[i], e.layer_keys(i)) for i in range(depth)] if e.stacked else [(arr, list(e.theirs))]
    for value, keys in layers:
      for k, v in zip(keys, e.conversion.to_theirs(value)):
        out[k] = np.asarray(v)  # a view where the conversion is a transpose: the writer copies it tensor by tensor
  return out


def regex_list(values) -> tuple[str, ...]:
  """Regexes from a config value (tuple or comma-separated string); each is compiled to catch typos early.

  Raises:
    ValueError: an invalid regex.
  """
  out = as_tuple(values or ())
  for v in out:
    try:
      re.compile(v)
    except re.error as e:
      raise ValueError(f"invalid regex {v!r} ({e})") from e
  return out
