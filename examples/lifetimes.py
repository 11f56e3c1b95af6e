"""One allocator per lifetime: a small attention decoder running on zigmem memory.

A 4-layer, single-head attention model with random weights decodes 256 tokens:

* weights live for the whole run, in page-allocator memory (huge pages where available);
* the KV cache lives for the conversation: a ``zm.KVCache`` that grows by doubling, which
  on the page allocator moves page table entries (mremap) instead of copying the cache;
* activations live for one token: every temporary comes from an arena that is reset with
  ``retain_capacity`` after each token, so later tokens touch no new pages.

Each subsystem allocates through its own CountingAllocator, and the run ends with
``zm.memory_report()``: where every byte lives.
"""

from __future__ import annotations

import time

import numpy as np

import zigmem as zm

LAYERS, DIM, TOKENS = 4, 256, 256


def view(buf: zm.Buffer, shape, dtype=np.float32) -> np.ndarray:
    """A typed, shaped zero-copy view of a Buffer."""
    return np.asarray(buf).view(dtype).reshape(shape)


def main() -> None:
    weights_mem = zm.CountingAllocator(zm.PageAllocator(huge_pages=True), name="weights")
    kv_mem = zm.CountingAllocator(zm.page_allocator, name="kv_cache")
    act_mem = zm.CountingAllocator(zm.page_allocator, name="activations")
    arena = zm.ArenaAllocator(act_mem)

    rng = np.random.default_rng(0)
    weight_bufs = [weights_mem.alloc(4 * DIM * DIM * 4, alignment=2 << 20) for _ in range(LAYERS)]
    for buf in weight_bufs:  # wq, wk, wv, wo of one layer, side by side
        view(buf, (4, DIM, DIM))[:] = rng.standard_normal((4, DIM, DIM), np.float32) / DIM**0.5
    embed = weights_mem.alloc(DIM * 4)
    view(embed, (DIM,))[:] = rng.standard_normal(DIM, np.float32)

    cache = zm.KVCache(kv_mem, LAYERS, n_kv_heads=1, head_dim=DIM, max_seq_len=TOKENS,
                       dtype="float32", growth="double")
    x_init = view(embed, (DIM,))
    checksum = 0.0
    t0 = time.perf_counter()
    for token in range(TOKENS):
        x = view(arena.alloc(DIM * 4), (DIM,))
        x[:] = x_init * (1 + token / TOKENS)
        for layer, buf in enumerate(weight_bufs):
            w = view(buf, (4, DIM, DIM))
            qkv = view(arena.alloc(3 * DIM * 4), (3, DIM))
            np.matmul(w[:3], x, out=qkv)
            cache.append(layer, qkv[1].reshape(1, 1, DIM), qkv[2].reshape(1, 1, DIM))
            keys, values = cache.keys(layer)[:, 0], cache.values(layer)[:, 0]
            n = keys.shape[0]
            scores = view(arena.alloc(n * 4), (n,))
            np.matmul(keys, qkv[0], out=scores)
            scores -= scores.max()
            np.exp(scores / DIM**0.5, out=scores)
            scores /= scores.sum()
            attended = view(arena.alloc(DIM * 4), (DIM,))
            np.matmul(scores, values, out=attended)
            out = view(arena.alloc(DIM * 4), (DIM,))
            np.matmul(w[3], attended, out=out)
            x += out
            x /= np.sqrt((x * x).mean())
            del w, qkv, keys, values, scores, attended, out
        checksum += float(x[0])
        del x
        arena.reset("retain_capacity")  # every activation of this token, gone at once
    elapsed = time.perf_counter() - t0
    del x_init  # a view of the embedding: zigmem refuses to free memory a view can reach

    print(f"decoded {TOKENS} tokens through {LAYERS} layers in {elapsed * 1e3:.1f} ms "
          f"({TOKENS / elapsed:.0f} tokens/s), checksum {checksum:.4f}")
    print(f"KV cache grew by doubling to {cache.capacity} positions per layer, "
          f"copying {cache.bytes_copied} bytes; "
          f"arena capacity after the last reset: {arena.capacity / 1024:.1f} KiB\n")
    print(zm.memory_report())

    cache.deinit()
    for buf in weight_bufs + [embed]:
        weights_mem.free(buf)
    arena.deinit()
    for counting in (weights_mem, kv_mem, act_mem):
        assert counting.stats.current_bytes == 0, f"{counting.name} leaked"
        counting.deinit()
    print("\nall memory returned: every subsystem's current bytes are 0")


if __name__ == "__main__":
    main()
