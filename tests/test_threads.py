"""cffi releases the GIL around C calls: allocators used from several threads stay consistent."""

import threading

import numpy as np
import pytest

import zigmem as zm


def hammer(allocator, rounds, errors):
    try:
        for i in range(rounds):
            n = 1 + (i * 7919) % 20000
            buf = allocator.alloc(n, alignment=16)
            view = np.asarray(buf)
            view[:] = i % 251
            if not (view == i % 251).all():
                errors.append(f"block {buf} was overwritten by another thread")
            del view
            allocator.free(buf)
    except Exception as e:  # reported by the main thread
        errors.append(repr(e))


@pytest.mark.parametrize("make", [
    lambda: zm.CountingAllocator(name="threads"),
    lambda: zm.ArenaAllocator(zm.CountingAllocator(name="threads")),
    lambda: zm.FailingAllocator(zm.page_allocator),
])
def test_concurrent_alloc_free(make):
    allocator = make()
    errors = []
    threads = [threading.Thread(target=hammer, args=(allocator, 1500, errors)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    if isinstance(allocator, zm.CountingAllocator):
        s = allocator.stats
        assert s.current_bytes == 0 and s.alloc_count == s.free_count == 6000
    if isinstance(allocator, zm.FailingAllocator):
        assert allocator.allocations == allocator.deallocations == 6000
    allocator.deinit()


def test_arena_shared_by_threads_hands_out_disjoint_blocks():
    arena = zm.ArenaAllocator()
    results = [[] for _ in range(4)]

    def grab(out):
        for _ in range(2000):
            out.append(arena.alloc(48, alignment=16).address)

    threads = [threading.Thread(target=grab, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    addresses = sorted(a for r in results for a in r)
    assert len(set(addresses)) == 8000
    assert all(b - a >= 48 for a, b in zip(addresses, addresses[1:]))
    arena.deinit()
