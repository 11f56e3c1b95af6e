"""Parsing GGUF files with huge record counts: zm.load_weights against gguf.GGUFReader, in
one process, on files built byte by byte.

Each case runs in a fresh interpreter so that its peak RSS growth (VmHWM after a reset,
minus VmRSS before; mapped pages included) is its own; the time is the median of 3 runs inside that interpreter. The cases:
a table of 20,000 real, distinct, empty tensors (valid); a sparse file claiming as many
zero-filled tensor infos as its size allows (refused); one key holding an array of
millions of empty arrays (valid, decoded lazily). Sizes are kept small enough for
GGUFReader, which builds Python objects per record, to finish.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile

MiB = 1 << 20

CHILD = """
import json, statistics, sys, time
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))
which, path = sys.argv[1], sys.argv[2]
if which == "zigmem":
    import zigmem as zm
    def run():
        try:
            w = zm.load_weights(path, format="gguf")
            len(w)
        except zm.WeightFormatError:
            pass
else:
    import gguf
    def run():
        try:
            gguf.GGUFReader(path)
        except Exception:  # the reader's own errors on a hostile file
            pass
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS:")
times = []
for _ in range(3):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
grown = status("VmHWM:") - before
print(json.dumps({"median": statistics.median(times), "rss_kib": grown}))
"""


def measure(which: str, path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, path], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def many_tensors(path: str, n: int) -> None:
    record = struct.Struct("<Q7sIQIQ")  # name, one dim of 0, F32, offset 0
    table = b"".join(record.pack(7, b"t%06d" % i, 1, 0, 0, 0) for i in range(n))
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, n, 0) + table)
        f.write(b"\0" * (-(24 + len(table)) % 32))


def sparse_tensor_infos(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, (size - 24) // 24, 0))
        f.truncate(size)


def nested_arrays(path: str, size: int) -> None:
    key = b"nested"
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    count = (size - len(head) - 16) // 12
    head += struct.pack("<IIQ", 9, 9, count)  # array of `count` arrays
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + 12 * count)  # each an empty array of u8: 12 zero bytes


def main() -> None:
    cases = [
        ("20k empty tensors (valid)", many_tensors, 20_000),
        ("512 KiB sparse, 22k tensor infos (refused)", sparse_tensor_infos, MiB // 2),
        ("512 KiB sparse, 44k nested arrays (valid)", nested_arrays, MiB // 2),
    ]
    print(f"{'case':<66} {'median':>10} {'ratio':>8} {'peak RSS growth':>16}")
    with tempfile.TemporaryDirectory(prefix="zigmem-bench-") as tmp:
        for label, make, arg in cases:
            path = os.path.join(tmp, "case.gguf")
            make(path, arg)
            size = os.path.getsize(path)
            base, ours = measure("gguf", path), measure("zigmem", path)
            for who, r in (("gguf.GGUFReader (base)", base), ("zm.load_weights", ours)):
                print(f"{label + ': ' + who:<62} {r['median'] * 1e3:7.1f} ms "
                      f"{r['median'] / base['median']:8.4f}x {r['rss_kib'] / 1024:8.1f} MiB "
                      f"({r['rss_kib'] * 1024 / size:.2f}x file)")
            os.unlink(path)


if __name__ == "__main__":
    main()
