"""load_weights on GGUF: files by the real gguf writer, checked against GGUFReader; the
dequantize kernels bit-exact against gguf.quants; hostile files built byte by byte."""

import copy
import pickle
import struct
import threading

import gguf
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zigmem as zm
from zigmem._binding import ffi, lib
from weights_leaks import held

RNG = np.random.default_rng(0)


def write_reference(path, alignment=None):
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1.5)
    w.add_uint64("t.u64", 2**63)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", -0.125)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "naïve ✓")
    w.add_array("t.tokens", ["<s>", "héllo", "", "▁world"] * 50)
    w.add_array("t.scores", [0.5, -1.0, 2.0])
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_tensor("f32", RNG.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("f16", RNG.standard_normal((2, 32)).astype(np.float16))
    w.add_tensor("f64", RNG.standard_normal(5))
    w.add_tensor("i8", np.arange(-8, 8, dtype=np.int8))
    w.add_tensor("i32", np.arange(12, dtype=np.int32).reshape(3, 4))
    for name, qtype in [("q4_0", Q.Q4_0), ("q4_1", Q.Q4_1), ("q8_0", Q.Q8_0)]:
        w.add_tensor(name, quantize(RNG.standard_normal((4, 64)).astype(np.float32), qtype), raw_dtype=qtype)
    bf16 = (RNG.standard_normal((2, 16)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    w.add_tensor("bf16", bf16.view(np.uint8).reshape(2, 32), raw_dtype=Q.BF16)
    block, size = GGML_QUANT_SIZES[Q.Q6_K]
    w.add_tensor("q6_k", RNG.integers(0, 255, (2, 2 * size), dtype=np.uint8), raw_dtype=Q.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return write_reference(tmp_path_factory.mktemp("gguf") / "ref.gguf")


def test_tensors_match_gguf_reader_byte_for_byte(reference):
    reader = gguf.GGUFReader(str(reference))
    with zm.load_weights(reference) as w:
        assert w.format == "gguf" and len(w) == len(reader.tensors)
        for t in reader.tensors:
            info = w.info(t.name)
            assert info.dtype == t.tensor_type.name
            assert info.offset == t.data_offset and info.nbytes == t.n_bytes
            assert info.shape == tuple(int(d) for d in reversed(t.shape))
            assert w[t.name].tobytes() == np.asarray(t.data).tobytes()
        assert w["f32"].shape == (3, 64) and w["f32"].dtype == np.float32
        assert w["q4_1"].shape == (4, 40) and w["q6_k"].shape == (2, 2 * 210)


def test_metadata_matches_gguf_reader(reference):
    reader = gguf.GGUFReader(str(reference))
    with zm.load_weights(reference) as w:
        md = w.metadata
        assert md["GGUF.version"] == 3 and md["general.architecture"] == "llama"
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "t.nested":
                continue  # the reader flattens nested arrays; checked below
            expected = field.contents()
            got = md[field.name]
            if isinstance(got, np.ndarray):
                got = got.tolist()
            elif isinstance(got, zm.weights.gguf.StringArray):
                got = list(got)
            if isinstance(expected, float):
                assert got == pytest.approx(expected)
            else:
                assert got == expected, field.name
        assert md["t.str"] == "naïve ✓" and md["t.bool"] is True and md["t.nested"] == [[1, 2], [3]]
        assert list(md) == ["GGUF.version"] + [f.name for f in reader.fields.values()
                                               if not f.name.startswith("GGUF.")]


def test_nested_arrays_decode_lazily(reference):
    with zm.load_weights(reference) as w:
        nested = w.metadata["t.nested"]
        assert isinstance(nested, zm.weights.gguf.NestedArray) and len(nested) == 2
        assert nested[1].tolist() == [3] and nested[-2][1] == 2 and nested.tolist() == [[1, 2], [3]]
        assert nested[0:1] == [[1, 2]] and nested != [[1, 2], [4]] and "NestedArray" in repr(nested)
        with pytest.raises(IndexError):
            nested[2]
        with pytest.raises(TypeError):
            nested["0"]


def test_metadata_misses_are_key_errors(reference):
    with zm.load_weights(reference) as w:
        for key in ("t.missing", 3, None, "\ud800", b"t.str"):
            with pytest.raises(KeyError):
                w.metadata[key]
            assert key not in w.metadata
        assert w.metadata.get("t.missing", 7) == 7 and len(w.metadata) == len(list(w.metadata))


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, pickle.dumps])
def test_lazy_tables_and_arrays_refuse_copies_naming_their_type(reference, how):
    with zm.load_weights(reference) as w:
        md = w.metadata
        for obj, name in [(md, "Metadata"), (w._infos, "TensorTable"),
                          (md["t.tokens"], "StringArray"), (md["t.nested"], "NestedArray")]:
            with pytest.raises(TypeError, match=f"a {name}: "):
                how(obj)
        assert pickle.loads(pickle.dumps(dict(md.items()) | {"t.tokens": md["t.tokens"].tolist(),
                                                             "t.nested": md["t.nested"].tolist()}))


def test_lookups_racing_close_see_data_or_use_after_free(reference):
    names = list(zm.load_weights(reference))
    errors = []

    def read_all(w):
        try:
            for name in names:
                w[name].tobytes()
            for key in list(w.metadata):
                value = w.metadata[key]
                value.tolist() if hasattr(value, "tolist") else value
        except zm.UseAfterFreeError:
            pass
        except Exception as e:  # reported below
            errors.append(e)

    for _ in range(100):
        w = zm.load_weights(reference)
        thread = threading.Thread(target=read_all, args=(w,))
        thread.start()
        w.close()
        thread.join()
    assert errors == []


def test_close_lets_go_of_the_mapping_even_while_metadata_is_held(reference):
    w = zm.load_weights(reference)
    md, tokens = w.metadata, w.metadata["t.tokens"]
    w.close()
    assert tokens[1] == "héllo"  # a value read before close stays readable (it holds a view)
    with pytest.raises(zm.UseAfterFreeError):
        md["t.str"]


def test_custom_alignment_is_honoured(tmp_path):
    path = write_reference(tmp_path / "a.gguf", alignment=64)
    with zm.load_weights(path) as w:
        assert w.metadata["general.alignment"] == 64
        for name in w:
            assert (w.info(name).offset - w.info("f32").offset) % 64 == 0


def test_type_table_matches_the_gguf_package():
    block, size = ffi.new("uint32_t *"), ffi.new("uint32_t *")
    for qtype, (b, s) in GGML_QUANT_SIZES.items():
        assert lib.zm_ggml_type_size(qtype.value, block, size), qtype.name
        assert (block[0], size[0]) == (b, s), qtype.name
    assert not lib.zm_ggml_type_size(4, block, size) and not lib.zm_ggml_type_size(10**6, block, size)


@pytest.mark.parametrize("name, qtype", [("q4_0", Q.Q4_0), ("q4_1", Q.Q4_1), ("q8_0", Q.Q8_0),
                                         ("f16", Q.F16), ("bf16", Q.BF16), ("f32", Q.F32)])
def test_dequantize_is_bit_exact(reference, name, qtype):
    with zm.load_weights(reference) as w:
        ours = w.dequantize(name)
        theirs = dequantize(np.asarray(w[name]).view(np.uint8) if qtype not in (Q.F16, Q.F32)
                            else np.asarray(w[name]), qtype).astype(np.float32)
        assert ours.dtype == np.float32 and ours.shape == w.info(name).shape
        assert ours.tobytes() == theirs.reshape(ours.shape).tobytes()


def test_dequantize_into_a_chosen_allocator(reference):
    counting = zm.CountingAllocator(name="dequantized")
    with zm.load_weights(reference) as w:
        x = w.dequantize("q4_1", allocator=counting)
        assert counting.stats.current_bytes >= x.nbytes
        del x
        assert counting.stats.current_bytes == 0
        with pytest.raises(zm.InvalidArgumentError, match="I32 is not supported"):
            w.dequantize("i32")


# ------------------------------------------------------------------ hostile files

def gguf_bytes(kvs=(), tensors=(), version=3, n_kv=None, n_tensors=None, data=b"", alignment=32):
    """A GGUF file from raw parts: kvs are (key bytes, type, value bytes); tensors are
    (name bytes, dims, ggml type, offset)."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                len(kvs) if n_kv is None else n_kv)
    for key, vtype, value in kvs:
        out += struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype) + value
    for name, dims, ttype, offset in tensors:
        out += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ttype, offset)
    out += b"\0" * (-len(out) % alignment)
    return out + data


def s(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


F32 = 0
HOSTILE = [
    (b"GGUX" + b"\0" * 20, "no GGUF magic"),
    (gguf_bytes(version=1), "version 1"),
    (gguf_bytes(version=4), "version 4"),
    (gguf_bytes(n_kv=2**60), "cannot fit"),
    (gguf_bytes(n_tensors=2**40), "cannot fit"),
    (gguf_bytes(kvs=[(b"k", 99, b"")]), "unknown value type 99"),
    (gguf_bytes(kvs=[(b"k", 8, struct.pack("<Q", 2**62))]), "past the end"),
    (gguf_bytes(kvs=[(b"\xff\xfe", 4, b"\0" * 4)]), "UTF-8"),
    (gguf_bytes(kvs=[(b"k", 8, s(b"\xc3\x28"))]), "k: string is not valid UTF-8"),
    (gguf_bytes(kvs=[(b"k", 9, struct.pack("<IQ", 4, 2**60))]), "cannot fit"),
    (gguf_bytes(kvs=[(b"k", 9, struct.pack("<IQ", 77, 1))]), "unknown array item type"),
    (gguf_bytes(kvs=[(b"k", 9, struct.pack("<IQ", 9, 1) * 9 + struct.pack("<IQ", 4, 0))]), "nested deeper"),
    (gguf_bytes(kvs=[(b"k", 7, b"\x02")]), "neither 0 nor 1"),
    (gguf_bytes(kvs=[(b"k", 4, b"\0" * 4), (b"k", 4, b"\0" * 4)]), "duplicate key k"),
    (gguf_bytes(kvs=[(b"general.alignment", 4, struct.pack("<I", 48))]), "not a power of two"),
    (gguf_bytes(kvs=[(b"general.alignment", 8, s(b"32"))]), "must be a u32"),
    (gguf_bytes(tensors=[(b"t", [4, 1, 1, 1, 1], F32, 0)], data=b"\0" * 16), "5 dimensions"),
    (gguf_bytes(tensors=[(b"t", [4], 5, 0)], data=b"\0" * 16), "unknown ggml type 5"),
    (gguf_bytes(tensors=[(b"t", [2**40, 2**40], F32, 0)]), "overflows"),
    (gguf_bytes(tensors=[(b"t", [2**62], F32, 0)]), "size overflows"),
    (gguf_bytes(tensors=[(b"t", [16], 2, 0)], data=b"\0" * 32), "multiple of the 32-element block"),
    (gguf_bytes(tensors=[(b"t", [4], F32, 8)], data=b"\0" * 64), "alignment"),
    (gguf_bytes(tensors=[(b"t", [64], F32, 0)], data=b"\0" * 16), "past the end"),
    (gguf_bytes(tensors=[(b"a", [8], F32, 0), (b"b", [8], F32, 0)], data=b"\0" * 32), "overlap"),
    (gguf_bytes(tensors=[(b"a", [4], F32, 0), (b"a", [4], F32, 32)], data=b"\0" * 48), "duplicate tensor name a"),
    (gguf_bytes(tensors=[(b"\xed\xa0\x80", [4], F32, 0)], data=b"\0" * 16), "UTF-8"),
    (gguf_bytes(kvs=[(b"", 4, b"\0" * 4)]), "key-value #0: the key is empty"),
    (gguf_bytes(kvs=[(b"k", 9, struct.pack("<IQ", 7, 2) + b"\1\2")]), "k: bool value 2"),
    # numpy checks the product of the non-zero dims even when one dim is 0
    (gguf_bytes(tensors=[(b"t", [2**62, 2**62, 0], F32, 0)]), "tensor t: its shape overflows"),
    (gguf_bytes(tensors=[(b"t", [0, 2**62], F32, 0)]), "tensor t: its size overflows"),
    (gguf_bytes(tensors=[(b"t", [2**61, 0, 4], 24, 0)]), "tensor t: its shape overflows"),
    (gguf_bytes(n_kv=2**61, n_tensors=2**60), "cannot fit"),
    (gguf_bytes(kvs=[(b"GGUF.version", 4, b"\0" * 4)]), "GGUF.version is reserved"),
]


@pytest.mark.parametrize("data, error", HOSTILE, ids=[e for _, e in HOSTILE])
def test_hostile_files_are_named_errors(tmp_path, data, error):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(zm.WeightFormatError, match=error):
        zm.load_weights(path, format="gguf")


def test_a_minimal_valid_file_from_the_builder_loads(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(gguf_bytes(kvs=[(b"k", 8, s(b"v"))], tensors=[(b"t", [4], F32, 0)],
                                data=np.arange(4, dtype=np.float32).tobytes()))
    with zm.load_weights(path) as w:
        assert w.metadata["k"] == "v" and w["t"].tolist() == [0, 1, 2, 3]


def test_every_truncation_is_a_clear_error(reference, tmp_path):
    data = reference.read_bytes()
    other = zm.load_weights(reference)
    for cut in list(range(0, 600, 3)) + list(range(600, len(data) - 1, 97)):
        path = tmp_path / "cut.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(zm.WeightFormatError):
            zm.load_weights(path, format="gguf")
    assert other["i8"].tolist() == list(range(-8, 8))  # other open files unaffected
    other.close()


def touch_everything(w):
    """Read every tensor and decode every metadata value, as a user might."""
    for name in w:
        w[name].tobytes()
        w.info(name)
    for value in w.metadata.values():
        if isinstance(value, zm.weights.gguf.StringArray | zm.weights.gguf.NestedArray):
            value.tolist()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_files_load_or_raise_format_errors_and_leak_nothing(reference, tmp_path, data):
    mutated = bytearray(reference.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        # most mutations in the header and tables, where the parser reads
        pos = data.draw(st.integers(0, min(len(mutated) - 1, 4000)))
        mutated[pos] = data.draw(st.integers(0, 255))
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(mutated))
    descriptors = held()[1]
    error = load_and_touch(path)
    assert error is None or error.startswith(str(path))
    assert held(path) == (0, descriptors)  # the mapping and the descriptor are gone


def load_and_touch(path):
    """None if ``path`` loads and every tensor and value reads; the message of its
    WeightFormatError if not (any other exception fails the test). Nothing it made
    outlives the call."""
    try:
        with zm.load_weights(path, format="gguf") as w:
            touch_everything(w)  # a file that loads is whole: nothing in it may raise
    except zm.WeightFormatError as e:
        return str(e)
    return None
