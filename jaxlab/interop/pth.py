"""A PyTorch state dict file (`torch.save`'s zip archive) written without torch.

The archive `torch.save` writes (torch >= 1.6) is an uncompressed zip whose entries share one top-level folder
named after the file:

    <name>/data.pkl             the state dict, pickled (protocol 2)
    <name>/.format_version      "1"
    <name>/.storage_alignment   "64": every storage's bytes start at a multiple of 64 in the file
    <name>/byteorder            "little"
    <name>/data/<key>           one storage per tensor, raw little-endian bytes
    <name>/version              "3"

The pickle is an `OrderedDict` whose values are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, backward_hooks)` calls; each storage is a persistent id `('storage', torch.<Type>Storage, key,
'cpu', numel)` that the loader resolves to `<name>/data/<key>`. That pickle names only the globals that
`torch.load(weights_only=True)` allows (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and the
storage types), so it is written here opcode by opcode, and `readers.TorchZipSource` reads it back.
`tools/make_timm_fixtures.py` loads such a file with `torch.load(weights_only=True)` and timm.
"""

from __future__ import annotations

import os
import struct
import zipfile

import numpy as np

# numpy dtype name -> torch storage type (the inverse of readers._TORCH_STORAGE_DTYPES)
STORAGE_TYPES = {
  "float64": "DoubleStorage",
  "float32": "FloatStorage",
  "float16": "HalfStorage",
  "bfloat16": "BFloat16Storage",
  "int64": "LongStorage",
  "int32": "IntStorage",
  "int16": "ShortStorage",
  "int8": "CharStorage",
  "uint8": "ByteStorage",
  "bool": "BoolStorage",
}
ALIGNMENT = 64


def _int(n: int) -> bytes:
  if 0 <= n < 1 << 8:
    return b"K" + struct.pack("<B", n)  # BININT1
  if 0 <= n < 1 << 16:
    return b"M" + struct.pack("<H", n)  # BININT2
  if -(1 << 31) <= n < 1 << 31:
    return b"J" + struct.pack("<i", n)  # BININT
  raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
  return b"\x8a" + struct.pack("<B", len(raw)) + raw  # LONG1


def _str(s: str) -> bytes:
  raw = s.encode("utf-8")
  return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _tuple(items: list[bytes]) -> bytes:
  return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


def _ordered_dict() -> bytes:
  return _global("collections", "OrderedDict") + b")R"  # OrderedDict() : EMPTY_TUPLE REDUCE


def state_dict_pickle(tensors: dict[str, np.ndarray]) -> bytes:
  """The `data.pkl` of a state dict of contiguous tensors: storage `str(i)` holds the i-th tensor."""
  out = [b"\x80\x02", _ordered_dict()]  # PROTO 2
  items = list(tensors.items())
  for start in range(0, len(items), 1000):  # SETITEMS in batches, as pickle does
    out.append(b"(")
    for i, (key, value) in enumerate(items[start : start + 1000], start):
      shape = tuple(int(d) for d in value.shape)
      stride = tuple(int(np.prod(shape[j + 1 :], dtype=np.int64)) for j in range(len(shape)))
      kind = _global("torch", STORAGE_TYPES[np.dtype(value.dtype).name])
      storage = _tuple([_str("storage"), kind, _str(str(i)), _str("cpu"), _int(int(value.size))])
      args = _tuple(
        [
          storage + b"Q",  # BINPERSID
          _int(0),
          _tuple([_int(d) for d in shape]),
          _tuple([_int(s) for s in stride]),
          b"\x89",  # NEWFALSE: requires_grad
          _ordered_dict(),  # backward hooks
        ]
      )
      out += [_str(key), _global("torch._utils", "_rebuild_tensor_v2"), args, b"R"]
    out.append(b"u")  # SETITEMS
  out.append(b".")  # STOP
  return b"".join(out)


def _aligned_info(zf: zipfile.ZipFile, name: str, size: int, zip64: bool = False) -> zipfile.ZipInfo:
  """A stored entry whose data start at a multiple of ALIGNMENT: padding in the local header's extra field
  (after zipfile's own 20-byte zip64 field when `zip64`)."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  info.file_size = size
  data_start = zf.fp.tell() + 30 + len(name.encode()) + (20 if zip64 else 0)
  pad = (-(data_start + 4)) % ALIGNMENT  # an extra field: 2-byte id, 2-byte length, then the padding
  info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
  return info


def write_state_dict(tensors: dict[str, np.ndarray], out: str) -> None:
  """Writes `tensors` (arrays or strided views) as a `torch.save` zip archive, one tensor at a time, atomically.

  A strided view (a transposed kernel) is copied to contiguous memory one tensor at a time, so writing needs
  about one extra tensor of memory. The archive is written under a temporary name and renamed into place.

  Raises:
    ValueError: a dtype torch has no storage type for.
  """
  from jaxlab.interop.names import copy_into

  for key, value in tensors.items():
    if np.dtype(value.dtype).name not in STORAGE_TYPES:
      raise ValueError(f"tensor {key}: dtype {np.dtype(value.dtype).name} has no torch storage type")
  stem = os.path.splitext(os.path.basename(out))[0] or "archive"
  stem = "".join(c if c.isalnum() or c in "_-." else "_" for c in stem)
  tmp = out + ".tmp"
  try:
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:

      def entry(name: str, data: bytes) -> None:
        zf.writestr(_aligned_info(zf, f"{stem}/{name}", len(data)), data)

      entry("data.pkl", state_dict_pickle(tensors))
      entry(".format_version", b"1")
      entry(".storage_alignment", str(ALIGNMENT).encode())
      entry("byteorder", b"little")
      for i, value in enumerate(tensors.values()):
        v = np.asarray(value)
        if not v.flags.c_contiguous:
          v = copy_into(np.empty(v.shape, v.dtype), v)
        raw = memoryview(v.astype(v.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8))
        zip64 = raw.nbytes >= zipfile.ZIP64_LIMIT
        info = _aligned_info(zf, f"{stem}/data/{i}", raw.nbytes, zip64)
        with zf.open(info, "w", force_zip64=zip64) as f:
          f.write(raw)
      entry("version", b"3\n")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
