"""PageAllocator: options, large alignments, growth through mremap, mlock limits."""

import mmap
import pathlib
import re
import textwrap

import numpy as np
import pytest

import zigmem as zm
from helpers import has_capsh, run_under_memlock_limit

PAGE = mmap.PAGESIZE
THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage")


def resident_pages(view):
    """How many pages of `view` are resident, without touching them."""
    return zm.testing.resident_bytes(view.ctypes.data, view.nbytes) // PAGE


def test_page_size_is_the_os_page_size():
    assert zm.page_allocator.page_size == PAGE
    assert zm.PageAllocator(huge_pages=True).page_size == PAGE


def transparent_huge_pages_mode():
    """The bracketed word of THP's ``enabled`` ("always", "madvise", "never"), or None."""
    try:
        found = re.search(r"\[(\w+)\]", (THP / "enabled").read_text())
    except OSError:
        return None
    return found.group(1) if found else None


def huge_page_size():
    try:
        return int((THP / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 2 << 20


def anon_huge_bytes(address):
    """AnonHugePages of the mapping holding ``address``, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            header = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if header:
                inside = int(header.group(1), 16) <= address < int(header.group(2), 16)
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x} in /proc/self/smaps")


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
    assert resident_pages(vb) == vb.nbytes // PAGE
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


@pytest.mark.skipif(transparent_huge_pages_mode() not in ("always", "madvise"),
                    reason="transparent huge pages are off ([never]) or absent")
def test_huge_pages_are_backed_by_huge_pages():
    # A block aligned to a huge page and spanning several, touched after the madvise
    # (populate=True would fault small pages in before it): the kernel backs it with huge
    # pages, which smaps counts as AnonHugePages of its mapping.
    huge = huge_page_size()
    nbytes = max(4 << 20, 2 * huge)
    hinted, plain = zm.PageAllocator(huge_pages=True), zm.PageAllocator()
    a, b = hinted.alloc(nbytes, alignment=huge), plain.alloc(nbytes, alignment=huge)
    np.asarray(a)[:] = 1
    np.asarray(b)[:] = 1
    try:
        assert anon_huge_bytes(a.address) > 0
        if transparent_huge_pages_mode() == "madvise":  # only the hint asks for them
            assert anon_huge_bytes(b.address) == 0
    finally:
        hinted.free(a)
        plain.free(b)


def test_populated_huge_pages_are_huge_pages():
    # populate=True faults the block in after the hint, so it is backed by huge pages too.
    mode = transparent_huge_pages_mode()
    huge = huge_page_size()
    p = zm.PageAllocator(huge_pages=True, populate=True)
    buf = p.alloc(max(4 << 20, 2 * huge), alignment=huge)
    try:
        assert zm.testing.resident_bytes(buf.address, buf.nbytes) == buf.nbytes  # populated
        if mode in ("always", "madvise"):
            assert anon_huge_bytes(buf.address) > 0
    finally:
        p.free(buf)


def test_realloc_moves_pages_without_losing_data():
    buf = zm.page_allocator.alloc(16 << 20, alignment=PAGE)
    np.asarray(buf).view(np.uint32)[:] = np.arange(4 << 20, dtype=np.uint32)
    new = zm.page_allocator.realloc(buf, 256 << 20)
    assert np.array_equal(np.asarray(new)[: 16 << 20].view(np.uint32),
                          np.arange(4 << 20, dtype=np.uint32))
    zm.page_allocator.free(new)


def test_lock_allocates_resident_memory():
    p = zm.PageAllocator(lock=True)
    buf = p.alloc(64 << 10)
    view = np.asarray(buf)
    assert resident_pages(view) == (64 << 10) // PAGE
    del view
    p.free(buf)


@pytest.mark.skipif(not has_capsh(), reason="needs capsh to drop CAP_IPC_LOCK")
def test_lock_beyond_memlock_limit_names_the_limit():
    script = textwrap.dedent("""
        import mmap
        import zigmem as zm
        p = zm.PageAllocator(lock=True)
        try:
            p.alloc(1 << 20)
        except zm.OutOfMemoryError as e:
            print(e)
        p.free(p.alloc(mmap.PAGESIZE))  # still usable
        print("usable")
    """)
    out = run_under_memlock_limit(script)
    assert "RLIMIT_MEMLOCK is 64.0 KiB" in out and "mlock of 1.0 MiB refused" in out
    assert "usable" in out
