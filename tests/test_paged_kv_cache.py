"""PagedKVCache: a numpy reference model of the cache (hypothesis state machine over append /
fork / free / shared prompts / eviction), copy-on-write, the prefix cache, full pools and
allocation failures, attention against float64 numpy, batch invariance, bad input, threads."""

import copy
import gc
import pickle
import threading

import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import zigmem as zm
from zigmem._binding import ffi, lib
from zigmem.dtypes import resolve

L, H, D, BS = 2, 2, 8, 4
DTYPES = ["float32", "float16", "bfloat16"]


def prompt_kv(tokens, pos, layer, dtype):
    """K and V a model would compute at ``pos`` of a prompt: a function of tokens[:pos+1]
    only, so every sequence sharing that prefix writes the same values."""
    rng = np.random.default_rng(abs(hash((tuple(int(t) for t in tokens[: pos + 1]), layer))))
    kv = rng.standard_normal((2, H, D)).astype(np.float32)
    return kv[0].astype(dtype), kv[1].astype(dtype)


def full_step(cache, s, kk, vv):
    """Append [n, H, D] arrays per layer (lists of L)."""
    for layer in range(cache.n_layers):
        cache.append(s, layer, kk[layer], vv[layer])


class Model:
    """The numpy reference: each sequence's K and V per layer, and its prompt."""

    def __init__(self, dtype):
        self.dtype = resolve(dtype)
        self.k = {}  # id -> [L arrays [len, H, D]]
        self.v = {}
        self.prompt = {}

    def add(self, s, prompt, cached):
        ks, vs = [], []
        for layer in range(L):
            rows = [prompt_kv(prompt, p, layer, self.dtype) for p in range(cached)]
            ks.append(np.array([r[0] for r in rows], dtype=self.dtype).reshape(cached, H, D))
            vs.append(np.array([r[1] for r in rows], dtype=self.dtype).reshape(cached, H, D))
        self.k[s], self.v[s], self.prompt[s] = ks, vs, prompt

    def step_arrays(self, s, n, rng):
        start = self.k[s][0].shape[0]
        prompt = self.prompt[s]
        kk, vv = [], []
        for layer in range(L):
            k = rng.standard_normal((n, H, D)).astype(self.dtype)
            v = rng.standard_normal((n, H, D)).astype(self.dtype)
            for i in range(n):
                if prompt is not None and start + i < len(prompt):
                    k[i], v[i] = prompt_kv(prompt, start + i, layer, self.dtype)
            kk.append(k)
            vv.append(v)
        return kk, vv

    def append(self, s, kk, vv):
        for layer in range(L):
            self.k[s][layer] = np.concatenate([self.k[s][layer], kk[layer]])
            self.v[s][layer] = np.concatenate([self.v[s][layer], vv[layer]])

    def fork(self, s, t):
        self.k[t] = [a.copy() for a in self.k[s]]
        self.v[t] = [a.copy() for a in self.v[s]]
        self.prompt[t] = self.prompt[s]

    def free(self, s):
        del self.k[s], self.v[s], self.prompt[s]


# ---------------------------------------------------------------- the state machine

SYSTEM = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 9, 9, 9, 9], [7] * 13]


class PagedCacheMachine(RuleBasedStateMachine):
    """Random append / fork / free / add_sequence with shared prompts in a small pool, so
    that blocks are shared, copied on write, cached, evicted and the pool runs full."""

    def __init__(self):
        super().__init__()
        self.cache = zm.PagedKVCache(zm.page_allocator, L, H, D, num_blocks=14, block_size=BS,
                                     dtype="float16")
        self.model = Model("float16")
        self.rng = np.random.default_rng(0)
        self.freed = []
        self.registered = set()  # full-block prompt prefixes written (ignoring eviction)

    @rule(system=st.integers(0, len(SYSTEM) - 1), suffix=st.lists(st.integers(0, 20), max_size=6),
          no_prompt=st.booleans())
    def add(self, system, suffix, no_prompt):
        prompt = None if no_prompt else SYSTEM[system] + suffix
        s = self.cache.add_sequence(prompt)
        cached = self.cache.cached_tokens(s)
        assert self.cache.seq_len(s) == cached and cached % BS == 0
        if cached:
            event("prefix cache hit")

        if prompt is None:
            assert cached == 0
        else:
            assert cached <= len(prompt) - 1
            if self.cache.stats.evictions == 0:  # nothing forgotten: the longest cached prefix
                best = 0
                for n in range(BS, len(prompt), BS):
                    if tuple(prompt[:n]) in self.registered:
                        best = n
                assert cached == best
        self.model.add(s, prompt, cached)

    @precondition(lambda self: self.model.k)
    @rule(data=st.data(), n=st.integers(1, 7))
    def append(self, data, n):
        s = data.draw(st.sampled_from(sorted(self.model.k)))
        kk, vv = self.model.step_arrays(s, n, self.rng)
        before = self.cache.stats
        if not self.cache.can_append(s, n):
            event("pool full")
            with pytest.raises(zm.OutOfMemoryError):
                full_step(self.cache, s, kk, vv)
            after = self.cache.stats
            assert (after.blocks_in_use, after.blocks_free, after.blocks_cached) == \
                (before.blocks_in_use, before.blocks_free, before.blocks_cached)
            # the failed step left no layer half-written: a smaller step still works
            return
        full_step(self.cache, s, kk, vv)
        if self.cache.stats.evictions > before.evictions:
            event("cached blocks evicted")
        self.model.append(s, kk, vv)
        prompt = self.model.prompt[s]
        if prompt is not None:
            held = self.cache.seq_len(s)
            for end in range(BS, min(held, len(prompt)) + 1, BS):
                self.registered.add(tuple(prompt[:end]))

    @precondition(lambda self: self.cache.stats.blocks_cached)
    @rule()
    def fill_the_pool(self):
        """A sequence without a prompt that grows until the pool is full: every cached
        block is evicted on the way."""
        s = self.cache.add_sequence()
        self.model.add(s, None, 0)
        while self.cache.can_append(s, BS):
            kk, vv = self.model.step_arrays(s, BS, self.rng)
            full_step(self.cache, s, kk, vv)
            self.model.append(s, kk, vv)
        stats = self.cache.stats
        assert stats.blocks_cached == 0 and stats.evictions > 0
        event("cached blocks evicted")
        with pytest.raises(zm.OutOfMemoryError):
            self.cache.append(s, 0, np.zeros((BS, H, D)), np.zeros((BS, H, D)))

    @precondition(lambda self: self.model.k)
    @rule(data=st.data())
    def fork(self, data):
        s = data.draw(st.sampled_from(sorted(self.model.k)))
        t = self.cache.fork(s)
        for a, b in zip(self.cache.block_table(s), self.cache.block_table(t)):
            assert a == b and self.cache._refcount(int(a)) >= 2
        self.model.fork(s, t)

    @precondition(lambda self: self.model.k)
    @rule(data=st.data())
    def free(self, data):
        s = data.draw(st.sampled_from(sorted(self.model.k)))
        self.cache.free(s)
        self.model.free(s)
        self.freed.append(s)

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def use_freed(self, data):
        s = data.draw(st.sampled_from(self.freed))
        with pytest.raises(zm.UseAfterFreeError):
            self.cache.seq_len(s)
        with pytest.raises(zm.UseAfterFreeError):
            self.cache.append(s, 0, np.zeros((1, H, D)), np.zeros((1, H, D)))

    @invariant()
    def matches_model(self):
        for s in self.model.k:
            assert self.cache.seq_len(s) == self.model.k[s][0].shape[0]
            for layer in range(L):
                np.testing.assert_array_equal(self.cache.keys(s, layer), self.model.k[s][layer])
                np.testing.assert_array_equal(self.cache.values(s, layer), self.model.v[s][layer])
        self.cache._check()
        stats = self.cache.stats
        assert stats.blocks_in_use + stats.blocks_cached + stats.blocks_free == stats.blocks_total
        assert stats.sequences == len(self.model.k)

    def teardown(self):
        for s in list(self.model.k):
            self.cache.free(s)
        stats = self.cache.stats
        assert stats.blocks_in_use == 0
        assert stats.blocks_free + stats.blocks_cached == stats.blocks_total
        self.cache._check()
        self.cache.deinit()


TestPagedCacheMachine = PagedCacheMachine.TestCase
TestPagedCacheMachine.settings = settings(max_examples=80, stateful_step_count=30,
                                          deadline=None)


# ---------------------------------------------------------------- sequences, fork, prefix

@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_and_block_tables(dtype):
    rng = np.random.default_rng(1)
    with zm.PagedKVCache(zm.page_allocator, L, H, D, num_blocks=32, block_size=BS,
                         dtype=dtype) as cache:
        model = Model(dtype)
        a, b = cache.add_sequence(), cache.add_sequence()
        model.add(a, None, 0)
        model.add(b, None, 0)
        for n in [5, 1, 1, 9, 1]:  # interleaved: the two sequences' blocks alternate
            for s in (a, b):
                kk, vv = model.step_arrays(s, n, rng)
                full_step(cache, s, kk, vv)
                model.append(s, kk, vv)
        for s in (a, b):
            assert cache.seq_len(s) == 17
            table = cache.block_table(s)
            assert table.dtype == np.int32 and table.size == 5  # ceil(17 / 4)
            for layer in range(L):
                np.testing.assert_array_equal(cache.keys(s, layer), model.k[s][layer])
                np.testing.assert_array_equal(cache.values(s, layer), model.v[s][layer])
        assert set(cache.block_table(a)).isdisjoint(cache.block_table(b))
        stats = cache.stats
        assert stats.blocks_in_use == 10 and stats.tokens_held == 34 and stats.slots_held == 40
        assert stats.waste == pytest.approx(6 / 40)


def test_converted_on_write_like_kv_cache():
    rng = np.random.default_rng(2)
    k = rng.standard_normal((3, H, D))  # float64 in, float16 stored
    with zm.PagedKVCache(zm.page_allocator, 1, H, D, num_blocks=4, block_size=BS) as cache:
        s = cache.add_sequence()
        cache.append(s, 0, k, k)
        np.testing.assert_array_equal(cache.keys(s, 0), k.astype(np.float16))
        assert cache.keys(s, 0).dtype == np.float16


def test_a_layer_sees_its_own_appends_before_the_step_completes():
    with zm.PagedKVCache(zm.page_allocator, L, H, D, num_blocks=4, block_size=BS) as cache:
        s = cache.add_sequence()
        one = np.ones((2, H, D), np.float32)
        cache.append(s, 0, one, one)
        assert cache.keys(s, 0).shape[0] == 2 and cache.keys(s, 1).shape[0] == 0
        assert cache.seq_len(s) == 0
        with pytest.raises(zm.InvalidArgumentError, match="already appended"):
            cache.append(s, 0, one, one)
        with pytest.raises(zm.InvalidArgumentError, match="appends 2 positions"):
            cache.append(s, 1, one[:1], one[:1])
        with pytest.raises(zm.InvalidArgumentError, match="middle of a step"):
            cache.fork(s)
        assert cache.can_append(s, 2) and not cache.can_append(s, 3)
        cache.append(s, 1, one, one)
        assert cache.seq_len(s) == 2


def test_fork_copies_the_shared_last_block_on_write():
    rng = np.random.default_rng(3)
    with zm.PagedKVCache(zm.page_allocator, L, H, D, num_blocks=8, block_size=BS,
                         dtype="float32") as cache:
        model = Model("float32")
        a = cache.add_sequence()
        model.add(a, None, 0)
        kk, vv = model.step_arrays(a, 6, rng)
        full_step(cache, a, kk, vv)
        model.append(a, kk, vv)
        b = cache.fork(a)
        model.fork(a, b)
        shared = cache.block_table(a)
        assert list(cache.block_table(b)) == list(shared)
        assert cache.stats.blocks_in_use == 2  # beam search: one block per branch, not a context
        kk, vv = model.step_arrays(b, 1, rng)
        full_step(cache, b, kk, vv)
        model.append(b, kk, vv)
        tb = cache.block_table(b)
        assert tb[0] == shared[0] and tb[1] != shared[1]
        assert cache._refcount(int(shared[0])) == 2 and cache._refcount(int(shared[1])) == 1
        for s in (a, b):  # the parent is unchanged, the child has its own position 6
            for layer in range(L):
                np.testing.assert_array_equal(cache.keys(s, layer), model.k[s][layer])
                np.testing.assert_array_equal(cache.values(s, layer), model.v[s][layer])
        cache.free(a)
        assert cache._refcount(int(shared[0])) == 1
        cache.free(b)
        assert cache.stats.blocks_free == 8


def test_prefix_cache_shares_prompt_blocks_and_evicts_lru():
    dtype = "float16"
    with zm.PagedKVCache(zm.page_allocator, L, H, D, num_blocks=8, block_size=BS,
                         dtype=dtype) as cache:
        model = Model(dtype)
        rng = np.random.default_rng(4)

        def run(prompt, extra=0):
            s = cache.add_sequence(prompt)
            model.add(s, prompt, cache.cached_tokens(s))
            n = len(prompt) - cache.cached_tokens(s) + extra
            kk, vv = model.step_arrays(s, n, rng)
            full_step(cache, s, kk, vv)
            model.append(s, kk, vv)
            return s

        system = list(range(100, 112))  # 3 blocks
        a = run(system + [1, 2])
        assert cache.cached_tokens(a) == 0
        b = run(system + [3])  # 12 positions cached, a forward pass for the 13th
        assert cache.cached_tokens(b) == 12
        assert list(cache.block_table(b)[:3]) == list(cache.block_table(a)[:3])
        for layer in range(L):
            np.testing.assert_array_equal(cache.keys(b, layer), model.k[b][layer])
        c = cache.add_sequence(system)  # the whole prompt cached: still one token to compute
        assert cache.cached_tokens(c) == 8
        cache.free(c)
        assert cache.stats.prefix_hits == 3 + 2
        cache.free(a)
        cache.free(b)
        st_ = cache.stats
        assert st_.blocks_in_use == 0 and st_.blocks_cached == 3
        # a prompt that shares nothing fills the pool: the cached blocks are evicted, the
        # prompt's tail first, so its head survives longest
        d = run(list(range(500, 520)))  # 5 blocks: 5 free
        e = cache.add_sequence()
        one = np.zeros((4, H, D), np.float32)
        full_step(cache, e, [one] * L, [one] * L)  # the 6th block: evicts system's third
        assert cache.stats.evictions == 1
        f = cache.add_sequence(system + [9])
        assert cache.cached_tokens(f) == 8
        for layer in range(L):
            np.testing.assert_array_equal(
                cache.keys(f, layer), model.k[a][layer][:8])
        for s in (d, e, f):
            cache.free(s)
        cache._check()


def test_prefix_cache_never_confuses_prompts_that_differ():
    with zm.PagedKVCache(zm.page_allocator, 1, H, D, num_blocks=16, block_size=BS) as cache:
        rng = np.random.default_rng(5)
        ids = {}
        for prompt in ([1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 0, 9],
                       [0, 2, 3, 4, 5, 6, 7, 8, 9]):
            s = cache.add_sequence(prompt)
            x = rng.standard_normal((len(prompt) - cache.cached_tokens(s), H, D))
            cache.append(s, 0, x, x)
            ids[tuple(prompt)] = s
        assert [cache.cached_tokens(s) for s in ids.values()] == [0, 4, 0]
        # a block is keyed by all the tokens before it: same second block, other first
        s = cache.add_sequence([0, 2, 3, 4, 5, 6, 7, 8, 1])
        assert cache.cached_tokens(s) == 8
        third = ids[(0, 2, 3, 4, 5, 6, 7, 8, 9)]
        np.testing.assert_array_equal(cache.keys(s, 0), cache.keys(third, 0)[:8])


def test_full_pool_raises_and_changes_nothing():
    with zm.PagedKVCache(zm.page_allocator, L, H, D, num_blocks=3, block_size=BS) as cache:
        a, b = cache.add_sequence(), cache.add_sequence()
        x = np.ones((5, H, D), np.float32)
        full_step(cache, a, [x] * L, [x] * L)  # 2 blocks
        full_step(cache, b, [x[:2]] * L, [x[:2]] * L)  # 1 block
        before = (cache.stats, cache.keys(b, 0).copy(), cache.block_table(b).copy())
        assert not cache.can_append(b, 3) and cache.can_append(b, 2)
        with pytest.raises(zm.OutOfMemoryError, match="pool is full"):
            cache.append(b, 0, x[:3], x[:3])
        assert cache.stats == before[0]
        np.testing.assert_array_equal(cache.keys(b, 0), before[1])
        np.testing.assert_array_equal(cache.block_table(b), before[2])
        cache.append(b, 0, x[:2], x[:2])  # the step can still start, at a size that fits
        cache.append(b, 1, x[:2], x[:2])
        with pytest.raises(zm.OutOfMemoryError, match="do not fit"):
            cache.add_sequence(list(range(13)))  # longer than the whole pool


def sweep_scenario(allocator, dtype):
    with zm.PagedKVCache(allocator, L, H, D, num_blocks=24, block_size=BS, dtype=dtype) as cache:
        x = np.ones((7, H, D), np.float32)
        ids = [cache.add_sequence(list(range(9))) for _ in range(10)]  # slots grow
        full_step(cache, ids[0], [x] * L, [x] * L)
        full_step(cache, ids[0], [x] * L, [x] * L)
        full_step(cache, ids[0], [x] * L, [x] * L)  # the block table grows
        t = cache.fork(ids[0])
        before = cache.stats
        try:
            full_step(cache, t, [x[:1]] * L, [x[:1]] * L)
        except zm.OutOfMemoryError:
            assert cache.stats == before and cache.seq_len(t) == 21
            raise
        for s in ids + [t]:
            cache.free(s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_allocation_failure_is_clean(dtype):
    n = zm.testing.check_all_allocation_failures(sweep_scenario, dtype)
    assert n >= 5


def test_counted_in_memory_report():
    counting = zm.CountingAllocator(name="paged_kv")
    cache = zm.PagedKVCache(counting, L, H, D, num_blocks=16, block_size=BS)
    assert counting.stats.current_bytes >= cache.nbytes
    s = cache.add_sequence()
    x = np.ones((5, H, D), np.float32)
    full_step(cache, s, [x] * L, [x] * L)
    report = zm.memory_report()
    assert "paged_kv" in report and "2/16 blocks" in report and "37.5%" in report
    with pytest.raises(zm.MemorySafetyError, match="PagedKVCache"):
        counting.deinit()
    cache.deinit()
    assert counting.stats.current_bytes == 0
    counting.deinit()


# ---------------------------------------------------------------- attention

def reference_attention(keys, values, q, n_pos):
    """float64 causal GQA attention of q [rows, nh, d] as the last rows of n_pos positions."""
    rows, nh, d = q.shape
    group = nh // keys.shape[1]
    out = np.empty((rows, nh, d))
    k64, v64 = keys.astype(np.float64), values.astype(np.float64)
    for r in range(rows):
        p = n_pos - rows + r
        for h in range(nh):
            s = k64[: p + 1, h // group] @ q[r, h].astype(np.float64) / np.sqrt(d)
            w = np.exp(s - s.max())
            out[r, h] = (w / w.sum()) @ v64[: p + 1, h // group]
    return out


def filled_cache(dtype, lengths, n_kv=2, d=64, n_heads_layers=2, block_size=16, seed=0):
    rng = np.random.default_rng(seed)
    total = sum(-(-n // block_size) for n in lengths)
    cache = zm.PagedKVCache(zm.page_allocator, n_heads_layers, n_kv, d, num_blocks=total + 4,
                            block_size=block_size, dtype=dtype)
    ids = []
    for n in lengths:
        s = cache.add_sequence()
        for layer in range(n_heads_layers):
            cache.append(s, layer, rng.standard_normal((n, n_kv, d)),
                         rng.standard_normal((n, n_kv, d)))
        ids.append(s)
    return cache, ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_kv,n_heads,d,block_size", [
    (3, 9, 64, 16),    # SmolLM2's geometry
    (2, 2, 5, 3),      # no GQA, odd sizes: the scalar tails
    (1, 8, 128, 100),  # multi-query, blocks longer than a tile
    (2, 4, 32, 1),
])
def test_attention_matches_float64_reference(dtype, n_kv, n_heads, d, block_size):
    lengths = [1, 37, 70, 16]
    cache, ids = filled_cache(dtype, lengths, n_kv=n_kv, d=d, block_size=block_size)
    rng = np.random.default_rng(6)
    for q_lens in ([1, 1, 1, 1], [1, 37, 5, 16], [0, 2, 70, 1]):  # decode, prefill, mixed
        q = rng.standard_normal((sum(q_lens), n_heads, d)).astype(np.float32)
        out = cache.attention(1, ids, q, q_lens=q_lens)
        assert out.dtype == np.float32 and out.shape == q.shape
        row = 0
        for s, n, ql in zip(ids, lengths, q_lens):
            ref = reference_attention(cache.keys(s, 1), cache.values(s, 1), q[row: row + ql], n)
            np.testing.assert_allclose(out[row: row + ql], ref, rtol=2e-5, atol=2e-6)
            row += ql
    cache.deinit()


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512f"])
def test_every_instruction_set_matches_the_reference(isa):
    default = ffi.string(lib.zm_paged_attention_isa())
    if lib.zm_paged_attention_use_isa(isa.encode()) != 0:
        pytest.skip(f"{isa} not supported on this CPU")
    try:
        cache, ids = filled_cache("float16", [33, 5], n_kv=3, d=40)
        q = np.random.default_rng(7).standard_normal((4, 9, 40)).astype(np.float32)
        out = cache.attention(0, ids, q, q_lens=[3, 1])
        np.testing.assert_allclose(
            out[:3], reference_attention(cache.keys(ids[0], 0), cache.values(ids[0], 0), q[:3], 33),
            rtol=2e-5, atol=2e-6)
        cache.deinit()
    finally:
        lib.zm_paged_attention_use_isa(default)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_is_batch_invariant_bitwise(dtype):
    cache, ids = filled_cache(dtype, [50, 3, 129, 64, 17], n_kv=3, d=64)
    rng = np.random.default_rng(8)
    q_lens = [4, 1, 7, 1, 2]
    q = rng.standard_normal((sum(q_lens), 9, 64)).astype(np.float32)
    batch = cache.attention(0, ids, q, q_lens=q_lens)
    threads = zm.get_num_threads()
    try:
        for n in (1, 3):  # the worker pool's size changes nothing
            zm.set_num_threads(n)
            assert np.array_equal(cache.attention(0, ids, q, q_lens=q_lens), batch)
    finally:
        zm.set_num_threads(threads)
    starts = np.cumsum([0] + q_lens)
    for i, s in enumerate(ids):  # alone, and among others in another order
        mine = q[starts[i]: starts[i + 1]]
        alone = cache.attention(0, [s], mine, q_lens=[q_lens[i]])
        assert np.array_equal(alone, batch[starts[i]: starts[i + 1]])
        others = [j for j in range(len(ids)) if j != i][::-1] + [i]
        qq = np.concatenate([q[starts[j]: starts[j + 1]] for j in others])
        mixed = cache.attention(0, [ids[j] for j in others], qq, q_lens=[q_lens[j] for j in others])
        assert np.array_equal(mixed[-q_lens[i]:], alone)
    # a row's result does not depend on how many rows its call had (prefill vs decode)
    last = cache.attention(0, [ids[2]], q[starts[2] + 6: starts[2] + 7])
    assert np.array_equal(last, batch[starts[2] + 6: starts[2] + 7])
    cache.deinit()


def test_attention_writes_into_out_and_serves_arena_arrays():
    cache, ids = filled_cache("float16", [10, 20], n_kv=2, d=16)
    q = np.random.default_rng(9).standard_normal((2, 4, 16)).astype(np.float32)
    out = np.full(q.shape, np.nan, np.float32)
    assert cache.attention(0, ids, q, out=out) is out and np.isfinite(out).all()
    arena = zm.ArenaAllocator()
    with arena.numpy():
        inside = cache.attention(0, ids, q)
    assert np.array_equal(inside, out)
    assert arena.capacity > 0
    del inside
    gc.collect()
    arena.deinit()
    cache.deinit()


def test_attention_bad_input_writes_nothing():
    cache, ids = filled_cache("float16", [10, 20], n_kv=2, d=16)
    q = np.zeros((2, 4, 16), np.float32)
    out = np.full(q.shape, 7.0, np.float32)
    freed = cache.add_sequence()
    cache.free(freed)
    bad = [
        (dict(layer=2), zm.InvalidArgumentError, "layer"),
        (dict(seqs=[ids[0], 12345]), zm.InvalidArgumentError, r"no sequence 12345 \(seqs\[1\]\)"),
        (dict(seqs=[ids[0], freed]), zm.UseAfterFreeError, "was freed"),
        (dict(seqs=[ids[0], -1]), zm.InvalidArgumentError, "never negative"),
        (dict(seqs=[ids[0], 1.5]), zm.InvalidArgumentError, "integers"),
        (dict(q_lens=[1]), zm.InvalidArgumentError, "entries"),
        (dict(q_lens=[1, -1]), zm.InvalidArgumentError, "negative"),
        (dict(q=np.zeros((2, 3, 16), np.float32)), zm.InvalidArgumentError, "multiple"),
        (dict(q=np.zeros((3, 4, 16), np.float32)), zm.InvalidArgumentError, "shaped"),
        (dict(q=np.zeros((2, 4, 16), np.int32)), zm.InvalidArgumentError, "floating"),
        (dict(q=np.zeros((2, 4, 16), np.float32), q_lens=[1, 21][::-1][::-1]),
         zm.InvalidArgumentError, "shaped"),
        (dict(out=np.zeros((2, 4, 16), np.float64)), zm.InvalidArgumentError, "float32"),
        (dict(out=np.zeros((2, 4, 32), np.float32)[:, :, ::2]), zm.InvalidArgumentError,
         "contiguous"),
        (dict(out=q), zm.InvalidArgumentError, "overlap"),
        (dict(out=[0.0]), zm.InvalidArgumentError, "numpy"),
    ]
    for change, error, match in bad:
        args = dict(layer=0, seqs=ids, q=q, q_lens=None, out=out) | change
        with pytest.raises(error, match=match):
            cache.attention(**args)
        assert (out == 7.0).all()
    with pytest.raises(zm.InvalidArgumentError, match="only 10 positions"):
        cache.attention(0, ids, np.zeros((12, 4, 16), np.float32), q_lens=[11, 1], out=None)
    read_only = np.zeros(q.shape, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(zm.InvalidArgumentError, match="writeable"):
        cache.attention(0, ids, q, out=read_only)
    cache.deinit()


# ---------------------------------------------------------------- misuse and lifetime

def test_bad_input_raises_and_writes_nothing():
    with zm.PagedKVCache(zm.page_allocator, L, H, D, num_blocks=8, block_size=BS) as cache:
        s = cache.add_sequence()
        ok = np.ones((2, H, D), np.float32)
        for k, v, match in [
            (np.ones((2, H + 1, D)), np.ones((2, H + 1, D)), "shaped"),
            (np.ones((2, H, D)), np.ones((3, H, D)), "differ"),
            (np.ones((H, D)), np.ones((H, D)), "shaped"),
            (np.ones((2, H, D), np.int64), ok, "floating"),
            (np.ones((2, H, D), np.complex64), ok, "floating"),
            ([["a"]], ok, "shaped"),
        ]:
            with pytest.raises(zm.InvalidArgumentError, match=match):
                cache.append(s, 0, k, v)
        for layer in (-1, L, 1.0, True, "0"):
            with pytest.raises(zm.InvalidArgumentError, match="layer"):
                cache.append(s, layer, ok, ok)
        for sid in (1.0, "0", None, True):
            with pytest.raises(zm.InvalidArgumentError, match="integer"):
                cache.seq_len(sid)
        with pytest.raises(zm.InvalidArgumentError, match="no sequence 99"):
            cache.append(99, 0, ok, ok)
        with pytest.raises(zm.InvalidArgumentError, match="no sequence"):
            cache.free(2**40)
        for prompt, match in [([1.5, 2.0], "integers"), ([[1, 2]], "1-D"), ([2**40], "int32")]:
            with pytest.raises(zm.InvalidArgumentError, match=match):
                cache.add_sequence(prompt)
        with pytest.raises(zm.InvalidArgumentError, match="non-negative"):
            cache.can_append(s, -1)
        assert cache.seq_len(s) == 0 and cache.keys(s, 0).shape == (0, H, D)
        assert cache.stats.blocks_in_use == 0 and cache.stats.sequences == 1
    for kwargs, match in [(dict(num_blocks=0), "num_blocks"), (dict(head_dim=2048), "head_dim"),
                          (dict(dtype="int8"), "dtype"), (dict(block_size=2.0), "block_size"),
                          (dict(n_layers=-1), "n_layers")]:
        args = dict(allocator=zm.page_allocator, n_layers=L, n_kv_heads=H, head_dim=D,
                    num_blocks=8) | kwargs
        with pytest.raises(zm.InvalidArgumentError, match=match):
            zm.PagedKVCache(**args)
    with pytest.raises(zm.InvalidArgumentError, match="allocator"):
        zm.PagedKVCache(object(), L, H, D, 8)
    with pytest.raises(zm.OutOfMemoryError):
        zm.PagedKVCache(zm.page_allocator, 1000, 1000, 1000, 2**30, block_size=2**20)


def test_no_copies_and_use_after_deinit():
    cache = zm.PagedKVCache(zm.page_allocator, L, H, D, num_blocks=4, block_size=BS)
    for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="PagedKVCache"):
            attempt(cache)
    s = cache.add_sequence()
    cache.deinit()
    cache.deinit()  # idempotent
    assert "deinitialised" in repr(cache)
    for call in (lambda: cache.seq_len(s), cache.add_sequence, lambda: cache.stats,
                 lambda: cache.attention(0, [s], np.zeros((1, H, D), np.float32))):
        with pytest.raises(zm.UseAfterFreeError, match="deinitialised"):
            call()


def test_collected_without_deinit_returns_its_memory():
    counting = zm.CountingAllocator(name="t")
    cache = zm.PagedKVCache(counting, L, H, D, num_blocks=4, block_size=BS)
    cache.add_sequence()
    del cache
    gc.collect()
    assert counting.stats.current_bytes == 0
    counting.deinit()


def test_threads_share_one_cache():
    cache = zm.PagedKVCache(zm.GeneralPurposeAllocator(), L, 3, 16, num_blocks=256,
                            block_size=BS)
    errors = []

    def work(seed):
        try:
            rng = np.random.default_rng(seed)
            for _ in range(10):
                s = cache.add_sequence(list(range(9)))
                ks = [rng.standard_normal((9 - cache.cached_tokens(s), 3, 16)).astype(np.float16)
                      for _ in range(L)]
                full_step(cache, s, ks, ks)
                np.testing.assert_array_equal(cache.keys(s, 1)[cache.cached_tokens(s):], ks[1])
                q = rng.standard_normal((2, 6, 16)).astype(np.float32)
                solo = cache.attention(1, [s], q, q_lens=[2])
                assert np.array_equal(solo, cache.attention(1, [s], q, q_lens=[2]))
                cache.free(s)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert cache.stats.blocks_in_use == 0
    cache._check()
    cache.deinit()


def test_resident_bytes_follow_the_blocks_written():
    with zm.PagedKVCache(zm.PageAllocator(), 4, 4, 64, num_blocks=64, block_size=16) as cache:
        assert cache.resident_bytes() == 0  # a fresh mapping: nothing touched yet
        s = cache.add_sequence()
        x = np.ones((40, 4, 64), np.float32)
        full_step(cache, s, [x] * 4, [x] * 4)
        block = cache.stats.block_bytes
        assert 3 * block <= cache.resident_bytes() <= 3 * block + 2 * 4096
