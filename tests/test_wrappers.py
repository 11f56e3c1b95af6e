"""FixedBufferAllocator, FailingAllocator, CountingAllocator and memory_report()."""

import numpy as np
import pytest

import zigmem as zm


def test_fixed_buffer_allocates_inside_the_callers_memory():
    backing = np.zeros(4096, dtype=np.uint8)
    fba = zm.FixedBufferAllocator(backing)
    buf = fba.alloc(100, alignment=8)
    assert fba.owns(buf) and fba.owns(buf.address) and not fba.owns(backing.ctypes.data + 4096)
    np.asarray(buf)[:] = 9
    assert backing[buf.address - backing.ctypes.data] == 9
    fba.reset()
    assert fba.used == 0
    again = fba.alloc(100, alignment=8)
    assert again.address == buf.address
    fba.deinit()


def test_fixed_buffer_over_a_zigmem_buffer():
    outer = zm.page_allocator.alloc(1 << 16)
    fba = zm.FixedBufferAllocator(outer)
    inner = fba.alloc(1000)
    assert outer.address <= inner.address < outer.address + outer.nbytes
    with pytest.raises(zm.DanglingViewError):
        zm.page_allocator.free(outer)  # the fixed-buffer allocator views it
    fba.deinit()
    zm.page_allocator.free(outer)


def test_failing_allocator_fails_at_the_index_and_after():
    f = zm.FailingAllocator(zm.page_allocator, fail_index=2)
    a, b = f.alloc(10), f.alloc(20)
    with pytest.raises(zm.OutOfMemoryError, match="failing index 2"):
        f.alloc(30)
    with pytest.raises(zm.OutOfMemoryError):
        f.alloc(30)
    assert f.has_induced_failure and f.allocations == 2 and f.allocated_bytes == 30
    f.free(a)
    f.free(b)
    assert f.deallocations == 2 and f.freed_bytes == 30


def test_failing_allocator_resize_fail_index():
    f = zm.FailingAllocator(zm.page_allocator, resize_fail_index=1)
    buf = f.alloc(100)
    assert f.resize(buf, 50)
    assert not f.resize(buf, 40)
    assert buf.nbytes == 50
    # realloc cannot resize in place, so it allocates + copies instead
    moved = f.realloc(buf, 30)
    assert moved.nbytes == 30
    f.free(moved)


def test_counting_allocator_counts_current_peak_total():
    c = zm.CountingAllocator(name="kv_cache")
    a = c.alloc(1000)
    b = c.alloc(3000)
    c.free(a)
    s = c.stats
    assert (s.current_bytes, s.peak_bytes, s.total_bytes) == (3000, 4000, 4000)
    assert (s.current_count, s.alloc_count, s.free_count) == (1, 2, 1)
    b = c.realloc(b, 5000)
    assert c.stats.current_bytes == 5000 and c.stats.peak_bytes == 5000
    c.reset_peak()
    c.free(b)
    assert c.stats.peak_bytes == 5000 and c.stats.current_bytes == 0
    c.deinit()


def test_counting_sees_allocations_made_in_c_by_an_arena():
    c = zm.CountingAllocator(name="activations")
    arena = zm.ArenaAllocator(c)
    arena.alloc(10 << 20)
    assert c.stats.current_bytes >= 10 << 20 and c.stats.alloc_count == 1
    arena.deinit()
    assert c.stats.current_bytes == 0


def test_memory_report_lists_live_counting_allocators():
    kv = zm.CountingAllocator(name="kv_cache_report")
    w = zm.CountingAllocator(name="weights_report")
    bufs = [kv.alloc(16 << 20), w.alloc(3 << 20)]
    report = zm.memory_report()
    lines = report.splitlines()
    assert lines[0].split() == ["subsystem", "current", "peak", "total", "blocks", "allocs"]
    kv_line = next(line for line in lines if line.startswith("kv_cache_report"))
    assert kv_line.split()[1:3] == ["16.0", "MiB"]
    kv.free(bufs[0])
    w.free(bufs[1])
    kv.deinit()
    assert "kv_cache_report" not in zm.memory_report()
    w.deinit()
