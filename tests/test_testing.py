"""zm.testing.check_all_allocation_failures: it must catch each way of mishandling OOM."""

import pytest

import zigmem as zm
from zigmem.testing import AllocationFailureCheckError, check_all_allocation_failures


def build_three(allocator):
    """Correct: allocates three blocks and frees what it got on any failure (errdefer)."""
    done = []
    try:
        for n in (100, 200, 300):
            done.append(allocator.alloc(n))
    finally:
        for buf in reversed(done):
            allocator.free(buf)


def test_a_correct_function_passes_every_index():
    assert check_all_allocation_failures(build_three) == 3


def test_arena_over_the_sweep_allocator_passes():
    def with_arena(allocator):
        arena = zm.ArenaAllocator(allocator)
        try:
            for _ in range(4):
                arena.alloc(1 << 20)
        finally:
            arena.deinit()

    assert check_all_allocation_failures(with_arena) >= 2


def test_a_leak_on_the_failure_path_is_named_with_its_site():
    def leaky(allocator):
        first = allocator.alloc(100)
        second = allocator.alloc(200)  # when this fails, `first` is never freed
        allocator.free(second)
        allocator.free(first)

    with pytest.raises(AllocationFailureCheckError, match=r"allocation #1 failed") as e:
        check_all_allocation_failures(leaky)
    assert "test_testing.py" in str(e.value) and "in leaky" in str(e.value)


def test_a_swallowed_error_is_reported():
    def swallow(allocator):
        try:
            allocator.free(allocator.alloc(10))
        except zm.OutOfMemoryError:
            pass

    with pytest.raises(AllocationFailureCheckError, match="swallowed"):
        check_all_allocation_failures(swallow)


def test_nondeterministic_allocation_counts_are_reported():
    calls = []

    def varying(allocator):
        calls.append(1)
        bufs = [allocator.alloc(8) for _ in range(1 if len(calls) > 1 else 3)]
        for b in bufs:
            allocator.free(b)

    with pytest.raises(AllocationFailureCheckError, match="not deterministic"):
        check_all_allocation_failures(varying)


def test_a_leak_without_failures_is_reported():
    with pytest.raises(AllocationFailureCheckError, match="no failure induced"):
        check_all_allocation_failures(lambda a: a.alloc(10))
