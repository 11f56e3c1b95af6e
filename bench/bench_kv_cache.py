"""The KV cache in a decode loop, against what a numpy user writes by hand, in one process.

2,048 single-token steps into an 8-layer cache with 4 KV heads of dimension 64, float32;
every step writes K and V of every layer. Baselines: growing arrays with np.concatenate
every token, and preallocated numpy arrays written by slice assignment.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

import zigmem as zm

LAYERS, HEADS, DIM, TOKENS = 8, 4, 64, 2048
K = np.ones((1, HEADS, DIM), np.float32)


def decode_zigmem(growth: str):
    """Seconds for the whole loop, and the per-step times."""
    cache = zm.KVCache(zm.page_allocator, LAYERS, HEADS, DIM, max_seq_len=TOKENS,
                       dtype="float32", growth=growth)
    append, steps = cache.append, []
    t0 = time.perf_counter()
    for _ in range(TOKENS):
        s = time.perf_counter()
        for layer in range(LAYERS):
            append(layer, K, K)
        steps.append(time.perf_counter() - s)
    total = time.perf_counter() - t0
    copied = cache.bytes_copied
    cache.deinit()
    return total, steps, copied


def decode_preallocated():
    ks = [np.zeros((TOKENS, HEADS, DIM), np.float32) for _ in range(LAYERS)]
    vs = [np.zeros((TOKENS, HEADS, DIM), np.float32) for _ in range(LAYERS)]
    t0 = time.perf_counter()
    for pos in range(TOKENS):
        for layer in range(LAYERS):
            ks[layer][pos:pos + 1] = K
            vs[layer][pos:pos + 1] = K
    return time.perf_counter() - t0


def decode_concatenate():
    ks = [np.zeros((0, HEADS, DIM), np.float32) for _ in range(LAYERS)]
    vs = [np.zeros((0, HEADS, DIM), np.float32) for _ in range(LAYERS)]
    t0 = time.perf_counter()
    for _ in range(TOKENS):
        for layer in range(LAYERS):
            ks[layer] = np.concatenate([ks[layer], K])
            vs[layer] = np.concatenate([vs[layer], K])
    return time.perf_counter() - t0


def resident_growth() -> list[tuple[int, int]]:
    """(tokens written, resident bytes of the slabs), for a preallocated cache."""
    cache = zm.KVCache(zm.page_allocator, LAYERS, HEADS, DIM, max_seq_len=TOKENS, dtype="float32")

    def resident():
        return sum(zm.testing.resident_bytes(buf.address, buf.nbytes) for buf in cache._slabs)

    points = [(0, resident())]
    for pos in range(TOKENS):
        for layer in range(LAYERS):
            cache.append(layer, K, K)
        if pos + 1 in (256, 1024, 2048):
            points.append((pos + 1, resident()))
    cache.deinit()
    return points


def main() -> None:
    runs = [decode_zigmem("preallocate") for _ in range(3)]
    pre_total = statistics.median(r[0] for r in runs)
    steps = runs[1][1]
    doubled = [decode_zigmem("double") for _ in range(3)]
    dbl_total = statistics.median(r[0] for r in doubled)
    numpy_pre = statistics.median(decode_preallocated() for _ in range(3))
    concat = decode_concatenate()

    def window(end):  # median step time over the 128 steps before `end` positions
        return statistics.median(steps[end - 128:end])

    print(f"{'case':<58} {'median':>11} {'ratio':>8}   target")
    rows = [
        ("decode loop: preallocated numpy, slice assignment (base)", numpy_pre, numpy_pre, ""),
        ("decode loop: np.concatenate every token (1 run)", concat, numpy_pre, ""),
        ("decode loop: KVCache preallocate", pre_total, numpy_pre, "<= 1.5x"),
        ("decode loop: KVCache double (page allocator)", dbl_total, numpy_pre, ""),
    ]
    for name, value, base, target in rows:
        print(f"{name:<58} {value * 1e3:8.1f} ms {value / base:7.3f}x   {target}")
    print(f"{'KVCache preallocate vs np.concatenate: speed-up':<58} {concat / pre_total:8.1f} x"
          f"{'':9}   >= 20x")
    print(f"{'per-step (8 layers) median at 256 positions':<58} {window(256) * 1e6:8.2f} us")
    print(f"{'per-step (8 layers) median at 2048 positions':<58} {window(2048) * 1e6:8.2f} us"
          f"{window(2048) / window(256):7.3f}x   flat (~1x)")
    print(f"{'growth=double, page allocator: bytes copied by growth':<58} {doubled[0][2]:8d} B"
          f"{'':9}   0")
    for tokens, nbytes in resident_growth():
        print(f"{f'preallocate: resident after {tokens} tokens':<58} {nbytes / 2**20:8.2f} MiB"
              f"   of {2 * LAYERS * TOKENS * HEADS * DIM * 4 / 2**20:.0f} MiB reserved")


if __name__ == "__main__":
    main()
