"""Bounded work and memory for any GGUF file: counts a file cannot back are refused before
anything is allocated for them, and files with millions of records (sparse files, built
byte by byte) cost at most about twice their size, decoded lazily."""

import json
import os
import struct
import subprocess
import sys

import pytest

import zigmem as zm
from test_weights_gguf import gguf_bytes

MiB = 1 << 20


def sparse(path, head: bytes, size: int):
    """A file of ``size`` bytes: ``head``, then a hole (zeros that take no disk)."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def load_in_child(path, script: str = "") -> dict:
    """Load ``path`` in a fresh interpreter, run ``script`` on ``w``; the peak RSS growth
    (KiB: VmHWM after resetting it, minus VmRSS before; mapped pages count), and the
    error class and message if loading failed."""
    code = f"""
import json, sys
import zigmem as zm
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS to the current one
before = status("VmRSS:")
out = {{}}
try:
    w = zm.load_weights({str(path)!r}, format="gguf")
    {script or "pass"}
except Exception as e:
    out["error"], out["message"] = type(e).__name__, str(e)
out["growth_kib"] = status("VmHWM:") - before
print(json.dumps(out))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


@pytest.mark.parametrize("n_kv, n_tensors", [
    ((128 * MiB - 24) // 14, 0),      # a zero-filled table of "key-values": empty keys
    (0, (128 * MiB - 24) // 24),      # zero-filled tensor infos: data past the end
    ((64 * MiB) // 14, (64 * MiB) // 24),
])
def test_sparse_tables_are_refused_within_twice_the_file(tmp_path, n_kv, n_tensors):
    path = sparse(tmp_path / "sparse.gguf", b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv), 128 * MiB)
    out = load_in_child(path)
    assert out["error"] == "WeightFormatError", out
    assert out["growth_kib"] * 1024 < 2 * 128 * MiB, out


@pytest.mark.parametrize("n_kv, n_tensors", [
    (2**64 - 1, 0), (0, 2**64 - 1), ((128 * MiB) // 14, (128 * MiB) // 24), (2**60, 2**60)])
def test_counts_the_file_cannot_hold_are_refused_first(tmp_path, n_kv, n_tensors):
    path = sparse(tmp_path / "counts.gguf", b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv), 128 * MiB)
    with pytest.raises(zm.WeightFormatError, match="cannot fit in a 134217728-byte file"):
        zm.load_weights(path)


def test_nested_arrays_of_a_sparse_file_are_lazy(tmp_path):
    # One key: an array of ~11 million empty arrays of u8 (12 zero bytes each).
    size = 128 * MiB
    head = gguf_bytes(kvs=[(b"nested", 9, b"")], alignment=1)
    count = (size - len(head) - 12) // 12
    head += struct.pack("<IQ", 9, count)
    path = sparse(tmp_path / "nested.gguf", head, len(head) + 12 * count)
    out = load_in_child(path, 'v = w.metadata["nested"]; out["len"] = len(v); '
                              'out["last"] = v[-1].tolist(); out["repr"] = repr(v)')
    assert "error" not in out, out
    assert out["len"] == count and out["last"] == [] and "NestedArray" in out["repr"]
    assert out["growth_kib"] * 1024 < 2 * size, out


def test_a_file_of_many_tensors_costs_no_object_per_tensor(tmp_path):
    # 200,000 real, distinct, empty tensors: parsed, indexed, looked up by name.
    n = 200_000
    record = struct.Struct("<Q7sIQIQ")  # name, one dim (0), F32, offset 0
    table = b"".join(record.pack(7, b"t%06d" % i, 1, 0, 0, 0) for i in range(n))
    path = tmp_path / "many.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n, 0) + table + b"\0" * (-(24 + len(table)) % 32))
    size = os.path.getsize(path)
    out = load_in_child(path, 'out["len"] = len(w); out["shape"] = w["t199999"].shape; '
                              'out["missing"] = "t200000" in w')
    assert "error" not in out, out
    assert out["len"] == n and out["shape"] == [0] and out["missing"] is False
    assert out["growth_kib"] * 1024 < 2 * size, out
