"""FailingAllocator: fails on purpose, to test out-of-memory paths."""

from __future__ import annotations

from typing import SupportsIndex

from ._binding import SIZE_MAX, check_size, ffi, lib
from .allocator import Allocator


def _index(value: SupportsIndex | None, name: str) -> int:
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

    @property
    def allocations(self) -> int:
        """Allocations that reached the child."""
        value: int = self._state.allocations
        return value

    @property
    def deallocations(self) -> int:
        """Frees passed on."""
        value: int = self._state.deallocations
        return value

    @property
    def allocated_bytes(self) -> int:
        """Bytes allocated, growth included."""
        value: int = self._state.allocated_bytes
        return value

    @property
    def freed_bytes(self) -> int:
        """Bytes freed, shrinking included."""
        value: int = self._state.freed_bytes
        return value

    @property
    def has_induced_failure(self) -> bool:
        """Whether a failure was induced."""
        return bool(self._state.has_induced_failure)

    @property
    def alloc_index(self) -> int:
        """Index the next allocation will have."""
        value: int = self._state.alloc_index
        return value

    @property
    def resize_index(self) -> int:
        """Index the next resize will have."""
        value: int = self._state.resize_index
        return value

    def __repr__(self) -> str:
        fail = None if self._state.fail_index == SIZE_MAX else self._state.fail_index
        return (f"FailingAllocator(fail_index={fail}, allocations={self.allocations}, "
                f"deallocations={self.deallocations})")
