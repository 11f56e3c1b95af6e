"""FixedBufferAllocator: bump allocation inside a buffer the caller provides."""

from __future__ import annotations

from ._binding import ffi, lib
from .allocator import Allocator
from .buffer import Buffer
from .errors import ArenaEscapeError, InvalidArgumentError


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

    def __init__(self, buffer) -> None:
        self._source = buffer  # keeps a zigmem Buffer's view owner (hence memory) alive
        if isinstance(buffer, Buffer):
            buffer = buffer.__array__()
            self._source = buffer
        try:
            self._cbuf = ffi.from_buffer("char[]", buffer, require_writable=True)
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
        return self._state.len

    @property
    def used(self) -> int:
        """Bytes handed out so far, alignment padding included."""
        return self._state.end

    def owns(self, buf) -> bool:
        """Whether ``buf`` (a Buffer or an integer address) lies inside this allocator's buffer."""
        if isinstance(buf, Buffer):
            address = buf.address
        elif isinstance(buf, int) or hasattr(buf, "__index__"):
            address = buf.__index__()
        else:
            raise InvalidArgumentError(f"owns() takes a Buffer or an integer address, not "
                                       f"{type(buf).__name__}")
        start = int(ffi.cast("uintptr_t", self._cbuf))
        return start <= address < start + self._state.len

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
