"""QuantizedMatrix: a 2-D weight read in place from its mapped file, multiplied by C kernels.

``w.matrix(name)`` wraps the tensor's bytes in the mapping without copying them. ``matmul``
computes ``x @ dequantize(W).T`` straight from the ggml blocks (csrc/quant_matmul.c): each
task dequantizes a tile of W's rows into per-thread scratch, bit for bit as
``gguf.quants``, and dots it against every row of x, in float32. ``rows`` dequantizes only
the rows asked for (an embedding lookup).

Determinism: every output element is one dot product whose summation order depends only on
the number of columns and the kernel path, so results are bitwise equal for every thread
count, and row i of an n-row matmul equals the 1-row matmul of x[i].
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, NoReturn

import numpy as np
import numpy.typing as npt

from .._binding import ffi, lib, raise_failure
from ..errors import InvalidArgumentError, WeightFormatError
from .. import threads

if TYPE_CHECKING:
    from ..allocator import Allocator

# ggml type name -> id, for the types with kernels (dequantize, matmul, rows).
GGML_TYPE_IDS = {
    "F32": lib.ZM_GGML_F32, "F16": lib.ZM_GGML_F16, "BF16": lib.ZM_GGML_BF16,
    "Q4_0": lib.ZM_GGML_Q4_0, "Q4_1": lib.ZM_GGML_Q4_1, "Q5_0": lib.ZM_GGML_Q5_0,
    "Q5_1": lib.ZM_GGML_Q5_1, "Q8_0": lib.ZM_GGML_Q8_0, "Q2_K": lib.ZM_GGML_Q2_K,
    "Q3_K": lib.ZM_GGML_Q3_K, "Q4_K": lib.ZM_GGML_Q4_K, "Q5_K": lib.ZM_GGML_Q5_K,
    "Q6_K": lib.ZM_GGML_Q6_K, "IQ4_NL": lib.ZM_GGML_IQ4_NL,
}
SUPPORTED_TYPES = tuple(GGML_TYPE_IDS)

KERNEL_PATHS = {"portable": lib.ZM_KERNELS_PORTABLE, "avx2": lib.ZM_KERNELS_AVX2,
                "avx512": lib.ZM_KERNELS_AVX512}
_PATH_NAMES = {v: k for k, v in KERNEL_PATHS.items()}


def type_id(dtype: str, what: str) -> int:
    """The ggml id of a supported type, or InvalidArgumentError naming ``what`` and the type."""
    try:
        ggml: int = GGML_TYPE_IDS[dtype]
        return ggml
    except KeyError:
        raise InvalidArgumentError(
            f"{what}: type {dtype} is not supported (supported: {', '.join(SUPPORTED_TYPES)})"
        ) from None


def dequantize_bytes(ggml: int, data: np.ndarray, shape: tuple[int, ...],
                     allocator: Allocator | None, what: str) -> np.ndarray:
    """``data`` (a tensor's bytes) as a float32 array of ``shape`` from ``allocator``."""
    from ..allocator import Allocator
    from ..page_allocator import page_allocator

    if allocator is not None and not isinstance(allocator, Allocator):
        raise InvalidArgumentError(f"allocator must be a zigmem allocator or None, not "
                                   f"{type(allocator).__name__}")
    with (allocator or page_allocator).numpy():
        out = np.empty(shape, np.float32)
    n = out.size
    if n and lib.zm_dequantize(ggml, ffi.cast("void *", data.ctypes.data), n,
                               ffi.cast("float *", out.ctypes.data)):
        raise WeightFormatError(f"{what}: cannot dequantize {n} elements")
    return out


def kernel_path() -> str:
    """The kernel path in use: "avx512", "avx2" or "portable" (see ZIGMEM_KERNELS)."""
    name: str = _PATH_NAMES[lib.zm_kernels_get()]
    return name


def use_kernels(path: str) -> None:
    """Force a kernel path for the whole process (tests cover every path this way).

    Raises:
        InvalidArgumentError: unknown path, or one this CPU cannot run.
    """
    if path not in KERNEL_PATHS:
        raise InvalidArgumentError(f"kernel path must be one of {sorted(KERNEL_PATHS)}, not {path!r}")
    if lib.zm_kernels_set(KERNEL_PATHS[path]):
        raise InvalidArgumentError(f"this CPU cannot run the {path} kernels")


def supported_kernel_paths() -> list[str]:
    """The kernel paths this CPU can run."""
    return [name for name, p in KERNEL_PATHS.items() if lib.zm_kernels_supported(p)]


_matmul = lib.zm_quant_matmul
_from_buffer = ffi.from_buffer
_INT16: int = lib.ZM_MATMUL_INT16

_forced = os.environ.get("ZIGMEM_KERNELS")
if _forced and _forced not in supported_kernel_paths():
    warnings.warn(f"ZIGMEM_KERNELS={_forced!r} is not a kernel path this CPU runs "
                  f"({', '.join(supported_kernel_paths())}); using {kernel_path()}",
                  RuntimeWarning, stacklevel=2)


_F32 = np.dtype(np.float32)


def _float32_array(value: object, what: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        kind = f"a numpy {type(value).__name__} scalar" if isinstance(value, np.generic) else type(value).__name__
        raise InvalidArgumentError(f"{what} must be a numpy float32 array, not {kind}")
    if value.dtype != _F32:
        raise InvalidArgumentError(f"{what} must be float32, not {value.dtype} (convert it "
                                   "explicitly: zigmem does not cast behind your back)")
    if not value.flags.c_contiguous:
        raise InvalidArgumentError(f"{what} must be C-contiguous")
    return value


def _int16_flags(flag: object) -> int:
    """The C flags of ``quantize_activations=flag`` when it is not False (checked inline)."""
    if flag is True:
        return _INT16
    raise InvalidArgumentError(f"quantize_activations must be True or False, not {flag!r}")


def _check_out(out: np.ndarray, shape: tuple[int, ...], name: str) -> None:
    _float32_array(out, "out")
    if out.shape != shape:
        raise InvalidArgumentError(f"{name}: out must have shape {list(shape)}, not {list(out.shape)}")
    if not out.flags.writeable:
        raise InvalidArgumentError("out is read-only")


class QuantizedMatrix:
    """A 2-D weight of a weight file, read in place: ``matmul``, ``rows``, ``dequantize``.

    Made by :meth:`WeightFile.matrix`. Holds the file's mapping, so it keeps working after
    ``WeightFile.close()`` (the mapping goes when the last matrix and view die).

    Attributes:
        name: The tensor's name.
        shape: ``(out_features, in_features)``, numpy order (GGUF dims reversed).
        dtype: The type as the file names it ("Q4_K", "F16", ...).
        nbytes: Bytes of the weight in the file.

    Example:
        >>> w = zm.load_weights("model.gguf")
        >>> q = w.matrix("blk.0.attn_q.weight")
        >>> y = q.matmul(x)                  # x: float32 [in] or [n, in]
        >>> e = w.matrix("token_embd.weight").rows([1, 2, 3])
    """

    __slots__ = ("name", "shape", "dtype", "nbytes", "_type", "_data", "_ptr", "__weakref__")

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], data: np.ndarray) -> None:
        """Wrap ``data``, the C-contiguous bytes of a ``shape`` matrix of type ``dtype``
        (``WeightFile.matrix`` does this; the bytes' size is checked against the shape)."""
        self._type = type_id(dtype, f"matrix {name!r}")
        if len(shape) != 2:
            raise InvalidArgumentError(f"matrix {name!r}: a matrix has 2 dimensions, this "
                                       f"tensor has shape {shape}")
        rows, cols = (int(d) for d in shape)
        block, size = ffi.new("uint32_t *"), ffi.new("uint32_t *")
        lib.zm_ggml_type_size(self._type, block, size)
        if not isinstance(data, np.ndarray):
            raise InvalidArgumentError(f"matrix {name!r}: data must be a numpy array of the "
                                       f"matrix's bytes, not {type(data).__name__}")
        if not data.flags.c_contiguous:
            raise InvalidArgumentError(f"matrix {name!r}: data must be a C-contiguous array")
        if rows < 0 or cols < 0 or cols % block[0] or data.nbytes != rows * (cols // block[0]) * size[0]:
            raise InvalidArgumentError(
                f"matrix {name!r}: {data.nbytes} bytes do not hold a {rows}x{cols} {dtype} matrix "
                f"(rows of {block[0]}-element blocks of {size[0]} bytes)")
        self.name, self.dtype, self.shape = name, dtype, (rows, cols)
        self._data = data.reshape(-1).view(np.uint8)  # holds the mapping
        self.nbytes = self._data.size
        self._ptr = ffi.cast("const void *", self._data.ctypes.data if self.nbytes else 0)
        threads.scratch_allocator()  # the pool gets its scratch allocator before any matmul

    def matmul(self, x: np.ndarray, out: np.ndarray | None = None, *,
               quantize_activations: bool = False) -> np.ndarray:
        """``x @ dequantize(W).T``, computed from the blocks with no dequantized copy of W.

        Args:
            x: float32, C-contiguous, shape ``[in_features]`` or ``[n, in_features]``.
                Other dtypes are refused rather than cast.
            out: Where to write: a C-contiguous float32 array of shape ``[out_features]`` or
                ``[n, out_features]`` not overlapping ``x``. Default: a new array from
                numpy (inside ``with arena.numpy():`` it lands in the arena).
            quantize_activations: False (default): float32 activations; the result equals
                ``x @ dequantize(W).T`` up to float32 summation order. True: each row of x is
                quantized to int16 per 32 columns and met with integer dots, as llama.cpp
                does with 8 bits: ~1.5x faster for a few rows (a decode step). Each element
                of x moves by at most half a step of its block (the block's largest
                magnitude / 65534): ~1e-5 relative for typical activations, fewer bits for
                an element far smaller than an outlier beside it. Rows of any magnitude
                keep their range (each row is scaled by a power of two first); a row holding
                NaN or infinity gives NaN. Deterministic and batch invariant, the same bits on
                every kernel path. F32, F16 and BF16 weights ignore it.

        Returns:
            ``out``: float32 ``[out_features]`` or ``[n, out_features]``.

        Raises:
            InvalidArgumentError: wrong type, dtype, shape or layout of ``x`` or ``out``, or
                ``out`` overlapping ``x`` (nothing is written).
            OutOfMemoryError: the kernel scratch could not be allocated (nothing written).

        Example:
            >>> logits = w.matrix("output.weight").matmul(hidden)
        """
        rows, cols = self.shape
        shape: tuple[int, ...]
        # The common case first, cheaply: ~200 calls per generated token.
        if not (type(x) is np.ndarray and x.dtype is _F32 and x.flags.c_contiguous):
            _float32_array(x, "x")
        if x.ndim == 1 and x.shape[0] == cols:
            n, shape = 1, (rows,)
        elif x.ndim == 2 and x.shape[1] == cols:
            n, shape = x.shape[0], (x.shape[0], rows)
        else:
            raise InvalidArgumentError(f"{self.name}: x must have shape [{cols}] or [n, {cols}] "
                                       f"for a {rows}x{cols} matrix, not {list(x.shape)}")
        if out is None:
            out = np.empty(shape, _F32)
        else:
            _check_out(out, shape, self.name)
        if n and rows:
            # from_buffer: the arrays' own memory, no copy; C checks that out overlaps
            # neither x nor the weight before it writes anything.
            if _matmul(self._type, self._ptr, rows, cols, _from_buffer("float[]", x), n,
                       _from_buffer("float[]", out), 0 if quantize_activations is False
                       else _int16_flags(quantize_activations)):
                if lib.zm_last_report().limit == 1:
                    raise InvalidArgumentError(f"{self.name}: out must not overlap x or the weight")
                raise_failure(f"{self.name}.matmul")
        return out

    def rows(self, ids: npt.ArrayLike, out: np.ndarray | None = None) -> np.ndarray:
        """The dequantized rows ``ids`` (an embedding lookup); nothing else is read.

        Args:
            ids: An integer or an array-like of integers (any shape), each in
                ``[0, out_features)``; negative ids are out of range, not wrapped.
            out: Where to write: C-contiguous float32 of shape ``ids.shape + (in_features,)``.

        Returns:
            float32 array of shape ``ids.shape + (in_features,)``.

        Raises:
            InvalidArgumentError: non-integer ids, an id out of range (naming it), or a bad
                ``out`` (nothing is written).

        Example:
            >>> hidden = w.matrix("token_embd.weight").rows(token_ids)
        """
        rows, cols = self.shape
        ids_arr = np.asarray(ids)
        # (an empty list is float64 to numpy: no ids, not a wrong type)
        if ids_arr.dtype.kind not in "iu" and (ids_arr.size or isinstance(ids, np.ndarray)):
            raise InvalidArgumentError(f"{self.name}: ids must be integers, not {ids_arr.dtype}")
        shape = (*ids_arr.shape, cols)
        if ids_arr.size:
            lo, hi = ids_arr.min(), ids_arr.max()
            if lo < 0 or hi >= rows:
                bad = lo if lo < 0 else hi
                raise InvalidArgumentError(f"{self.name}: row id {int(bad)} is out of range "
                                           f"[0, {rows})")
        flat = np.ascontiguousarray(ids_arr.reshape(-1), dtype=np.int64)
        if out is None:
            out = np.empty(shape, _F32)
        else:
            _check_out(out, shape, self.name)
            if np.may_share_memory(out, self._data):
                raise InvalidArgumentError(f"{self.name}: out must not overlap the weight")
        if out.size:
            if lib.zm_quant_rows(self._type, self._ptr, rows, cols,
                                 _from_buffer("int64_t[]", flat), flat.size,
                                 _from_buffer("float[]", out)):
                raise_failure(f"{self.name}.rows")
        return out

    def dequantize(self, allocator: Allocator | None = None) -> np.ndarray:
        """The whole matrix as float32 ``shape``, in memory from ``allocator``.

        Bit-exact against ``gguf.quants.dequantize``; the array frees into ``allocator``
        (default: the page allocator) when it dies.

        Example:
            >>> dense = q.dequantize(zm.CountingAllocator(name="dequantized weights"))
        """
        return dequantize_bytes(self._type, self._data, self.shape, allocator, self.name)

    def __repr__(self) -> str:
        return f"<QuantizedMatrix {self.name} {self.dtype} {self.shape[0]}x{self.shape[1]}>"

    def __copy__(self) -> NoReturn:
        raise TypeError("QuantizedMatrix cannot be copied: it shares its file's mapping; "
                        "use the same object, or w.matrix(name) again")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("QuantizedMatrix cannot be deep-copied: it reads its file's mapping; "
                        "use dequantize() for an array you own")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("QuantizedMatrix cannot be pickled: it reads a mapped file; pickle "
                        "the path and call load_weights(path).matrix(name) again")
