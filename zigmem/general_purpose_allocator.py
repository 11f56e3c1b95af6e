"""GeneralPurposeAllocator: any size, any lifetime, and with safety on, every misuse found."""

from __future__ import annotations

from dataclasses import dataclass

from . import _sites
from ._binding import SIZE_MAX, CData, check_size, failure, ffi, lib, raise_failure
from ._format import format_address, format_bytes
from .allocator import Allocator
from .errors import InvalidArgumentError, LeakError, OutOfMemoryError

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

    def __init__(self, safety: bool = True, thread_safe: bool = True, never_unmap: bool = False,
                 stack_trace_frames: int = 6, memory_limit: int | None = None,
                 quarantine_bytes: int = DEFAULT_QUARANTINE) -> None:
        for name, flag in (("safety", safety), ("thread_safe", thread_safe),
                           ("never_unmap", never_unmap)):
            if not isinstance(flag, bool):
                raise InvalidArgumentError(f"{name} must be True or False, not {flag!r}")
        limit = SIZE_MAX if memory_limit is None else check_size(memory_limit, "memory_limit")
        config = ffi.new("zm_gpa_config_t *", {
            "safety": bool(safety), "thread_safe": bool(thread_safe),
            "never_unmap": bool(never_unmap), "memory_limit": limit,
            "quarantine_bytes": check_size(quarantine_bytes, "quarantine_bytes"),
        })
        frames = check_size(stack_trace_frames, "stack_trace_frames")
        self.safety, self.thread_safe, self.memory_limit = bool(safety), bool(thread_safe), memory_limit
        self._gpa = lib.zm_gpa_create(config)
        if self._gpa == ffi.NULL:
            raise OutOfMemoryError("GeneralPurposeAllocator: cannot map its bookkeeping")
        # The GPA brings its own guard hooks: errors its vtable finds are reported by the
        # call that found them, and a block is validated before realloc moves it.
        super().__init__(None, guard_init=lambda g: lib.zm_gpa_guard_init(g, self._gpa))
        self._result = "ok"
        self._final_error: Exception | None = None
        self.leaks_at_deinit: list[LeakedBlock] = []
        if frames:
            self._site_frames = frames
            _sites.retain()

    # ------------------------------------------------------------ safety

    def check(self) -> None:
        """Verify every live block's red zones and every quarantined block's poison now.

        Raises:
            BufferOverflowError, UseAfterFreeError, DoubleFreeError, InvalidFreeError: the
                first problem found (the rest are counted in the message); it is repaired,
                so each problem is reported once.
        """
        self._check_open("check")
        if lib.zm_py_gpa_check(self._g, self._gpa):
            raise_failure("GeneralPurposeAllocator.check()")
        if self._numpy_bridge is not None:
            self._numpy_bridge.raise_error("GeneralPurposeAllocator.check()")

    def leaks(self) -> list[LeakedBlock]:
        """The blocks allocated and not yet freed (tracked with safety on)."""
        self._check_open("list leaks of")
        n = lib.zm_py_gpa_leaks(self._g, self._gpa, ffi.NULL, 0)
        reports = ffi.new("zm_report_t[]", max(n, 1))
        n = min(n, lib.zm_py_gpa_leaks(self._g, self._gpa, reports, n))
        return [LeakedBlock(r.address, r.size, r.alignment, _sites.frames(r.alloc_site))
                for r in reports[0:n]]

    @property
    def stats(self) -> GeneralPurposeStats:
        self._check_open("read stats of")
        s = ffi.new("zm_gpa_stats_t *")
        lib.zm_py_gpa_stats(self._g, self._gpa, s)
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

    def _c_deinit(self, guards: CData, holds: CData, n: int) -> int:
        leaks = self.leaks() if self.safety else []
        op_status = ffi.new("int *")
        status: int = lib.zm_py_gpa_destroy(guards, holds, n, self._gpa, op_status)
        if status == lib.ZM_OK:
            self.leaks_at_deinit = leaks
            self._result = "leak" if leaks else "ok"
            if op_status[0]:
                self._final_error = failure("GeneralPurposeAllocator.deinit()")
        return status

    def _after_close(self) -> None:
        if self._site_frames:
            _sites.release()

    def __exit__(self, *exc: object) -> None:
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
