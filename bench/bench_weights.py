"""load_weights against the reference readers, on generated files, in one process.

Time is from path to every tensor available as a numpy array. safetensors.numpy.load_file
reads (copies) every tensor; gguf.GGUFReader maps the file but parses metadata field by
field in Python. The GGUF file carries a realistic tokenizer (49,152 tokens with scores and
types, as SmolLM2's). Also: the proportional set size (PSS) of 4 processes holding the same
1 GB file, mapped by zigmem or loaded by load_file, and the dequantize kernels' speed.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import zigmem as zm

MiB = 1 << 20


def median_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_safetensors(path: str, total_bytes: int) -> None:
    """~total_bytes of float16 matrices, 200 tensors, as a model's layers."""
    n = 200
    rows = max(1, total_bytes // n // (1024 * 2))
    rng = np.random.default_rng(0)
    block = rng.standard_normal((rows, 1024)).astype(np.float16)
    zm.save_safetensors(path, {f"layers.{i}.weight": block for i in range(n)})


def make_gguf(path: str, total_bytes: int) -> None:
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    vocab = [f"tok{i}_" + "x" * (i % 13) for i in range(49152)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab)
    w.add_token_scores([float(-i) for i in range(len(vocab))])
    w.add_token_types([1] * len(vocab))
    w.add_token_merges([f"a{i} b{i}" for i in range(48900)])
    rows = total_bytes // 270 // (1024 * 2)
    block = np.random.default_rng(0).standard_normal((rows, 1024)).astype(np.float16)
    for i in range(270):
        w.add_tensor(f"blk.{i}.weight", block)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def zigmem_all(path: str) -> None:
    with zm.load_weights(path) as w:
        views = [w[name] for name in w]
        del views


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def pss_of_four(path: str, how: str) -> int:
    """PSS (bytes) summed over 4 processes that each hold every tensor of the file."""
    code = f"""
import sys, time, numpy as np
if {how!r} == "zigmem":
    import zigmem as zm
    w = zm.load_weights({path!r}, populate=True)
    tensors = [w[n] for n in w]
else:
    import safetensors.numpy
    tensors = list(safetensors.numpy.load_file({path!r}).values())
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
"""
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        p.stdout.readline()
    total = 0
    for p in procs:
        with open(f"/proc/{p.pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
    for p in procs:
        p.communicate("go\n")
    return total


def main() -> None:
    import gguf
    import safetensors.numpy

    tmp = tempfile.mkdtemp(prefix="zigmem-bench-")
    print(f"{'case':<58} {'median':>11} {'ratio':>9}   target")
    try:
        for size in (100 * MiB, 1024 * MiB):
            path = os.path.join(tmp, f"model-{size // MiB}.safetensors")
            make_safetensors(path, size)
            label = f"{os.path.getsize(path) / MiB:.0f} MB safetensors"
            base = median_time(lambda: safetensors.numpy.load_file(path), 3)
            ours = median_time(lambda: zigmem_all(path))
            print(f"{label + ': safetensors.numpy.load_file (base)':<58} {base * 1e3:8.2f} ms {1:8.3f}x")
            print(f"{label + ': zm.load_weights, every tensor':<58} {ours * 1e3:8.2f} ms "
                  f"{ours / base:8.4f}x   >= 20x faster ({base / ours:.0f}x)")
            if size == 1024 * MiB:
                pss_ref = pss_of_four(path, "safetensors")
                pss_ours = pss_of_four(path, "zigmem")
                print(f"{'1 GB safetensors, PSS of 4 processes: load_file (base)':<58} "
                      f"{pss_ref / MiB:8.0f} MiB {1:8.3f}x")
                print(f"{'1 GB safetensors, PSS of 4 processes: zm.load_weights':<58} "
                      f"{pss_ours / MiB:8.0f} MiB {pss_ours / pss_ref:8.3f}x   one shared copy")
                before = rss()
                with zm.load_weights(path) as w:
                    views = [w[name] for name in w]
                    grown = rss() - before
                    del views
                print(f"{'1 GB safetensors: process RSS growth, every tensor viewed':<58} "
                      f"{grown / MiB:8.1f} MiB   (file: {os.path.getsize(path) / MiB:.0f} MiB)")
            os.unlink(path)

        path = os.path.join(tmp, "model.gguf")
        make_gguf(path, 100 * MiB)
        label = f"{os.path.getsize(path) / MiB:.0f} MB GGUF, 49k-token vocab"
        base = median_time(lambda: gguf.GGUFReader(path), 3)
        ours = median_time(lambda: zigmem_all(path))
        print(f"{label + ': gguf.GGUFReader (base)':<58} {base * 1e3:8.2f} ms {1:8.3f}x")
        print(f"{label + ': zm.load_weights':<58} {ours * 1e3:8.2f} ms {ours / base:8.4f}x"
              f"   >= 50x faster ({base / ours:.0f}x)")
        decode = median_time(lambda: list(zm.load_weights(path).metadata["tokenizer.ggml.tokens"]))
        print(f"{'  + decoding the 49,152 token strings (lazy, on first use)':<58} {decode * 1e3:8.2f} ms")
        os.unlink(path)

        dequant_rows(tmp)
    finally:
        os.rmdir(tmp) if not os.listdir(tmp) else None


def dequant_rows(tmp: str) -> None:
    import gguf
    from gguf.quants import dequantize, quantize

    x = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)  # 64 MiB out
    path = os.path.join(tmp, "q.gguf")
    w = gguf.GGUFWriter(path, "llama")
    for qtype in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
                  gguf.GGMLQuantizationType.Q8_0):
        w.add_tensor(qtype.name, quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with zm.load_weights(path) as weights:
        for name in ("Q4_0", "Q4_1", "Q8_0"):
            qtype = getattr(gguf.GGMLQuantizationType, name)
            raw = np.asarray(weights[name])
            base = median_time(lambda: dequantize(raw, qtype), 3)
            ours = median_time(lambda: weights.dequantize(name))
            gbs = x.nbytes / ours / 1e9
            print(f"{f'dequantize {name} 4096x4096: gguf.quants (base)':<58} {base * 1e3:8.2f} ms {1:8.3f}x")
            print(f"{f'dequantize {name} 4096x4096: zigmem C kernel':<58} {ours * 1e3:8.2f} ms "
                  f"{ours / base:8.3f}x   {gbs:.1f} GB/s of float32 out")
    os.unlink(path)


if __name__ == "__main__":
    main()
