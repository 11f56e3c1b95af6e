"""The allocator conformance suite: every allocator, the same contract (as Zig's testAllocator)."""

import mmap

import numpy as np
import pytest

import zigmem as zm

PAGE = mmap.PAGESIZE
SIZES = [0, 1, 7, 64, PAGE - 1, PAGE, PAGE + 1, 65536, 1 << 20, 5 << 20]


def pattern(n, seed):
    return (np.arange(n, dtype=np.uint32) * 31 + seed).astype(np.uint8)


def alignments(max_align):
    a = 1
    while a <= max_align:
        yield a
        a <<= 4


def test_sizes_and_alignments(any_allocator):
    allocator, max_align = any_allocator
    for align in alignments(max_align):
        bufs = []
        for i, n in enumerate(SIZES):
            buf = allocator.alloc(n, alignment=align)
            assert buf.nbytes == n and buf.alignment == align
            assert buf.address % align == 0
            view = np.asarray(buf)
            assert view.shape == (n,) and view.dtype == np.uint8
            view[:] = pattern(n, i)
            del view
            bufs.append(buf)
        for i, buf in enumerate(bufs):
            assert np.array_equal(np.asarray(buf), pattern(buf.nbytes, i))
        # free in an order other than allocation: odd ones first, then the rest backwards
        for buf in bufs[1::2] + bufs[::2][::-1]:
            allocator.free(buf)
        if isinstance(allocator, (zm.ArenaAllocator, zm.FixedBufferAllocator)):
            allocator.reset()


def test_view_is_zero_copy(any_allocator):
    allocator, _ = any_allocator
    buf = allocator.alloc(256)
    view = np.asarray(buf)
    assert view.__array_interface__["data"][0] == buf.address
    view[:] = 5
    assert np.asarray(buf)[100] == 5  # a second view sees the first one's writes
    del view
    allocator.free(buf)


@pytest.mark.parametrize("grow", [True, False])
def test_realloc_keeps_contents(any_allocator, grow):
    allocator, _ = any_allocator
    buf = allocator.alloc(10000, alignment=64)
    np.asarray(buf)[:] = pattern(10000, 3)
    new_size = 3 << 20 if grow else 100
    new = allocator.realloc(buf, new_size)
    assert new.nbytes == new_size and new.address % 64 == 0
    kept = min(10000, new_size)
    assert np.array_equal(np.asarray(new)[:kept], pattern(10000, 3)[:kept])
    assert not buf.is_live
    with pytest.raises(zm.DoubleFreeError):
        allocator.free(buf)
    allocator.free(new)


def test_resize_in_place_changes_size_only_on_success(any_allocator):
    allocator, _ = any_allocator
    buf = allocator.alloc(8192)
    address = buf.address
    np.asarray(buf)[:] = 1
    if allocator.resize(buf, 4096):
        assert buf.nbytes == 4096 and buf.address == address
        assert (np.asarray(buf) == 1).all()
    else:
        assert buf.nbytes == 8192
    allocator.free(buf)


def test_zero_length_is_well_defined(any_allocator):
    allocator, _ = any_allocator
    a, b = allocator.alloc(0), allocator.alloc(0, alignment=PAGE)
    assert np.asarray(a).size == 0 and b.address % PAGE == 0
    grown = allocator.realloc(a, 100)
    np.asarray(grown)[:] = 9
    assert (np.asarray(grown) == 9).all()
    shrunk = allocator.realloc(grown, 0)
    assert shrunk.nbytes == 0
    allocator.free(shrunk)
    allocator.free(b)


def test_context_manager_deinits(any_allocator):
    allocator, _ = any_allocator
    with allocator as a:
        a.free(a.alloc(100))
    if not isinstance(allocator, zm.PageAllocator):  # the page allocator has no state
        with pytest.raises(zm.UseAfterFreeError, match="deinitialised"):
            allocator.alloc(10)


def test_bad_input_is_reported_and_harmless(any_allocator):
    allocator, _ = any_allocator
    with pytest.raises(zm.InvalidArgumentError, match="negative"):
        allocator.alloc(-1)
    with pytest.raises(zm.InvalidArgumentError, match="power of two"):
        allocator.alloc(10, alignment=3)
    with pytest.raises(zm.InvalidArgumentError, match="power of two"):
        allocator.alloc(10, alignment=0)
    with pytest.raises(zm.InvalidArgumentError, match="integer"):
        allocator.alloc(1.5)
    with pytest.raises(zm.OutOfMemoryError):
        allocator.alloc(2**64)
    with pytest.raises(zm.OutOfMemoryError, match="too large|out of memory"):
        allocator.alloc(2**64 - 100)
    with pytest.raises(zm.InvalidArgumentError):
        allocator.free("not a buffer")
    # still usable afterwards
    buf = allocator.alloc(100)
    np.asarray(buf)[:] = 1
    allocator.free(buf)
