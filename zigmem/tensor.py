"""Tensor: an n-dimensional array whose data, shape and strides come from one allocator."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, SupportsIndex, TypeAlias

import numpy as np
import numpy.typing as npt

from . import _sites
from ._binding import CData, ffi, lib, raise_failure
from ._format import format_bytes
from ._ownership import OwnsCState
from .allocator import Allocator
from .buffer import _FREED, Buffer, new_buffer
from .dtypes import resolve
from .errors import (
    DanglingViewError, DoubleFreeError, InvalidArgumentError, OutOfMemoryError, UseAfterFreeError,
)

_here = _sites.here
_STALE = lib.ZM_ERR_STALE
_NO_SITES = (0, 0)
_tensor_init = lib.zm_py_tensor_init
_tensor_deinit = lib.zm_py_tensor_deinit

# What a shape may be given as: one integer, or a sequence of them, as numpy takes it.
ShapeLike: TypeAlias = "SupportsIndex | Sequence[SupportsIndex]"


class Tensor(OwnsCState):
    """The seed design's ``Tensor(T)``: its data, an owned copy of its shape and its strides
    (in elements), all three from ``allocator``; ``deinit`` frees all three.

    Init is all-or-nothing: if an allocation fails, those already made are freed before
    ``OutOfMemoryError`` is raised (Zig's errdefer, done in C).

    Args:
        allocator: Any zigmem allocator.
        shape: Non-negative integers (or one integer, as numpy); ``()`` is a 0-d tensor,
            zero-length dimensions work.
        dtype: float32, float16, bfloat16 (with ml_dtypes), float64, int8, uint8, int16,
            int32, int64 or bool.

    A Tensor cannot be copied or pickled (two handles would free one block twice); its
    blocks are recorded with the caller's site by a general-purpose allocator.

    Example:
        >>> with zm.Tensor(arena, (4, 64)) as t:
        ...     t.data[:] = 1.0            # zero-copy, C-contiguous numpy view
    """

    __slots__ = ("_t", "_allocator", "_gen", "_buf", "_shape", "_dtype", "_sites")

    # The slots' types (annotations only: no class attributes, so the slots stay as they are).
    _t: CData                   # zm_tensor_t *
    _allocator: Allocator
    _gen: int                   # the allocator's generation at init, or _FREED
    _buf: Buffer | None         # the data as a Buffer, made at the first .data
    _shape: tuple[SupportsIndex, ...]  # as given (C checked each dimension)
    _dtype: np.dtype[Any]
    _sites: tuple[int, int]     # (init site, deinit site) ids, 0 when not recorded

    def __init__(self, allocator: Allocator, shape: ShapeLike,
                 dtype: npt.DTypeLike = "float32") -> None:
        if not isinstance(allocator, Allocator):
            raise InvalidArgumentError(
                f"allocator must be a zigmem allocator, not {type(allocator).__name__}")
        self._gen = _FREED  # until init succeeds
        self._dtype = resolve(dtype)
        shape = self._shape = shape if shape.__class__ is tuple else _as_shape(shape)
        frames = allocator._site_frames
        site = _here(frames) if frames else 0
        t = _structs.pop() if _structs else ffi.new("zm_tensor_t *")
        while True:
            gen = allocator._gen_seen
            try:
                # cffi converts each dimension to int64 and C refuses negatives: the careful
                # check runs only when one of them fails.
                status = _tensor_init(allocator._g, gen, t, shape, len(shape),
                                      self._dtype.itemsize, site)
            except (TypeError, OverflowError, AttributeError):
                allocator._check_open("allocate a Tensor from")
                _check_shape(shape)
                raise
            if status != _STALE:
                break
            allocator._gen_seen = allocator._g.generation  # a release since: again
        if status:
            _structs.append(t)
            if status == lib.ZM_ERR_INVALID_ARG:
                _check_shape(shape)
            if status == lib.ZM_ERR_TOO_LARGE:
                raise _too_large(shape, self._dtype)
            raise_failure(f"Tensor({shape}, {self._dtype.name})", site)
        self._t = t
        self._allocator = allocator
        self._gen = gen
        self._buf = None  # the data as a Buffer, made at the first .data
        self._sites = (site, 0) if site else _NO_SITES

    @classmethod
    def from_numpy(cls, allocator: Allocator, array: npt.ArrayLike) -> Tensor:
        """A Tensor holding a copy of ``array`` (any layout; stored C-contiguous)."""
        array = np.asarray(array)
        tensor = cls(allocator, array.shape, array.dtype)
        tensor.data[...] = array
        return tensor

    @property
    def data(self) -> npt.NDArray[Any]:
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
    def dtype(self) -> np.dtype[Any]:
        return self._dtype

    @property
    def nbytes(self) -> int:
        return math.prod([operator.index(d) for d in self._shape]) * self._dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self._shape)

    def deinit(self) -> None:
        """Free the data, shape and strides.

        Raises:
            DoubleFreeError: already deinitialised.
            UseAfterFreeError: its allocator released the memory (reset or deinit).
            DanglingViewError: views of ``data`` are alive (nothing is freed).
        """
        allocator = self._allocator
        buf = self._buf
        gen = self._gen
        if buf is not None or gen != allocator._gen_seen:
            self._check_live("deinit", releasing=True)
            if buf is not None:
                if buf.has_views():
                    raise DanglingViewError(
                        f"cannot deinit {self!r}: numpy views of its data are still alive; "
                        "drop them (del the arrays) first")
                buf._gen = _FREED
        frames = allocator._site_frames
        site = _here(frames) if frames else 0
        self._gen = _FREED  # claimed before the GIL is released
        if site:
            self._sites = (self._sites[0], site)
        status = _tensor_deinit(allocator._g, gen, self._t, site)
        if status:
            if status == _STALE:  # released by a reset in another thread
                self._gen = gen
                allocator._gen_seen = allocator._g.generation
                self._check_live("deinit")
            raise_failure(f"{self!r}.deinit()", site)
        _structs.append(self._t)  # reusable: every later access checks _gen first

    def _check_live(self, action: str, releasing: bool = False) -> None:
        """Raise the precise error if the Tensor's memory is gone."""
        gen = self._gen
        if gen != _FREED and gen == self._allocator._g.generation:
            return
        what = f"Tensor(shape={self._shape}, dtype={self._dtype.name}, {format_bytes(self.nbytes)})"
        if gen == _FREED:
            sites = f"; allocated at {_sites.describe(self._sites[0])}" if self._sites[0] else ""
            if self._sites[1]:
                sites += f"; deinitialised at {_sites.describe(self._sites[1])}"
            if releasing:
                raise DoubleFreeError(f"double deinit of {what}{sites}")
            raise UseAfterFreeError(f"cannot {action} {what}: it was deinitialised{sites}")
        raise UseAfterFreeError(
            f"cannot {action} {what}: {self._allocator._describe()} released its memory (a "
            "reset or deinit) after it was made")

    def _buffer(self, action: str) -> Buffer:
        """The data as a Buffer (views and their tracking go through it)."""
        self._check_live(action)
        buf = self._buf
        if buf is None:
            buf = self._buf = new_buffer(self._allocator, self._t.data, self._t.nbytes, 64,
                                         self._gen)
        return buf

    def __enter__(self) -> Tensor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.deinit()

    def __repr__(self) -> str:
        live = self._gen != _FREED and self._gen == self._allocator._g.generation
        return (f"Tensor(shape={self._shape}, dtype={self._dtype.name}, "
                f"{'live' if live else 'released'})")


# zm_tensor_t structs of deinitialised Tensors, reused: ffi.new costs more than the C call.
_structs: list[CData] = []


def _as_shape(shape: Any) -> tuple[SupportsIndex, ...]:
    """``shape`` as a tuple: one integer, or anything iterable (whatever the user passed:
    Any, as it is checked here and by C; a non-iterable is InvalidArgumentError)."""
    if isinstance(shape, int) or (hasattr(shape, "__index__") and not hasattr(shape, "__len__")):
        return (shape,)
    try:
        return tuple(shape)
    except TypeError:
        raise InvalidArgumentError(
            f"shape must be a sequence of integers, not {type(shape).__name__}") from None


def _too_large(shape: tuple[SupportsIndex, ...], dtype: np.dtype[Any]) -> OutOfMemoryError:
    span = math.prod(n for n in map(int, shape) if n) * dtype.itemsize
    return OutOfMemoryError(f"Tensor({shape}, {dtype.name}): its dimensions span {span} bytes, "
                            "beyond what an array can address")


def _check_shape(shape: tuple[SupportsIndex, ...]) -> None:
    """Raise the precise error for a shape C or cffi refused."""
    try:
        dims = tuple(d.__index__() for d in shape)
    except (TypeError, AttributeError):
        raise InvalidArgumentError(f"shape must be a sequence of integers, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise InvalidArgumentError(f"shape {dims} has a negative dimension")
    if any(d >= 2**63 for d in dims):
        raise InvalidArgumentError(f"shape {dims} has a dimension beyond int64")
