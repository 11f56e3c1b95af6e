"""Allocator: the interface every zigmem allocator shares, over one guarded C allocator.

A subclass builds its C state and hands its ``zm_allocator_t`` to ``Allocator.__init__``,
which puts it behind a guard (``csrc/guard.c``); everything else lives here, once:
``alloc`` / ``resize`` / ``remap`` / ``realloc`` / ``free``, releases (``reset``, ``deinit``),
the checks that keep Python from reaching freed memory, and call-site recording.

How liveness is kept (the README's promise table):

* A Buffer is stamped with its allocator's generation; every reset or deinit of the
  allocator, or of any allocator below it, bumps it in C under the guard, in the same
  critical section as the release itself. A stale Buffer can neither be used nor viewed.
* A release takes the guards of the allocator and of every allocator above it (wrappers),
  and is refused while numpy can reach any of their blocks: a view of a Buffer (counted in
  C when made, listed in Python for the message) or an array numpy allocated inside a
  ``numpy()`` block (counted by the bridge in C).
* An allocator wrapped by an arena (which keeps the child's memory between calls) refuses
  ``reset`` as it refuses ``deinit``; pass-through wrappers (counting, failing) only see
  their blocks end with it.
* Operations that change a Buffer claim it before the C call and let C write the result
  into a record the Buffer holds, so an exception landing right after the call (a
  KeyboardInterrupt) leaves a Buffer that settles itself on its next use, never a lost or
  doubly owned block.
* No lock is ever held while Python code runs: each C call takes and drops its locks.
"""

from __future__ import annotations

import weakref

from . import _sites
from ._binding import check_alignment, check_size, failure, ffi, lib
from ._concurrency import snapshot
from ._format import format_address, format_bytes
from ._ownership import OwnsCState
from .buffer import _FREED, _MOVING, Buffer, new_buffer
from .numpy_bridge import NumpyBridge
from .errors import (
    DanglingViewError,
    DoubleFreeError,
    InvalidArgumentError,
    InvalidFreeError,
    MemorySafetyError,
    UseAfterFreeError,
)

_guard_alloc = lib.zm_guard_alloc
_guard_free = lib.zm_guard_free
_here = _sites.here
_new = object.__new__
_STALE = lib.ZM_ERR_STALE


class Allocator(OwnsCState):
    """Base class of every allocator: ``alloc(nbytes, alignment=64)`` and friends.

    Class attributes subclasses set:
        thread_safe: The C allocator tolerates concurrent calls by itself, so calls share
            its guard; otherwise each call (from Python, a wrapper or numpy) takes it alone.
        retains_child_memory: It keeps memory from its child between calls (an arena), so
            the child must not be reset under it.
    """

    thread_safe = False
    retains_child_memory = False
    _g = None          # the guard (zm_guard_t *), set by __init__
    _gen_seen = 0
    _c_users: list = []  # (is_alive, name) of C code holding memory from it, per instance
    _site_frames = 0   # Python frames recorded per allocation (0: none)
    _live = None       # id -> Buffer, while site tracking is on (testing's sweep)

    def __new__(cls, *args, **kwargs):
        if cls is Allocator:
            raise TypeError("zm.Allocator is the interface every allocator shares and cannot "
                            "be instantiated; use PageAllocator, ArenaAllocator, ...")
        return super().__new__(cls)

    def __init__(self, inner, children: tuple[Allocator, ...] = (), guard_init=None) -> None:
        """``inner``: the subclass's ``zm_allocator_t *``; ``children``: what it wraps (checked
        with :meth:`_wrap` before the subclass read them); ``guard_init(guard)``: for C
        allocators that bring their own guard hooks (the GPA)."""
        g = ffi.new("zm_guard_t *")
        if guard_init is None:
            lib.zm_guard_init(g, inner[0], self.thread_safe)
        else:
            guard_init(g)
        self._g = ffi.gc(g, lib.zm_guard_deinit)
        # The generation as last seen from Python: what new Buffers are stamped with. C
        # checks every stamp, so a stale value (a release in another thread) only costs a
        # refresh and a retry.
        self._gen_seen = 0
        self._own_chain = (ffi.new("zm_guard_t *[1]", [g]), ffi.new("uint64_t[1]"))
        self._c = ffi.new("zm_allocator_t *")
        lib.zm_guard_allocator(self._g, self._c)
        self._children = tuple(children)
        self._parents: list[weakref.ref] = []  # allocators that wrap this one
        self._views: weakref.WeakSet = weakref.WeakSet()  # view owners of its Buffers
        self._numpy_bridge = None  # created by the first numpy() block
        self._collect_when_unused = False
        self._c_users = []
        for child in self._children:
            child._parents.append(weakref.ref(self))

    def _add_c_user(self, owner, name: str) -> None:
        """C code that is not an allocator holds memory from this one (a PagedKVCache's pool;
        the kernels' worker pool, ``owner`` None: for the rest of the process): deinit and
        reset are refused, naming it, while ``owner`` is alive and has not removed itself."""
        alive = (lambda: True) if owner is None else weakref.ref(owner)
        self._c_users.append((alive, name))

    def _remove_c_user(self, owner) -> None:
        self._c_users = [(alive, name) for alive, name in self._c_users
                         if alive() is not None and alive() is not owner]

    def _c_user_names(self) -> list[str]:
        return [name for alive, name in self._c_users if alive() is not None]

    @staticmethod
    def _wrap(child, name: str = "child") -> Allocator:
        """``child`` if it is an open zigmem allocator a wrapper may use, else the error."""
        if not isinstance(child, Allocator):
            raise InvalidArgumentError(f"{name} must be a zigmem allocator, not {type(child).__name__}")
        child._check_open("wrap")
        return child

    @property
    def _closed(self) -> bool:
        g = self._g
        return g is None or bool(g.closed)

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
            UseAfterFreeError: The allocator was deinitialised.
        """
        site = _here(self._site_frames) if self._site_frames else 0
        while True:
            gen = self._gen_seen
            try:
                address = _guard_alloc(self._g, gen, nbytes, alignment, site)
            except (TypeError, OverflowError, AttributeError):
                self._check_open("alloc")
                check_size(nbytes, "nbytes")
                check_alignment(alignment)
                raise
            if address:
                break
            if lib.zm_last_report().code != _STALE:
                raise failure(f"{self._describe()}.alloc({nbytes}, alignment={alignment})", site)
            self._gen_seen = self._g.generation  # a release since we looked: again
        buf = new_buffer(self, address, nbytes, alignment, gen)
        if site:
            buf._sites = (site, 0)
        if self._live is not None:
            self._live[id(buf)] = buf
        return buf

    def free(self, buf: Buffer) -> None:
        """Give ``buf`` back. Its views must be gone; the Buffer is unusable afterwards.

        Raises:
            DoubleFreeError: ``buf`` was already freed.
            UseAfterFreeError: A reset or deinit already released it.
            InvalidFreeError: ``buf`` belongs to another allocator.
            DanglingViewError: numpy views of ``buf`` are alive.
            BufferOverflowError, ...: found by a safety check; the block is freed all the same.
        """
        if buf.__class__ is not Buffer or buf._allocator is not self or buf._owner is not None \
                or buf._gen != self._gen_seen:
            self._check_release(buf, "free", releasing=True)
        site = _here(self._site_frames) if self._site_frames else 0
        gen = buf._gen
        # Claimed before the GIL is released: a racing free of the same Buffer from another
        # thread sees it freed instead of freeing it twice in C.
        buf._gen = _FREED
        if site:
            buf._sites = (buf._sites[0] if buf._sites else 0, site)
        status = _guard_free(self._g, gen, buf._address, buf._nbytes, buf._alignment, site)
        if self._live is not None:
            self._live.pop(id(buf), None)
        if status:
            if status == _STALE:  # released by a reset in another thread: not freed here
                buf._gen = gen
                self._gen_seen = self._g.generation
                self._check_usable(buf, "free")
            raise failure(f"{self._describe()}.free({format_address(buf._address)})", site)

    def resize(self, buf: Buffer, new_nbytes: int) -> bool:
        """Grow or shrink ``buf`` in place. False (and ``buf`` unchanged) when it cannot."""
        self._check_release(buf, "resize")
        new_nbytes = check_size(new_nbytes, "new_nbytes")
        rec, gen = self._claim(buf)
        ok = lib.zm_guard_resize(self._g, gen, rec, new_nbytes)
        _settle(buf)
        if ok < 0:
            raise failure(f"{self._describe()}.resize({format_address(buf._address)}, {new_nbytes})")
        return bool(ok)

    def remap(self, buf: Buffer, new_nbytes: int) -> Buffer | None:
        """Resize ``buf`` without copying: in place, or by moving its pages (``mremap``).

        Returns the resized Buffer (``buf`` is consumed), or None when the allocator cannot
        do it without a copy (``buf`` unchanged): then ``realloc`` copies.
        """
        rec, gen, site = self._moved(buf, new_nbytes, False, "remap")
        if rec is None:
            return None
        new = _new(Buffer)
        # The hand-over (as in realloc): no call until the return, so no exception can land
        # inside it; before it, an exception leaves buf claimed, and it settles on the move.
        new._address, new._nbytes, new._alignment, new._allocator = rec.address, rec.nbytes, buf._alignment, self
        new._gen, new._owner, new._rec, new._sites = gen, None, None, (site, 0) if site else None
        buf._gen, buf._rec = _FREED, None
        buf._sites = (buf._sites[0], site) if buf._sites else None
        if self._live is not None:
            self._relive(buf, new)
        return new

    def realloc(self, buf: Buffer, new_nbytes: int) -> Buffer:
        """Resize ``buf``, moving it if needed (contents kept up to the smaller size).

        Returns a new Buffer; ``buf`` is consumed. On OutOfMemoryError ``buf`` is untouched.
        An exception landing inside the call (KeyboardInterrupt) leaves ``buf`` describing
        the block wherever it is then, never a lost or doubly owned block.
        """
        rec, gen, site = self._moved(buf, new_nbytes, True, "realloc")
        new = _new(Buffer)
        # The hand-over: no call until the return, so no exception can land inside it.
        new._address, new._nbytes, new._alignment, new._allocator = rec.address, rec.nbytes, buf._alignment, self
        new._gen, new._owner, new._rec, new._sites = gen, None, None, (site, 0) if site else None
        buf._gen, buf._rec = _FREED, None
        buf._sites = (buf._sites[0], site) if buf._sites else None
        if self._live is not None:
            self._relive(buf, new)
        return new

    def _claim(self, buf: Buffer):
        """Mark ``buf`` as being changed by C and give C the record to write the result to;
        whatever lands in Python after the C call, ``_settle`` makes the Buffer agree."""
        rec = ffi.new("zm_block_t *", (buf._address, buf._nbytes, buf._alignment, 0))
        gen = buf._gen
        buf._rec = (rec, gen)
        buf._gen = _MOVING
        return rec, gen

    def _moved(self, buf: Buffer, new_nbytes: int, copy: bool, action: str):
        """Move ``buf``'s block in C: (record, generation, site) with ``buf`` still claimed,
        or (None, ...) with ``buf`` settled when remap cannot move without a copy."""
        self._check_release(buf, action)
        new_nbytes = check_size(new_nbytes, "new_nbytes")
        site = _here(self._site_frames) if self._site_frames else 0
        rec, gen = self._claim(buf)
        status = lib.zm_guard_move(self._g, gen, rec, new_nbytes, copy, site)
        if status or not rec.moved:
            _settle(buf)
            if status:
                raise failure(f"{self._describe()}.{action}({buf._nbytes} -> {new_nbytes})", site)
            return None, gen, site
        return rec, gen, site

    def _relive(self, old: Buffer, new: Buffer) -> None:
        """Site tracking after a move: ``old`` gone, ``new`` live."""
        self._live.pop(id(old), None)
        self._live[id(new)] = new

    def _remap_in_place(self, buf: Buffer, new_nbytes: int) -> bool:
        """``remap`` that keeps ``buf`` itself (its address and size change) instead of
        consuming it: for owners like the KV cache, whose record of the block must never
        be lost, whatever exception lands after the call. False: cannot without a copy."""
        rec, _, _ = self._moved(buf, new_nbytes, False, "remap")
        if rec is not None:
            _settle(buf)
        return rec is not None

    # ------------------------------------------------------------ releases

    def deinit(self) -> None:
        """Release everything this allocator holds. Idempotent.

        Raises:
            DanglingViewError: numpy views of its memory are alive (nothing is released).
            MemorySafetyError: another allocator still allocates from this one, or the
                calling context is inside one of its ``numpy()`` blocks.
        """
        if self._closed:
            return
        users = [p._describe() for p in self._open_parents()] + self._c_user_names()
        if users:
            raise MemorySafetyError(
                f"cannot deinit {self._describe()}: {', '.join(users)} still allocates from "
                "it; deinit that first")
        bridge = self._numpy_bridge
        if bridge is not None and bridge.serving_this_context():
            raise MemorySafetyError(
                f"cannot deinit {self._describe()} inside its own `with numpy()` block: numpy "
                "would allocate from it after the deinit; leave the block first")
        self._close()

    def _close(self) -> None:
        """Release the C state and let go of the children (deinit, or collection)."""
        self._release("deinit", DanglingViewError, (self,), self._c_deinit)
        self._after_close()
        self._detach()

    def _release(self, action: str, error: type[DanglingViewError], chain, c_release,
                 *args) -> int:
        """Run ``c_release(guards, holds, n, *args)`` over ``chain`` (ancestors newest first,
        then self) once nothing numpy can reach is left in any of them; its status."""
        if len(chain) == 1:  # the usual case, without building arrays
            guards, holds = self._own_chain
        else:
            guards = ffi.new("zm_guard_t *[]", [a._g for a in chain])
            holds = ffi.new("uint64_t[]", len(chain))
        for _ in range(1000):
            self._check_no_views(chain, action, error)
            for i, a in enumerate(chain):
                holds[i] = a._g.holds_made
            status = c_release(guards, holds, len(chain), *args)
            if status != lib.ZM_ERR_RETRY:  # a view was made meanwhile: look again
                break
        if status == lib.ZM_ERR_LIVE:
            where = chain[lib.zm_last_report().offset]
            raise error(f"cannot {action} {self._describe()}: "
                        f"{where._numpy_bridge.describe_live()}; nothing was released")
        if status == lib.ZM_ERR_CLOSED:
            raise UseAfterFreeError(f"cannot {action}: {self._describe()} was deinitialised")
        for a in chain:
            a._gen_seen = a._g.generation
            if a._numpy_bridge is not None:
                a._numpy_bridge.raise_error(f"{self._describe()}.{action}()")
        return status

    def _reset_chain(self, action: str) -> list[Allocator]:
        """self and every open allocator above it, newest first, for a reset; refused when
        one of them keeps memory from below (an arena over this one)."""
        holders = self._c_user_names()
        if holders:
            raise MemorySafetyError(
                f"cannot {action} {self._describe()}: {', '.join(holders)} allocates from it "
                "and keeps its memory; deinit that first")
        if not self._parents:
            return [self]
        above: dict[int, Allocator] = {}
        todo = self._open_parents()
        while todo:
            a = todo.pop()
            if id(a) not in above:
                above[id(a)] = a
                todo += a._open_parents()
        for a in above.values():
            holders = ([a._describe()] if a.retains_child_memory else []) + a._c_user_names()
            if holders:
                raise MemorySafetyError(
                    f"cannot {action} {self._describe()}: {', '.join(holders)} allocates from "
                    f"it{'' if a is self else ' through ' + a._describe()} and keeps its memory; "
                    "reset or deinit that first")
        return sorted(above.values(), key=lambda a: -a._g.serial) + [self]

    def _open_parents(self) -> list[Allocator]:
        found = []
        for ref in self._parents:
            parent = ref()
            if parent is not None and not parent._closed:
                found.append(parent)
        return found

    def _detach(self) -> None:
        for child in self._children:
            child._parents = [r for r in child._parents if r() is not None and r() is not self]
            if child._collect_when_unused and not child._open_parents():
                child._collect_when_unused = False
                _close_quietly(child)

    def numpy(self):
        """Serve numpy's own data allocations from this allocator inside a ``with`` block.

        Every numpy data buffer made in the block (``np.empty``, ufunc and matmul outputs,
        temporaries) comes from this allocator; each array frees into it when it dies, also
        after the block. Resetting or deinitialising the allocator while such arrays live
        raises (``ArenaEscapeError`` / ``DanglingViewError``); deinit inside the block raises.
        Affects the current thread or asyncio task only (NumPy keeps the handler in a
        ContextVar). Blocks nest, the same object may be entered again, and a block exited
        out of order (generators) raises a clear error and leaves a consistent handler. A
        handler captured elsewhere (a copied context, a task) that outlives ``deinit`` makes
        numpy raise ``MemoryError`` instead of allocating.

        Example:
            >>> with arena.numpy():
            ...     logits = hidden @ w_out      # temporaries and result in the arena
            ...     token = int(logits.argmax())
            >>> del logits
            >>> arena.reset("retain_capacity")
        """
        self._check_open("serve numpy from")
        bridge = self._numpy_bridge
        if bridge is None:
            bridge = self._numpy_bridge = NumpyBridge(self)
        return bridge.serve(self, _here(self._site_frames or 1))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.deinit()

    def __del__(self) -> None:
        # Unreachable means no Buffer, view or numpy array refers to our memory any more.
        # A wrapper above that is being collected in the same cycle releases us after itself.
        try:
            if self._closed:
                return
            if self._open_parents():
                self._collect_when_unused = True
                return
            self._close()
        except Exception:  # interpreter shutdown: modules may be half torn down
            pass

    # ------------------------------------------------------------ hooks for subclasses

    def _c_deinit(self, guards, holds, n: int) -> int:
        """The C release for deinit; by default the C state holds nothing to give back."""
        return lib.zm_py_close(guards, holds, n)

    def _after_close(self) -> None:
        """Python-side cleanup after the C state was released (a caller's buffer)."""

    def _describe(self) -> str:
        return type(self).__name__

    # ------------------------------------------------------------ checks (slow paths)

    def _check_open(self, action: str) -> None:
        if self._g is None:
            raise UseAfterFreeError(f"cannot {action}: {type(self).__name__}.__init__ never ran")
        if self._closed:
            raise UseAfterFreeError(f"cannot {action}: {self._describe()} was deinitialised")

    def _check_usable(self, buf: Buffer, action: str, releasing: bool = False) -> None:
        """Raise if ``buf`` no longer refers to memory this allocator holds for it; a freed
        block that is being released again is a double free, any other use of it a use
        after free."""
        if buf._gen == _MOVING:
            _settle(buf)
        if buf._gen == self._g.generation and not self._closed:
            return
        where = f"buffer {format_address(buf._address)} ({format_bytes(buf._nbytes)})"
        if buf._gen == _FREED:
            sites = ""
            if buf._sites and buf._sites[1]:
                sites = (f"; allocated at {_sites.describe(buf._sites[0])}; "
                         f"first freed at {_sites.describe(buf._sites[1])}")
            if releasing:
                again = f"; freed again at {_sites.describe(_here(8))}" if sites else ""
                raise DoubleFreeError(f"double free of {where}{sites}{again}")
            raise UseAfterFreeError(f"cannot {action} {where}: it was freed{sites}")
        raise UseAfterFreeError(
            f"cannot {action} {where}: {self._describe()} released it "
            "(a reset or deinit of it or of an allocator below it) after it was allocated")

    def _check_release(self, buf: Buffer, action: str, releasing: bool = False) -> None:
        """Everything ``free`` / ``resize`` / ``realloc`` must know before touching C."""
        if not isinstance(buf, Buffer):
            raise InvalidArgumentError(f"{action} expects a Buffer, got {type(buf).__name__}")
        if buf._allocator is not self:
            raise InvalidFreeError(
                f"cannot {action} buffer {format_address(buf._address)} "
                f"({format_bytes(buf._nbytes)}) through {self._describe()}: "
                f"it belongs to {buf._allocator._describe()}")
        self._check_usable(buf, action, releasing)
        if buf.has_views():
            raise DanglingViewError(
                f"cannot {action} buffer {format_address(buf._address)} "
                f"({format_bytes(buf._nbytes)}): numpy views of it are still alive; "
                "drop them (del the arrays) first")
        buf._owner = None  # dead, if it was set: the hot paths test for None

    def _check_no_views(self, chain, action: str, error: type[DanglingViewError]) -> None:
        """Refuse ``action`` while numpy can still reach memory of any allocator in
        ``chain``: views of its Buffers, or arrays numpy allocated from it."""
        for a in chain:
            bridge = a._numpy_bridge
            if bridge is not None and bridge.live_count:
                raise error(f"cannot {action} {self._describe()}: {bridge.describe_live()}"
                            f"{_of(a, self)}; nothing was released")
            owners = snapshot(a._views)
            if not owners:
                continue
            sizes = ", ".join(
                f"{format_address(o.buffer._address)} ({format_bytes(o.buffer._nbytes)})"
                for o in owners[:8])
            more = f" and {len(owners) - 8} more" if len(owners) > 8 else ""
            whose = "of its blocks" if a is self else f"blocks{_of(a, self)}"
            raise error(
                f"cannot {action} {self._describe()}: numpy arrays still view {len(owners)} "
                f"{whose}: {sizes}{more}; nothing was released")

    def _note_view(self, owner) -> None:
        """Register a view owner of one of our Buffers, then count it in C: a release that
        looked before this call sees the count change and looks again."""
        self._views.add(owner)
        status = lib.zm_guard_hold(self._g, owner.buffer._gen)
        if status:
            self._views.discard(owner)
            self._check_usable(owner.buffer, "view")
            raise failure(f"view of buffer {format_address(owner.buffer._address)}")

    # ------------------------------------------------------------ site tracking

    def _track_sites(self, frames: int) -> None:
        """Remember live blocks and the Python sites of their alloc and free."""
        self._live = {}
        self._site_frames = frames
        _sites.retain()

    def live_buffers(self) -> list[Buffer]:
        """Blocks allocated and not yet freed, when site tracking is on (else empty)."""
        return list(self._live.values()) if self._live is not None else []


def _settle(buf: Buffer) -> None:
    """Make a claimed Buffer agree with the record C wrote: the moved or resized block if
    the C call completed, else the block as it was."""
    rec, gen = buf._rec
    buf._address = rec.address
    buf._nbytes = rec.nbytes
    buf._gen = gen
    buf._rec = None


def _of(owner: Allocator, released: Allocator) -> str:
    return "" if owner is released else f" of {owner._describe()}, which allocates from it"


def _close_quietly(allocator: Allocator) -> None:
    try:
        allocator._close()
    except Exception:
        pass
