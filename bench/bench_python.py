"""Python-level benchmarks: zigmem calls against the numpy a user would otherwise write.

Each case is timed in batches; the table prints the median time per operation over the
batches and its ratio to the baseline run in the same process, right beside it.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

import zigmem as zm

BATCHES = 25


def per_op(fn, number: int) -> float:
    """Median seconds per call of fn over BATCHES batches of `number` calls."""
    times = []
    for _ in range(BATCHES):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times)


def table(rows) -> None:
    print(f"{'case':<52} {'median':>10} {'ratio':>8}   target")
    for name, seconds, baseline, target in rows:
        ratio = seconds / baseline
        print(f"{name:<52} {seconds * 1e6:8.3f} us {ratio:7.3f}x   {target}")


def main() -> None:
    arena = zm.ArenaAllocator()
    alloc, free = arena.alloc, arena.free
    page_alloc, page_free = zm.page_allocator.alloc, zm.page_allocator.free

    def arena_roundtrip():
        free(alloc(64))

    def numpy_64():
        del_ = np.empty(64, np.uint8)  # noqa: F841 - dropped at once, as the baseline

    def arena_alloc_view():
        np.asarray(alloc(64))
        arena.reset()

    def page_roundtrip():
        page_free(page_alloc(1 << 16))

    def numpy_64k():
        del_ = np.empty(1 << 16, np.uint8)  # noqa: F841

    base = per_op(numpy_64, 20000)
    rows = [
        ("np.empty(64, uint8) + del (baseline)", base, base, ""),
        ("arena alloc(64) + free", per_op(arena_roundtrip, 20000), base, "median <= 1 us"),
        ("arena alloc(64) + np.asarray + reset", per_op(arena_alloc_view, 5000), base, ""),
    ]
    gpa = zm.GeneralPurposeAllocator()  # safety on, stack_trace_frames=6
    gpa_alloc, gpa_free = gpa.alloc, gpa.free
    bare = zm.GeneralPurposeAllocator(stack_trace_frames=0)

    def gpa_roundtrip():
        gpa_free(gpa_alloc(64))

    def bare_roundtrip():
        bare.free(bare.alloc(64))

    rows += [
        ("gpa (safety, 6 frames) alloc(64) + free", per_op(gpa_roundtrip, 5000), base,
         "median <= 5 us"),
        ("gpa (safety, no frames) alloc(64) + free", per_op(bare_roundtrip, 5000), base, ""),
    ]
    base64k = per_op(numpy_64k, 5000)
    rows += [
        ("np.empty(64 KiB) + del (baseline)", base64k, base64k, ""),
        ("page_allocator alloc(64 KiB) + free", per_op(page_roundtrip, 5000), base64k, ""),
    ]
    table(rows)
    arena.deinit()
    gpa.deinit()
    bare.deinit()


if __name__ == "__main__":
    main()
