"""zigmem's memory in tracemalloc: every mapping the C core takes from the OS appears under
zm.TRACEMALLOC_DOMAIN while tracing, with its size, and disappears when it is given back;
reporting never deadlocks with threads that hold the GIL or zigmem's locks."""

import threading
import tracemalloc

import numpy as np
import pytest

import zigmem as zm


def zigmem_traces():
    snapshot = tracemalloc.take_snapshot()
    return snapshot.filter_traces([tracemalloc.DomainFilter(True, zm.TRACEMALLOC_DOMAIN)]).traces


@pytest.fixture
def tracing():
    tracemalloc.start()
    yield
    tracemalloc.stop()


def test_page_blocks_and_arena_chunks_are_traced(tracing):
    page = zm.page_allocator
    before = len(zigmem_traces())
    buf = page.alloc(3 << 20)
    traces = zigmem_traces()
    assert len(traces) == before + 1
    assert any(t.size == 3 << 20 for t in traces)
    page.free(buf)
    assert len(zigmem_traces()) == before

    arena = zm.ArenaAllocator()
    for _ in range(40):
        arena.alloc(64)  # bump allocations inside one 4 KiB chunk: one trace, not 40
    assert len(zigmem_traces()) == before + 1
    arena.reset("free_all")
    assert len(zigmem_traces()) == before
    arena.deinit()


def test_growth_by_mremap_updates_the_trace(tracing):
    page = zm.page_allocator
    buf = page.alloc(1 << 20)
    grown = page.realloc(buf, 64 << 20)
    sizes = {t.size for t in zigmem_traces()}
    assert 64 << 20 in sizes and 1 << 20 not in sizes
    page.free(grown)


def test_gpa_slabs_and_kv_slabs_are_traced(tracing):
    before = sum(t.size for t in zigmem_traces())
    gpa = zm.GeneralPurposeAllocator()
    blocks = [gpa.alloc(1000) for _ in range(200)]
    cache = zm.KVCache(zm.page_allocator, 2, 2, 64, 1024)
    held = sum(t.size for t in zigmem_traces()) - before
    assert held >= 200 * 1000 + cache.nbytes
    for b in blocks:
        gpa.free(b)
    cache.deinit()
    gpa.deinit()
    assert sum(t.size for t in zigmem_traces()) == before


def test_numpy_bridge_arrays_live_inside_traced_chunks(tracing):
    arena = zm.ArenaAllocator()
    with arena.numpy():
        x = np.ones(1 << 18)  # numpy traces it in its own domain too
    chunk = max(t.size for t in zigmem_traces())
    assert chunk >= x.nbytes
    del x
    arena.deinit()


def test_no_deadlock_with_threads_while_tracing(tracing):
    errors = []

    def work():
        try:
            arena = zm.ArenaAllocator(zm.CountingAllocator(name="traced"))
            for i in range(200):
                with arena.numpy():
                    np.ones(10000 + i * 100)
                arena.alloc(1 << 16)
                arena.reset("free_all")
            arena.deinit()
        except Exception as e:  # reported by the main thread
            errors.append(repr(e))

    threads = [threading.Thread(target=work, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "deadlock between tracing and zigmem's locks"
    assert errors == []


def test_nothing_is_recorded_when_not_tracing():
    assert not tracemalloc.is_tracing()
    buf = zm.page_allocator.alloc(1 << 20)
    tracemalloc.start()
    try:
        assert not any(t.size == 1 << 20 for t in zigmem_traces())
    finally:
        tracemalloc.stop()
    zm.page_allocator.free(buf)
