"""zm.ops: the fused forward-pass kernels against float64 numpy references; batch invariance
(row i of an n-row call equals the 1-row call bitwise); both SIMD paths bitwise equal; bad
input raises InvalidArgumentError and writes nothing."""

import threading

import numpy as np
import pytest

import zigmem as zm
from zigmem import ops

RNG = np.random.default_rng(7)


def randn(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def rope_tables(positions, head_dim, base=10000.0):
    freqs = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(positions), freqs)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def ref_rms_norm(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def ref_rope(x, cos, sin, start):
    x = x.astype(np.float64)
    c = cos[start:start + x.shape[0], None, :].astype(np.float64)
    s = sin[start:start + x.shape[0], None, :].astype(np.float64)
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return out


def ref_attention(q, keys, values, start):
    n, heads, d = q.shape
    group = heads // keys.shape[1]
    k, v = keys.astype(np.float64), values.astype(np.float64)
    out = np.empty((n, heads, d))
    for r in range(n):
        for h in range(heads):
            s = k[:start + r + 1, h // group] @ q[r, h].astype(np.float64) / np.sqrt(d)
            p = np.exp(s - s.max())
            out[r, h] = p @ v[:start + r + 1, h // group] / p.sum()
    return out


@pytest.fixture(params=["portable", "avx2"])
def simd(request):
    previous = ops.simd(request.param)
    yield ops.simd()
    ops.simd(previous)


@pytest.mark.parametrize("dim", [1, 7, 64, 576, 1000])
def test_rms_norm_matches_float64(simd, dim):
    x, w = randn(5, dim), randn(dim)
    np.testing.assert_allclose(ops.rms_norm(x, w, 1e-5), ref_rms_norm(x, w, 1e-5), rtol=2e-6, atol=2e-6)


def test_rope_matches_float64_and_runs_in_place(simd):
    cos, sin = rope_tables(40, 64)
    x = randn(6, 9, 64)
    expected = ref_rope(x, cos, sin, 30)
    np.testing.assert_allclose(ops.rope(x, cos, sin, 30), expected, rtol=1e-5, atol=1e-6)
    same = ops.rope(x, cos, sin, 30, out=x)
    assert same is x
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-6)


def test_silu_mul_matches_float64(simd):
    g, u = randn(3, 1536) * 4, randn(3, 1536)
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(ops.silu_mul(g, u), g64 / (1 + np.exp(-g64)) * u, rtol=1e-5, atol=1e-6)
    assert ops.silu_mul(g, u, out=u) is u  # in place over an input


def test_silu_mul_over_the_whole_float_range_and_both_paths_agree():
    g = np.concatenate([np.linspace(-100, 100, 4001), [0.0, -0.0, 1e-30, -1e-30]]).astype(np.float32)
    up = np.ones_like(g)
    g64 = g.astype(np.float64)
    expected = g64 / (1 + np.exp(-g64))
    results = []
    for path in ("portable", "avx2"):
        previous = ops.simd(path)
        try:
            results.append(ops.silu_mul(g, up))
        finally:
            ops.simd(previous)
    assert np.array_equal(results[0], results[1])
    np.testing.assert_allclose(results[0], expected, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("head_dim", [64, 12])  # 12: a tail after the 8-lane blocks
@pytest.mark.parametrize("start", [0, 37])
def test_attention_matches_float64(simd, head_dim, start):
    n, heads, kv_heads = 5, 9, 3
    keys, values = randn(start + n + 4, kv_heads, head_dim, dtype=np.float16), randn(
        start + n + 4, kv_heads, head_dim, dtype=np.float16)
    q = randn(n, heads, head_dim)
    got = ops.attention(q, keys, values, start)
    np.testing.assert_allclose(got, ref_attention(q, keys, values, start), rtol=1e-4, atol=1e-5)


def test_prompt_sized_attention_shares_rows_across_threads_with_the_same_bits(simd):
    """Enough rows and the pool's threads share them (a scratch slot per task); every
    thread count gives the bits of one thread, and each row those of its own 1-row call."""
    n, heads, kv_heads, head_dim, start = 45, 9, 3, 64, 20
    keys = randn(start + n, kv_heads, head_dim, dtype=np.float16)
    values = randn(start + n, kv_heads, head_dim, dtype=np.float16)
    q = randn(n, heads, head_dim)
    before = zm.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3, 8):
            zm.set_num_threads(t)
            results.append(ops.attention(q, keys, values, start).tobytes())
    finally:
        zm.set_num_threads(before)
    assert len(set(results)) == 1
    got = ops.attention(q, keys, values, start)
    np.testing.assert_allclose(got, ref_attention(q, keys, values, start), rtol=1e-4, atol=1e-5)
    for r in (0, 17, n - 1):
        assert ops.attention(q[r:r + 1], keys, values, start + r).tobytes() == got[r].tobytes()


def test_attention_reads_the_kv_cache_views():
    cache = zm.KVCache(zm.page_allocator, 1, 2, 16, 32)
    k, v = randn(10, 2, 16), randn(10, 2, 16)
    cache.append(0, k, v)
    q = randn(3, 4, 16)
    got = ops.attention(q, cache.keys(0), cache.values(0), 7)
    np.testing.assert_allclose(got, ref_attention(q, k.astype(np.float16), v.astype(np.float16), 7),
                               rtol=1e-4, atol=1e-5)
    del got
    cache.deinit()


def test_every_kernel_is_batch_invariant_and_both_paths_agree_bitwise():
    cos, sin = rope_tables(64, 64)
    x, w = randn(13, 576), randn(576)
    q = randn(13, 9, 64)
    keys, values = randn(50, 3, 64, dtype=np.float16), randn(50, 3, 64, dtype=np.float16)
    g, u = randn(13, 1536), randn(13, 1536)
    results = {}
    for path in ("portable", "avx2"):
        previous = ops.simd(path)
        try:
            many = (ops.rms_norm(x, w, 1e-5), ops.rope(q, cos, sin, 20),
                    ops.silu_mul(g, u), ops.attention(q, keys, values, 20))
            for i in (0, 6, 12):
                one = (ops.rms_norm(x[i:i + 1], w, 1e-5), ops.rope(q[i:i + 1], cos, sin, 20 + i),
                       ops.silu_mul(g[i:i + 1], u[i:i + 1]),
                       ops.attention(q[i:i + 1], keys, values, 20 + i))
                for a, b in zip(many, one):
                    assert np.array_equal(a[i:i + 1], b)
            results[path] = many
        finally:
            ops.simd(previous)
    for a, b in zip(results["portable"], results["avx2"]):
        assert np.array_equal(a, b)


def test_out_lands_where_asked_and_arena_outputs():
    x, w = randn(2, 32), randn(32)
    out = np.full((2, 32), np.nan, np.float32)
    assert ops.rms_norm(x, w, 1e-6, out=out) is out and np.isfinite(out).all()
    arena = zm.ArenaAllocator()
    with arena.numpy():
        y = ops.rms_norm(x, w, 1e-6)
    assert np.array_equal(y, out)
    del y
    arena.reset()
    arena.deinit()


def _cases():
    cos, sin = rope_tables(8, 16)
    x, w, q = randn(2, 16), randn(16), randn(2, 4, 16)
    kv = randn(6, 2, 16, dtype=np.float16)
    g = randn(2, 16)
    return [
        ("x float64", lambda o: ops.rms_norm(x.astype(np.float64), w, 1e-5, out=o), (2, 16), "float32"),
        ("weight shape", lambda o: ops.rms_norm(x, w[:8], 1e-5, out=o), (2, 16), r"\[dim\]"),
        ("negative eps", lambda o: ops.rms_norm(x, w, -1.0, out=o), (2, 16), "eps"),
        ("nan eps", lambda o: ops.rms_norm(x, w, float("nan"), out=o), (2, 16), "eps"),
        ("non-contiguous", lambda o: ops.rms_norm(np.asfortranarray(randn(16, 16)), w, 1e-5,
                                                  out=o), (16, 16), "contiguous"),
        ("not an array", lambda o: ops.rms_norm([[1.0] * 16], w, 1e-5, out=o), (1, 16), "numpy"),
        ("odd head_dim", lambda o: ops.rope(randn(2, 4, 15), cos, sin, 0, out=o), (2, 4, 15), "even"),
        ("rope beyond tables", lambda o: ops.rope(q, cos, sin, 7, out=o), (2, 4, 16), "beyond"),
        ("negative start", lambda o: ops.rope(q, cos, sin, -1, out=o), (2, 4, 16), "non-negative"),
        ("bool start", lambda o: ops.rope(q, cos, sin, True, out=o), (2, 4, 16), "non-negative"),
        ("shapes differ", lambda o: ops.silu_mul(g, g[:1], out=o), (2, 16), "differ"),
        ("keys float32", lambda o: ops.attention(q, kv.astype(np.float32), kv, 0, out=o), (2, 4, 16), "float16"),
        ("heads not a multiple", lambda o: ops.attention(randn(2, 3, 16), kv, kv, 0, out=o), (2, 3, 16), "heads"),
        ("too few positions", lambda o: ops.attention(q, kv, kv, 5, out=o), (2, 4, 16), "positions"),
        ("values shape", lambda o: ops.attention(q, kv, kv[:3], 0, out=o), (2, 4, 16), "keys, values"),
        ("out wrong shape", lambda o: ops.silu_mul(g, g, out=np.zeros((16, 2), np.float32)), None, "shape"),
        ("out float64", lambda o: ops.silu_mul(g, g, out=np.zeros((2, 16))), None, "float32"),
    ]


@pytest.mark.parametrize("name,call,out_shape,match", _cases(), ids=[c[0] for c in _cases()])
def test_bad_input_raises_and_writes_nothing(name, call, out_shape, match):
    out = np.full(out_shape, 123.0, np.float32) if out_shape else None
    with pytest.raises(zm.InvalidArgumentError, match=match):
        call(out)
    if out is not None:
        assert (out == 123.0).all()


def test_overlapping_or_read_only_out_is_refused():
    q = randn(2, 4, 16)
    kv = randn(6, 2, 16, dtype=np.float16)
    before = q.copy()
    with pytest.raises(zm.InvalidArgumentError, match="overlaps"):
        ops.attention(q, kv, kv, 0, out=q)  # attention reads q while it writes out
    big = randn(3, 16)
    with pytest.raises(zm.InvalidArgumentError, match="overlaps"):
        ops.silu_mul(big[:2], big[:2], out=big[1:])  # a shifted overlap, not the same array
    w = randn(16)
    with pytest.raises(zm.InvalidArgumentError, match="overlaps"):
        ops.rms_norm(w[None], w, 1e-5, out=w.reshape(1, 16))  # out would be the weight
    ro = np.zeros((2, 16), np.float32)
    ro.flags.writeable = False
    with pytest.raises(zm.InvalidArgumentError, match="read-only"):
        ops.silu_mul(big[:2], big[:2], out=ro)
    assert np.array_equal(q, before)
    with pytest.raises(zm.InvalidArgumentError, match="SIMD"):
        ops.simd("avx9000")


def test_weights_mapped_read_only_are_accepted_as_inputs(tmp_path):
    zm.save_safetensors(tmp_path / "w.safetensors", {"norm": np.ones(32, np.float32)})
    weights = zm.load_weights(tmp_path / "w.safetensors")
    x = randn(3, 32)
    np.testing.assert_allclose(ops.rms_norm(x, weights["norm"], 0.0), ref_rms_norm(x, 1.0, 0.0), rtol=2e-6)
    weights.close()


def test_two_threads_at_once_get_their_own_results():
    keys, values = randn(300, 3, 64, dtype=np.float16), randn(300, 3, 64, dtype=np.float16)
    qs = [randn(40, 9, 64) for _ in range(2)]
    expected = [ops.attention(q, keys, values, 200) for q in qs]
    errors = []

    def work(i):
        for _ in range(20):
            if not np.array_equal(ops.attention(qs[i], keys, values, 200), expected[i]):
                errors.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
