"""Buffer: one block of memory from an allocator, and how numpy views of it are tracked.

A Buffer is a handle (address, size, alignment) that its allocator frees. ``np.asarray(buf)``
is a zero-copy ``uint8`` view. The view does not point at the Buffer but at a small per-block
owner object that exposes ``__array_interface__``: every view derived from it (slices,
``.view(dtype)``, ``.reshape``) keeps that owner alive through its ``.base`` chain, so a weak
reference to the owner is dead exactly when no view is left. Allocators consult it before
releasing memory (the README's Promise 1): freeing, resizing or resetting memory that a live
view can still reach raises instead of leaving a dangling pointer for numpy to crash on.
Making an owner is also counted in C (``zm_guard_hold``), so a release racing it in another
thread is decided on the right side of it.
"""

from __future__ import annotations

import weakref

import numpy as np

from ._format import format_address, format_bytes
from ._ownership import OwnsCState

_FREED = -1   # Buffer._gen of a block given back with free()
_MOVING = -2  # Buffer._gen while C changes the block (resize, remap, realloc): see _rec


class _ViewOwner:
    """What numpy views of a Buffer hold on to; alive exactly while any view is."""

    __slots__ = ("__array_interface__", "buffer", "__weakref__")

    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer  # keeps the Buffer, hence its allocator, alive under the views
        self.__array_interface__ = {
            "shape": (buffer._nbytes,),
            "typestr": "|u1",
            "data": (buffer._address, False),
            "version": 3,
        }


class Buffer(OwnsCState):
    """A block of memory from a zigmem allocator.

    Attributes:
        address: Where the block starts (an integer, for ctypes or C code).
        nbytes: Its length in bytes.
        alignment: The alignment it was allocated with (a power of two).

    ``np.asarray(buf)`` is a zero-copy writable ``uint8`` view; on Python 3.12+
    ``memoryview(buf)`` works too. Give the Buffer back with ``allocator.free(buf)``, or
    with :meth:`free_when_unviewed` once the last view is gone. A Buffer cannot be copied
    or pickled (two handles would free one block twice).

    Example:
        >>> buf = zm.page_allocator.alloc(4096)
        >>> np.asarray(buf)[:4] = [1, 2, 3, 4]
        >>> zm.page_allocator.free(buf)
    """

    # Read-only properties over private slots: a Buffer whose size a user could change would
    # let numpy views reach memory the block does not own.
    __slots__ = ("_address", "_nbytes", "_alignment", "_allocator", "_gen", "_owner", "_sites",
                 "_rec")

    address = property(lambda self: self._address, doc="Where the block starts.")
    nbytes = property(lambda self: self._nbytes, doc="Length of the block in bytes.")
    alignment = property(lambda self: self._alignment, doc="Alignment it was allocated with.")

    @property
    def allocator(self):
        """The allocator this block belongs to."""
        return self._allocator

    @property
    def is_live(self) -> bool:
        """False once the block was freed, or released by its allocator's reset / deinit."""
        if self._gen == _MOVING:
            self._allocator._check_usable(self, "inspect")  # settles it
        allocator = self._allocator
        return self._gen == allocator._g.generation and not allocator._closed

    def has_views(self) -> bool:
        """Whether numpy views (or memoryviews) of this block are still alive."""
        return self._owner is not None and self._owner() is not None

    def free_when_unviewed(self) -> None:
        """Free the block now if no view of it is alive, else when the last one dies (a KV
        slab replaced by growth while a caller still reads the old one)."""
        owner = self._owner() if self._owner is not None else None
        if owner is None:
            self._allocator.free(self)
        else:
            weakref.finalize(owner, _free_if_live, self)

    def __array__(self, dtype=None, copy=None):
        owner = self._owner() if self._owner is not None else None
        if owner is None:
            self._allocator._check_usable(self, "view")
            owner = _ViewOwner(self)
            self._allocator._note_view(owner)
            self._owner = weakref.ref(owner)
        array = np.asarray(owner)
        if dtype is not None and np.dtype(dtype) != array.dtype:
            return array.astype(dtype)
        return array.copy() if copy else array

    def __buffer__(self, flags: int) -> memoryview:  # Python 3.12+ (PEP 688)
        return memoryview(self.__array__())

    def __repr__(self) -> str:
        state = "live" if self.is_live else "released"
        return (
            f"<Buffer {format_address(self.address)} {format_bytes(self.nbytes)} "
            f"align={self.alignment} {state} from {type(self._allocator).__name__}>"
        )


def _free_if_live(buf: Buffer) -> None:
    if buf.is_live:
        buf._owner = None  # its last view just died
        buf._allocator.free(buf)


def new_buffer(allocator, address: int, nbytes: int, alignment: int, gen: int) -> Buffer:
    # object.__new__ plus slot stores: the cheapest way to build one on the alloc hot path.
    buf = _new(Buffer)
    buf._address = address
    buf._nbytes = nbytes
    buf._alignment = alignment
    buf._allocator = allocator
    buf._gen = gen
    buf._owner = None
    buf._sites = None
    buf._rec = None
    return buf


_new = object.__new__
