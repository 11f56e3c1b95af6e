"""KVCache: round trips against numpy, growth without copies, views, rollback, bad input."""

import mmap

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import zigmem as zm

L, H, D = 3, 2, 8


def step(rng, n_new, batch=1):
    shape = (n_new, H, D) if batch == 1 else (batch, n_new, H, D)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def resident_pages(buf):
    return zm.testing.resident_bytes(buf.address, buf.nbytes) // mmap.PAGESIZE


@pytest.mark.parametrize("growth", ["preallocate", "double"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 2])
def test_round_trip_against_numpy(growth, dtype, batch):
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    cache = zm.KVCache(zm.page_allocator, L, H, D, max_seq_len=100, dtype=dtype,
                       growth=growth, batch=batch)
    ref_k = [[] for _ in range(L)]
    ref_v = [[] for _ in range(L)]
    for n_new in [5, 1, 1, 20, 1, 40]:  # a prompt, then decode steps, then a long chunk
        for layer in range(L):
            k, v = step(rng, n_new, batch)
            cache.append(layer, k, v)
            ref_k[layer].append(k)
            ref_v[layer].append(v)
    axis = 0 if batch == 1 else 1
    stored = cache.dtype
    for layer in range(L):
        expected_k = np.concatenate(ref_k[layer], axis=axis).astype(stored)
        np.testing.assert_array_equal(cache.keys(layer), expected_k)
        np.testing.assert_array_equal(cache.values(layer),
                                      np.concatenate(ref_v[layer], axis=axis).astype(stored))
    assert cache.seq_len == 68
    # doubling: 16 -> 32 (27 needed) -> 68 (a 40-position chunk needs more than twice 32)
    assert cache.capacity == (100 if growth == "preallocate" else 68)
    if growth == "preallocate" or batch == 1:
        assert cache.bytes_copied == 0
    else:  # the second batch row moves within each grown slab
        assert cache.bytes_copied > 0
    cache.deinit()


def test_nbytes_is_the_seed_formula_and_what_the_allocator_holds():
    counting = zm.CountingAllocator(name="kv")
    cache = zm.KVCache(counting, 30, 3, 64, max_seq_len=2048, dtype="float16")
    assert cache.nbytes == 2 * 30 * 2048 * 3 * 64 * 2
    assert counting.stats.current_bytes == cache.nbytes
    cache.deinit()
    assert counting.stats.current_bytes == 0


def test_preallocated_pages_become_resident_only_as_tokens_arrive():
    cache = zm.KVCache(zm.page_allocator, 1, 8, 64, max_seq_len=8192, dtype="float32")
    slab = cache._slabs[0]
    assert resident_pages(slab) == 0
    k = np.ones((1, 8, 64), np.float32)  # 2 KiB per position: 2 positions per page
    for _ in range(64):
        cache.append(0, k, k)
    assert resident_pages(slab) == 32  # of 4096
    cache.deinit()


def test_doubling_on_the_page_allocator_copies_no_bytes():
    cache = zm.KVCache(zm.page_allocator, 4, 4, 64, max_seq_len=4096, dtype="float32",
                       growth="double")
    k = np.ones((1, 4, 64), np.float32)
    for _ in range(3000):
        for layer in range(4):
            cache.append(layer, k, k)
    assert cache.capacity == 4096 and cache.bytes_copied == 0
    cache.deinit()


def test_doubling_on_a_fixed_buffer_copies_and_counts_it():
    fba = zm.FixedBufferAllocator(bytearray(8 << 20))
    cache = zm.KVCache(fba, 2, 1, 4, max_seq_len=64, dtype="float32", growth="double")
    k = np.ones((1, 1, 4), np.float32)
    for pos in range(40):
        for layer in range(2):
            cache.append(layer, k * pos, k)
    assert cache.bytes_copied > 0
    assert cache.keys(1)[39, 0, 0] == 39 and cache.keys(0)[3, 0, 0] == 3


def test_views_taken_before_growth_stay_valid():
    counting = zm.CountingAllocator(zm.page_allocator, name="kv")
    cache = zm.KVCache(counting, 1, 1, 4, max_seq_len=1024, dtype="float32",
                       growth="double")
    k = np.arange(4, dtype=np.float32).reshape(1, 1, 4)
    for _ in range(16):
        cache.append(0, k, k)
    old = cache.keys(0)  # a view of the 16-position slab
    cache.append(0, k + 100, k)  # growth: this slab is copied (its view pins it)
    assert cache.capacity == 32 and cache.bytes_copied == 16 * 16
    assert old.shape == (16, 1, 4) and old[15, 0, 3] == 3  # still the old memory, intact
    assert cache.keys(0)[16, 0, 0] == 100
    assert counting.stats.current_count == 3  # K (new), V (remapped) and the old K slab
    del old  # the old slab is freed with its last view
    assert counting.stats.current_count == 2
    cache.deinit()


def test_truncate_and_reset():
    cache = zm.KVCache(zm.page_allocator, 2, 1, 2, max_seq_len=16, dtype="float32")
    for pos in range(6):
        for layer in range(2):
            cache.append(layer, np.full((1, 1, 2), pos, np.float32), np.zeros((1, 1, 2)))
    cache.truncate(4)
    assert cache.seq_len == 4 and cache.keys(0).shape == (4, 1, 2)
    for layer in range(2):
        cache.append(layer, np.full((1, 1, 2), 9, np.float32), np.zeros((1, 1, 2)))
    assert cache.keys(1)[:, 0, 0].tolist() == [0, 1, 2, 3, 9]
    cache.reset()
    assert cache.seq_len == 0 and cache.capacity == 16
    with pytest.raises(zm.InvalidArgumentError):
        cache.truncate(1)
    cache.deinit()


def test_bad_input_changes_nothing():
    cache = zm.KVCache(zm.page_allocator, 2, 2, 4, max_seq_len=8, dtype="float16")
    ok = np.ones((1, 2, 4), np.float32)
    for layer in range(2):
        cache.append(layer, ok, ok)
    before = [cache.keys(0).copy(), cache.seq_len]
    bad = [
        (5, ok, ok, "layer"), (-1, ok, ok, "layer"), ("0", ok, ok, "layer"),
        (0, np.ones((1, 3, 4)), np.ones((1, 3, 4)), "shaped"),
        (0, ok, np.ones((2, 2, 4)), "differ"),
        (0, np.full((1, 2, 4), "a"), ok, "cannot be stored"),
        (0, np.ones((8, 2, 4)), np.ones((8, 2, 4)), "max_seq_len"),
    ]
    for layer, k, v, error in bad:
        with pytest.raises(zm.InvalidArgumentError, match=error):
            cache.append(layer, k, v)
    cache.append(0, ok, ok)
    with pytest.raises(zm.InvalidArgumentError, match="once per step"):
        cache.append(0, ok, ok)
    with pytest.raises(zm.InvalidArgumentError, match="positions to each layer"):
        cache.append(1, np.ones((2, 2, 4)), np.ones((2, 2, 4)))
    cache.append(1, ok, ok)
    assert np.array_equal(cache.keys(0)[:1], before[0]) and cache.seq_len == before[1] + 1
    for kwargs, error in [({"n_layers": 0}, "positive"), ({"max_seq_len": float("inf")}, "finite"),
                          ({"head_dim": 2.5}, "integer"), ({"dtype": "int8"}, "dtype"),
                          ({"growth": "triple"}, "growth")]:
        args = {"n_layers": 1, "n_kv_heads": 1, "head_dim": 1, "max_seq_len": 4, **kwargs}
        with pytest.raises(zm.InvalidArgumentError, match=error):
            zm.KVCache(zm.page_allocator, **args)
    cache.deinit()


def test_out_of_memory_during_growth_leaves_the_cache_as_it_was():
    def run(allocator):
        cache = zm.KVCache(allocator, 2, 1, 4, max_seq_len=64, dtype="float32", growth="double")
        try:
            for pos in range(40):
                for layer in range(2):
                    k = np.full((1, 1, 4), pos, np.float32)
                    try:
                        cache.append(layer, k, k)
                    except zm.OutOfMemoryError:
                        assert cache.keys(layer)[:, 0, 0].tolist() == list(range(cache.keys(layer).shape[0]))
                        raise
        finally:
            cache.deinit()

    # a fixed buffer (growth copies: alloc can fail) under every failure index
    backing = zm.FixedBufferAllocator(bytearray(1 << 20))
    assert zm.testing.check_all_allocation_failures(run, backing=backing) > 4


def test_deinit_with_live_views_and_use_after_deinit():
    cache = zm.KVCache(zm.page_allocator, 1, 1, 2, max_seq_len=4)
    cache.append(0, np.ones((1, 1, 2)), np.ones((1, 1, 2)))
    view = cache.keys(0)
    with pytest.raises(zm.DanglingViewError):
        cache.deinit()
    assert view[0, 0, 0] == 1
    del view
    cache.deinit()
    with pytest.raises(zm.UseAfterFreeError):
        cache.keys(0)
    with pytest.raises(zm.UseAfterFreeError):
        cache.append(0, np.ones((1, 1, 2)), np.ones((1, 1, 2)))


class CacheModel(RuleBasedStateMachine):
    """Appends and truncates against a list-of-arrays model."""

    def __init__(self):
        super().__init__()
        self.cache = zm.KVCache(zm.page_allocator, 2, 1, 3, max_seq_len=80, dtype="float32",
                                growth="double")
        self.model = [np.zeros((0, 1, 3), np.float32) for _ in range(2)]
        self.counter = 0

    @rule(n=st.integers(0, 12))
    def append_step(self, n):
        if self.cache.seq_len + n > 80:
            with pytest.raises(zm.InvalidArgumentError):
                self.cache.append(0, np.zeros((n, 1, 3)), np.zeros((n, 1, 3)))
            return
        for layer in range(2):
            self.counter += 1
            k = np.full((n, 1, 3), self.counter, np.float32)
            self.cache.append(layer, k, -k)
            self.model[layer] = np.concatenate([self.model[layer], k])

    @precondition(lambda self: self.cache.seq_len > 0)
    @rule(data=st.data())
    def truncate(self, data):
        n = data.draw(st.integers(0, self.cache.seq_len))
        self.cache.truncate(n)
        self.model = [m[:n] for m in self.model]

    @invariant()
    def matches(self):
        for layer in range(2):
            assert np.array_equal(self.cache.keys(layer), self.model[layer])
            assert np.array_equal(self.cache.values(layer), -self.model[layer])
        assert self.cache.bytes_copied == 0

    def teardown(self):
        self.cache.deinit()


TestCacheModel = settings(max_examples=30, stateful_step_count=25, deadline=None)(CacheModel).TestCase
