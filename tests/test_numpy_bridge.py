"""with allocator.numpy(): numpy's own allocations served by zigmem allocators (NEP 49)."""

import threading

import numpy as np
import pytest

import zigmem as zm
from helpers import flip

_multiarray = getattr(np, "_core", None) or np.core


def handler_of(array) -> str:
    return _multiarray.multiarray.get_handler_name(array)


def test_every_numpy_allocation_in_the_block_comes_from_the_allocator():
    counting = zm.CountingAllocator(name="numpy")
    x = np.ones((64, 64), np.float32)
    with counting.numpy():
        y = x @ x                     # matmul output
        z = np.exp(y) + 1             # ufunc outputs and a temporary
        w = np.empty(10)
        assert counting.stats.alloc_count >= 4
    assert [handler_of(a) for a in (y, z, w)] == ["zigmem CountingAllocator"] * 3
    assert handler_of(np.empty(3)) == "default_allocator"  # restored after the block
    np.testing.assert_allclose(z, np.exp(x @ x) + 1)
    del y, z, w
    assert counting.stats.current_bytes == 0  # temporaries and results all freed into it


def test_arrays_free_into_their_allocator_after_the_block():
    counting = zm.CountingAllocator(name="numpy")
    with counting.numpy():
        kept = np.arange(1000.0)
    held = counting.stats.current_bytes
    assert held >= 8000
    del kept
    assert counting.stats.current_bytes == 0


def test_arena_reset_with_an_escaped_array_raises_and_keeps_the_arena():
    arena = zm.ArenaAllocator()
    with arena.numpy():
        escaped = np.full(1024, 3.0)
        tmp = np.zeros(10)
        del tmp
    with pytest.raises(zm.ArenaEscapeError, match=r"1 numpy array \(8.0 KiB\).*test_numpy_bridge.py"):
        arena.reset("retain_capacity")
    assert escaped.sum() == 3072.0  # intact
    del escaped
    assert arena.reset("retain_capacity")
    arena.deinit()


def test_per_token_arena_loop_is_clean():
    arena = zm.ArenaAllocator()
    w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    x = np.ones(256, np.float32)
    outputs = []
    for _ in range(10):
        with arena.numpy():
            h = np.tanh(w @ x)
            y = (h * h).sum()
        outputs.append(float(y))  # a Python float: nothing escapes
        del h, y
        arena.reset("retain_capacity")
    assert len(set(outputs)) == 1
    capacity = arena.capacity
    assert capacity > 0
    arena.deinit()


def test_deinit_with_live_arrays_is_refused_never_a_crash():
    for allocator in (zm.ArenaAllocator(), zm.GeneralPurposeAllocator(),
                      zm.FixedBufferAllocator(bytearray(1 << 20))):
        with allocator.numpy():
            a = np.ones(100)
        with pytest.raises(zm.DanglingViewError, match="still alive"):
            allocator.deinit()
        assert a.sum() == 100
        del a
        allocator.deinit()


def test_dropping_the_allocator_object_keeps_arrays_valid():
    arena = zm.ArenaAllocator()
    with arena.numpy():
        a = np.arange(100_000.0)
    del arena
    import gc

    gc.collect()
    assert a.sum() == sum(range(100_000))  # the handler holds the arena alive


def test_general_purpose_allocator_reports_numpy_leaks_and_overflows():
    gpa = zm.GeneralPurposeAllocator()
    with gpa.numpy():
        a = np.zeros(16, np.uint8)
    leaks = gpa.leaks()
    assert len(leaks) == 1 and "test_numpy_bridge.py" in leaks[0].site[0]
    flip(a.ctypes.data + 16, 1)  # a C extension writes one byte past the array
    with pytest.raises(zm.BufferOverflowError):
        gpa.check()
    del a
    assert gpa.deinit() == "ok"


def test_other_threads_numpy_is_untouched():
    counting = zm.CountingAllocator(name="numpy")
    seen = {}
    entered, done = threading.Event(), threading.Event()

    def other():
        entered.wait()
        seen["other"] = handler_of(np.ones(1000))
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with counting.numpy():
        entered.set()
        done.wait()
        seen["main"] = handler_of(np.ones(1000))
    t.join()
    assert seen == {"other": "default_allocator", "main": "zigmem CountingAllocator"}


def test_nested_blocks_restore_the_previous_handler():
    outer, inner = zm.CountingAllocator(name="outer"), zm.CountingAllocator(name="inner")
    with outer.numpy():
        with inner.numpy():
            np.ones(10)
        assert inner.stats.alloc_count > 0 and outer.stats.alloc_count == 0
        np.ones(10)
        served_by_inner = inner.stats.alloc_count
        assert outer.stats.alloc_count > 0
    np.ones(10)
    assert inner.stats.alloc_count == served_by_inner
    assert handler_of(np.ones(10)) == "default_allocator"


def test_resize_realloc_and_calloc_paths():
    counting = zm.CountingAllocator(name="numpy")
    with counting.numpy():
        a = np.zeros(10)          # calloc
        a.resize(100_000, refcheck=False)  # realloc
        a[-1] = 7
        b = np.zeros((100, 100))
    assert a[:10].sum() == 0 and a[-1] == 7 and b.sum() == 0
    del a, b
    assert counting.stats.current_bytes == 0


def test_out_of_memory_inside_the_block_is_a_memory_error():
    failing = zm.FailingAllocator(zm.page_allocator, fail_index=0)
    with failing.numpy():
        with pytest.raises(MemoryError):
            np.empty(1000)
    np.empty(1000)


def test_bridge_on_a_deinitialised_allocator_is_refused():
    arena = zm.ArenaAllocator()
    arena.deinit()
    with pytest.raises(zm.UseAfterFreeError):
        with arena.numpy():
            pass
