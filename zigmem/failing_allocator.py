"""FailingAllocator: fails on purpose, to test out-of-memory paths."""

from __future__ import annotations

from ._binding import SIZE_MAX, check_size, ffi, lib
from .allocator import Allocator


def _index(value, name: str) -> int:
    return SIZE_MAX if value is None else check_size(value, name)


class FailingAllocator(Allocator):
    """Wraps ``child`` and makes allocation number ``fail_index`` (from 0), and every later
    one, raise ``OutOfMemoryError``; ``resize_fail_index`` does the same for resizes.

    As Zig's ``std.testing.FailingAllocator``. The counters say what reached the child, so a
    test can sweep every failure point (see :func:`zigmem.testing.check_all_allocation_failures`).

    Args:
        child: The allocator that serves the allocations that do not fail.
        fail_index: Index of the first allocation to fail; None never fails.
        resize_fail_index: Index of the first resize / realloc-in-place to fail.
    """

    def __init__(self, child: Allocator, fail_index: int | None = None,
                 resize_fail_index: int | None = None) -> None:
        self.child = self._wrap(child)
        self._state = ffi.new("zm_failing_t *")
        lib.zm_failing_init(self._state, child._c[0], _index(fail_index, "fail_index"),
                            _index(resize_fail_index, "resize_fail_index"))
        inner = ffi.new("zm_allocator_t *")
        lib.zm_failing_allocator(self._state, inner)
        super().__init__(inner, (child,))

    allocations = property(lambda self: self._state.allocations,
                           doc="Allocations that reached the child.")
    deallocations = property(lambda self: self._state.deallocations, doc="Frees passed on.")
    allocated_bytes = property(lambda self: self._state.allocated_bytes,
                               doc="Bytes allocated, growth included.")
    freed_bytes = property(lambda self: self._state.freed_bytes,
                           doc="Bytes freed, shrinking included.")
    has_induced_failure = property(lambda self: bool(self._state.has_induced_failure),
                                   doc="Whether a failure was induced.")
    alloc_index = property(lambda self: self._state.alloc_index,
                           doc="Index the next allocation will have.")
    resize_index = property(lambda self: self._state.resize_index,
                            doc="Index the next resize will have.")

    def __repr__(self) -> str:
        fail = None if self._state.fail_index == SIZE_MAX else self._state.fail_index
        return (f"FailingAllocator(fail_index={fail}, allocations={self.allocations}, "
                f"deallocations={self.deallocations})")
