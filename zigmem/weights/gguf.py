"""GGUF: parsed and validated in C (csrc/gguf.c); values decoded here, large arrays lazily.

Tensors come back in numpy axis order: GGUF lists dims fastest-varying first (ggml's ne[0]
is the row length), so a tensor with dims (576, 1536) is a numpy (1536, 576) array. Types
numpy has (F32, F16, BF16 with ml_dtypes, F64, I8-I64) are typed views; quantized tensors
are raw uint8 views, one row per innermost row of blocks, ``[*dims[:0:-1], row_bytes]``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from .._binding import ffi, lib
from ..dtypes import numpy_dtype_named
from ..errors import WeightFormatError
from .info import TensorInfo

# GGUF value types: (struct format, numpy dtype) for scalars.
_SCALARS = {0: ("<B", "u1"), 1: ("<b", "i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"),
            4: ("<I", "<u4"), 5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "?"),
            10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8")}
_STRING, _ARRAY = 8, 9

# ggml types: name, and the numpy dtype of a typed view (None: raw blocks).
GGML_TYPES = {
    0: ("F32", "<f4"), 1: ("F16", "<f2"), 2: ("Q4_0", None), 3: ("Q4_1", None), 6: ("Q5_0", None),
    7: ("Q5_1", None), 8: ("Q8_0", None), 9: ("Q8_1", None), 10: ("Q2_K", None), 11: ("Q3_K", None),
    12: ("Q4_K", None), 13: ("Q5_K", None), 14: ("Q6_K", None), 15: ("Q8_K", None),
    16: ("IQ2_XXS", None), 17: ("IQ2_XS", None), 18: ("IQ3_XXS", None), 19: ("IQ1_S", None),
    20: ("IQ4_NL", None), 21: ("IQ3_S", None), 22: ("IQ2_S", None), 23: ("IQ4_XS", None),
    24: ("I8", "i1"), 25: ("I16", "<i2"), 26: ("I32", "<i4"), 27: ("I64", "<i8"), 28: ("F64", "<f8"),
    29: ("IQ1_M", None), 30: ("BF16", "bfloat16"), 34: ("TQ1_0", None), 35: ("TQ2_0", None),
    39: ("MXFP4", None), 40: ("NVFP4", None), 41: ("Q1_0", None),
}


class StringArray(Sequence):
    """A GGUF array of strings (a tokenizer vocabulary), decoded on first use."""

    def __init__(self, buf: memoryview, offset: int, count: int) -> None:
        self._buf, self._offset, self._count, self._items = buf, offset, count, None

    def _decoded(self) -> list[str]:
        if self._items is None:
            buf, pos, items = self._buf, self._offset, []
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(self._count):
                (n,) = unpack(buf, pos)
                items.append(str(buf[pos + 8: pos + 8 + n], "utf-8"))
                pos += 8 + n
            self._items = items
        return self._items

    def __getitem__(self, i):
        return self._decoded()[i]

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<StringArray of {self._count} strings>"


def _decode(buf: memoryview, kv) -> object:
    t = kv.type
    if t in _SCALARS:
        return struct.unpack_from(_SCALARS[t][0], buf, kv.value)[0]
    if t == _STRING:
        return str(buf[kv.value: kv.value + kv.count], "utf-8")
    item = kv.item_type
    if item in _SCALARS:  # zero-copy, read-only
        return np.frombuffer(buf, _SCALARS[item][1], kv.count, kv.value)
    if item == _STRING:
        return StringArray(buf, kv.value, kv.count)
    return _nested(buf, kv.value - 12, _ARRAY)[0]  # C validated it: decode it in full


def _nested(buf: memoryview, pos: int, t: int):
    """(value, next position) of a value of type t at pos; arrays of arrays, recursively."""
    if t in _SCALARS:
        fmt = _SCALARS[t][0]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if t == _STRING:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return str(buf[pos + 8: pos + 8 + n], "utf-8"), pos + 8 + n
    item, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    values = []
    for _ in range(count):
        value, pos = _nested(buf, pos, item)
        values.append(value)
    return values, pos


def parse(root: np.ndarray):
    """(metadata, [TensorInfo]) of a mapped GGUF file, or WeightFormatError."""
    size = root.size
    data = ffi.cast("const uint8_t *", root.ctypes.data) if size else ffi.NULL
    err = ffi.new("char[]", 256)
    info = ffi.new("zm_gguf_info_t *")
    if size < 24:
        raise WeightFormatError(f"{size} bytes is too short for a GGUF header")
    if lib.zm_gguf_header(data, size, info, err, 256):
        raise WeightFormatError(ffi.string(err).decode())
    # The header's counts were checked against the file size: these are bounded by it.
    kvs = ffi.new("zm_gguf_kv_t[]", max(info.n_kv, 1))
    tensors = ffi.new("zm_gguf_tensor_t[]", max(info.n_tensors, 1))
    scratch = ffi.new("char[]", 24 * max(info.n_kv, info.n_tensors, 1))
    if lib.zm_gguf_parse(data, size, info, kvs, tensors, scratch, err, 256):
        raise WeightFormatError(ffi.string(err).decode())
    buf = memoryview(root)
    metadata = {"GGUF.version": info.version}
    for kv in kvs[0:info.n_kv]:
        metadata[str(buf[kv.key: kv.key + kv.key_len], "utf-8")] = _decode(buf, kv)
    infos = [_tensor_info(TensorInfo, buf, t) for t in tensors[0:info.n_tensors]]
    return metadata, infos


def _tensor_info(TensorInfo, buf, t):
    name = str(buf[t.name: t.name + t.name_len], "utf-8")
    type_name, np_name = GGML_TYPES[t.type]
    dims = [int(d) for d in t.dims[0:t.n_dims]]
    shape = tuple(reversed(dims))
    if np_name == "bfloat16":
        np_dtype = numpy_dtype_named("bfloat16") or np.dtype("<u2")
    elif np_name is not None:
        np_dtype = np.dtype(np_name)
    else:
        np_dtype = None
    if np_dtype is not None:
        view_shape = shape
    else:  # raw blocks, one row per innermost row
        np_dtype = np.dtype(np.uint8)
        row_bytes = t.nbytes // max(1, int(np.prod(dims[1:], dtype=np.int64)))
        view_shape = (*shape[:-1], row_bytes) if shape else (t.nbytes,)
    return TensorInfo(name, type_name, shape, int(t.offset), int(t.nbytes), np_dtype, view_shape)
