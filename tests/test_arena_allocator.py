"""ArenaAllocator: bump allocation, in-place free of the last block, the three reset modes."""

import numpy as np
import pytest

import zigmem as zm


def test_consecutive_allocations_are_adjacent(arena):
    a, b = arena.alloc(64, alignment=16), arena.alloc(64, alignment=16)
    assert b.address == a.address + 64


def test_last_allocation_is_freed_and_grown_in_place(arena):
    a = arena.alloc(64, alignment=16)
    b = arena.alloc(64, alignment=16)
    arena.free(b)
    c = arena.alloc(32, alignment=16)
    assert c.address == b.address
    assert arena.resize(c, 1024)
    assert not arena.resize(a, 1024)  # not the most recent
    assert arena.resize(a, 16)        # shrinking always works


def test_retain_capacity_reuses_memory_without_the_child():
    counting = zm.CountingAllocator(name="arena-child")
    arena = zm.ArenaAllocator(counting)
    for _ in range(50):
        arena.alloc(100_000)
    capacity = arena.capacity
    assert capacity >= 50 * 100_000
    assert arena.reset("retain_capacity")
    assert arena.capacity == capacity
    calls = counting.stats.alloc_count
    for _ in range(50):
        arena.alloc(100_000)
    assert counting.stats.alloc_count == calls
    arena.deinit()
    assert counting.stats.current_bytes == 0


def test_retain_with_limit_and_free_all():
    counting = zm.CountingAllocator(name="arena-child")
    arena = zm.ArenaAllocator(counting)
    arena.alloc(10 << 20)
    assert arena.reset("retain_with_limit", limit=1 << 20)
    assert arena.capacity == 1 << 20
    assert arena.reset(limit=4096)  # retain_capacity with a limit is the same
    assert arena.capacity == 4096
    assert arena.reset("free_all")
    assert arena.capacity == 0 and counting.stats.current_bytes == 0
    arena.deinit()


def test_reset_returns_false_when_capacity_cannot_be_kept():
    # The retained buffer is one new allocation; make the child refuse it.
    failing = zm.FailingAllocator(zm.page_allocator, fail_index=2)
    arena = zm.ArenaAllocator(failing)
    arena.alloc(5000)
    arena.alloc(100_000)  # a second buffer: retain must merge into a third allocation
    assert arena.reset("retain_capacity") is False
    assert arena.capacity == 0
    with pytest.raises(zm.OutOfMemoryError, match="failed on purpose"):
        arena.alloc(10)
    arena.deinit()


def test_per_token_loop_keeps_capacity_flat(arena):
    for token in range(20):
        acts = np.asarray(arena.alloc(1 << 20)).view(np.float32)
        acts[:] = token
        assert acts[0] == token
        del acts
        arena.reset("retain_capacity")
    assert 1 << 20 <= arena.capacity < 2 << 20
