"""GeneralPurposeAllocator: each case of the README's safety table, reported precisely.

A buggy C extension is played by ctypes.memmove on buf.address; an out-of-bounds numpy view
by numpy.lib.stride_tricks.as_strided.
"""

import ctypes
import re
import threading

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

import zigmem as zm
from helpers import flip
from zigmem._binding import lib

HERE = re.escape(__file__.rsplit("/", 1)[-1])


@pytest.fixture
def gpa():
    g = zm.GeneralPurposeAllocator()
    yield g
    g.deinit()




def out_of_bounds(buf, start, n):
    """A numpy view reaching n bytes from start, relative to the block (may be outside)."""
    base = np.asarray(buf)
    return as_strided(base[:1], shape=(n,), strides=(1,))[start:] if start >= 0 else \
        np.frombuffer((ctypes.c_char * n).from_address(buf.address + start), np.uint8)


def test_overflow_by_one_byte_at_free(gpa):
    buf = gpa.alloc(100)
    flip(buf.address + 100, 1)
    with pytest.raises(zm.BufferOverflowError,
                       match=rf"1 bytes after the end .*\(100 B\).*offset 100 .*{HERE}:\d+"):
        gpa.free(buf)
    gpa.check()  # the free went through; nothing left to report


def test_overflow_by_a_whole_red_zone_through_a_numpy_view(gpa):
    buf = gpa.alloc(64, alignment=16)
    view = out_of_bounds(buf, 0, 64 + 16)
    view[64:] ^= 0xFF  # the 16 bytes past the end: the whole red zone
    del view
    with pytest.raises(zm.BufferOverflowError, match=r"16 bytes after the end"):
        gpa.check()
    gpa.free(buf)  # repaired by the report: the free itself is clean


def test_underflow(gpa):
    buf = gpa.alloc(32, alignment=16)
    flip(buf.address - 3, 3)
    with pytest.raises(zm.BufferOverflowError, match=r"underflow: 3 bytes before the start.*3 bytes before it"):
        gpa.free(buf)


def test_immediate_double_free_names_all_three_sites(gpa):
    buf = gpa.alloc(10)  # allocated here
    gpa.free(buf)        # first free
    with pytest.raises(zm.DoubleFreeError) as e:
        gpa.free(buf)    # second free
    msg = str(e.value)
    lines = [int(n) for n in re.findall(rf"{HERE}:(\d+)", msg)]
    assert len(lines) == 3 and lines[0] < lines[1] < lines[2]
    assert "allocated at" in msg and "first freed at" in msg and "freed again at" in msg


def test_double_free_after_the_address_could_be_reused(gpa):
    first = gpa.alloc(48)
    address = first.address
    gpa.free(first)
    others = [gpa.alloc(48) for _ in range(200)]
    assert address not in {b.address for b in others}  # quarantined: not handed out again
    with pytest.raises(zm.DoubleFreeError):
        gpa.free(first)
    for b in others:
        gpa.free(b)


def test_double_free_in_c_is_reported_with_sites(gpa):
    # A C caller (no Buffer bookkeeping) frees the same pointer twice.
    buf = gpa.alloc(200, alignment=16)
    g = gpa._g
    assert lib.zm_guard_free(g, g.generation, buf.address, 200, 16, 0) == 0
    assert lib.zm_guard_free(g, g.generation, buf.address, 200, 16, 0) == lib.ZM_ERR_DOUBLE_FREE
    with pytest.raises(zm.DoubleFreeError, match=rf"allocated at .*{HERE}"):
        zm._binding.raise_failure("C free")


def test_double_free_from_two_threads_exactly_one_wins():
    for _ in range(30):
        gpa = zm.GeneralPurposeAllocator(stack_trace_frames=0)
        buf = gpa.alloc(128)
        outcomes = []
        barrier = threading.Barrier(2)

        def free():
            barrier.wait()
            try:
                gpa.free(buf)
                outcomes.append("ok")
            except zm.DoubleFreeError:
                outcomes.append("double")

        threads = [threading.Thread(target=free) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["double", "ok"]
        assert gpa.deinit() == "ok"


@pytest.mark.parametrize("case, pattern", [
    ("interior", r"10 bytes inside block 0x[0-9a-f]+ \(1000 B\)"),
    ("size", r"freed with size 999 but allocated with 1000"),
    ("alignment", r"freed with alignment 32 but allocated with 16"),
    ("unknown", r"never returned it"),
])
def test_invalid_frees(gpa, case, pattern):
    buf = gpa.alloc(1000, alignment=16)
    other = zm.page_allocator.alloc(4096)
    args = {
        "interior": (buf.address + 10, 990, 16),
        "size": (buf.address, 999, 16),
        "alignment": (buf.address, 1000, 32),
        "unknown": (other.address, 64, 16),
    }[case]
    assert lib.zm_guard_free(gpa._g, gpa._g.generation, *args, 0) == lib.ZM_ERR_INVALID_FREE
    with pytest.raises(zm.InvalidFreeError, match=pattern):
        zm._binding.raise_failure("C free")
    gpa.free(buf)  # the allocator is unharmed
    zm.page_allocator.free(other)


def test_free_into_another_allocator_is_invalid(gpa):
    buf = gpa.alloc(8)
    with pytest.raises(zm.InvalidFreeError, match="belongs to GeneralPurposeAllocator"):
        zm.page_allocator.free(buf)
    gpa.free(buf)


def test_write_after_free_found_by_check_with_both_sites(gpa):
    buf = gpa.alloc(256)
    address = buf.address
    gpa.free(buf)
    flip(address + 40, 5)
    with pytest.raises(zm.UseAfterFreeError,
                       match=rf"written after it was freed: 5 bytes changed, the first at offset 40"
                             rf".*allocated at .*{HERE}.*freed at .*{HERE}"):
        gpa.check()
    gpa.check()  # reported once


def test_write_after_free_found_when_leaving_quarantine():
    gpa = zm.GeneralPurposeAllocator(quarantine_bytes=4096)
    victim = gpa.alloc(1024)
    address = victim.address
    gpa.free(victim)
    flip(address, 8)
    with pytest.raises(zm.UseAfterFreeError, match=f"0x{address:x}"):
        for _ in range(10):
            gpa.free(gpa.alloc(1024))  # pushes the victim out of quarantine
    assert gpa.deinit() == "ok"


def test_write_after_free_found_at_deinit():
    gpa = zm.GeneralPurposeAllocator()
    buf = gpa.alloc(64)
    address = buf.address
    gpa.free(buf)
    flip(address, 1)
    with pytest.raises(zm.UseAfterFreeError):
        gpa.deinit()
    with pytest.raises(zm.UseAfterFreeError, match="deinitialised"):
        gpa.alloc(1)  # released all the same


def test_read_after_free_reads_poison_not_old_data(gpa):
    buf = gpa.alloc(4096)
    np.asarray(buf)[:] = 7
    address = buf.address
    gpa.free(buf)
    stale = bytes((ctypes.c_ubyte * 4096).from_address(address))
    assert stale.count(7) < 4096 // 4  # poison, not the old contents
    with pytest.raises(zm.UseAfterFreeError):
        np.asarray(buf)  # and through zigmem it cannot even be viewed


def test_leaks_at_deinit_and_leak_error_lists_every_block():
    gpa = zm.GeneralPurposeAllocator()
    kept = [gpa.alloc(100), gpa.alloc(2000)]
    assert [b.nbytes for b in sorted(gpa.leaks(), key=lambda b: b.nbytes)] == [100, 2000]
    assert gpa.deinit() == "leak"
    assert not kept[0].is_live

    with pytest.raises(zm.LeakError, match=r"2 blocks \(2.0 KiB\) leaked") as e:
        with zm.GeneralPurposeAllocator() as g2:
            g2.alloc(1000)
            g2.alloc(1048)
    assert len(re.findall(rf"{HERE}:\d+ in test_leaks", str(e.value))) == 2


def test_no_leak_means_ok():
    with zm.GeneralPurposeAllocator() as gpa:
        gpa.free(gpa.alloc(10))
    assert gpa.deinit() == "ok"


def test_memory_limit():
    gpa = zm.GeneralPurposeAllocator(memory_limit=1 << 20)
    a = gpa.alloc(600 << 10)
    with pytest.raises(zm.OutOfMemoryError, match=r"exceed the memory limit of 1.0 MiB"):
        gpa.alloc(600 << 10)
    np.asarray(a)[:] = 5
    assert not gpa.resize(a, 2 << 20)  # a failed growing resize leaves the block untouched
    assert a.nbytes == 600 << 10 and (np.asarray(a) == 5).all()
    with pytest.raises(zm.OutOfMemoryError):
        gpa.realloc(a, 2 << 20)
    assert a.is_live
    gpa.free(a)
    gpa.free(gpa.alloc(1 << 20))  # the limit counts live bytes only
    assert gpa.stats.live_bytes == 0 and gpa.stats.peak_bytes == 1 << 20
    assert gpa.deinit() == "ok"


def test_stack_trace_frames_zero_records_nothing():
    gpa = zm.GeneralPurposeAllocator(stack_trace_frames=0)
    buf = gpa.alloc(10)
    assert gpa.leaks()[0].site == []
    gpa.free(buf)
    gpa.deinit()


def test_stack_trace_frames_records_callers():
    gpa = zm.GeneralPurposeAllocator(stack_trace_frames=2)

    def inner():
        return gpa.alloc(10)

    def outer():
        return inner()

    buf = outer()
    site = gpa.leaks()[0].site
    assert len(site) == 2 and "in inner" in site[0] and "in outer" in site[1]
    gpa.free(buf)
    gpa.deinit()


def test_error_in_a_vtable_free_is_reported_by_the_next_call():
    gpa = zm.GeneralPurposeAllocator()
    arena = zm.ArenaAllocator(gpa)
    buf = arena.alloc(100, alignment=16)
    # `buf` starts right after the arena buffer's 16-byte node header; the byte before that
    # header is the GPA's left red zone of the arena's buffer
    flip(buf.address - 16 - 1, 1)
    arena.deinit()  # the arena frees its buffer through the GPA's vtable: no status there
    with pytest.raises(zm.BufferOverflowError, match="underflow"):
        gpa.alloc(1)
    gpa.free(gpa.alloc(1))
    assert gpa.deinit() == "ok"


def test_safety_off_is_a_plain_fast_allocator():
    gpa = zm.GeneralPurposeAllocator(safety=False)
    bufs = [gpa.alloc(n) for n in (16, 100, 4096, 100_000)]
    assert gpa.leaks() == []
    assert gpa.resize(bufs[0], 24)  # same size class: in place
    for b in bufs:
        gpa.free(b)
    assert gpa.stats.live_bytes == 0 and gpa.stats.peak_bytes == 24 + 100 + 4096 + 100_000
    assert gpa.deinit() == "ok"


def test_deinit_refuses_while_views_live(gpa):
    buf = gpa.alloc(10)
    view = np.asarray(buf)
    with pytest.raises(zm.DanglingViewError):
        gpa.deinit()
    del view
    gpa.free(buf)


def test_stress_from_threads_no_false_report_no_lost_block():
    gpa = zm.GeneralPurposeAllocator(stack_trace_frames=2, quarantine_bytes=1 << 20)
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        live = []
        try:
            for _ in range(1500):
                if live and rng.random() < 0.5:
                    buf, value = live.pop(rng.integers(len(live)))
                    view = np.asarray(buf)
                    assert (view == value).all(), "block contents changed"
                    del view
                    gpa.free(buf)
                else:
                    buf = gpa.alloc(int(rng.integers(1, 5000)), alignment=int(2 ** rng.integers(0, 8)))
                    value = int(rng.integers(256))
                    np.asarray(buf)[:] = value
                    live.append((buf, value))
            for buf, _ in live:
                gpa.free(buf)
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    gpa.check()
    assert gpa.stats.live_count == 0 and gpa.stats.live_bytes == 0
    assert gpa.deinit() == "ok"
