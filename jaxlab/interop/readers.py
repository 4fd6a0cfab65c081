"""Readers of foreign checkpoint files into name -> numpy array maps, without PyTorch.

Three formats, chosen by `format='auto'` from the file name:

- safetensors (`.safetensors`): `safetensors.numpy`, lazily per tensor.
- PyTorch zip archives (`.pth`, `.pt`, `.bin`, torch >= 1.6): a restricted
  unpickler reads `data.pkl`. Only the globals a state dict needs are resolved
  (`collections.OrderedDict`, torch's tensor/parameter rebuild functions and
  storage classes); every other global in the pickle (an `argparse.Namespace`
  of training args, numpy scalars, ...) becomes an inert `Opaque` placeholder,
  so no code named by the file ever runs. Storages are read from their offset
  in the archive (torch stores them uncompressed) only when a tensor is read,
  straight into the returned array when the tensor is contiguous. A `{'model': state_dict}` wrapper as DeiT ships it is
  unwrapped (keys `model`, `state_dict`, `model_ema`, in that order).
- big_vision / AugReg `.npz`: `np.load(allow_pickle=False)`, keys as stored
  (`params/Transformer/encoderblock_0/...`).

Every reader is a `TensorSource`: `keys()`, `shape(k)`, `dtype(k)`, `get(k)`,
so that name maps and the import job can check names and shapes before any
tensor is read, and read one tensor at a time (peak memory about the output).
Files are only read, never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

FORMATS = ("safetensors", "torch", "npz")


class ReadError(ValueError):
  """A checkpoint file that cannot be read (unknown format, corrupt, unsupported content)."""


def _pread_into(file, out: np.ndarray, offset: int) -> int:
  """Reads `out.nbytes` bytes at `offset` into `out` without moving the file position (safe across threads)."""
  view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
  while done < len(view):
    n = os.preadv(file.fileno(), [view[done:]], offset + done)
    if n == 0:
      break
    done += n
  return done


class TensorSource:
  """A read-only map from tensor names to arrays, read lazily."""

  path: str
  format: str
  thread_safe = False  # get() may be called from several threads at once (different `out` buffers)

  def keys(self) -> list[str]:
    raise NotImplementedError

  def shape(self, key: str) -> tuple[int, ...]:
    raise NotImplementedError

  def dtype(self, key: str) -> np.dtype:
    raise NotImplementedError

  def get(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
    """The tensor as a numpy array: a fresh one, or `out` (of the tensor's shape and dtype) filled in place."""
    raise NotImplementedError

  def __contains__(self, key: str) -> bool:
    return key in set(self.keys())

  def __iter__(self) -> Iterator[str]:
    return iter(self.keys())

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class DictSource(TensorSource):
  """A `TensorSource` over an in-memory dict (tests, already loaded state dicts)."""

  thread_safe = True

  def __init__(self, tensors: dict[str, np.ndarray], path: str = "<memory>", format: str = "dict"):
    self._t = {k: np.asarray(v) for k, v in tensors.items()}
    self.path, self.format = path, format

  def keys(self):
    return list(self._t)

  def shape(self, key):
    return tuple(self._t[key].shape)

  def dtype(self, key):
    return self._t[key].dtype

  def get(self, key, out=None):
    if out is not None:
      out[...] = self._t[key]
      return out
    return np.array(self._t[key])


# ----------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------


class SafetensorsSource(TensorSource):
  """A safetensors file: names, shapes, dtypes and metadata through `safetensors.safe_open` (which validates the
  header); each tensor is read with one `readinto` into a fresh array at the offset the header gives.

  Reading into our own array, rather than through the library's memory map, keeps the file's pages out of the
  process's resident memory (they stay in the page cache) and copies each tensor once; it also reads bfloat16,
  which numpy (and so `safetensors.numpy`) has no dtype for (`ml_dtypes.bfloat16`, as jax uses). Reads use
  `os.preadv` (no shared file position), so several threads may read at once.
  """

  thread_safe = True

  def __init__(self, path: str):
    from safetensors import safe_open

    self.path, self.format = path, "safetensors"
    try:
      with safe_open(path, framework="np") as f:
        self._keys = list(f.keys())
        self._meta = f.metadata() or {}
      with open(path, "rb") as f:  # the layout: u64 header size, JSON header, data (offsets relative to its end)
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    except Exception as e:  # safetensors raises its own error types
      raise ReadError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from e
    self._data_start = 8 + n
    self._info = {k: header[k] for k in self._keys}
    self._file = open(path, "rb")
    self._mmap = None

  @property
  def metadata(self) -> dict[str, str]:
    """The file's `__metadata__` string map (empty when absent)."""
    return dict(self._meta)

  def keys(self):
    return list(self._keys)

  def shape(self, key):
    return tuple(self._info[key]["shape"])

  def dtype(self, key):
    name = self._info[key]["dtype"]
    if name == "BF16":
      import ml_dtypes

      return np.dtype(ml_dtypes.bfloat16)
    if name not in _SAFETENSORS_DTYPES:
      raise ReadError(f"{self.path}: tensor {key} has dtype {name}, which jaxlab does not read")
    return np.dtype(_SAFETENSORS_DTYPES[name])

  def get(self, key, out=None):
    start, end = self._info[key]["data_offsets"]
    dtype = self.dtype(key).newbyteorder("<")
    if out is None or out.shape != self.shape(key) or out.dtype != dtype or not out.flags.c_contiguous:
      out = np.empty(self.shape(key), dtype)
    if out.nbytes != end - start:
      raise ReadError(f"{self.path}: tensor {key} has {end - start} bytes for shape {list(out.shape)}")
    if _pread_into(self._file, out, self._data_start + start) != out.nbytes:
      raise ReadError(f"{self.path}: file ends inside tensor {key}")
    return out if out.dtype.isnative else out.astype(out.dtype.newbyteorder("="))

  def view(self, key) -> np.ndarray:
    """The tensor as a read-only array over a memory map of the file (no copy; pages come from the page cache).

    For a caller that copies it elsewhere at once (a transpose into the output) and then calls `release(key)`,
    which drops the tensor's pages from this process's resident memory again (the page cache keeps them).
    """
    import mmap

    if self._mmap is None:
      self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
    start, end = self._info[key]["data_offsets"]
    dtype = self.dtype(key).newbyteorder("<")
    count = int(np.prod(self.shape(key), dtype=np.int64))
    if count * dtype.itemsize != end - start or self._data_start + end > len(self._mmap):
      raise ReadError(f"{self.path}: tensor {key} has {end - start} bytes for shape {list(self.shape(key))}")
    arr = np.frombuffer(self._mmap, dtype, count, self._data_start + start).reshape(self.shape(key))
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))

  def release(self, key) -> None:
    import mmap

    if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):  # no madvise (Windows): the pages stay mapped
      return
    start, end = self._info[key]["data_offsets"]
    lo = (self._data_start + start) // mmap.PAGESIZE * mmap.PAGESIZE
    self._mmap.madvise(mmap.MADV_DONTNEED, lo, self._data_start + end - lo)

  def close(self):
    if self._mmap is not None:
      try:
        self._mmap.close()
      except BufferError:  # an array over the map is still alive: the map closes when it is collected
        pass
      self._mmap = None
    self._file.close()


_SAFETENSORS_DTYPES = {
  "F64": "float64",
  "F32": "float32",
  "F16": "float16",
  "I64": "int64",
  "I32": "int32",
  "I16": "int16",
  "I8": "int8",
  "U8": "uint8",
  "BOOL": "bool",
}


# ----------------------------------------------------------------------------
# PyTorch zip archives, without torch
# ----------------------------------------------------------------------------

_TORCH_STORAGE_DTYPES = {
  "DoubleStorage": "float64",
  "FloatStorage": "float32",
  "HalfStorage": "float16",
  "LongStorage": "int64",
  "IntStorage": "int32",
  "ShortStorage": "int16",
  "CharStorage": "int8",
  "ByteStorage": "uint8",
  "BoolStorage": "bool",
  "BFloat16Storage": "bfloat16",
}


class Opaque:
  """Stands in for any object in a pickle that a state dict does not need; nothing of it is executed."""

  def __init__(self, name: str, *args, **kwargs):
    self.name, self.args = name, args

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    return f"Opaque({self.name})"


def _opaque_class(name: str):
  return type(
    "Opaque_" + name.replace(".", "_"),
    (Opaque,),
    {
      "__new__": lambda cls, *a, **k: object.__new__(cls),
      "__init__": lambda self, *a, **k: Opaque.__init__(self, name, *a),
      "__call__": lambda self, *a, **k: Opaque(name, *a),
    },
  )


class _StorageRef:
  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel


class LazyTensor:
  """A torch tensor in the archive: storage key, dtype, offset, shape and strides (in elements)."""

  def __init__(self, storage: _StorageRef, offset: int, shape, stride):
    self.storage, self.offset, self.shape, self.stride = storage, int(offset), tuple(shape), tuple(stride)

  @property
  def dtype(self) -> np.dtype:
    return self.storage.dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
  if not isinstance(storage, _StorageRef):
    raise ReadError("unsupported tensor storage in the pickle")
  return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_):
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals of a torch state dict; anything else becomes an `Opaque` placeholder."""

  def __init__(self, file, path: str):
    super().__init__(file)
    self._path = path

  def find_class(self, module: str, name: str):
    full = f"{module}.{name}"
    if full == "collections.OrderedDict":
      return OrderedDict
    if full in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor"):
      return _rebuild_tensor
    if full == "torch._utils._rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _TORCH_STORAGE_DTYPES:
      return name  # a marker, resolved in persistent_load
    if full == "torch._tensor._rebuild_from_type_v2":  # a tensor subclass: (func, type, args, state)
      return lambda func, _type, args, _state: func(*args)
    return _opaque_class(full)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise ReadError(f"{self._path}: unsupported persistent id in the pickle ({str(pid)[:80]})")
    _, storage_type, key, _location, numel = pid[:5]
    if storage_type not in _TORCH_STORAGE_DTYPES:
      raise ReadError(f"{self._path}: unsupported torch storage type {storage_type!r}")
    dt = _TORCH_STORAGE_DTYPES[storage_type]
    if dt == "bfloat16":
      import ml_dtypes

      dtype = np.dtype(ml_dtypes.bfloat16)
    else:
      dtype = np.dtype(dt)
    return _StorageRef(str(key), dtype, int(numel))


def _pick_state_dict(obj, path: str) -> dict:
  """The state dict in a loaded pickle: the object itself, or its `model` / `state_dict` / `model_ema` entry."""
  if isinstance(obj, dict) and obj and all(isinstance(v, LazyTensor) for v in obj.values()):
    return obj
  if isinstance(obj, dict):
    for key in ("model", "state_dict", "model_ema", "module"):
      inner = obj.get(key)
      if isinstance(inner, dict) and inner and any(isinstance(v, LazyTensor) for v in inner.values()):
        return _pick_state_dict(inner, path)
  entries = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
  raise ReadError(
    f"{path}: no state dict found (top-level entries: {entries}); expected a state dict or a "
    "dict with a 'model', 'state_dict' or 'model_ema' entry"
  )


class TorchZipSource(TensorSource):
  """A PyTorch `torch.save` zip archive (torch >= 1.6) read with a restricted unpickler, tensors read lazily."""

  def __init__(self, path: str):
    self.path, self.format = path, "torch"
    if not zipfile.is_zipfile(path):
      raise ReadError(
        f"{path}: not a PyTorch zip archive (a legacy torch<1.6 file or not a checkpoint); "
        "re-save it with a recent torch (`torch.save(torch.load(f), f2)`) or convert it to "
        "safetensors"
      )
    self._zip = zipfile.ZipFile(path)
    names = self._zip.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pkl:
      raise ReadError(f"{path}: zip archive without <name>/data.pkl; not a torch.save file")
    self._prefix = pkl[0][: -len("data.pkl")]
    byteorder = self._prefix + "byteorder"
    if byteorder in names and self._zip.read(byteorder).decode().strip() != "little":
      raise ReadError(f"{path}: big-endian torch archives are not supported")
    with self._zip.open(pkl[0]) as f:
      try:
        obj = _RestrictedUnpickler(f, path).load()
      except ReadError:
        raise
      except Exception as e:
        raise ReadError(f"{path}: cannot read the pickle in the archive ({type(e).__name__}: {e})") from e
    self._tensors: dict[str, LazyTensor] = {}
    for k, v in _pick_state_dict(obj, path).items():
      if isinstance(v, LazyTensor):
        self._tensors[str(k)] = v
    self._file = open(path, "rb")
    self._offsets: dict[str, int | None] = {}

  def _storage_start(self, ref: _StorageRef) -> int | None:
    """File offset of a storage's bytes (None when the archive compressed it)."""
    name = f"{self._prefix}data/{ref.key}"
    if name not in self._offsets:
      info = self._zip.getinfo(name)
      if info.compress_type != zipfile.ZIP_STORED:
        self._offsets[name] = None
      else:  # the data follow the local file header (30 bytes + name + extra field)
        self._file.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", self._file.read(4))
        self._offsets[name] = info.header_offset + 30 + name_len + extra_len
    return self._offsets[name]

  def keys(self):
    return list(self._tensors)

  def shape(self, key):
    return self._tensors[key].shape

  def dtype(self, key):
    return self._tensors[key].dtype

  def get(self, key, out=None):
    t = self._tensors[key]
    item = t.dtype.itemsize
    shape = tuple(int(d) for d in t.shape)
    extent = 1 + sum((d - 1) * st for d, st in zip(shape, t.stride)) if all(shape) else 0
    if extent > t.storage.numel - t.offset:
      raise ReadError(f"{self.path}: tensor {key} reaches past its storage")
    contiguous = tuple(t.stride) == tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))
    start = self._storage_start(t.storage)
    if start is None:  # compressed entry (torch never writes these): read the storage whole
      raw = self._zip.read(f"{self._prefix}data/{t.storage.key}")
      buf = np.frombuffer(raw, dtype=t.dtype, count=t.storage.numel)[t.offset : t.offset + extent]
    else:
      reuse = contiguous and out is not None and out.shape == shape and out.dtype == t.dtype and out.flags.c_contiguous
      buf = out.reshape(-1) if reuse else np.empty(extent, t.dtype)
      if _pread_into(self._file, buf, start + t.offset * item) != buf.nbytes:
        raise ReadError(f"{self.path}: archive ends inside tensor {key}")
      if contiguous:
        return buf.reshape(shape)
    view = np.lib.stride_tricks.as_strided(buf, shape=shape, strides=tuple(st * item for st in t.stride))
    return np.array(view)

  def close(self):
    for obj in (getattr(self, "_file", None), getattr(self, "_zip", None)):
      if obj is not None:
        obj.close()


# ----------------------------------------------------------------------------
# big_vision / AugReg npz
# ----------------------------------------------------------------------------


class NpzSource(TensorSource):
  def __init__(self, path: str):
    self.path, self.format = path, "npz"
    try:
      self._npz = np.load(path, allow_pickle=False)
      self._keys = list(self._npz.files)
    except Exception as e:
      raise ReadError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    self._cache: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

  def _header(self, key):
    if key not in self._cache:
      with self._npz.zip.open(key + ".npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
      self._cache[key] = (tuple(shape), np.dtype(dtype))
    return self._cache[key]

  def keys(self):
    return list(self._keys)

  def shape(self, key):
    return self._header(key)[0]

  def dtype(self, key):
    return self._header(key)[1]

  def get(self, key, out=None):
    return np.array(self._npz[key])

  def close(self):
    self._npz.close()


# ----------------------------------------------------------------------------


def detect_format(path: str, format: str = "auto") -> str:
  """`safetensors`, `torch` or `npz` from the file name (or `format` when given).

  Raises:
    ReadError: an unknown extension with `format='auto'`, or an unknown format name.
  """
  if format not in ("auto", *FORMATS):
    raise ReadError(f"config.format={format!r}: choose auto, {', '.join(FORMATS)}")
  if format != "auto":
    return format
  ext = os.path.splitext(path)[1].lower()
  by_ext = {
    ".safetensors": "safetensors",
    ".pth": "torch",
    ".pt": "torch",
    ".bin": "torch",
    ".ckpt": "torch",
    ".npz": "npz",
  }
  if ext not in by_ext:
    raise ReadError(
      f"{path}: cannot tell the format from the extension {ext!r}; set config.format to one of {', '.join(FORMATS)}"
    )
  return by_ext[ext]


def open_source(path: str, format: str = "auto") -> TensorSource:
  """Opens a checkpoint file for reading as a `TensorSource`.

  Raises:
    FileNotFoundError: no such file.
    ReadError: unknown format or unreadable file.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.source={path}: no such file")
  fmt = detect_format(path, format)
  return {"safetensors": SafetensorsSource, "torch": TorchZipSource, "npz": NpzSource}[fmt](path)


def sha256(path: str, chunk: int = 1 << 23) -> str:
  """Hex sha256 of a file, read in chunks into one reused buffer."""
  h = hashlib.sha256()
  buf = bytearray(chunk)
  view = memoryview(buf)
  with open(path, "rb", buffering=0) as f:
    while n := f.readinto(buf):
      h.update(view[:n])
  return h.hexdigest()


class InThread:
  """`fn(*args)` run on a daemon thread while the caller does other work; `result()` waits for it and returns
  its value or re-raises its error in the caller's thread."""

  def __init__(self, fn, *args, name: str = "jaxlab-background"):
    self._value = None
    self._error: BaseException | None = None
    self._thread = threading.Thread(target=self._run, args=(fn, args), name=name, daemon=True)
    self._thread.start()

  def _run(self, fn, args) -> None:
    try:
      self._value = fn(*args)
    except BaseException as e:  # re-raised in the caller's thread by result()
      self._error = e

  def result(self):
    self._thread.join()
    if self._error is not None:
      raise self._error
    return self._value


class BackgroundSha256(InThread):
  """The sha256 of a file computed on a daemon thread while the caller reads and converts the file
  (`hashlib` releases the GIL while hashing, so on a multi-core machine this costs no wall time)."""

  def __init__(self, path: str):
    super().__init__(sha256, path, name="jaxlab-sha256")

  def result(self) -> str:
    return str(super().result())
