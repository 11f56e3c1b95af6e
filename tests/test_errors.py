"""Misuse of the allocator interface: each a precise exception; the allocator survives."""

import pytest

import zigmem as zm


def test_hierarchy_subclasses_the_builtins():
    assert issubclass(zm.OutOfMemoryError, MemoryError)
    assert issubclass(zm.InvalidArgumentError, ValueError)
    assert issubclass(zm.WeightFormatError, ValueError)
    assert issubclass(zm.ArenaEscapeError, zm.DanglingViewError)
    for cls in (zm.DoubleFreeError, zm.UseAfterFreeError, zm.BufferOverflowError,
                zm.InvalidFreeError, zm.LeakError, zm.DanglingViewError):
        assert issubclass(cls, zm.MemorySafetyError)
        assert issubclass(cls, zm.ZigmemError)


def test_double_free_names_address_and_size():
    buf = zm.page_allocator.alloc(3000)
    zm.page_allocator.free(buf)
    with pytest.raises(zm.DoubleFreeError, match=rf"0x{buf.address:x} \(2.9 KiB\)"):
        zm.page_allocator.free(buf)


def test_free_into_the_wrong_allocator():
    arena = zm.ArenaAllocator()
    buf = arena.alloc(64)
    with pytest.raises(zm.InvalidFreeError, match="belongs to ArenaAllocator"):
        zm.page_allocator.free(buf)
    arena.free(buf)  # the right one still works
    arena.deinit()


def test_oom_from_the_os_names_the_size():
    with pytest.raises(zm.OutOfMemoryError, match="PageAllocator.alloc"):
        zm.page_allocator.alloc(1 << 60)
    zm.page_allocator.free(zm.page_allocator.alloc(10))


def test_fixed_buffer_full_says_how_much_is_left():
    fba = zm.FixedBufferAllocator(bytearray(1000))
    fba.alloc(600, alignment=1)
    with pytest.raises(zm.OutOfMemoryError, match="only 400 B left"):
        fba.alloc(500, alignment=1)
    fba.alloc(400, alignment=1)


def test_fixed_buffer_needs_a_writable_contiguous_buffer():
    import numpy as np

    with pytest.raises(zm.InvalidArgumentError, match="writable"):
        zm.FixedBufferAllocator(b"read-only bytes")
    with pytest.raises(zm.InvalidArgumentError):
        zm.FixedBufferAllocator(np.zeros((10, 10))[:, ::2])


def test_bad_reset_modes():
    arena = zm.ArenaAllocator()
    with pytest.raises(zm.InvalidArgumentError, match="unknown reset mode"):
        arena.reset("everything")
    with pytest.raises(zm.InvalidArgumentError, match="limit"):
        arena.reset("retain_with_limit")
    with pytest.raises(zm.InvalidArgumentError):
        arena.reset(limit=-5)
    arena.deinit()


def test_wrappers_need_an_allocator():
    with pytest.raises(zm.InvalidArgumentError, match="zigmem allocator"):
        zm.ArenaAllocator(child=bytearray(10))
    with pytest.raises(zm.InvalidArgumentError):
        zm.CountingAllocator(child=None)
