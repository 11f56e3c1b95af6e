"""load_weights on safetensors: the reference writer's files, byte for byte; hostile files."""

import json
import struct

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zigmem as zm
from helpers import has_capsh, run_under_memlock_limit

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
]


@pytest.mark.parametrize("header, data, length, error", HOSTILE)
def test_hostile_headers_are_named_errors(tmp_path, header, data, length, error):
    path = raw_file(tmp_path, header, data, length)
    with pytest.raises(zm.WeightFormatError, match=error):
        zm.load_weights(path)


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
def test_fuzz_mutated_files_never_crash(tmp_path, fuzz_seed, data):
    mutated = bytearray(fuzz_seed)
    for _ in range(data.draw(st.integers(1, 6))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        mutated = mutated[: data.draw(st.integers(0, len(mutated)))]
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(mutated))
    try:
        with zm.load_weights(path, format="safetensors") as w:
            for name in w:
                w[name].tobytes()
    except zm.WeightFormatError:
        pass
