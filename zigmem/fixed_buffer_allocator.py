"""FixedBufferAllocator: bump allocation inside a buffer the caller provides."""

from __future__ import annotations

from typing import TYPE_CHECKING, SupportsIndex

from ._binding import ffi, lib
from .allocator import Allocator
from .buffer import Buffer
from .errors import ArenaEscapeError, InvalidArgumentError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer


class FixedBufferAllocator(Allocator):
    """Allocates from ``buffer`` and never from anywhere else.

    Args:
        buffer: Any writable, C-contiguous Python buffer: ``bytearray``, a numpy array, an
            ``mmap``, a zigmem :class:`Buffer`. It is held (and, for a bytearray, cannot be
            resized) until ``deinit``.

    When the buffer is full, ``alloc`` raises ``OutOfMemoryError`` saying how much is left.
    Only the most recent allocation can be freed or resized in place; ``reset()`` forgets all.

    Example:
        >>> scratch = zm.FixedBufferAllocator(bytearray(1 << 20))
        >>> tmp = scratch.alloc(4096)
    """

    def __init__(self, buffer: Buffer | WriteableBuffer) -> None:
        self._source: object = buffer  # keeps a zigmem Buffer's view owner (hence memory) alive
        if isinstance(buffer, Buffer):
            self._source = buffer.__array__()
        try:
            self._cbuf = ffi.from_buffer("char[]", self._source, require_writable=True)
        except (TypeError, ValueError, BufferError) as e:
            raise InvalidArgumentError(
                f"FixedBufferAllocator needs a writable contiguous buffer: {e}"
            ) from None
        self._state = ffi.new("zm_fixed_buffer_t *")
        lib.zm_fixed_buffer_init(self._state, self._cbuf, len(self._cbuf))
        inner = ffi.new("zm_allocator_t *")
        lib.zm_fixed_buffer_allocator(self._state, inner)
        super().__init__(inner)

    @property
    def size(self) -> int:
        """Length of the underlying buffer."""
        size: int = self._state.len
        return size

    @property
    def used(self) -> int:
        """Bytes handed out so far, alignment padding included."""
        used: int = self._state.end
        return used

    def owns(self, buf: Buffer | SupportsIndex) -> bool:
        """Whether ``buf`` (a Buffer or an integer address) lies inside this allocator's buffer."""
        if isinstance(buf, Buffer):
            address = buf.address
        elif isinstance(buf, int) or hasattr(buf, "__index__"):
            address = buf.__index__()
        else:
            raise InvalidArgumentError(f"owns() takes a Buffer or an integer address, not "
                                       f"{type(buf).__name__}")
        start = int(ffi.cast("uintptr_t", self._cbuf))
        end: int = start + self._state.len
        return start <= address < end

    def reset(self) -> None:
        """Forget every allocation; the whole buffer is free again.

        Raises:
            ArenaEscapeError: numpy arrays still view memory from it; nothing is released.
            MemorySafetyError: an arena allocates from it and keeps its memory.
        """
        self._check_open("reset")
        self._release("reset", ArenaEscapeError, self._reset_chain("reset"),
                      lib.zm_py_fixed_buffer_reset, self._state)

    def _after_close(self) -> None:
        ffi.release(self._cbuf)  # lets a bytearray be resized again
        self._source = None

    def __repr__(self) -> str:
        return f"FixedBufferAllocator(size={self.size}, used={self.used})"
