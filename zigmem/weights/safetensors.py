"""safetensors: parse a mapped file's header strictly; write files streaming from arrays.

Layout: u64 little-endian header length N, N bytes of JSON (UTF-8, may end in spaces), then
the data section. The JSON maps tensor names to {"dtype", "shape", "data_offsets":
[begin, end]} (relative to the data section) plus an optional "__metadata__" of strings.
Validation is at least the reference reader's (header size cap, UTF-8, offsets from 0,
contiguous, no holes or overlaps, each range exactly shape x dtype, the data section exactly
the rest of the file) and stricter where its README says so: duplicate keys are rejected.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import numpy.typing as npt

from ..dtypes import numpy_dtype_named
from ..errors import WeightFormatError
from .info import TensorInfo

if TYPE_CHECKING:
    from _typeshed import StrOrBytesPath

MAX_HEADER = 100_000_000  # the reference reader's cap
MAX_DIMS = 64  # numpy's
INTP_MAX = 2**63 - 1

# dtype -> (bits per element, numpy type name or None when numpy has none)
DTYPES = {
    "BOOL": (8, "bool"), "U8": (8, "uint8"), "I8": (8, "int8"), "I16": (16, "int16"),
    "U16": (16, "uint16"), "F16": (16, "float16"), "BF16": (16, "bfloat16"),
    "I32": (32, "int32"), "U32": (32, "uint32"), "F32": (32, "float32"),
    "F64": (64, "float64"), "I64": (64, "int64"), "U64": (64, "uint64"),
    "C64": (64, "complex64"), "F8_E5M2": (8, "float8_e5m2"), "F8_E4M3": (8, "float8_e4m3fn"),
    "F8_E8M0": (8, "float8_e8m0fnu"), "F4": (4, None), "F6_E2M3": (6, None), "F6_E3M2": (6, None),
}
_RAW = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


def numpy_dtype(name: str) -> np.dtype[Any] | None:
    """The numpy dtype for a safetensors dtype: ml_dtypes types when installed, else None."""
    np_name = DTYPES[name][1]
    return None if np_name is None else numpy_dtype_named(np_name)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise WeightFormatError(f"duplicate key {key!r} in the header")
        seen[key] = value
    return seen


def _reject_constant(name: str) -> NoReturn:
    raise WeightFormatError(f"header is not valid JSON: {name} is not a JSON value")


def _json_object(text: str) -> dict[str, Any]:
    """The header's JSON object, or WeightFormatError: whatever the text, json's own
    failures (nesting too deep for the parser, integers too long to convert, NaN) are
    format errors, never bare RecursionError or ValueError."""
    try:
        header: dict[str, Any] = json.loads(text, object_pairs_hook=_no_duplicates,
                                            parse_constant=_reject_constant)
        return header
    except json.JSONDecodeError as e:
        raise WeightFormatError(f"header is not valid JSON: {e}") from None
    except RecursionError:
        raise WeightFormatError("header is not valid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer beyond sys.get_int_max_str_digits()
        if isinstance(e, WeightFormatError):
            raise
        raise WeightFormatError(f"header is not valid JSON: {e}") from None


def parse(root: np.ndarray) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """(metadata, {name: TensorInfo} in file order) of a mapped safetensors file, or
    WeightFormatError."""
    size = root.size
    if size < 8:
        raise WeightFormatError(f"{size} bytes is too short for the 8-byte header length")
    n = int.from_bytes(bytes(root[:8]), "little")
    if n > MAX_HEADER:
        raise WeightFormatError(f"header length {n} exceeds the {MAX_HEADER}-byte cap")
    if n > size - 8:
        raise WeightFormatError(f"header of {n} bytes runs past the end of the {size}-byte file")
    try:
        text = bytes(root[8:8 + n]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise WeightFormatError(f"header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.startswith("{"):
        raise WeightFormatError("header is not a JSON object")
    header = _json_object(text)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise WeightFormatError("__metadata__ must map strings to strings")
    start, data_size = 8 + n, size - 8 - n
    entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
    for name, entry in header.items():
        entries.append(_entry(name, entry))
    entries.sort(key=lambda e: (e[3], e[4]))
    infos: list[TensorInfo] = []
    expected = 0
    for name, dtype, shape, begin, end in entries:
        if begin != expected:
            what = "overlaps the previous tensor" if begin < expected else "leaves a hole before it"
            raise WeightFormatError(f"tensor {name!r}: data_offsets start at {begin}, which {what} "
                                    f"(expected {expected})")
        elements = math.prod(shape)
        bits, _ = DTYPES[dtype]
        if elements * bits % 8:
            raise WeightFormatError(f"tensor {name!r}: {elements} elements of {dtype} are not whole bytes")
        if end - begin != elements * bits // 8:
            raise WeightFormatError(f"tensor {name!r}: {end - begin} bytes for shape {list(shape)} of "
                                    f"{dtype}, which needs {elements * bits // 8}")
        if end > data_size:
            raise WeightFormatError(f"tensor {name!r}: bytes {begin}..{end} lie past the end of the "
                                    f"{data_size}-byte data section")
        infos.append(_info(TensorInfo, name, dtype, shape, start + begin, end - begin))
        expected = end
    if expected != data_size:
        raise WeightFormatError(f"the data section has {data_size} bytes but the tensors cover {expected}")
    return metadata, {info.name: info for info in infos}


def _entry(name: str, entry: object) -> tuple[str, str, tuple[int, ...], int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise WeightFormatError(f"tensor {name!r}: needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise WeightFormatError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**63 for d in shape):
        raise WeightFormatError(f"tensor {name!r}: shape must be a list of non-negative integers")
    _check_viewable(name, dtype, shape)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and 0 <= o < 2**63 for o in offsets) or offsets[0] > offsets[1]):
        raise WeightFormatError(f"tensor {name!r}: data_offsets must be [begin, end] with begin <= end")
    return name, dtype, tuple(shape), offsets[0], offsets[1]


def _check_viewable(name: str, dtype: str, shape: list[int]) -> None:
    """A shape numpy can view: at most 64 dims, and the product of the non-zero dims times
    the item size fits in an intp (numpy checks it even when another dim is 0)."""
    if len(shape) > MAX_DIMS:
        raise WeightFormatError(f"tensor {name!r}: {len(shape)} dimensions, numpy allows at most "
                                f"{MAX_DIMS}")
    itemsize = max(1, DTYPES[dtype][0] // 8)
    product = itemsize
    for d in shape:
        if d:
            product *= d
            if product > INTP_MAX:
                raise WeightFormatError(f"tensor {name!r}: shape {shape} overflows (numpy cannot "
                                        "view it)")


def _info(TensorInfo: type[TensorInfo], name: str, dtype: str, shape: tuple[int, ...],
          offset: int, nbytes: int) -> TensorInfo:
    bits, _ = DTYPES[dtype]
    np_dtype = numpy_dtype(dtype)
    if np_dtype is not None:
        view_shape = shape
    elif bits in _RAW:  # numpy lacks it: the same bits as unsigned integers
        np_dtype, view_shape = np.dtype(_RAW[bits]), shape
    else:  # sub-byte: raw bytes
        np_dtype, view_shape = np.dtype(np.uint8), (nbytes,)
    return TensorInfo(name, dtype, shape, offset, nbytes, np_dtype, view_shape)


def _file_dtype(array: np.ndarray) -> str:
    name = array.dtype.name
    for file_name, (_, np_name) in DTYPES.items():
        if np_name == name:
            return file_name
    raise WeightFormatError(f"safetensors has no dtype for numpy {array.dtype}")


def _little_endian(array: np.ndarray) -> np.ndarray:
    """The array with little-endian items (safetensors' byte order), C-contiguous."""
    dtype = array.dtype
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and sys.byteorder == "big"):
        dtype = dtype.newbyteorder("<")
    return np.ascontiguousarray(array, dtype=dtype)  # copies one tensor at most


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def save_safetensors(path: StrOrBytesPath, tensors: Mapping[str, npt.ArrayLike],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> array) to a safetensors file, one tensor at a time.

    The whole file is never built in memory: the header is written, then each array's
    bytes, little-endian whatever the array's byte order and layout. Tensors are ordered by
    decreasing item size and the data section starts 64-byte aligned, so every tensor is
    naturally aligned in the file. The file appears atomically: it is written to a new,
    uniquely named file beside it, then renamed over it, so concurrent savers never mix
    their bytes, and on any failure the temporary file is removed and an existing file at
    ``path`` is left untouched.

    Args:
        path: Where to write: str, bytes or os.PathLike.
        tensors: A mapping of names (str, not "__metadata__") to arrays or array-likes.
        metadata: Optional str -> str, stored as "__metadata__".

    Raises:
        WeightFormatError: a name, metadata item or dtype safetensors cannot store.
        InvalidArgumentError: ``tensors`` is not a mapping, or ``path`` is not a path.
        OSError: the directory cannot be written (nothing is left behind).

    Example:
        >>> zm.save_safetensors("out.safetensors", {"w": np.ones((2, 3), np.float32)})
    """
    from ..errors import InvalidArgumentError

    try:
        target = os.fspath(path)
    except TypeError:
        raise InvalidArgumentError(f"path must be a str, bytes or os.PathLike, not "
                                   f"{type(path).__name__}") from None
    if not os.path.basename(target) or os.path.isdir(target):
        raise InvalidArgumentError(f"path must name a file, not a directory: {target!r}")
    if not isinstance(tensors, Mapping):
        raise InvalidArgumentError(f"tensors must be a mapping of names to arrays, not "
                                   f"{type(tensors).__name__}")
    if metadata is not None and (not isinstance(metadata, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise WeightFormatError("metadata must map strings to strings")
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise WeightFormatError(f"tensor names must be strings other than __metadata__: {name!r}")
        arrays[name] = np.asarray(value)
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    header: dict[str, Any] = {}
    offset = 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": _file_dtype(a), "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 64)
    directory, base = os.path.split(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.fsdecode(base)}.", suffix=".tmp",
                               dir=os.fsdecode(directory))
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would create it; mkstemp makes 0600
        with open(fd, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for name in order:
                f.write(_little_endian(arrays[name]).reshape(-1).view(np.uint8).data)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
