"""load_weights' arguments: every kind of path, files that are not regular, wrong types,
and the one-owner rule (no copy, no pickle)."""

import copy
import os
import pathlib
import pickle
import threading

import numpy as np
import pytest

import zigmem as zm
from weights_leaks import held


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "w.safetensors"
    zm.save_safetensors(path, {"x": np.arange(4, dtype=np.float32)})
    return path


class BytesPathLike:
    def __init__(self, path):
        self.path = os.fsencode(path)

    def __fspath__(self):
        return self.path


@pytest.mark.parametrize("kind", [str, os.fsencode, pathlib.Path, BytesPathLike])
def test_str_bytes_and_pathlike_paths(saved, kind):
    path = kind(saved)
    with zm.load_weights(path) as w:
        assert w["x"].tolist() == [0, 1, 2, 3]
        assert w.path == os.fspath(path)


def test_non_utf8_names_open_the_right_file(tmp_path):
    directory = os.fsencode(tmp_path)
    names = [b"caf\xe9.safetensors", b"caf\xe8.safetensors"]  # Latin-1, not UTF-8
    for i, name in enumerate(names):
        zm.save_safetensors(directory + b"/" + name, {"x": np.full(2, i, np.int32)})
    for i, name in enumerate(names):
        raw = directory + b"/" + name
        for path in (raw, os.fsdecode(raw)):  # bytes, and str with surrogateescape
            with zm.load_weights(path) as w:
                assert w["x"].tolist() == [i, i]


@pytest.mark.parametrize("path", ["a\0b", b"a\0b", pathlib.Path("dir") / "x\0y"])
def test_embedded_nul_is_invalid_argument(path):
    with pytest.raises(zm.InvalidArgumentError, match="NUL"):
        zm.load_weights(path)


@pytest.mark.parametrize("path", [3, None, ["a"], 1.5, "\ud800"])
def test_wrong_path_types_are_invalid_argument(path):
    with pytest.raises(zm.InvalidArgumentError, match="path"):
        zm.load_weights(path)


def test_missing_file_is_file_not_found_naming_the_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        zm.load_weights(path)
    assert e.value.filename == str(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_permission_error(saved):
    saved.chmod(0)
    with pytest.raises(PermissionError) as e:
        zm.load_weights(saved)
    assert e.value.filename == str(saved)


def test_directory_is_is_a_directory_error(tmp_path):
    with pytest.raises(IsADirectoryError) as e:
        zm.load_weights(tmp_path)
    assert e.value.filename == str(tmp_path)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    outcome = []

    def load():
        try:
            zm.load_weights(fifo)
        except Exception as e:  # reported below, in the test's thread
            outcome.append(e)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(60)  # a guard against hanging the suite, not a timing measurement
    assert not thread.is_alive(), "load_weights blocked opening a FIFO"
    assert isinstance(outcome[0], zm.InvalidArgumentError)
    assert "a FIFO, not a regular file" in str(outcome[0]) and "pipe" in str(outcome[0])


def test_character_device_is_refused():
    with pytest.raises(zm.InvalidArgumentError, match="character device"):
        zm.load_weights("/dev/null")


@pytest.mark.parametrize("options, what", [
    ({"advice": ["x"]}, "advice"), ({"advice": 3}, "advice"), ({"advice": "often"}, "advice"),
    ({"format": 3}, "format"), ({"format": ["gguf"]}, "format"), ({"format": "onnx"}, "format"),
    ({"populate": "yes"}, "populate"), ({"lock": 1}, "lock"), ({"writable": None}, "writable"),
])
def test_wrong_options_are_invalid_argument(saved, options, what):
    with pytest.raises(zm.InvalidArgumentError, match=what):
        zm.load_weights(saved, **options)


@pytest.mark.parametrize("allocator", ["page", 3, object()])
def test_dequantize_into_a_non_allocator_is_invalid_argument(saved, allocator):
    with zm.load_weights(saved) as w:
        with pytest.raises(zm.InvalidArgumentError, match="allocator"):
            w.dequantize("x", allocator=allocator)


@pytest.mark.parametrize("name", [3, None, ["x"], b"x", ("x",)])
def test_non_str_names_are_key_errors_naming_them(saved, name):
    with zm.load_weights(saved) as w:
        for lookup in (w.__getitem__, w.info, w.dequantize):
            with pytest.raises(KeyError, match="no tensor"):
                lookup(name)
        assert name not in w


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, pickle.dumps])
def test_weight_files_have_one_owner(saved, how):
    with zm.load_weights(saved) as w:
        with pytest.raises(TypeError, match="WeightFile"):
            how(w)
        with pytest.raises(TypeError, match="_MappedFile"):
            how(w._owner)
        assert w["x"].sum() == 6  # still usable


def test_closed_file_refuses_every_lookup(saved):
    w = zm.load_weights(saved)
    w.close()
    for use in (lambda: w["x"], lambda: list(w), lambda: len(w), lambda: "x" in w,
                lambda: w.info("x")):
        with pytest.raises(zm.UseAfterFreeError, match="closed"):
            use()
    assert "closed" in repr(w)


def test_failing_loads_leave_no_mapping_and_no_descriptor(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10" + b"\0" * 7 + b'{"a": [1, 2]}   ' + b"\0" * 4096)
    missing = tmp_path / "missing.gguf"
    before = held(bad), held()[1]
    kept = []  # exceptions kept, with their tracebacks, must not keep the file mapped
    for _ in range(200):
        with pytest.raises(zm.WeightFormatError) as caught:
            zm.load_weights(bad)
        kept.append(caught.value)
        with pytest.raises(FileNotFoundError) as caught:
            zm.load_weights(missing)
        kept.append(caught.value)
    assert (held(bad), held()[1]) == before
