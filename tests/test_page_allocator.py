"""PageAllocator: options, large alignments, growth through mremap, mlock limits."""

import textwrap

import numpy as np
import pytest

import zigmem as zm
from helpers import has_capsh, run_under_memlock_limit


def resident_pages(view):
    """How many pages of `view` are resident, without touching them."""
    return zm.testing.resident_bytes(view.ctypes.data, view.nbytes) // 4096


def test_alignment_beyond_a_page():
    for align in (1 << 16, 2 << 20, 1 << 30):
        buf = zm.page_allocator.alloc(100, alignment=align)
        assert buf.address % align == 0
        np.asarray(buf)[:] = 1
        zm.page_allocator.free(buf)


def test_populate_faults_pages_in_and_default_does_not():
    lazy = zm.PageAllocator()
    eager = zm.PageAllocator(populate=True)
    a, b = lazy.alloc(4 << 20), eager.alloc(4 << 20)
    va, vb = np.asarray(a), np.asarray(b)
    assert resident_pages(va) == 0
    assert resident_pages(vb) == vb.nbytes // 4096
    del va, vb
    lazy.free(a)
    eager.free(b)


def test_huge_pages_is_a_working_hint():
    p = zm.PageAllocator(huge_pages=True)
    buf = p.alloc(8 << 20, alignment=2 << 20)
    view = np.asarray(buf)
    view[:] = 3
    assert view.sum() == 3 * (8 << 20)
    del view
    p.free(buf)


def test_realloc_moves_pages_without_losing_data():
    buf = zm.page_allocator.alloc(16 << 20, alignment=4096)
    np.asarray(buf).view(np.uint32)[:] = np.arange(4 << 20, dtype=np.uint32)
    new = zm.page_allocator.realloc(buf, 256 << 20)
    assert np.array_equal(np.asarray(new)[: 16 << 20].view(np.uint32),
                          np.arange(4 << 20, dtype=np.uint32))
    zm.page_allocator.free(new)


def test_lock_allocates_resident_memory():
    p = zm.PageAllocator(lock=True)
    buf = p.alloc(64 << 10)
    view = np.asarray(buf)
    assert resident_pages(view) == 16
    del view
    p.free(buf)


@pytest.mark.skipif(not has_capsh(), reason="needs capsh to drop CAP_IPC_LOCK")
def test_lock_beyond_memlock_limit_names_the_limit():
    script = textwrap.dedent("""
        import zigmem as zm
        p = zm.PageAllocator(lock=True)
        try:
            p.alloc(1 << 20)
        except zm.OutOfMemoryError as e:
            print(e)
        p.free(p.alloc(4096))  # still usable
        print("usable")
    """)
    out = run_under_memlock_limit(script)
    assert "RLIMIT_MEMLOCK is 64.0 KiB" in out and "mlock of 1.0 MiB refused" in out
    assert "usable" in out
