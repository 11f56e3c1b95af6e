"""QuantizedMatrix: matmul, rows and dequantize of every supported type against gguf.quants,
on GGUF files written by the real gguf writer; determinism across batch sizes, thread
counts and kernel paths; bad input; lifetimes; threads and fork."""

import copy
import os
import pickle
import threading

import gguf
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize

import zigmem as zm
from zigmem.weights import quantized_matrix as qm

RNG = np.random.default_rng(11)

# Byte offsets of each block's fp16 scales: random blocks get finite values there.
SCALE_FIELDS = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
    Q.IQ4_NL: (0,), Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}
QUANTIZED = list(SCALE_FIELDS)
FLOATS = [Q.F32, Q.F16, Q.BF16]
ALL_TYPES = FLOATS + QUANTIZED
ROWS, COLS = 37, 512  # 37: not a multiple of any thread count or tile


def random_blocks(qtype, rows, cols):
    block, size = GGML_QUANT_SIZES[qtype]
    raw = RNG.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for off in SCALE_FIELDS[qtype]:
        scale = RNG.uniform(-0.05, 0.05, (rows, cols // block)).astype(np.float16)
        raw[:, :, off:off + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def tensor_for(qtype, rows=ROWS, cols=COLS):
    """(array for GGUFWriter.add_tensor, raw_dtype or None)."""
    if qtype == Q.F32:
        return RNG.standard_normal((rows, cols)).astype(np.float32), None
    if qtype == Q.F16:
        return RNG.standard_normal((rows, cols)).astype(np.float16), None
    if qtype == Q.BF16:
        bits = RNG.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8).reshape(rows, 2 * cols), Q.BF16
    return random_blocks(qtype, rows, cols), qtype


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("qm") / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for qtype in ALL_TYPES:
        data, raw = tensor_for(qtype)
        w.add_tensor(qtype.name, data, raw_dtype=raw)
    data, raw = tensor_for(Q.F32, 9, 67)  # a row length no vector width divides
    w.add_tensor("F32_odd", data)
    data, raw = tensor_for(Q.Q4_K, 3, 256)
    w.add_tensor("Q4_K_small", data, raw_dtype=raw)
    w.add_tensor("I32", np.arange(24, dtype=np.int32).reshape(4, 6))
    w.add_tensor("norm", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with zm.load_weights(path) as f:
        yield f


def reference(w, name):
    """gguf.quants' float32 dequantization of tensor `name`."""
    info = w.info(name)
    raw = np.asarray(w[name])
    if info.dtype not in ("F32", "F16"):
        raw = raw.view(np.uint8)
    out = dequantize(raw, Q[info.dtype]).astype(np.float32)
    return out.reshape(info.shape)


def assert_close(ours, x, dense):
    """Equal to x @ dense.T up to float32 summation order."""
    exact = x.astype(np.float64) @ dense.astype(np.float64).T
    bound = np.abs(x).astype(np.float64) @ np.abs(dense).astype(np.float64).T
    assert np.all(np.abs(ours - exact) <= 1e-5 * bound + 1e-30), np.max(np.abs(ours - exact))


@pytest.fixture
def threads():
    before = zm.get_num_threads()
    yield
    zm.set_num_threads(before)


@pytest.fixture
def kernels():
    before = qm.kernel_path()
    yield
    qm.use_kernels(before)


NAMES = [t.name for t in ALL_TYPES] + ["F32_odd", "Q4_K_small"]

# ------------------------------------------------------------------ against gguf.quants


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_is_bit_exact(model, name):
    expected = reference(model, name)
    q = model.matrix(name)
    assert q.shape == expected.shape and q.dtype == model.info(name).dtype
    assert q.nbytes == model.info(name).nbytes
    assert q.dequantize().tobytes() == expected.tobytes()
    assert model.dequantize(name).tobytes() == expected.tobytes()


@pytest.mark.parametrize("n", [1, 7, 64])
@pytest.mark.parametrize("name", NAMES)
def test_matmul_matches_the_dequantized_product(model, name, n):
    q = model.matrix(name)
    x = RNG.standard_normal((n, q.shape[1])).astype(np.float32)
    y = q.matmul(x)
    assert y.shape == (n, q.shape[0]) and y.dtype == np.float32
    assert_close(y, x, reference(model, name))
    one = q.matmul(x[0])
    assert one.shape == (q.shape[0],)


@pytest.mark.parametrize("name", NAMES)
def test_rows_are_the_dequantized_rows(model, name):
    q, dense = model.matrix(name), reference(model, name)
    ids = [0, q.shape[0] - 1, 2, 2]
    assert q.rows(ids).tobytes() == dense[ids].tobytes()
    assert q.rows(1).tobytes() == dense[1].tobytes()
    grid = np.array([[0, 1], [2, 0]], dtype=np.uint8)
    assert q.rows(grid).shape == (2, 2, q.shape[1])
    assert q.rows(grid).tobytes() == dense[grid].tobytes()
    assert q.rows([]).shape == (0, q.shape[1])


# ------------------------------------------------------------------ determinism


@pytest.mark.parametrize("name", NAMES)
def test_row_i_of_a_batch_equals_the_one_row_result_bitwise(model, name):
    q = model.matrix(name)
    x = RNG.standard_normal((64, q.shape[1])).astype(np.float32)
    batch = q.matmul(x)
    for n in (7, 3):
        assert q.matmul(x[:n]).tobytes() == batch[:n].tobytes()
    for i in range(64):
        assert q.matmul(x[i]).tobytes() == batch[i].tobytes(), i


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K", "F32", "F16", "Q4_K_small"])
def test_every_thread_count_gives_the_same_bits(model, name, threads):
    q = model.matrix(name)
    x = RNG.standard_normal((64, q.shape[1])).astype(np.float32)
    results = []
    for t in (1, 2, 3, 4):
        zm.set_num_threads(t)
        assert zm.get_num_threads() == t
        results.append((q.matmul(x).tobytes(), q.matmul(x[5]).tobytes()))
    assert all(r == results[0] for r in results)


@pytest.mark.parametrize("path", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("name", NAMES)
def test_every_kernel_path_is_correct_and_batch_invariant(model, name, path, kernels):
    if path not in qm.supported_kernel_paths():
        pytest.skip(f"this CPU has no {path}")
    qm.use_kernels(path)
    assert qm.kernel_path() == path
    q = model.matrix(name)
    x = RNG.standard_normal((9, q.shape[1])).astype(np.float32)
    y = q.matmul(x)
    dense = reference(model, name)
    assert_close(y, x, dense)
    for i in range(9):
        assert q.matmul(x[i]).tobytes() == y[i].tobytes()
    # rows dequantizes with the path's own (SIMD) code: still bit-exact
    assert q.rows(np.arange(q.shape[0])).tobytes() == dense.tobytes()


def test_the_environment_variable_forces_a_path():
    import subprocess
    import sys

    for path in qm.supported_kernel_paths():
        out = subprocess.run(
            [sys.executable, "-c", "from zigmem.weights.quantized_matrix import kernel_path; "
             "print(kernel_path())"], env={**os.environ, "ZIGMEM_KERNELS": path},
            capture_output=True, text=True, check=True)
        assert out.stdout.strip() == path
    out = subprocess.run([sys.executable, "-W", "always", "-c", "import zigmem"],
                         env={**os.environ, "ZIGMEM_KERNELS": "sse9"}, capture_output=True,
                         text=True, check=True)
    assert "ZIGMEM_KERNELS='sse9'" in out.stderr


def test_unknown_kernel_path_is_refused():
    with pytest.raises(zm.InvalidArgumentError, match="kernel path"):
        qm.use_kernels("neon")


# ------------------------------------------------------------------ int16 activations


def assert_within_int16_quantization(ours, x, dense):
    """x @ dense.T, where each element of x may move by half a step of its 32-column block
    (the block's largest magnitude / 65534), plus float32 rounding."""
    blocks = np.abs(x).reshape(x.shape[0], -1, 32).max(axis=2)
    step = np.repeat(blocks / 65534 * 1.001, 32, axis=1)
    exact = x.astype(np.float64) @ dense.astype(np.float64).T
    bound = (step + 1e-5 * np.abs(x)).astype(np.float64) @ np.abs(dense).astype(np.float64).T
    assert np.all(np.abs(ours - exact) <= bound + 1e-30), np.max(np.abs(ours - exact) / bound)


@pytest.mark.parametrize("path", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("name", [t.name for t in QUANTIZED] + ["Q4_K_small"])
def test_int16_activations_are_close_batch_invariant_and_equal_on_every_path(model, name, path, kernels):
    if path not in qm.supported_kernel_paths():
        pytest.skip(f"this CPU has no {path}")
    q = model.matrix(name)
    x = RNG.standard_normal((9, q.shape[1])).astype(np.float32)
    x[2] *= 1000  # a row's scale is its own
    x[4] = 0
    qm.use_kernels("portable")
    expected = q.matmul(x, quantize_activations=True)
    qm.use_kernels(path)
    y = q.matmul(x, quantize_activations=True)
    assert y.tobytes() == expected.tobytes()  # one definition, every path
    assert_within_int16_quantization(y, x, reference(model, name))
    assert not np.any(y[4])
    for i in range(9):
        assert q.matmul(x[i], quantize_activations=True).tobytes() == y[i].tobytes()
    assert q.matmul(x[3:7], quantize_activations=True).tobytes() == y[3:7].tobytes()


@pytest.mark.parametrize("name", ["Q4_1", "Q6_K", "Q4_K_small"])
def test_int16_activations_give_the_same_bits_for_every_thread_count(model, name, threads):
    q = model.matrix(name)
    x = RNG.standard_normal((64, q.shape[1])).astype(np.float32)
    results = set()
    for t in (1, 2, 3, 4):
        zm.set_num_threads(t)
        results.add((q.matmul(x, quantize_activations=True).tobytes(),
                     q.matmul(x[5], quantize_activations=True).tobytes()))
    assert len(results) == 1


def test_int16_activations_a_row_with_nan_or_inf_is_nan_the_others_unchanged(model):
    q = model.matrix("Q4_1")
    x = RNG.standard_normal((4, q.shape[1])).astype(np.float32)
    clean = q.matmul(x, quantize_activations=True)
    x[1, 7], x[2, 300] = np.nan, np.inf
    y = q.matmul(x, quantize_activations=True)
    assert np.isnan(y[1:3]).all()
    assert y[[0, 3]].tobytes() == clean[[0, 3]].tobytes()


@pytest.mark.parametrize("name", ["Q4_1", "Q8_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("scale", [1e-36, 1e-41, 1e33])  # 1e-41: subnormal; 1e33: sums near 1e36
def test_int16_activations_keep_tiny_and_huge_rows_in_range(model, name, scale):
    """A row is scaled by a power of two first: block scales and sums of rows near the
    ends of the float range neither flush to zero nor overflow (the adversarial tester's
    1e-36 row came out 0, a 3e38 row NaN)."""
    q = model.matrix(name)
    x = RNG.standard_normal((2, q.shape[1])).astype(np.float32)
    x[0] *= np.float32(scale)
    dense = reference(model, name)
    y = q.matmul(x, quantize_activations=True)
    assert np.isfinite(y).all()
    x64 = x.astype(np.float64)
    exact = x64 @ dense.astype(np.float64).T
    bound = np.abs(x64) @ np.abs(dense).astype(np.float64).T
    tolerance = 1e-4 if scale > 1e-38 else 1e-2  # subnormal x carries few bits of its own
    assert np.all(np.abs(y - exact) <= tolerance * bound + 1e-44)
    assert q.matmul(x[0], quantize_activations=True).tobytes() == y[0].tobytes()


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q2_K])
def test_int16_activations_near_float_max_with_minimums_stay_finite(qtype):
    """x = 3e38 against weights of scale ~1e-7: the true products are finite; the block sums
    of the minimum terms (16 x 32767 x scale) used to overflow to inf, then NaN."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = RNG.integers(0, 256, (2, 256 // block, size), dtype=np.uint8)
    for off in SCALE_FIELDS[qtype]:
        scale = RNG.uniform(-3e-7, 3e-7, (2, 256 // block)).astype(np.float16)
        raw[:, :, off:off + 2] = scale.view(np.uint8).reshape(2, 256 // block, 2)
    q = qm.QuantizedMatrix("huge", qtype.name, (2, 256), raw.reshape(-1))
    dense = q.dequantize().astype(np.float64)
    x = np.full(256, 3e38, np.float32)
    exact = dense @ x.astype(np.float64)
    assert np.all(np.abs(exact) < 3e38)
    y = q.matmul(x, quantize_activations=True)
    assert np.all(np.abs(y - exact) <= 1e-4 * (np.abs(dense) @ np.abs(x.astype(np.float64))))


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_float_weights_ignore_quantize_activations(model, name):
    q = model.matrix(name)
    x = RNG.standard_normal((3, q.shape[1])).astype(np.float32)
    assert q.matmul(x, quantize_activations=True).tobytes() == q.matmul(x).tobytes()


@pytest.mark.parametrize("flag", [1, 0, None, "yes", np.True_])
def test_quantize_activations_must_be_a_bool(model, flag):
    q = model.matrix("Q4_0")
    x = RNG.standard_normal(q.shape[1]).astype(np.float32)
    out = np.zeros(q.shape[0], np.float32)
    with pytest.raises(zm.InvalidArgumentError, match="quantize_activations must be True or False"):
        q.matmul(x, out=out, quantize_activations=flag)
    assert not out.any()


def test_int16_activations_refuse_bad_out_and_aliasing_like_float(model):
    q = model.matrix("Q8_0")
    x = RNG.standard_normal((2, q.shape[1])).astype(np.float32)
    with pytest.raises(zm.InvalidArgumentError, match="out must have shape"):
        q.matmul(x, out=np.empty((2, 3), np.float32), quantize_activations=True)
    big = np.zeros(q.shape[1] * 4, np.float32)
    with pytest.raises(zm.InvalidArgumentError, match="overlap"):
        q.matmul(big[:q.shape[1]], out=big[:q.shape[0]], quantize_activations=True)
    assert not big.any()


# ------------------------------------------------------------------ outputs


def test_out_is_written_and_returned(model):
    q = model.matrix("Q4_K")
    x = RNG.standard_normal((3, COLS)).astype(np.float32)
    out = np.full((3, ROWS), np.nan, np.float32)
    assert q.matmul(x, out=out) is out
    assert out.tobytes() == q.matmul(x).tobytes()
    one = np.empty(ROWS, np.float32)
    assert q.matmul(x[1], out=one) is one and one.tobytes() == out[1].tobytes()
    rows = np.empty((2, COLS), np.float32)
    assert q.rows([3, 4], out=rows) is rows
    assert rows.tobytes() == reference(model, "Q4_K")[[3, 4]].tobytes()


def test_results_land_in_the_arena_inside_numpy_blocks(model):
    counting = zm.CountingAllocator(name="activations")
    arena = zm.ArenaAllocator(counting)
    q = model.matrix("Q8_0")
    x = RNG.standard_normal((4, COLS)).astype(np.float32)
    expected = q.matmul(x)
    with arena.numpy():
        y = q.matmul(x)
        e = q.rows([1, 2])
    assert counting.stats.current_bytes >= y.nbytes + e.nbytes
    assert y.tobytes() == expected.tobytes()
    del y, e
    arena.reset("free_all")
    arena.deinit()


def test_scratch_shows_in_the_memory_report(model):
    model.matrix("Q4_0").matmul(np.ones((64, COLS), np.float32))
    assert "kernel scratch" in zm.memory_report()


def test_a_big_int16_job_does_not_pin_its_quantized_x(model):
    """The quantized rows of x (~1 KiB per 512 columns) live in the pool's shared scratch;
    past 1 MiB it is freed after the job rather than held for the process's life."""
    from zigmem import threads as zm_threads

    scratch = zm_threads.scratch_allocator()
    q = model.matrix("Q4_0")
    q.matmul(np.ones((2, COLS), np.float32), quantize_activations=True)
    before = scratch.stats.current_bytes
    q.matmul(np.ones((4000, COLS), np.float32), quantize_activations=True)
    assert scratch.stats.peak_bytes >= before + 4000 * COLS * 2
    assert scratch.stats.current_bytes <= before


# ------------------------------------------------------------------ bad input


def bad_x_cases():
    good = np.ones((2, COLS), np.float32)
    return {
        "float64": good.astype(np.float64),
        "float16": good.astype(np.float16),
        "list": good.tolist(),
        "wrong width": np.ones((2, COLS - 32), np.float32),
        "3-D": np.ones((1, 2, COLS), np.float32),
        "0-D": np.float32(1.0),
        "non-contiguous": np.ones((2, 2 * COLS), np.float32)[:, ::2],
        "big-endian": good.astype(">f4"),
    }


def test_messages_name_what_was_passed(model):
    with pytest.raises(zm.InvalidArgumentError, match="not a numpy float32 scalar"):
        model.matrix("Q4_0").matmul(np.float32(1))
    with pytest.raises(zm.InvalidArgumentError, match="numpy array of the matrix's bytes, not bytes"):
        qm.QuantizedMatrix("m", "Q8_0", (1, 32), bytes(34))


@pytest.mark.parametrize("case", sorted(bad_x_cases()))
def test_bad_x_is_refused_and_nothing_is_written(model, case):
    x = bad_x_cases()[case]
    out = np.full((2, ROWS), 7.0, np.float32)
    with pytest.raises(zm.InvalidArgumentError):
        model.matrix("Q4_0").matmul(x, out=out)
    assert np.all(out == 7.0)


def bad_out_cases():
    return {
        "float64": np.zeros((2, ROWS)),
        "wrong shape": np.zeros((2, ROWS + 1), np.float32),
        "flat": np.zeros(2 * ROWS, np.float32),
        "non-contiguous": np.zeros((2, 2 * ROWS), np.float32)[:, ::2],
        "read-only": np.zeros((2, ROWS), np.float32).copy(),
        "tuple": (0.0,) * ROWS,
    }


@pytest.mark.parametrize("case", sorted(bad_out_cases()))
def test_bad_out_is_refused(model, case):
    out = bad_out_cases()[case]
    if case == "read-only":
        out.flags.writeable = False
    with pytest.raises(zm.InvalidArgumentError):
        model.matrix("Q4_0").matmul(np.ones((2, COLS), np.float32), out=out)
    if isinstance(out, np.ndarray):
        assert not np.any(out)


def test_out_aliasing_x_is_refused(model):
    q = model.matrix("F32")  # 37 x 512: give x room to alias
    buf = np.ones(2 * COLS, np.float32)
    x = buf.reshape(2, COLS)
    with pytest.raises(zm.InvalidArgumentError, match="overlap"):
        q.matmul(x, out=buf[:2 * ROWS].reshape(2, ROWS))
    assert np.all(buf == 1.0)
    square = model.matrix("F32_odd")  # 9 x 67
    v = np.ones(67, np.float32)
    with pytest.raises(zm.InvalidArgumentError, match="overlap"):
        square.matmul(v, out=v[:9])


@pytest.mark.parametrize("ids, match", [
    ([0, -1], "row id -1 is out of range"), ([ROWS], f"row id {ROWS} is out of range"),
    (np.array([2**63], np.uint64), "out of range"), ([0.5], "integers"), ([True], "integers"),
    ("3", "integers"),
])
def test_bad_row_ids_are_refused_and_nothing_is_written(model, ids, match):
    out = np.full((1, COLS), 3.0, np.float32)
    q = model.matrix("Q6_K")
    with pytest.raises(zm.InvalidArgumentError, match=match):
        q.rows(ids, out=out if np.size(ids) == 1 else None)
    assert np.all(out == 3.0)


def test_types_without_kernels_and_other_shapes_are_refused(model):
    with pytest.raises(zm.InvalidArgumentError, match="I32 is not supported"):
        model.matrix("I32")
    with pytest.raises(zm.InvalidArgumentError, match="2 dimensions"):
        model.matrix("norm")
    with pytest.raises(KeyError):
        model.matrix("missing")


def test_thread_counts_are_checked(threads):
    for bad in (0, -1, 257, 1.5, "2", True):
        with pytest.raises(zm.InvalidArgumentError):
            zm.set_num_threads(bad)
    zm.set_num_threads(3)
    assert zm.get_num_threads() == 3


def test_default_thread_count_is_the_usable_cpus():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import zigmem; print(zigmem.get_num_threads())"],
                         capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(os.sched_getaffinity(0))


# ------------------------------------------------------------------ lifetimes


def test_matrix_keeps_working_after_close(tmp_path):
    path = tmp_path / "c.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    data, raw = tensor_for(Q.Q8_0, 8, 64)
    w.add_tensor("m", data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = zm.load_weights(path)
    q = f.matrix("m")
    x = np.ones(64, np.float32)
    before = q.matmul(x).tobytes()
    f.close()
    with pytest.raises(zm.UseAfterFreeError):
        f.matrix("m")
    assert q.matmul(x).tobytes() == before
    assert q.rows([7]).shape == (1, 64)
    assert q.dequantize().shape == (8, 64)


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, pickle.dumps])
def test_copying_or_pickling_is_a_type_error(model, how):
    with pytest.raises(TypeError, match="QuantizedMatrix"):
        how(model.matrix("Q4_0"))


def test_safetensors_float_matrices(tmp_path):
    path = tmp_path / "m.safetensors"
    f32 = RNG.standard_normal((5, 40)).astype(np.float32)
    tensors = {"f32": f32, "f16": f32.astype(np.float16),
               "bf16": f32.astype(ml_dtypes.bfloat16)}
    safetensors.numpy.save_file(tensors, str(path))
    x = RNG.standard_normal((3, 40)).astype(np.float32)
    with zm.load_weights(path) as w:
        for name, t in tensors.items():
            q = w.matrix(name)
            assert q.dtype == name.upper() and q.shape == (5, 40)
            dense = t.astype(np.float32)
            assert q.dequantize().tobytes() == dense.tobytes()
            assert_close(q.matmul(x), x, dense)
            assert q.rows([4]).tobytes() == dense[[4]].tobytes()


# ------------------------------------------------------------------ concurrency


def test_two_python_threads_at_once_get_their_own_results(model, threads):
    zm.set_num_threads(2)
    q = model.matrix("Q5_K")
    xs = [RNG.standard_normal((16, COLS)).astype(np.float32) for _ in range(2)]
    expected = [q.matmul(x).tobytes() for x in xs]
    failures = []

    def work(k):
        for _ in range(200):
            if q.matmul(xs[k]).tobytes() != expected[k]:
                failures.append(k)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not failures


def test_two_threads_with_int16_activations_each_get_their_own_quantized_x(model, threads):
    """The quantized rows of x live in the pool's one shared scratch: a second caller must
    wait its turn, never overwrite the first's x (different row counts grow it meanwhile)."""
    zm.set_num_threads(2)
    q = model.matrix("Q4_K")
    xs = [RNG.standard_normal((n, COLS)).astype(np.float32) for n in (1, 40, 3)]
    expected = [q.matmul(x, quantize_activations=True).tobytes() for x in xs]
    failures = []

    def work(k):
        for _ in range(150):
            if q.matmul(xs[k], quantize_activations=True).tobytes() != expected[k]:
                failures.append(k)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not failures


def test_a_forked_child_computes_with_fresh_workers(model, threads):
    zm.set_num_threads(2)
    q = model.matrix("Q4_1")
    x = RNG.standard_normal((8, COLS)).astype(np.float32)
    expected = q.matmul(x).tobytes()  # the pool's workers are running now
    expected16 = q.matmul(x, quantize_activations=True).tobytes()  # and its shared scratch held
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: exit without running pytest's machinery
        ok = q.matmul(x).tobytes() == expected and q.matmul(x[3]).tobytes() == expected[
            3 * 4 * ROWS:4 * 4 * ROWS] and q.matmul(x, quantize_activations=True).tobytes() == expected16
        os.write(wfd, b"1" if ok else b"0")
        os._exit(0)
    os.close(wfd)
    answer = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert answer == b"1"
    assert q.matmul(x).tobytes() == expected


def test_out_overlapping_a_writable_mapping_of_the_weight_is_refused(model):
    with zm.load_weights(model.path, writable=True) as w:
        q = w.matrix("F32_odd")  # 9 x 67, float32 in the copy-on-write mapping
        inside = np.asarray(w["F32_odd"]).reshape(-1)[:9]
        before = inside.copy()
        with pytest.raises(zm.InvalidArgumentError, match="overlap"):
            q.matmul(np.ones(67, np.float32), out=inside)
        with pytest.raises(zm.InvalidArgumentError, match="overlap"):
            q.rows([0], out=np.asarray(w["F32_odd"])[1:2])
        assert inside.tobytes() == before.tobytes()


def test_zero_rows_of_x_and_empty_matrices(model):
    q = model.matrix("Q8_0")
    assert q.matmul(np.ones((0, COLS), np.float32)).shape == (0, ROWS)
    assert q.rows(np.array([], np.int64)).shape == (0, COLS)


def test_the_constructor_checks_the_bytes_against_the_shape():
    good = random_blocks(Q.Q4_0, 2, 64)
    assert zm.QuantizedMatrix("m", "Q4_0", (2, 64), good).shape == (2, 64)
    for shape, data in [((3, 64), good), ((2, 48), good), ((2, 64), good[:, :-1].copy()),
                        ((2, 64), np.ascontiguousarray(good.T).T)]:
        with pytest.raises(zm.InvalidArgumentError):
            zm.QuantizedMatrix("m", "Q4_0", shape, data)
    with pytest.raises(zm.InvalidArgumentError, match="Q8_1 is not supported"):
        zm.QuantizedMatrix("m", "Q8_1", (2, 64), good)
