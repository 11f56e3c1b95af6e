"""Promise 1: no numpy view can reach memory that was given back, whatever the user does."""

import gc
import sys

import numpy as np
import pytest

import zigmem as zm


def test_free_with_live_view_raises_and_keeps_memory():
    buf = zm.page_allocator.alloc(4096)
    view = np.asarray(buf).view(np.float32)[10:20]  # derived views count too
    with pytest.raises(zm.DanglingViewError, match="views of it are still alive"):
        zm.page_allocator.free(buf)
    view[:] = 1.5  # memory is still mapped and writable
    assert buf.is_live
    del view
    zm.page_allocator.free(buf)


@pytest.mark.parametrize("op", ["resize", "realloc"])
def test_resize_and_realloc_with_live_view_raise(op):
    buf = zm.page_allocator.alloc(1 << 20)
    view = np.asarray(buf)
    with pytest.raises(zm.DanglingViewError):
        getattr(zm.page_allocator, op)(buf, 16)
    assert buf.nbytes == 1 << 20 and view[-1] == view[-1]
    del view
    zm.page_allocator.free(buf)


def test_arena_reset_with_escaped_array_raises_and_keeps_arena(arena):
    kept = np.asarray(arena.alloc(1000))
    other = arena.alloc(50)
    with pytest.raises(zm.ArenaEscapeError, match=r"1 of its blocks: 0x[0-9a-f]+ \(1000 B\)"):
        arena.reset()
    kept[:] = 3  # intact
    arena.free(other)
    del kept
    assert arena.reset()


@pytest.mark.parametrize("mode", ["retain_capacity", "free_all"])
def test_buffers_are_stale_after_reset(arena, mode):
    buf = arena.alloc(100)
    arena.reset(mode)
    with pytest.raises(zm.UseAfterFreeError, match="released it"):
        np.asarray(buf)
    with pytest.raises(zm.UseAfterFreeError):
        arena.free(buf)
    assert not buf.is_live


def test_deinit_with_live_view_raises(arena):
    view = np.asarray(arena.alloc(64))
    with pytest.raises(zm.DanglingViewError, match="deinit"):
        arena.deinit()
    view[:] = 1
    del view
    arena.deinit()


def test_fixed_buffer_reset_and_deinit_with_live_view():
    backing = bytearray(1 << 16)
    fba = zm.FixedBufferAllocator(backing)
    view = np.asarray(fba.alloc(128))
    with pytest.raises(zm.ArenaEscapeError):
        fba.reset()
    with pytest.raises(zm.DanglingViewError):
        fba.deinit()
    with pytest.raises(BufferError):
        backing.extend(b"x")  # the allocator holds the caller's buffer: it cannot move
    del view
    fba.deinit()
    backing.extend(b"x")  # released


def test_view_after_free_raises():
    buf = zm.page_allocator.alloc(100)
    zm.page_allocator.free(buf)
    with pytest.raises(zm.UseAfterFreeError, match="freed"):
        np.asarray(buf)


def test_views_outlive_every_python_reference_safely():
    # Drop the Buffer and the allocator: the view alone keeps the arena (and its memory).
    arena = zm.ArenaAllocator()
    view = np.asarray(arena.alloc(1 << 20))
    del arena
    gc.collect()
    view[:] = 7
    assert view.sum() == 7 << 20


def test_collected_arena_releases_its_memory():
    counting = zm.CountingAllocator(name="collected")
    arena = zm.ArenaAllocator(counting)
    arena.alloc(1 << 20)
    assert counting.stats.current_bytes > 0
    del arena
    gc.collect()
    assert counting.stats.current_bytes == 0
    counting.deinit()  # the collected arena no longer counts as its user


def test_child_cannot_be_deinitialised_under_a_parent():
    counting = zm.CountingAllocator(name="child")
    arena = zm.ArenaAllocator(counting)
    with pytest.raises(zm.MemorySafetyError, match="ArenaAllocator still allocates"):
        counting.deinit()
    arena.deinit()
    counting.deinit()


def test_asarray_with_dtype_and_copy():
    buf = zm.page_allocator.alloc(4)
    np.asarray(buf)[:] = [1, 2, 3, 4]
    assert np.asarray(buf, dtype=np.float32).tolist() == [1.0, 2.0, 3.0, 4.0]
    copy = np.array(buf, copy=True)
    copy[0] = 99
    assert np.asarray(buf)[0] == 1
    del copy
    zm.page_allocator.free(buf)  # the copy is no view


@pytest.mark.skipif(sys.version_info < (3, 12), reason="__buffer__ (PEP 688) is Python 3.12+")
def test_memoryview_counts_as_a_view():
    buf = zm.page_allocator.alloc(16)
    mv = memoryview(buf)
    mv[0] = 42
    with pytest.raises(zm.DanglingViewError):
        zm.page_allocator.free(buf)
    mv.release()
    del mv
    zm.page_allocator.free(buf)


def test_buffer_geometry_is_read_only():
    buf = zm.page_allocator.alloc(16)
    for name in ("address", "nbytes", "alignment"):
        with pytest.raises(AttributeError):
            setattr(buf, name, 1 << 40)
    zm.page_allocator.free(buf)
