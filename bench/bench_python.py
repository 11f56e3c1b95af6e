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
    print(f"{'case':<52} {'median':>12} {'ratio':>8}   target")
    for name, seconds, baseline, target in rows:
        ratio = seconds / baseline
        print(f"{name:<52} {seconds * 1e6:10.3f} us {ratio:7.3f}x   {target}")


def per_token(fn, tokens: int) -> float:
    """Median seconds of one token of fn over `tokens` tokens (after one warm-up token)."""
    fn()
    times = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tensor_and_bridge_rows(arena):
    rows = []
    for shape in [(64,), (128, 576)]:
        def tensor_roundtrip(shape=shape):
            zm.Tensor(arena, shape).deinit()

        def numpy_roundtrip(shape=shape):
            x = np.empty(shape, np.float32)  # noqa: F841

        base = per_op(numpy_roundtrip, 10000)
        rows += [
            (f"np.empty{shape} float32 + del (baseline)", base, base, ""),
            (f"Tensor(arena, {shape}) + deinit", per_op(tensor_roundtrip, 10000), base,
             "<= 4x"),
        ]

    def small_empty():
        np.empty(64, np.float32)

    base = per_op(small_empty, 20000)
    with arena.numpy():
        inside = per_op(small_empty, 20000)
    rows += [
        ("np.empty(64) outside any block (baseline)", base, base, ""),
        ("np.empty(64) inside `with arena.numpy()`", inside, base, "<= 1.25x"),
    ]

    # A per-token loop whose temporaries are 64 MiB each (a scaled residual stream: two
    # elementwise passes, as activations do): plain numpy maps and faults fresh pages for
    # every temporary; the arena bridge reuses retained, already faulted pages.
    big = np.random.default_rng(0).standard_normal(16 << 20).astype(np.float32)

    def big_token():
        h = big * 1.5
        r = h + big
        return float(r[::4096].sum())

    def big_token_in_arena():
        with arena.numpy():
            value = big_token()
        arena.reset("retain_capacity")
        return value

    base = per_token(big_token, 15)
    rows += [
        ("token, 64 MiB temporaries: plain numpy (baseline)", base, base, ""),
        ("token, 64 MiB temporaries: arena bridge + reset", per_token(big_token_in_arena, 15),
         base, "<= 0.67x (>= 1.5x faster)"),
    ]

    # Small temporaries, the decode step of a small model: many ops on 576-wide vectors.
    w = np.random.default_rng(1).standard_normal((576, 576)).astype(np.float32)
    x = np.ones(576, np.float32)

    def small_token():
        h = x
        for _ in range(8):
            h = np.tanh(w @ h) * 0.5 + h
        return float(h[0])

    def small_token_in_arena():
        with arena.numpy():
            value = small_token()
        arena.reset("retain_capacity")
        return value

    base = per_token(small_token, 400)
    rows += [
        ("token, small temporaries: plain numpy (baseline)", base, base, ""),
        ("token, small temporaries: arena bridge + reset", per_token(small_token_in_arena, 400),
         base, "<= 1.1x"),
    ]
    return rows


def main() -> None:
    arena = zm.ArenaAllocator()
    alloc, free = arena.alloc, arena.free
    page_alloc, page_free = zm.page_allocator.alloc, zm.page_allocator.free

    def arena_roundtrip():
        free(alloc(64))

    def numpy_64():
        np.empty(64, np.uint8)  # dropped at once: the baseline of alloc + free

    def arena_alloc_view():
        np.asarray(alloc(64))
        arena.reset()

    def page_roundtrip():
        page_free(page_alloc(1 << 16))

    def numpy_64k():
        np.empty(1 << 16, np.uint8)

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
    rows += tensor_and_bridge_rows(arena)
    table(rows)
    arena.deinit()
    gpa.deinit()
    bare.deinit()


if __name__ == "__main__":
    main()
