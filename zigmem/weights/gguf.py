"""GGUF: parsed and validated in C (csrc/gguf.c); tables and values decoded here on demand.

Parsing allocates one u64 per record (two C indexes sorted by name, at most 0.6x the file
size) and no Python object per record: ``metadata`` and the tensor table are mappings that
decode a record when it is asked for, so a hostile file with millions of records costs
neither memory nor time until they are read. Arrays are lazy too: arrays of numbers are
zero-copy numpy views, arrays of strings (a tokenizer vocabulary) and arrays of arrays
decode their items on first use.

Tensors come back in numpy axis order: GGUF lists dims fastest-varying first (ggml's ne[0]
is the row length), so a tensor with dims (576, 1536) is a numpy (1536, 576) array. Types
numpy has (F32, F16, BF16 with ml_dtypes, F64, I8-I64) are typed views; quantized tensors
are raw uint8 views, one row per innermost row of blocks, ``[*dims[:0:-1], row_bytes]``.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from .._binding import ffi, lib
from .._ownership import OwnsCState
from ..dtypes import numpy_dtype_named
from ..errors import UseAfterFreeError, WeightFormatError
from .info import TensorInfo

# GGUF value types: (struct format, numpy dtype) for scalars.
_SCALARS = {0: ("<B", "u1"), 1: ("<b", "i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"),
            4: ("<I", "<u4"), 5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "?"),
            10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8")}
_STRING, _ARRAY = 8, 9
_TYPE_NAMES = {0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 6: "f32", 7: "bool",
               8: "string", 9: "array", 10: "u64", 11: "i64", 12: "f64"}

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

_u64 = struct.Struct("<Q").unpack_from


class _Source(OwnsCState):
    """The mapped bytes and C indexes the lazy tables read. ``release()`` (WeightFile.close)
    drops the tables' hold on the mapping; values already handed out keep their own."""

    __slots__ = ("root", "data", "info", "kv_index", "tensor_index")

    def __init__(self, root: np.ndarray, data, info, kv_index, tensor_index) -> None:
        self.root, self.data, self.info = root, data, info
        self.kv_index, self.tensor_index = kv_index, tensor_index

    def live(self) -> np.ndarray:
        """The mapped bytes: ``data`` points into them while the caller holds the result."""
        root = self.root  # one read: a concurrent release() cannot pull it from under us
        if root is None:
            raise UseAfterFreeError("the weight file was closed")
        return root

    def release(self) -> None:
        self.root = None


def _pointer(root: np.ndarray):
    return ffi.cast("const uint8_t *", root.ctypes.data)  # ctypes is slow: once per object


def _find(data, index, n: int, name) -> int:
    """The record position named ``name`` through a sorted C index, or -1."""
    if not isinstance(name, str):
        return -1
    try:
        key = name.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: no record can be named so
        return -1
    i = lib.zm_gguf_find(data, index, n, key, len(key))
    return -1 if i < 0 else index[i]


class Metadata(OwnsCState, Mapping):
    """A GGUF file's key-values, in file order, each decoded when first read.

    ``"GGUF.version"`` comes first. Values: Python scalars and strings; arrays of numbers
    as read-only numpy views of the file; arrays of strings as :class:`StringArray`;
    arrays of arrays as :class:`NestedArray`.
    """

    def __init__(self, source: _Source) -> None:
        self._source = source
        self._cache: dict[str, object] = {"GGUF.version": int(source.info.version)}

    def __getitem__(self, key: str) -> object:
        try:
            return self._cache[key]
        except (KeyError, TypeError):
            pass
        source = self._source
        root = source.live()
        pos = _find(source.data, source.kv_index, source.info.n_kv, key)
        if pos < 0:
            raise KeyError(key)
        kv = ffi.new("zm_gguf_kv_t *")
        if lib.zm_gguf_kv_at(source.data, root.size, pos, kv):
            raise WeightFormatError(f"key-value at offset {pos} cannot be decoded")
        value = self._cache[key] = _decode(root, kv)
        return value

    def __iter__(self) -> Iterator[str]:
        source = self._source
        yield "GGUF.version"
        root = source.live()
        buf, data, pos = memoryview(root), source.data, 24
        kv = ffi.new("zm_gguf_kv_t *")
        for _ in range(source.info.n_kv):
            if lib.zm_gguf_kv_at(data, root.size, pos, kv):
                raise WeightFormatError(f"key-value at offset {pos} cannot be decoded")
            yield str(buf[kv.key: kv.key + kv.key_len], "utf-8")
            pos = kv.end

    def __len__(self) -> int:
        return self._source.info.n_kv + 1

    def release(self) -> None:
        """Let go of the mapping (values already read stay readable)."""
        self._source.release()

    def __repr__(self) -> str:
        return f"<GGUF metadata: {len(self)} keys>"


class TensorTable(OwnsCState, Mapping):
    """A GGUF file's tensor infos: name -> :class:`TensorInfo`, in file order, decoded
    when first asked for (and then kept)."""

    def __init__(self, source: _Source) -> None:
        self._source = source
        self._cache: dict[str, TensorInfo] = {}

    def __getitem__(self, name: str) -> TensorInfo:
        try:
            return self._cache[name]
        except (KeyError, TypeError):
            pass
        source = self._source
        root = source.live()
        pos = _find(source.data, source.tensor_index, source.info.n_tensors, name)
        if pos < 0:
            raise KeyError(name)
        info = self._cache[name] = _tensor_info(root, source.data, source.info, pos)
        return info

    def __iter__(self) -> Iterator[str]:
        source = self._source
        root = source.live()
        buf, data, pos = memoryview(root), source.data, source.info.tensors_offset
        t = ffi.new("zm_gguf_tensor_t *")
        for _ in range(source.info.n_tensors):
            if lib.zm_gguf_tensor_at(data, root.size, source.info, pos, t):
                raise WeightFormatError(f"tensor info at offset {pos} cannot be decoded")
            yield str(buf[t.name: t.name + t.name_len], "utf-8")
            pos = t.end

    def __len__(self) -> int:
        return self._source.info.n_tensors

    def release(self) -> None:
        """Let go of the mapping."""
        self._source.release()

    def __repr__(self) -> str:
        return f"<GGUF tensor table: {len(self)} tensors>"


def _plain(value):
    """Lazy arrays and sequences as nested lists, for comparisons."""
    if isinstance(value, (NestedArray, StringArray, list, tuple)):
        return [_plain(v) for v in value]
    return value


class _LazyArray(OwnsCState, Sequence):
    """Items of a GGUF array at ``first`` in ``root`` (which it keeps mapped), decoded on
    use; variable-size items (strings, arrays) are located by one walk, on first use."""

    _item_type: int

    def __init__(self, root: np.ndarray, first: int, count: int) -> None:
        self._root, self._first, self._count = root, first, count
        self._offsets: np.ndarray | None = None

    def _offset(self, i: int) -> int:
        size = _SCALARS.get(self._item_type)
        if size is not None:
            return self._first + i * struct.calcsize(size[0])
        if self._offsets is None:  # one u64 per item: at most 2/3 of the array's bytes
            root, offsets = self._root, np.empty(self._count, np.uint64)
            if lib.zm_gguf_item_offsets(_pointer(root), root.size, self._first, self._item_type,
                                        self._count, ffi.cast("uint64_t *", offsets.ctypes.data)):
                raise WeightFormatError(f"array at offset {self._first} cannot be decoded")
            self._offsets = offsets
        return int(self._offsets[i])

    def _item(self, i: int):
        return _value_at(self._root, self._offset(i), self._item_type)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._item(k) for k in range(*i.indices(self._count))]
        k = operator.index(i)  # TypeError for a non-integer, as a list would
        if not -self._count <= k < self._count:
            raise IndexError(f"index {i} out of range for {self._count} items")
        return self._item(k % self._count)

    def __len__(self) -> int:
        return self._count

    def __eq__(self, other) -> bool:
        if not isinstance(other, (Sequence, np.ndarray)) or isinstance(other, (str, bytes)):
            return NotImplemented
        return _plain(self) == _plain(list(other))

    __hash__ = None  # type: ignore[assignment]

    def tolist(self) -> list:
        """Every item, nested arrays as nested lists."""
        return _plain(self)


class StringArray(_LazyArray):
    """A GGUF array of strings (a tokenizer vocabulary), decoded on first use."""

    _item_type = _STRING

    def __init__(self, root: np.ndarray, first: int, count: int) -> None:
        super().__init__(root, first, count)
        self._items: list[str] | None = None

    def _decoded(self) -> list[str]:
        if self._items is None:
            buf, pos, items = memoryview(self._root), self._first, []
            for _ in range(self._count):
                (n,) = _u64(buf, pos)
                items.append(str(buf[pos + 8: pos + 8 + n], "utf-8"))
                pos += 8 + n
            self._items = items
        return self._items

    def __getitem__(self, i):
        return self._decoded()[i]

    def __repr__(self) -> str:
        return f"<StringArray of {self._count} strings>"


class NestedArray(_LazyArray):
    """A GGUF array whose items are arrays (or an array inside one): items are Python
    scalars, strings, or further NestedArrays, each decoded when read."""

    def __init__(self, root: np.ndarray, item_type: int, first: int, count: int) -> None:
        super().__init__(root, first, count)
        self._item_type = item_type

    def __repr__(self) -> str:
        return f"<NestedArray of {self._count} {_TYPE_NAMES[self._item_type]}>"


def _value_at(root: np.ndarray, pos: int, t: int):
    """The value of type t at pos, inside a nested array (validated by the C parser)."""
    buf = memoryview(root)
    if t in _SCALARS:
        return struct.unpack_from(_SCALARS[t][0], buf, pos)[0]
    if t == _STRING:
        (n,) = _u64(buf, pos)
        return str(buf[pos + 8: pos + 8 + n], "utf-8")
    item, count = struct.unpack_from("<IQ", buf, pos)
    return NestedArray(root, item, pos + 12, count)


def _decode(root: np.ndarray, kv) -> object:
    t, buf = kv.type, memoryview(root)
    if t in _SCALARS:
        return struct.unpack_from(_SCALARS[t][0], buf, kv.value)[0]
    if t == _STRING:
        return str(buf[kv.value: kv.value + kv.count], "utf-8")
    item = kv.item_type
    if item in _SCALARS:  # zero-copy, read-only
        return np.frombuffer(buf, _SCALARS[item][1], kv.count, kv.value)
    if item == _STRING:
        return StringArray(root, kv.value, kv.count)
    return NestedArray(root, item, kv.value, kv.count)


def parse(root: np.ndarray):
    """(metadata, tensor table) of a mapped GGUF file, or WeightFormatError.

    Memory: two C arrays of one u64 per record, sized only once the C parser has walked
    every record (so a count the file does not back is refused first).
    """
    size = root.size
    if size < 24:
        raise WeightFormatError(f"{size} bytes is too short for a GGUF header")
    data = _pointer(root)
    err = ffi.new("char[]", 256)
    info = ffi.new("zm_gguf_info_t *")
    if lib.zm_gguf_header(data, size, info, err, 256):
        raise WeightFormatError(ffi.string(err).decode("utf-8", "replace"))
    kv_index = ffi.new("uint64_t[]", max(info.n_kv, 1))
    tensor_index = ffi.new("uint64_t[]", max(info.n_tensors, 1))
    if lib.zm_gguf_parse(data, size, info, kv_index, tensor_index, err, 256):
        raise WeightFormatError(ffi.string(err).decode("utf-8", "replace"))
    if _find(data, kv_index, info.n_kv, "GGUF.version") >= 0:  # it would shadow the header's
        raise WeightFormatError("key GGUF.version is reserved for the header's version")
    source = _Source(root, data, info, kv_index, tensor_index)
    return Metadata(source), TensorTable(source)


def _tensor_info(root: np.ndarray, data, info, pos: int) -> TensorInfo:
    t = ffi.new("zm_gguf_tensor_t *")
    if lib.zm_gguf_tensor_at(data, root.size, info, pos, t):
        raise WeightFormatError(f"tensor info at offset {pos} cannot be decoded")
    name = str(memoryview(root)[t.name: t.name + t.name_len], "utf-8")
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
        block, nbytes = ffi.new("uint32_t *"), ffi.new("uint32_t *")
        lib.zm_ggml_type_size(t.type, block, nbytes)
        np_dtype = np.dtype(np.uint8)
        view_shape = (*shape[:-1], dims[0] // block[0] * nbytes[0])
    return TensorInfo(name, type_name, shape, int(t.offset), int(t.nbytes), np_dtype, view_shape)
