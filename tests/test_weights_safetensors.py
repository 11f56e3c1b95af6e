"""load_weights on safetensors: the reference writer's files, byte for byte; hostile files."""

import json
import os
import stat
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zigmem as zm
from helpers import has_capsh, run_under_memlock_limit
from weights_leaks import held

ml_dtypes = pytest.importorskip("ml_dtypes")

REFERENCE = {
    "bool": np.array([True, False, True]),
    "u8": np.arange(7, dtype=np.uint8),
    "i8": np.arange(-3, 4, dtype=np.int8),
    "i16": np.arange(6, dtype=np.int16).reshape(2, 3),
    "u16": np.arange(5, dtype=np.uint16),
    "f16": np.linspace(-1, 1, 9, dtype=np.float16).reshape(3, 3),
    "i32": np.arange(4, dtype=np.int32),
    "u32": np.arange(3, dtype=np.uint32),
    "f32": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    "f64": np.array([1.5, -2.25]),
    "i64": np.arange(-2, 2, dtype=np.int64),
    "u64": np.array([2**63], dtype=np.uint64),
    "empty": np.zeros((0, 4), np.float32),
    "scalar": np.array(7.0, np.float32),
}


@pytest.fixture
def reference_file(tmp_path):
    path = tmp_path / "ref.safetensors"
    safetensors.numpy.save_file(REFERENCE, str(path), metadata={"format": "np", "note": "é"})
    return path


def test_every_tensor_matches_the_reference_byte_for_byte(reference_file):
    with zm.load_weights(reference_file) as w:
        assert w.format == "safetensors" and w.metadata == {"format": "np", "note": "é"}
        assert sorted(w.keys()) == sorted(REFERENCE) and len(w) == len(REFERENCE)
        loaded = safetensors.numpy.load_file(str(reference_file))
        for name, expected in loaded.items():
            view = w[name]
            assert view.dtype == expected.dtype and view.shape == expected.shape
            assert view.tobytes() == expected.tobytes()
            info = w.info(name)
            assert info.shape == expected.shape and info.nbytes == expected.nbytes


def test_views_are_zero_copy_and_read_only(reference_file):
    w = zm.load_weights(reference_file)
    base = w._live_root().ctypes.data
    view = w["f32"]
    assert view.ctypes.data == base + w.info("f32").offset  # inside the mapping
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0, 0, 0] = 1
    w.close()


def test_writable_maps_copy_on_write(reference_file):
    before = reference_file.read_bytes()
    with zm.load_weights(reference_file, writable=True) as w:
        view = w["f32"]
        view[:] = -1
        assert (w["f32"] == -1).all()
        del view
    assert reference_file.read_bytes() == before  # the file is untouched


def test_close_defers_the_unmap_until_views_die(reference_file):
    w = zm.load_weights(reference_file)
    view = w["f64"]
    w.close()
    assert view.tolist() == [1.5, -2.25]  # still mapped
    with pytest.raises(zm.UseAfterFreeError, match="closed"):
        w["f64"]
    del view


@pytest.mark.parametrize("options", [{"advice": "sequential"}, {"advice": "random"},
                                     {"advice": "willneed"}, {"populate": True}, {"lock": True}])
def test_options(reference_file, options):
    with zm.load_weights(reference_file, **options) as w:
        assert w["f32"].sum() == sum(range(24))
        if options.get("populate") or options.get("lock"):
            assert w.resident_bytes() == -(-w.nbytes // 4096) * 4096


def test_bfloat16_and_float8_come_back_as_ml_dtypes(tmp_path):
    path = tmp_path / "ml.safetensors"
    tensors = {"bf16": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16),
               "e4m3": np.array([0.5, 1.0], dtype=ml_dtypes.float8_e4m3fn),
               "e5m2": np.array([2.0], dtype=ml_dtypes.float8_e5m2)}
    zm.save_safetensors(path, tensors)
    with zm.load_weights(path) as w:
        assert w.info("bf16").dtype == "BF16" and w["bf16"].dtype == ml_dtypes.bfloat16
        assert w["bf16"].astype(np.float32).tolist() == [1.5, -2.0]
        assert w.info("e4m3").dtype == "F8_E4M3" and w["e5m2"].astype(np.float32).tolist() == [2.0]
        assert w.dequantize("bf16").tolist() == [1.5, -2.0]


def test_save_safetensors_round_trips_through_the_reference_reader_aligned(tmp_path):
    path = tmp_path / "saved.safetensors"
    zm.save_safetensors(path, REFERENCE, metadata={"a": "b"})
    loaded = safetensors.numpy.load_file(str(path))
    for name, expected in REFERENCE.items():
        assert loaded[name].tobytes() == expected.tobytes() and loaded[name].shape == expected.shape
    with zm.load_weights(path) as w:
        for name in w:
            info = w.info(name)
            assert info.offset % max(1, info.numpy_dtype.itemsize) == 0  # naturally aligned
        assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 64 == 0


def test_save_streams_non_contiguous_arrays(tmp_path):
    base = np.arange(100, dtype=np.float32).reshape(10, 10)
    zm.save_safetensors(tmp_path / "t.safetensors", {"t": base.T, "s": base[::2, ::3]})
    with zm.load_weights(tmp_path / "t.safetensors") as w:
        assert np.array_equal(w["t"], base.T) and np.array_equal(w["s"], base[::2, ::3])


# ------------------------------------------------------------------ hostile files

def raw_file(tmp_path, header, data=b"", length=None, name="bad.safetensors"):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


HOSTILE = [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "past the end"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, None, "cover 8"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, None, "needs 8"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "hole"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "overlaps"),
    ({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "non-negative"),
    ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, b"", None, "overflows"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, None, "begin <= end"),
    ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, None, "exactly"),
    ({"__metadata__": {"k": 1}}, b"", None, "strings to strings"),
    ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0\0", None, "whole bytes"),
    (b'{"a": 1, "a": 2}', b"", None, "duplicate key"),
    (b"\xff\xfe{}", b"", None, "UTF-8"),
    (b"[1, 2]", b"", None, "JSON object"),
    (b'{"a": ', b"", None, "not valid JSON"),
    ({}, b"", 10**12, "exceeds"),
    ({}, b"", 10**6, "runs past the end"),
    ({"__metadata__": []}, b"", None, "strings to strings"),
    ({"__metadata__": "x"}, b"", None, "strings to strings"),
    ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "unknown dtype"),
    ({"a": {"dtype": {"x": 1}, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}, b"\0" * 4, None,
     "tensor 'a': 65 dimensions, numpy allows at most 64"),
    ({"a": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}, b"", None,
     "tensor 'a': shape .* overflows"),
    ({"a": {"dtype": "F32", "shape": [2**62, 0], "data_offsets": [0, 0]}}, b"", None, "overflows"),
    ({"a": {"dtype": "U8", "shape": [2**62, 2, 0], "data_offsets": [0, 0]}}, b"", None, "overflows"),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", None, "nested too deeply"),
    (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', b"", None,
     "not valid JSON"),
    (b'{"a": NaN}', b"", None, "NaN is not a JSON value"),
    (b'{"__metadata__": {"k": Infinity}}', b"", None, "Infinity"),
]


@pytest.mark.parametrize("header, data, length, error", HOSTILE)
def test_hostile_headers_are_named_errors(tmp_path, header, data, length, error):
    path = raw_file(tmp_path, header, data, length)
    with pytest.raises(zm.WeightFormatError, match=error):
        zm.load_weights(path)


def test_a_shape_numpy_can_just_view_loads(tmp_path):
    # 64 dims, and a zero-size tensor whose other dims multiply to the largest intp
    path = raw_file(tmp_path, {"a": {"dtype": "F32", "shape": [1] * 64, "data_offsets": [0, 4]},
                               "b": {"dtype": "U8", "shape": [0, 2**63 - 1], "data_offsets": [4, 4]}},
                    b"\0" * 4)
    with zm.load_weights(path) as w:
        assert w["a"].ndim == 64 and w["b"].shape == (0, 2**63 - 1)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8) | st.sampled_from(["F32", "U8", "dtype", "shape", "data_offsets"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "a", ""]),
                      children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(max_size=4) | st.just("__metadata__"), json_values, max_size=4),
       data=st.binary(max_size=16))
def test_any_json_header_loads_or_is_a_format_error(tmp_path, header, data):
    path = raw_file(tmp_path, header, data)
    try:
        with zm.load_weights(path) as w:
            for name in w:
                w[name].tobytes()
    except zm.WeightFormatError:
        pass


def test_every_truncation_is_a_clear_error_and_other_files_are_unaffected(reference_file, tmp_path):
    good = zm.load_weights(reference_file)
    data = reference_file.read_bytes()
    for cut in range(0, len(data) - 1, 7):
        path = tmp_path / "cut.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(zm.WeightFormatError):
            zm.load_weights(path)
    assert good["f32"].sum() == sum(range(24))
    good.close()


@pytest.mark.skipif(not has_capsh(), reason="needs capsh to drop CAP_IPC_LOCK")
def test_lock_beyond_memlock_limit_names_the_limit(tmp_path):
    path = tmp_path / "big.safetensors"
    zm.save_safetensors(path, {"w": np.zeros(1 << 18, np.float32)})  # 1 MiB
    out = run_under_memlock_limit(
        "import zigmem as zm\n"
        "try:\n"
        f"    zm.load_weights({str(path)!r}, lock=True)\n"
        "except zm.OutOfMemoryError as e:\n"
        "    print(e)\n"
        f"print(zm.load_weights({str(path)!r})['w'].sum())\n")  # unlocked, still fine
    assert "RLIMIT_MEMLOCK is 64.0 KiB" in out and "mlock of 1.0 MiB" in out
    assert out.strip().endswith("0.0")


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        zm.load_weights(tmp_path / "nope.safetensors")


@pytest.fixture(scope="module")
def fuzz_seed(tmp_path_factory):
    path = tmp_path_factory.mktemp("seed") / "seed.safetensors"
    safetensors.numpy.save_file({"a": np.arange(6, dtype=np.float32), "b": np.ones((2, 2), np.int16)},
                                str(path), metadata={"m": "v"})
    return path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_files_load_or_raise_format_errors_and_leak_nothing(tmp_path, fuzz_seed, data):
    mutated = bytearray(fuzz_seed)
    for _ in range(data.draw(st.integers(1, 6))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        mutated = mutated[: data.draw(st.integers(0, len(mutated)))]
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(mutated))
    descriptors = held()[1]
    error = load_and_touch(path)
    assert error is None or error.startswith(str(path))
    assert held(path) == (0, descriptors)  # the mapping and the descriptor are gone


def load_and_touch(path):
    """None if ``path`` loads and every tensor reads; the message of its WeightFormatError
    if not (any other exception fails the test). Nothing it made outlives the call."""
    try:
        with zm.load_weights(path, format="safetensors") as w:
            for name in w:
                w[name].tobytes()
    except zm.WeightFormatError as e:
        return str(e)
    return None


# ------------------------------------------------------------------ save_safetensors

@pytest.mark.parametrize("array", [
    np.arange(6, dtype=">f4").reshape(2, 3),
    np.arange(12, dtype=">i8").reshape(3, 4).T,                # big-endian and transposed
    np.arange(24, dtype=">u2").reshape(4, 6)[::-1, ::2],        # negative and skipping strides
    np.asfortranarray(np.arange(6, dtype="<f8").reshape(2, 3)),
    np.array([1 + 2j, -3j], dtype=">c8"),
])
def test_save_writes_little_endian_whatever_the_byte_order_and_layout(tmp_path, array):
    path = tmp_path / "be.safetensors"
    zm.save_safetensors(path, {"x": array})
    expected = array.astype(array.dtype.newbyteorder("<"))
    theirs = safetensors.numpy.load_file(str(path))["x"]
    assert theirs.shape == array.shape and np.array_equal(theirs, expected)
    with zm.load_weights(path) as w:
        assert np.array_equal(w["x"], expected) and w["x"].dtype == expected.dtype


def test_concurrent_saves_to_one_path_never_mix(tmp_path):
    path = tmp_path / "shared.safetensors"
    tensors = [{"x": np.full(1 << 16, i, np.int32)} for i in range(2)]
    errors = []

    def save(i):
        try:
            for _ in range(20):
                zm.save_safetensors(path, tensors[i])
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with zm.load_weights(path) as w:
        x = w["x"]
        assert x[0] in (0, 1) and (x == x[0]).all()  # one writer's file, whole
    assert os.listdir(tmp_path) == ["shared.safetensors"]  # no temporary file left


def test_saved_file_mode_follows_the_umask(tmp_path):
    path = tmp_path / "mode.safetensors"
    zm.save_safetensors(path, {"x": np.zeros(2)})
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_failed_save_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "keep.safetensors"
    zm.save_safetensors(path, {"old": np.arange(3, dtype=np.int8)})
    before = path.read_bytes()
    # Files may not grow past 64 KiB: writing 1 MiB fails half way (EFBIG).
    script = f"""
import resource, signal
import numpy as np
import zigmem as zm
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
try:
    zm.save_safetensors({str(path)!r}, {{"new": np.zeros(1 << 18, np.float32)}})
except OSError as e:
    print("refused", e.errno)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("refused")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["keep.safetensors"]


@pytest.mark.parametrize("tensors, error", [
    ([("x", np.zeros(2))], zm.InvalidArgumentError), ({3: np.zeros(2)}, zm.WeightFormatError),
    ({"__metadata__": np.zeros(2)}, zm.WeightFormatError),
    ({"s": np.array(["a", "b"])}, zm.WeightFormatError),
])
def test_save_refuses_what_safetensors_cannot_hold(tmp_path, tensors, error):
    with pytest.raises(error):
        zm.save_safetensors(tmp_path / "bad.safetensors", tensors)
    assert os.listdir(tmp_path) == []
