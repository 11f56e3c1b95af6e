"""Helpers for testing code that allocates: Zig's allocation-failure sweep, for pytest."""

from __future__ import annotations

from . import _sites
from ._format import format_address, format_bytes
from .allocator import Allocator
from .counting_allocator import CountingAllocator
from .failing_allocator import FailingAllocator
from .page_allocator import page_allocator

from ._residency import resident_bytes

__all__ = ["AllocationFailureCheckError", "check_all_allocation_failures", "resident_bytes"]


class AllocationFailureCheckError(AssertionError):
    """The function under test mishandled an allocation failure."""


def _leaks(failing: FailingAllocator, counting: CountingAllocator) -> str | None:
    stats = counting.stats
    if stats.current_count == 0:
        return None
    lines = [f"{stats.current_count} blocks ({format_bytes(stats.current_bytes)}) still allocated"]
    for buf in failing.live_buffers():
        alloc_site = buf._sites[0] if buf._sites else 0
        lines.append(f"  {format_address(buf.address)} {format_bytes(buf.nbytes)} "
                     f"allocated at {_sites.describe(alloc_site)}")
    return "\n".join(lines)


def _run(fn, args, kwargs, fail_index: int | None, backing: Allocator):
    counting = CountingAllocator(backing, name="check_all_allocation_failures")
    failing = FailingAllocator(counting, fail_index=fail_index)
    failing._track_sites(8)
    try:
        fn(failing, *args, **kwargs)
        error = None
    except MemoryError as e:  # OutOfMemoryError, or numpy's own inside a numpy() block
        error = e
    return failing, counting, error


def check_all_allocation_failures(fn, *args, backing: Allocator = page_allocator, **kwargs) -> int:
    """Run ``fn(allocator, *args)`` once per allocation it makes, with that one failing.

    As Zig's ``std.testing.checkAllAllocationFailures``: a first run with no failure counts
    the allocations (N) and must not leak; then for each index 0..N-1 the allocation at that
    index raises ``OutOfMemoryError`` (numpy's ``MemoryError`` for an allocation numpy made
    inside ``allocator.numpy()``), which ``fn`` must let through, and nothing may leak.

    Args:
        fn: Takes the allocator to use as its first argument; must free all it allocates.
        backing: Where the allocations that do not fail come from.

    Returns:
        N, the number of allocations the sweep covered.

    Raises:
        AllocationFailureCheckError: ``fn`` swallowed the error, allocated a different
            number of times on a rerun, or leaked on a failure path (index and sites named).
    """
    failing, counting, error = _run(fn, args, kwargs, None, backing)
    if error is not None:
        raise AllocationFailureCheckError(
            f"{fn.__name__} raised OutOfMemoryError with no failure induced: {error}"
        ) from error
    leak = _leaks(failing, counting)
    if leak:
        raise AllocationFailureCheckError(f"{fn.__name__} leaked with no failure induced:\n{leak}")
    needed = failing.alloc_index
    for index in range(needed):
        failing, counting, error = _run(fn, args, kwargs, index, backing)
        if error is None:
            if failing.has_induced_failure:
                raise AllocationFailureCheckError(
                    f"{fn.__name__} swallowed the OutOfMemoryError of allocation #{index}"
                )
            raise AllocationFailureCheckError(
                f"{fn.__name__} made {failing.alloc_index} allocations instead of {needed} "
                f"(fail index {index}): its allocations are not deterministic"
            )
        if not failing.has_induced_failure:
            raise AllocationFailureCheckError(
                f"{fn.__name__} raised OutOfMemoryError at fail index {index} that the sweep "
                f"did not induce: {error}"
            ) from error
        leak = _leaks(failing, counting)
        if leak:
            raise AllocationFailureCheckError(
                f"{fn.__name__} leaked when allocation #{index} failed:\n{leak}"
            )
    return needed
