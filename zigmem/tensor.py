"""Tensor: an n-dimensional array whose data, shape and strides come from one allocator."""

from __future__ import annotations

import math

import numpy as np

from ._binding import ffi, lib, raise_failure
from .allocator import _FREED, Allocator
from .buffer import new_buffer
from .dtypes import resolve
from .errors import InvalidArgumentError

class Tensor:
    """The seed design's ``Tensor(T)``: its data, an owned copy of its shape and its strides
    (in elements), all three from ``allocator``; ``deinit`` frees all three.

    Init is all-or-nothing: if an allocation fails, those already made are freed before
    ``OutOfMemoryError`` is raised (Zig's errdefer, done in C).

    Args:
        allocator: Any zigmem allocator.
        shape: Non-negative integers; ``()`` is a 0-d tensor, zero-length dimensions work.
        dtype: float32, float16, bfloat16 (with ml_dtypes), float64, int8, uint8, int16,
            int32, int64 or bool.

    Example:
        >>> with zm.Tensor(arena, (4, 64)) as t:
        ...     t.data[:] = 1.0            # zero-copy, C-contiguous numpy view
    """

    __slots__ = ("_t", "_allocator", "_gen", "_buf", "_shape", "_dtype")

    def __init__(self, allocator: Allocator, shape, dtype="float32") -> None:
        try:
            closed = allocator._closed
        except AttributeError:
            raise InvalidArgumentError(
                f"allocator must be a zigmem allocator, not {type(allocator).__name__}") from None
        if closed:
            allocator._check_open("allocate a Tensor from")
        self._dtype = resolve(dtype)
        shape = self._shape = tuple(shape)
        t = _structs.pop() if _structs else ffi.new("zm_tensor_t *")
        # cffi converts each dimension to int64 and C refuses negatives: the careful check
        # runs only when one of them fails.
        try:
            status = lib.zm_py_tensor_init(t, allocator._c, shape, len(shape),
                                           self._dtype.itemsize, allocator._serialize)
        except (TypeError, OverflowError):
            _check_shape(shape)
            raise
        if status:
            _structs.append(t)
            if status == lib.ZM_ERR_INVALID_ARG:
                _check_shape(shape)
            raise_failure(f"Tensor({shape}, {self._dtype.name})")
        self._t = t
        self._allocator = allocator
        self._gen = allocator._generation
        self._buf = None  # the data as a Buffer, made at the first .data

    @classmethod
    def from_numpy(cls, allocator: Allocator, array) -> Tensor:
        """A Tensor holding a copy of ``array`` (any layout; stored C-contiguous)."""
        array = np.asarray(array)
        tensor = cls(allocator, array.shape, array.dtype)
        tensor.data[...] = array
        return tensor

    @property
    def data(self) -> np.ndarray:
        """A zero-copy, C-contiguous numpy view of the elements.

        Raises:
            UseAfterFreeError: the Tensor was deinitialised (or its arena reset).
        """
        return self._buffer("use").__array__().view(self._dtype).reshape(self._shape)

    @property
    def shape(self) -> tuple[int, ...]:
        self._buffer("use")
        return tuple(ffi.unpack(ffi.cast("int64_t *", self._t.shape), self._t.ndim))

    @property
    def strides(self) -> tuple[int, ...]:
        """Strides in elements, C order (numpy's byte strides: ``t.data.strides``)."""
        self._buffer("use")
        return tuple(ffi.unpack(ffi.cast("int64_t *", self._t.strides), self._t.ndim))

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self._shape) * self._dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self._shape)

    def deinit(self) -> None:
        """Free the data, shape and strides.

        Raises:
            DoubleFreeError: already deinitialised.
            DanglingViewError: views of ``data`` are alive (nothing is freed).
        """
        allocator = self._allocator
        buf = self._buf
        if buf is not None or self._gen != allocator._generation:
            allocator._check_release(self._buffer(None), "deinit Tensor", releasing=True)
            buf = self._buf
        if buf is not None:
            buf._gen = _FREED
        self._gen = _FREED  # claimed before the GIL is released
        lib.zm_py_tensor_deinit(self._t, allocator._c, allocator._serialize)
        _structs.append(self._t)  # reusable: every later access checks _gen first

    def _buffer(self, action: str | None):
        """The data as a Buffer (views and their tracking go through it). With an action,
        raise UseAfterFreeError if the Tensor was deinitialised or its memory reset away."""
        buf = self._buf
        if buf is None:
            buf = new_buffer(self._allocator, 0, 0, 64)
            buf._gen = self._gen
            if self._gen != _FREED:
                buf._address, buf._nbytes = self._t.data, self._t.nbytes
            self._buf = buf
        if action is not None:
            self._allocator._check_usable(buf, f"{action} Tensor")
        return buf

    def __enter__(self) -> Tensor:
        return self

    def __exit__(self, *exc) -> None:
        self.deinit()

    def __repr__(self) -> str:
        state = "live" if self._gen == self._allocator._generation else "released"
        return f"Tensor(shape={self._shape}, dtype={self._dtype.name}, {state})"


# zm_tensor_t structs of deinitialised Tensors, reused: ffi.new costs more than the C call.
_structs: list = []


def _check_shape(shape: tuple) -> None:
    """Raise the precise error for a shape C or cffi refused."""
    try:
        dims = tuple(d.__index__() for d in shape)
    except (TypeError, AttributeError):
        raise InvalidArgumentError(f"shape must be a sequence of integers, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise InvalidArgumentError(f"shape {dims} has a negative dimension")
    if any(d >= 2**63 for d in dims):
        raise InvalidArgumentError(f"shape {dims} has a dimension beyond int64")
