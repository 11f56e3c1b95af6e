"""GeneralPurposeAllocator: any size, any lifetime, and with safety on, every misuse found."""

from __future__ import annotations

from dataclasses import dataclass

from . import _sites
from ._binding import (
    SIZE_MAX, check_alignment, check_size, failure, ffi, lib, raise_failure,
)
from ._format import format_address, format_bytes
from .allocator import _FREED, Allocator
from .buffer import Buffer, new_buffer
from .errors import LeakError, OutOfMemoryError

_gpa_alloc = lib.zm_gpa_py_alloc
_gpa_free = lib.zm_gpa_py_free
_here = _sites.here

DEFAULT_QUARANTINE = 4 << 20


@dataclass(frozen=True)
class LeakedBlock:
    """A block still allocated when it was looked for (``leaks()``, ``deinit()``)."""

    address: int
    nbytes: int
    alignment: int
    site: list[str]  # where it was allocated, innermost frame first

    def __str__(self) -> str:
        where = " <- ".join(self.site) if self.site else "<site not recorded>"
        return f"{format_address(self.address)} {format_bytes(self.nbytes)} allocated at {where}"


@dataclass(frozen=True)
class GeneralPurposeStats:
    live_bytes: int        # bytes requested by live blocks
    live_count: int        # live blocks (counted with safety on)
    peak_bytes: int
    quarantine_bytes: int  # freed bytes held poisoned
    quarantine_count: int


class GeneralPurposeAllocator(Allocator):
    """A general-purpose allocator; with ``safety=True``, the one to develop with.

    As Zig's ``GeneralPurposeAllocator(.{ .safety = true })``: every block is tracked with
    the Python sites of its allocation and free, surrounded by red zones whose bytes derive
    from a random per-allocator key, and poisoned when freed and held in a quarantine, so that
    overflows, underflows, double frees, invalid frees, writes after free and leaks are found
    and reported precisely (see the README's safety table). A report never breaks the
    allocator: the damage is repaired and it keeps working.

    With ``safety=False`` it is a fast size-class allocator with no per-block bookkeeping
    (large blocks leaked at ``deinit`` stay mapped, since nothing tracks them).

    Args:
        safety: Track and check every block.
        thread_safe: Lock around every operation, so C code and Python threads may share it.
        never_unmap: Keep the pages of freed large blocks mapped until ``deinit``.
        stack_trace_frames: Python frames recorded at allocation and free (0: none).
        memory_limit: Most bytes that live blocks may request together; beyond it ``alloc``
            raises ``OutOfMemoryError`` naming the limit and a growing ``resize`` returns False.
        quarantine_bytes: Freed bytes held poisoned before their memory is reused (safety);
            the most recently freed block is held whatever its size. Larger catches staler
            pointers; smaller keeps the poison checks in cache (see the README's numbers).

    Example:
        >>> with zm.GeneralPurposeAllocator() as gpa:   # raises LeakError on leaks
        ...     buf = gpa.alloc(100)
        ...     gpa.free(buf)
    """

    releases_memory = True

    def __init__(self, safety: bool = True, thread_safe: bool = True, never_unmap: bool = False,
                 stack_trace_frames: int = 6, memory_limit: int | None = None,
                 quarantine_bytes: int = DEFAULT_QUARANTINE) -> None:
        super().__init__()
        limit = SIZE_MAX if memory_limit is None else check_size(memory_limit, "memory_limit")
        config = ffi.new("zm_gpa_config_t *", {
            "safety": bool(safety), "thread_safe": bool(thread_safe),
            "never_unmap": bool(never_unmap), "memory_limit": limit,
            "quarantine_bytes": check_size(quarantine_bytes, "quarantine_bytes"),
        })
        self._site_frames = check_size(stack_trace_frames, "stack_trace_frames")
        self._g = lib.zm_gpa_create(config)
        if self._g == ffi.NULL:
            raise OutOfMemoryError("GeneralPurposeAllocator: cannot map its bookkeeping")
        lib.zm_gpa_allocator(self._g, self._c)
        # The C allocator locks for itself, or (thread_safe=False) takes the Python lock.
        self._serialize = int(not thread_safe)
        self.safety, self.thread_safe, self.memory_limit = bool(safety), bool(thread_safe), memory_limit
        self._result = "ok"

    # ------------------------------------------------------------ the allocator interface

    def alloc(self, nbytes: int, alignment: int = 64) -> Buffer:
        if self._closed:
            self._check_open("alloc")
        site = _here(self._site_frames) if self._site_frames else 0
        try:
            address = _gpa_alloc(self._g, nbytes, alignment, site)
        except (TypeError, OverflowError):
            check_size(nbytes, "nbytes")
            check_alignment(alignment)
            raise
        if not address:
            raise_failure(f"GeneralPurposeAllocator.alloc({nbytes}, alignment={alignment})", site)
        buf = new_buffer(self, address, nbytes, alignment)
        buf._sites = (site, 0)
        return buf

    def free(self, buf: Buffer) -> None:
        """Free ``buf``. Its red zones are checked now; the memory is poisoned and held in
        quarantine. Corruption found is raised after the block is freed."""
        if buf.__class__ is not Buffer or buf._allocator is not self or buf._owner is not None \
                or buf._gen != self._generation:
            self._check_release(buf, "free", releasing=True)
        site = _here(self._site_frames) if self._site_frames else 0
        buf._gen = _FREED  # claimed before the GIL is released, as in Allocator.free
        buf._sites = (buf._sites[0], site)
        if _gpa_free(self._g, buf._address, buf._nbytes, buf._alignment, site):
            raise_failure(f"GeneralPurposeAllocator.free({format_address(buf._address)})", site)

    def resize(self, buf: Buffer, new_nbytes: int) -> bool:
        self._check_release(buf, "resize")
        new_nbytes = check_size(new_nbytes, "new_nbytes")
        ok = lib.zm_gpa_py_resize(self._g, buf._address, buf._nbytes, buf._alignment, new_nbytes)
        if ok < 0:
            raise_failure(f"GeneralPurposeAllocator.resize({format_address(buf._address)})")
        if ok:
            buf._nbytes = new_nbytes
        return bool(ok)

    def remap(self, buf: Buffer, new_nbytes: int) -> Buffer | None:
        """In place only: a moved block would need fresh red zones, which is a realloc."""
        if not self.resize(buf, new_nbytes):
            return None
        new = new_buffer(self, buf._address, buf._nbytes, buf._alignment)
        new._sites = buf._sites
        buf._gen = _FREED
        return new

    def realloc(self, buf: Buffer, new_nbytes: int) -> Buffer:
        site = _here(self._site_frames) if self._site_frames else 0

        def gpa_realloc(_c, address, nbytes, alignment, new, _serialize):
            return lib.zm_gpa_py_realloc(self._g, address, nbytes, alignment, new, site)

        address = self._move(buf, new_nbytes, gpa_realloc, "realloc")
        if address is None:
            raise_failure(f"GeneralPurposeAllocator.realloc({buf._nbytes} -> {new_nbytes})", site)
        buf._sites = (buf._sites[0], site)
        new = self._successor(buf, address, new_nbytes)
        new._sites = (site, 0)
        return new

    # ------------------------------------------------------------ safety

    def check(self) -> None:
        """Verify every live block's red zones and every quarantined block's poison now.

        Raises:
            BufferOverflowError, UseAfterFreeError, DoubleFreeError, InvalidFreeError: the
                first problem found (the rest are counted in the message); it is repaired,
                so each problem is reported once.
        """
        self._check_open("check")
        if lib.zm_gpa_check(self._g):
            raise_failure("GeneralPurposeAllocator.check()")

    def leaks(self) -> list[LeakedBlock]:
        """The blocks allocated and not yet freed (tracked with safety on)."""
        self._check_open("list leaks of")
        n = lib.zm_gpa_leaks(self._g, ffi.NULL, 0)
        reports = ffi.new("zm_report_t[]", max(n, 1))
        n = min(n, lib.zm_gpa_leaks(self._g, reports, n))
        return [LeakedBlock(r.address, r.size, r.expected, _sites.frames(r.alloc_site))
                for r in reports[0:n]]

    @property
    def stats(self) -> GeneralPurposeStats:
        self._check_open("read stats of")
        s = ffi.new("zm_gpa_stats_t *")
        lib.zm_gpa_stats(self._g, s)
        return GeneralPurposeStats(s.live_bytes, s.live_count, s.peak_bytes,
                                   s.quarantine_bytes, s.quarantine_count)

    def deinit(self) -> str:
        """Release all memory. Returns ``"ok"``, or ``"leak"`` if blocks were still allocated
        (they are released too; ``leaks_at_deinit`` lists them). Idempotent.

        Raises:
            DanglingViewError: numpy views of its memory are alive (nothing is released).
            BufferOverflowError, UseAfterFreeError, ...: corruption found by the final
                check, raised after everything was released.
        """
        was_closed = self._closed
        super().deinit()
        if not was_closed and self._final_error is not None:
            raise self._final_error
        return self._result

    def _release(self) -> None:
        self.leaks_at_deinit = self.leaks() if self.safety else []
        status = lib.zm_gpa_destroy(self._g)
        self._final_error = failure("GeneralPurposeAllocator.deinit()") if status else None
        self._result = "leak" if self.leaks_at_deinit else "ok"

    def __exit__(self, *exc) -> None:
        if self.deinit() == "leak":
            blocks = self.leaks_at_deinit
            total = sum(b.nbytes for b in blocks)
            lines = [f"  {b}" for b in blocks[:50]]
            if len(blocks) > 50:
                lines.append(f"  ... and {len(blocks) - 50} more")
            raise LeakError(f"{len(blocks)} blocks ({format_bytes(total)}) leaked from "
                            "GeneralPurposeAllocator:\n" + "\n".join(lines))

    def __repr__(self) -> str:
        return (f"GeneralPurposeAllocator(safety={self.safety}, thread_safe={self.thread_safe}, "
                f"memory_limit={self.memory_limit})")
