"""Allocator: the interface every zigmem allocator shares, over one C ``zm_allocator_t``.

Subclasses build their C state and fill ``self._c``; everything else lives here, once:
``alloc`` / ``resize`` / ``realloc`` / ``free``, the checks that keep Python from reaching
freed memory (DESIGN.md, Promises 1-3), ``deinit`` and the context manager.

Lifetimes in the Python layer mirror the C ones: a Buffer holds its allocator, a wrapper
holds its child, a numpy view holds its Buffer. So no C state is released while anything
in Python can still reach it, and an allocator that is garbage collected without ``deinit``
can release its memory safely.
"""

from __future__ import annotations

import weakref

from . import _sites
from ._binding import check_alignment, check_size, ffi, lib, raise_failure
from ._format import format_address, format_bytes
from .buffer import Buffer, new_buffer
from .errors import (
    DanglingViewError,
    DoubleFreeError,
    InvalidArgumentError,
    InvalidFreeError,
    MemorySafetyError,
    UseAfterFreeError,
)

_py_alloc = lib.zm_py_alloc
_py_free = lib.zm_py_free

_FREED = -1  # Buffer._gen of a block given back with free()


class Allocator:
    """Base class of every allocator: ``alloc(nbytes, alignment=64)`` and friends.

    Class attributes subclasses set:
        thread_safe: The C allocator tolerates concurrent calls by itself. When it (or any
            child) does not, calls from Python take one process-wide lock, because cffi
            releases the GIL around C calls.
        releases_memory: ``deinit`` (and ``reset``) give memory back, so they must first
            prove that no numpy view can still reach it.
    """

    thread_safe = False
    releases_memory = False

    def __init__(self, children: tuple[Allocator, ...] = ()) -> None:
        for child in children:
            child._check_open("wrap")
        self._c = ffi.new("zm_allocator_t *")
        self._children = children
        self._users: list[str] = []  # parents that allocate from this one in C
        self._serialize = int(not (self.thread_safe and all(not c._serialize for c in children)))
        self._generation = 0
        self._closed = False
        self._views: weakref.WeakSet = weakref.WeakSet()
        self._live: dict[int, Buffer] | None = None  # set by _track_sites
        self._site_frames = 0
        self._numpy_bridge = None  # created by the first numpy() block
        for child in children:
            child._users.append(type(self).__name__)

    # ------------------------------------------------------------ the allocator interface

    def alloc(self, nbytes: int, alignment: int = 64) -> Buffer:
        """Allocate ``nbytes`` bytes aligned to ``alignment`` (any power of two).

        Args:
            nbytes: Size in bytes; 0 gives an empty Buffer.
            alignment: A power of two, possibly larger than a page.

        Returns:
            A :class:`Buffer`; its memory is uninitialised.

        Raises:
            OutOfMemoryError: The allocator (or the OS, or a limit) refused.
            InvalidArgumentError: Negative size, alignment not a power of two.
        """
        if self._closed:
            self._check_open("alloc")
        try:
            address = _py_alloc(self._c, nbytes, alignment, self._serialize)
        except (TypeError, OverflowError):
            check_size(nbytes, "nbytes")
            check_alignment(alignment)
            raise
        if not address:
            raise_failure(f"{type(self).__name__}.alloc({nbytes}, alignment={alignment})")
        buf = new_buffer(self, address, nbytes, alignment)
        if self._live is not None:
            self._track(buf)
        return buf

    def free(self, buf: Buffer) -> None:
        """Give ``buf`` back. Its views must be gone; the Buffer is unusable afterwards.

        Raises:
            DoubleFreeError: ``buf`` was already freed.
            UseAfterFreeError: A reset or deinit already released it.
            InvalidFreeError: ``buf`` belongs to another allocator.
            DanglingViewError: numpy views of ``buf`` are alive.
        """
        if buf.__class__ is not Buffer or buf._allocator is not self or buf._owner is not None \
                or buf._gen != self._generation:
            self._check_release(buf, "free", releasing=True)
        # Claim the block before the GIL is released, so a racing free of the same Buffer
        # from another thread sees it freed instead of freeing it twice in C.
        buf._gen = _FREED
        _py_free(self._c, buf._address, buf._nbytes, buf._alignment, self._serialize)
        if self._live is not None:
            self._untrack(buf)

    def resize(self, buf: Buffer, new_nbytes: int) -> bool:
        """Grow or shrink ``buf`` in place. False (and ``buf`` unchanged) when it cannot."""
        self._check_release(buf, "resize")
        new_nbytes = check_size(new_nbytes, "new_nbytes")
        ok = lib.zm_py_resize(self._c, buf._address, buf._nbytes, buf._alignment, new_nbytes,
                              self._serialize)
        if ok:
            buf._nbytes = new_nbytes
        return bool(ok)

    def remap(self, buf: Buffer, new_nbytes: int) -> Buffer | None:
        """Resize ``buf`` without copying: in place, or by moving its pages (``mremap``).

        Returns the resized Buffer (``buf`` is consumed), or None when the allocator cannot
        do it without a copy (``buf`` unchanged): then ``realloc`` copies.
        """
        address = self._move(buf, new_nbytes, lib.zm_py_remap, "remap")
        return None if address is None else self._successor(buf, address, new_nbytes)

    def realloc(self, buf: Buffer, new_nbytes: int) -> Buffer:
        """Resize ``buf``, moving it if needed (contents kept up to the smaller size).

        Returns a new Buffer; ``buf`` is consumed. On OutOfMemoryError ``buf`` is untouched.
        """
        address = self._move(buf, new_nbytes, lib.zm_py_realloc, "realloc")
        if address is None:
            raise_failure(f"{type(self).__name__}.realloc({buf._nbytes} -> {new_nbytes})")
        return self._successor(buf, address, new_nbytes)

    def _move(self, buf: Buffer, new_nbytes: int, c_call, action: str) -> int | None:
        """Call remap / realloc in C with ``buf`` claimed; None (``buf`` intact) on failure.
        ``c_call(c_allocator, address, nbytes, alignment, new_nbytes, serialize)``."""
        self._check_release(buf, action)
        new_nbytes = check_size(new_nbytes, "new_nbytes")
        gen, buf._gen = buf._gen, _FREED  # claimed, as in free()
        address = c_call(self._c, buf._address, buf._nbytes, buf._alignment, new_nbytes,
                         self._serialize)
        if not address:
            buf._gen = gen
            return None
        return address

    def _successor(self, buf: Buffer, address: int, new_nbytes: int) -> Buffer:
        """The Buffer that replaces ``buf`` (already consumed) after a remap / realloc."""
        if self._live is not None:
            self._untrack(buf)
        new = new_buffer(self, address, new_nbytes, buf._alignment)
        if self._live is not None:
            self._track(new)
        return new

    def deinit(self) -> None:
        """Release everything this allocator holds. Idempotent.

        Raises:
            DanglingViewError: numpy views of its memory are alive (nothing is released).
            MemorySafetyError: another allocator still allocates from this one.
        """
        if self._closed:
            return
        if self._users:
            raise MemorySafetyError(
                f"cannot deinit {self._describe()}: {', '.join(self._users)} still allocates "
                "from it; deinit that first"
            )
        if self.releases_memory:
            self._check_no_views("deinit", DanglingViewError)
        self._close()

    def numpy(self):
        """Serve numpy's own data allocations from this allocator inside a ``with`` block.

        Every numpy data buffer made in the block (``np.empty``, ufunc and matmul outputs,
        temporaries) comes from this allocator; each array frees into it when it dies, also
        after the block. Resetting or deinitialising the allocator while such arrays live
        raises (``ArenaEscapeError`` / ``DanglingViewError``). Affects the current thread or
        asyncio task only (NumPy keeps the handler in a ContextVar); blocks nest.

        Example:
            >>> with arena.numpy():
            ...     logits = hidden @ w_out      # temporaries and result in the arena
            ...     token = int(logits.argmax())
            >>> del logits
            >>> arena.reset("retain_capacity")
        """
        from .numpy_bridge import ServeNumpy

        return ServeNumpy(self, self._site_frames or 1)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.deinit()

    def __del__(self) -> None:
        # Unreachable means no Buffer and no view refers to our memory any more.
        try:
            if not self._closed and not self._users:
                self._close()
        except Exception:  # interpreter shutdown: modules may be half torn down
            pass

    def _close(self) -> None:
        """Release the C state and let go of the children (deinit, or collection)."""
        self._release()
        self._closed = True
        if self.releases_memory:
            self._generation += 1
        for child in self._children:
            child._users.remove(type(self).__name__)

    # ------------------------------------------------------------ hooks for subclasses

    def _release(self) -> None:
        """Give back the C state's memory (arena buffers, a caller's buffer)."""

    def _describe(self) -> str:
        return type(self).__name__

    def _locked(self, fn, *args):
        """Call a C function on this allocator's state under the same lock as alloc/free."""
        if not self._serialize:
            return fn(*args)
        lib.zm_py_lock()
        try:
            return fn(*args)
        finally:
            lib.zm_py_unlock()

    # ------------------------------------------------------------ checks (slow paths)

    def _check_open(self, action: str) -> None:
        if self._closed:
            raise UseAfterFreeError(f"cannot {action}: {self._describe()} was deinitialised")

    def _check_usable(self, buf: Buffer, action: str, releasing: bool = False) -> None:
        """Raise if ``buf`` no longer refers to memory this allocator holds for it; a freed
        block that is being released again is a double free, any other use of it a use
        after free."""
        if buf._gen == self._generation:
            return
        where = f"buffer {format_address(buf.address)} ({format_bytes(buf.nbytes)})"
        if buf._gen == _FREED:
            sites = ""
            if buf._sites:
                sites = (f"; allocated at {_sites.describe(buf._sites[0])}; "
                         f"first freed at {_sites.describe(buf._sites[1])}")
            if releasing:
                again = f"; freed again at {_sites.describe(_sites.here(8))}" if sites else ""
                raise DoubleFreeError(f"double free of {where}{sites}{again}")
            raise UseAfterFreeError(f"cannot {action} {where}: it was freed{sites}")
        raise UseAfterFreeError(
            f"cannot {action} {where}: {self._describe()} released it "
            "(reset or deinit) after it was allocated"
        )

    def _check_release(self, buf: Buffer, action: str, releasing: bool = False) -> None:
        """Everything ``free`` / ``resize`` / ``realloc`` must know before touching C."""
        if not isinstance(buf, Buffer):
            raise InvalidArgumentError(f"{action} expects a Buffer, got {type(buf).__name__}")
        if buf._allocator is not self:
            raise InvalidFreeError(
                f"cannot {action} buffer {format_address(buf.address)} "
                f"({format_bytes(buf.nbytes)}) through {self._describe()}: "
                f"it belongs to {buf._allocator._describe()}"
            )
        self._check_usable(buf, action, releasing)
        if buf.has_views():
            raise DanglingViewError(
                f"cannot {action} buffer {format_address(buf.address)} "
                f"({format_bytes(buf.nbytes)}): numpy views of it are still alive; "
                "drop them (del the arrays) first"
            )
        buf._owner = None  # dead, if it was set: the hot paths test for None

    def _check_no_views(self, action: str, error: type[DanglingViewError]) -> None:
        """Refuse ``action`` while numpy can still reach this allocator's memory: views of
        its Buffers, or arrays that numpy allocated from it (``numpy()`` blocks)."""
        bridge = self._numpy_bridge
        if bridge is not None and bridge.live_count:
            raise error(f"cannot {action} {self._describe()}: {bridge.describe_live()}; "
                        "nothing was released")
        owners = list(self._views)
        if not owners:
            return
        sizes = ", ".join(
            f"{format_address(o.buffer.address)} ({format_bytes(o.buffer.nbytes)})"
            for o in owners[:8]
        )
        more = f" and {len(owners) - 8} more" if len(owners) > 8 else ""
        raise error(
            f"cannot {action} {self._describe()}: numpy arrays still view {len(owners)} of its "
            f"blocks: {sizes}{more}; nothing was released"
        )

    def _note_view(self, owner) -> None:
        if self.releases_memory:
            self._views.add(owner)

    # ------------------------------------------------------------ site tracking

    def _track_sites(self, frames: int) -> None:
        """Remember live blocks and the Python sites of their alloc and free."""
        self._live = {}
        self._site_frames = frames

    def _track(self, buf: Buffer) -> None:
        buf._sites = (_sites.here(self._site_frames), 0)
        self._live[id(buf)] = buf

    def _untrack(self, buf: Buffer) -> None:
        self._live.pop(id(buf), None)
        buf._sites = (buf._sites[0], _sites.here(self._site_frames))

    def live_buffers(self) -> list[Buffer]:
        """Blocks allocated and not yet freed, when site tracking is on (else empty)."""
        return list(self._live.values()) if self._live is not None else []

