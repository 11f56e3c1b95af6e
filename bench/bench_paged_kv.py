"""PagedKVCache against one preallocated KVCache per conversation, in one process.

(a) Memory. 8 conversations with prompt lengths drawn from 20-400 tokens and answers from
16-256 tokens (seeded), served together in a 2,048-token context with SmolLM2-135M's KV
geometry (30 layers, 3 KV heads, head_dim 64, float16): each is admitted with its prompt
(one prefill step), then decodes one token per step and is freed when its answer is done.
Measured at the peak: KV bytes reserved by the paged cache (blocks in use) and by the
slabs (8 x max_seq_len), the waste of each (slots reserved but empty / slots reserved),
and the resident bytes of each.

(b) Paged attention, decode: 8 sequences x 1,024 positions, 9 query heads over 3 KV heads,
head_dim 64, float16 blocks, against numpy attention over one contiguous preallocated slab of
the same data (float32, head-major so that every matmul is one BLAS call; and float16
converted each call). Medians of interleaved runs; ratios against the same run's baseline.
"""

from __future__ import annotations

import ctypes
import glob
import os
import statistics
import time

import numpy as np

import zigmem as zm

LAYERS, KV_HEADS, HEADS, DIM, CONTEXT, BLOCK = 30, 3, 9, 64, 2048, 16
CONVERSATIONS = 8


def mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


# ---------------------------------------------------------------- (a) memory

def memory() -> None:
    rng = np.random.default_rng(12)
    prompts = rng.integers(20, 401, CONVERSATIONS)
    answers = rng.integers(16, 257, CONVERSATIONS)
    ones = np.ones((int(prompts.max()), KV_HEADS, DIM), np.float16)
    num_blocks = CONVERSATIONS * CONTEXT // BLOCK  # the slabs' reservation, in blocks
    paged = zm.PagedKVCache(zm.page_allocator, LAYERS, KV_HEADS, DIM, num_blocks, BLOCK)
    slabs = [zm.KVCache(zm.page_allocator, LAYERS, KV_HEADS, DIM, CONTEXT) for _ in prompts]
    seqs = [paged.add_sequence() for _ in prompts]
    remaining = list(answers)
    peak = None  # (blocks in use, stats, slab tokens, resident paged, resident slabs)
    wastes = []  # (paged, slabs) after every step, for the mean over the run

    def step(i: int, n: int) -> None:
        for layer in range(LAYERS):
            paged.append(seqs[i], layer, ones[:n], ones[:n])
            slabs[i].append(layer, ones[:n], ones[:n])

    for i, n in enumerate(prompts):
        step(i, int(n))
    while any(remaining):
        for i in range(CONVERSATIONS):
            if remaining[i]:
                step(i, 1)
                remaining[i] -= 1
        stats = paged.stats
        live = [i for i in range(CONVERSATIONS) if seqs[i] is not None]
        slots = len(live) * CONTEXT
        wastes.append((stats.waste, (slots - sum(slabs[i].seq_len for i in live)) / slots))
        if peak is None or stats.blocks_in_use > peak[0]:
            slab_res = sum(zm.testing.resident_bytes(b.address, b.nbytes)
                           for s in slabs for b in s._slabs)
            peak = (stats.blocks_in_use, stats, sum(s.seq_len for s in slabs),
                    paged.resident_bytes(), slab_res)
        for i in range(CONVERSATIONS):
            if remaining[i] == 0 and seqs[i] is not None:
                paged.free(seqs[i])  # a finished conversation gives its blocks back
                seqs[i] = None
    _, stats, tokens, paged_res, slab_res = peak
    slab_bytes = sum(s.nbytes for s in slabs)
    slab_slots = CONVERSATIONS * CONTEXT
    print(f"(a) {CONVERSATIONS} conversations, prompts {sorted(prompts.tolist())}, answers "
          f"{sorted(answers.tolist())}; context {CONTEXT}, SmolLM2-135M KV geometry, float16")
    print(f"    at the peak: {stats.tokens_held} positions held in {stats.sequences} sequences")
    print("    cache                          KV reserved   waste     resident")
    print(f"    PagedKVCache (blocks in use)  {mib(stats.bytes_in_use)}  {100 * stats.waste:5.1f}%"
          f"  {mib(paged_res)}")
    print(f"    KVCache x {CONVERSATIONS} (preallocated)     {mib(slab_bytes)}  "
          f"{100 * (slab_slots - tokens) / slab_slots:5.1f}%  {mib(slab_res)}")
    print(f"    waste averaged over all {len(wastes)} decode steps: paged "
          f"{100 * statistics.mean(w[0] for w in wastes):.1f}%, slabs "
          f"{100 * statistics.mean(w[1] for w in wastes):.1f}%")
    print(f"    ratio reserved paged / slabs: {stats.bytes_in_use / slab_bytes:.3f} "
          f"({stats.sequences} live conversations in blocks vs {CONVERSATIONS} slabs reserved "
          "for the full context)")
    print("    Resident bytes are about equal: on the page allocator a slab's untouched pages "
          "cost no RAM.\n    On a CPU the win is admission (what can be promised up front), "
          "prefix sharing and fork, not RSS.")
    for s in seqs:
        if s is not None:
            paged.free(s)
    paged.deinit()
    for s in slabs:
        s.deinit()


# ---------------------------------------------------------------- (b) attention

def blas_kernel() -> str:
    """numpy's BLAS, and the kernel OpenBLAS picked (OPENBLAS_CORETYPE can force it)."""
    name = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    text = f"{name.get('name')} {name.get('version')}"
    libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*")
    for path in glob.glob(libs):
        lib = ctypes.CDLL(path)
        for symbol in ("scipy_openblas_get_corename64_", "openblas_get_corename64_",
                       "openblas_get_corename"):
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                text += f", kernel {fn().decode()}"
                break
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                      "OPENBLAS_NUM_THREADS") if k in os.environ}
    return text + (f", env {env}" if env else "")


def attention(rounds: int = 60) -> None:
    seqs_n, positions = 8, 1024
    rng = np.random.default_rng(0)
    k = rng.standard_normal((seqs_n, positions, KV_HEADS, DIM)).astype(np.float16)
    v = rng.standard_normal((seqs_n, positions, KV_HEADS, DIM)).astype(np.float16)
    cache = zm.PagedKVCache(zm.page_allocator, 1, KV_HEADS, DIM,
                            num_blocks=seqs_n * positions // BLOCK, block_size=BLOCK)
    ids = []
    for i in range(seqs_n):
        s = cache.add_sequence()
        cache.append(s, 0, k[i], v[i])
        ids.append(s)
    q = rng.standard_normal((seqs_n, HEADS, DIM)).astype(np.float32)
    out = np.empty_like(q)
    # the slab baselines: head-major [seq, kv head, position, dim], made once
    k32 = np.ascontiguousarray(k.transpose(0, 2, 1, 3), dtype=np.float32)
    v32 = np.ascontiguousarray(v.transpose(0, 2, 1, 3), dtype=np.float32)
    k16, v16 = k32.astype(np.float16), v32.astype(np.float16)
    group, scale = HEADS // KV_HEADS, 1 / np.sqrt(DIM)

    def numpy_attention(kk, vv):
        qq = q.reshape(seqs_n, KV_HEADS, group, DIM)
        scores = qq @ kk.transpose(0, 1, 3, 2).astype(np.float32, copy=False) * scale
        scores -= scores.max(-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(-1, keepdims=True)
        return (scores @ vv.astype(np.float32, copy=False)).reshape(seqs_n, HEADS, DIM)

    default_threads = zm.get_num_threads()

    def paged(threads):
        zm.set_num_threads(threads)
        cache.attention(0, ids, q, out=out)

    cases = {
        f"paged attention, C, {default_threads} threads": lambda: paged(default_threads),
        "paged attention, C, 1 thread": lambda: paged(1),
        "numpy, float32 slab (baseline)": lambda: numpy_attention(k32, v32),
        "numpy, float16 slab converted per call": lambda: numpy_attention(k16, v16),
    }
    times = {name: [] for name in cases}
    for _ in range(rounds):  # interleaved: the machine's noise falls on every case alike
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    paged(default_threads)
    worst = float(np.abs(out - numpy_attention(k32, v32)).max())
    base = statistics.median(times["numpy, float32 slab (baseline)"])
    from zigmem._binding import ffi, lib

    print(f"\n(b) paged attention, decode: {seqs_n} sequences x {positions} positions, "
          f"{HEADS} query / {KV_HEADS} KV heads, head_dim {DIM}, float16 blocks of {BLOCK}; "
          f"kernel {ffi.string(lib.zm_paged_attention_isa()).decode()}; numpy BLAS: "
          f"{blas_kernel()}; median of {rounds}")
    print("    case                                          median    vs baseline")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"    {name:<44} {m * 1e3:7.3f} ms   {m / base:5.2f}x")
    print(f"    largest difference paged vs numpy float32: {worst:.2e} (target: time <= 1.2x)")
    zm.set_num_threads(default_threads)
    cache.deinit()


def main() -> None:
    print("== bench_paged_kv: PagedKVCache vs a KVCache per conversation")
    memory()
    attention()


if __name__ == "__main__":
    main()
