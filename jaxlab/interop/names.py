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
  """`to_ours(list of foreign arrays) -> jaxlab array` and its inverse `to_theirs(array) -> list`.

  `axes`, for a conversion that only permutes the axes of one tensor: the permutation `to_theirs` applies
  (`()` for none), so that the foreign shape is computed without tracing `to_theirs`.
  """

  name: str
  to_ours: Callable[[list], object]
  to_theirs: Callable[[object], list]
  axes: tuple[int, ...] | None = None

  def theirs_shapes(self, shape: tuple[int, ...], dtype) -> list[tuple[int, ...]]:
    """The foreign shape(s) `to_theirs` gives for a jaxlab array of `shape`."""
    if self.axes is not None:
      return [tuple(shape[a] for a in self.axes) if self.axes else tuple(shape)]
    return [tuple(s.shape) for s in jax.eval_shape(self.to_theirs, jax.ShapeDtypeStruct(shape, dtype))]


SAME = Conversion("same", lambda xs: xs[0], lambda x: [x], ())
# torch Linear weight [out, in] <-> Flax Dense kernel [in, out]
LINEAR = Conversion("linear", lambda xs: xs[0].transpose(1, 0), lambda x: [x.transpose(1, 0)], (1, 0))
# torch Conv2d weight [out, in, kh, kw] <-> Flax Conv kernel [kh, kw, in, out]
CONV = Conversion("conv", lambda xs: xs[0].transpose(2, 3, 1, 0), lambda x: [x.transpose(3, 2, 0, 1)], (3, 2, 0, 1))


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
      theirs = e.conversion.theirs_shapes(tuple(shape), target.dtype)
    for layer in keys:
      for k, s in zip(layer, theirs):
        out[k] = s
  return out


class NameMapError(ValueError):
  """A foreign file whose tensors do not match the name map (missing, unexpected or mis-shaped)."""


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
    trees.shape_difference(k, expected[k], present[k], ("model", "file"))
    for k in expected
    if k in present and expected[k] is not None and tuple(present[k]) != tuple(expected[k]) and k not in allowed
  ]
  if missing or unexpected or shaped:
    raise NameMapError(trees.mismatch_message(
      f"{path}: tensors do not match the {map_name or 'name'} map ({len(missing)} missing, {len(unexpected)} "
      f"unexpected, {len(shaped)} mis-shaped)",
      [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected] + shaped,
      "check config.family and the model keys (num_heads, image_size, num_classes, ...), or allow them with "
      "config.skip_unexpected (regexes of file keys to ignore) / config.init_missing (regexes of jaxlab "
      "paths to initialise fresh, e.g. 'params/head/.*')"))
  skipped = [k for k in present if k not in expected]
  missing_allowed = [
    k for k in expected if k not in present or (expected[k] is not None and tuple(present[k]) != tuple(expected[k]))
  ]
  return skipped, missing_allowed


def _load_somatcopy():
  """`cblas_somatcopy` (float32 out-of-place transpose, GIL released by ctypes) of the OpenBLAS that numpy's
  wheels bundle, as `f(dst, src)`, or None where there is none or it does not copy bits exactly.

  OpenBLAS computes `alpha * a` even for `alpha = 1`; that is exact for every float32 except a signalling NaN
  (made quiet) and, on a thread that flushes denormals, a denormal (made zero). `transpose_into` checks the
  first before each call (a NaN in the source: numpy copies that part) and a probe here the second (and the
  rest).
  """
  if os.environ.get("JAXLAB_NUMPY_TRANSPOSE"):
    return None
  import ctypes
  import glob

  here = os.path.dirname(np.__file__)
  for lib in sorted(glob.glob(here + ".libs/*openblas64*") + glob.glob(os.path.join(here, ".dylibs", "*openblas64*"))):
    try:
      dll = ctypes.CDLL(lib)
    except OSError:
      continue
    for symbol in ("scipy_cblas_somatcopy64_", "cblas_somatcopy64_"):  # ILP64 interfaces: 64-bit integers
      fn = getattr(dll, symbol, None)
      if fn is None:
        continue
      i64 = ctypes.c_int64
      fn.restype = None
      fn.argtypes = [ctypes.c_int, ctypes.c_int, i64, i64, ctypes.c_float, ctypes.c_void_p, i64, ctypes.c_void_p, i64]

      def somatcopy(dst: np.ndarray, src: np.ndarray, fn=fn) -> None:  # src [n, m] -> dst [m, n]; rows contiguous
        n, m = src.shape
        lda, ldb = src.strides[0] // 4, dst.strides[0] // 4
        fn(101, 112, n, m, 1.0, src.ctypes.data, lda, dst.ctypes.data, ldb)  # CblasRowMajor, CblasTrans

      if _exact(somatcopy):
        return somatcopy
  return None


# bit patterns a transpose must keep: -0, a denormal, the largest float, inf, a quiet NaN with a payload
_PROBE = np.array([0x80000000, 0x00000001, 0x7F7FFFFF, 0xFF800000, 0x7FC12345, 0x3F800000], np.uint32).reshape(2, 3)


def _exact(somatcopy) -> bool:
  out = np.zeros((3, 2), np.uint32)
  somatcopy(out.view(np.float32), _PROBE.view(np.float32))
  return np.array_equal(out, _PROBE.T)


_SOMATCOPY: list = []  # [f or None], loaded on first use


def transpose_into(dst: np.ndarray, src: np.ndarray, rows: int = 256) -> bool:
  """`dst[...] = src.T` for C-contiguous float32 `src` [n, m] and `dst` [m, n] through BLAS; False (nothing
  done) where no exact BLAS transpose is available, the arrays do not fit it, or the current thread flushes
  denormals.

  `rows` source rows at a time: each part is checked for NaNs (`max`) just before BLAS copies it, while it is
  in cache (a part with a NaN is copied by numpy, since BLAS would make a signalling NaN quiet); measured,
  the checked parts are slightly faster than one unchecked call over the whole tensor.
  """
  if not _SOMATCOPY:
    _SOMATCOPY.append(_load_somatcopy())
  fn = _SOMATCOPY[0]
  if (
    fn is None
    or src.dtype != np.float32
    or dst.dtype != np.float32
    or src.ndim != 2
    or dst.shape != src.shape[::-1]
    or not (src.flags.c_contiguous and dst.flags.c_contiguous and dst.flags.writeable)
    or not _exact(fn)  # per call: the flush-to-zero mode belongs to the calling thread and may change
  ):
    return False
  with np.errstate(invalid="ignore"):  # a signalling NaN sets the invalid flag in max (numpy may warn)
    for r in range(0, src.shape[0] if src.size else 0, rows):
      part, into = src[r : r + rows], dst[:, r : r + rows]
      if np.isnan(part.max()):
        _copy_tiles(into, part.T)
      else:
        fn(into, part)
  return True


def _copy_tiles(dst: np.ndarray, src: np.ndarray, block: int = 256) -> None:
  n, m = src.shape
  for r in range(0, n, block):
    for c in range(0, m, block):
      dst[r : r + block, c : c + block] = src[r : r + block, c : c + block]


def copy_into(dst: np.ndarray, src: np.ndarray) -> np.ndarray:
  """`dst[...] = src` (casting), bit for bit; a large transposed 2D view is copied by BLAS or in square tiles.

  numpy copies a transposed view element by element in the destination's order, reading the source with a
  large stride (a cache miss per element). OpenBLAS's `somatcopy` (float32; 1.3-1.5x numpy's tiles on a
  ViT-B's MLP kernels) or tiles of 256 x 256 (which keep both sides in cache; 3-5x numpy's plain copy; 64
  and 128 within the noise of it) avoid that.
  """
  if src.ndim == 2 and src.size >= 1 << 16 and not src.flags.c_contiguous:
    if not (src.T.flags.c_contiguous and transpose_into(dst, src.T)):
      _copy_tiles(dst, src)
  else:
    dst[...] = src
  return dst


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
  """`np.empty(shape, dtype)` whose data start on an `align`-byte boundary (`align` <= the page size).

  jax aliases such a numpy array on a CPU (`jax.device_put` makes no copy), where numpy's own large arrays
  (16 bytes past a page boundary) are copied: for the import job that copy was a second model in memory.
  Arrays of 1 MB and more are private anonymous memory maps of their own (page-aligned): numpy asks the kernel
  for transparent huge pages for its large arrays (`madvise(MADV_HUGEPAGE)`), and on a machine whose memory is
  fragmented the kernel then compacts memory while the pages are first written (kernel time 0.2-0.8 s instead
  of 0.1 s for a ViT-B's 346 MB; a 2-8x slower import on this shared machine). A map without that advice gets
  huge pages only when they are free (kernel's choice), never a compaction stall.
  """
  import mmap

  dtype = np.dtype(dtype)
  shape = tuple(int(d) for d in shape)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if nbytes >= 1 << 20 and hasattr(mmap, "MAP_ANONYMOUS"):
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype).reshape(shape)
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
  shapes: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, np.ndarray]:
  """Builds the flat jaxlab tree (`collection/path` -> array) from a `TensorSource`, one tensor at a time.

  Every leaf is allocated once (`aligned_empty`, of its shape in `shapes`, else of the shape its first layer
  converts to) and each foreign tensor is written straight into its place in it (its layer of a stacked leaf):
  a tensor taken as it is (no conversion, same dtype) is read into place; a transposed one is copied into
  place from the source's memory map (`view`, pages dropped again by `release`) or, for sources without one,
  from a reused scratch buffer per shape. Peak memory stays near the size of the output. Leaves in
  `take_fresh` come from `fresh` (freshly initialised) instead of the file.

  With a source that reads safely from several threads (`thread_safe`), the tensors are converted on
  `threads` threads (0: up to 2 where the machine has the cores), largest first: reading (`preadv`),
  numpy's copies and the BLAS transposes release the GIL.

  Raises:
    NameMapError: a conversion gives a layer of another shape than `shapes` says.
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

  def convert(keys: list[str], e: Entry) -> np.ndarray:
    return np.asarray(e.conversion.to_ours(read(keys)))

  def release(keys: list[str]) -> None:
    if views:
      for k in keys:
        source.release(k)

  def fill(dst: np.ndarray, keys: list[str], e: Entry, name: str) -> None:
    if e.conversion is SAME and len(keys) == 1 and np.dtype(source.dtype(keys[0])) == dst.dtype:
      got = source.get(keys[0], out=dst)
      if not np.shares_memory(got, dst):  # a reader that returned an array of its own (npz)
        copy_into(dst, got)
      return
    value = convert(keys, e)
    if value.shape != dst.shape:
      layer = f"{name} (one layer)" if e.stacked else name
      raise NameMapError(trees.mismatch_message(
        f"{getattr(source, 'path', '<source>')}: converted tensors do not fit the model",
        [trees.shape_difference(layer, dst, value, ("model", "converted"))],
        "check config.num_heads and the other model keys",
      ))
    copy_into(dst, value)
    del value
    release(keys)

  out, tasks = {}, []
  for e in entries:
    name = f"{e.collection}/{e.ours}"
    if name in take_fresh:
      out[name] = np.asarray(fresh[name])
      continue
    dtype = np.dtype(dtypes.get(name, np.float32))
    layers = [e.layer_keys(i) for i in range(depth)] if e.stacked else [list(e.theirs)]
    if shapes is not None and name in shapes:
      arr = out[name] = aligned_empty(shapes[name], dtype)
    else:  # the first layer gives the shape (a conversion may change it)
      first = convert(layers[0], e)
      arr = out[name] = aligned_empty((depth, *first.shape) if e.stacked else first.shape, dtype)
      copy_into(arr[0] if e.stacked else arr, first)
      del first
      release(layers[0])
      layers = [None, *layers[1:]]
    for i, keys in enumerate(layers):
      if keys is not None:
        tasks.append((arr[i] if e.stacked else arr, keys, e, name))
  tasks.sort(key=lambda t: -t[0].nbytes)  # largest first: the two threads end together

  if threads <= 0:
    threads = min(2, os.cpu_count() or 1)
  if threads == 1 or len(tasks) < 2 or not getattr(source, "thread_safe", False):
    for t in tasks:
      fill(*t)
    return out
  with ThreadPoolExecutor(threads) as pool:
    for f in [pool.submit(fill, *t) for t in tasks]:
      f.result()
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
