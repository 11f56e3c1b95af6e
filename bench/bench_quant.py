"""QuantizedMatrix kernels: weight bytes streamed per second, and prompt-sized throughput.

1. Read bandwidth of this machine, measured here: bytes / time of numpy summing a 1 GiB
   float32 array (one thread streaming from memory).
2. One-row matmul, cold cache: cycle through >= 256 MiB of distinct 4096x4096 matrices of
   Q4_0, Q4_K and Q8_0 (so none stays in the 32 MiB L3); weight bytes / time, as a share of
   (1), with float32 activations and with quantize_activations=True (int16, what the
   demo's decode steps use). Target: >= 60%.
3. 64-row matmul (a prompt) against numpy's float32 matmul of the dequantized matrix, on
   the same thread count; the BLAS kernel numpy used is printed.

Matrices are random blocks with finite scales, built in memory (a mapped file reads the
same once it is in the page cache). Medians of repeated passes; ratios within this run.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

import zigmem as zm
from zigmem.weights.quantized_matrix import QuantizedMatrix, kernel_path

MiB, GiB = 1 << 20, 1 << 30
ROWS = COLS = 4096
SCALES = {Q.Q4_0: (0,), Q.Q4_K: (0, 2), Q.Q8_0: (0,)}


def median_time(fn, repeats: int) -> float:
    return median_times(fn, repeats)[0]


def median_times(fn, repeats: int) -> tuple[float, float]:
    """Medians of (wall time, this process's CPU time) over repeats."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def read_bandwidth() -> float:
    a = np.ones(GiB // 4, np.float32)
    a.sum()
    t = median_time(a.sum, 5)
    return GiB / t


def random_matrix(qtype, rng, name: str) -> QuantizedMatrix:
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (ROWS, COLS // block, size), dtype=np.uint8)
    for off in SCALES[qtype]:
        scale = rng.uniform(-0.02, 0.02, (ROWS, COLS // block)).astype(np.float16)
        raw[:, :, off:off + 2] = scale.view(np.uint8).reshape(ROWS, COLS // block, 2)
    return QuantizedMatrix(name, qtype.name, (ROWS, COLS), raw.reshape(-1))


def blas_kernel() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{info['name']} {info['version']} (threadpoolctl not installed: kernel unknown)"
    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    if not blas:
        return "no BLAS found"
    b = blas[0]
    return (f"{b['internal_api']} {b['version']}, kernel {b.get('architecture')}, "
            f"{b['num_threads']} threads")


def main() -> None:
    threads = zm.get_num_threads()
    env = {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")}
    print(f"\n== QuantizedMatrix kernels ({kernel_path()}, {threads} threads; numpy BLAS: "
          f"{blas_kernel()}; {env or 'no OPENBLAS_* settings'})")
    bw = read_bandwidth()
    print(f"read bandwidth (numpy sum of 1 GiB float32): {bw / GiB:.2f} GiB/s")
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal(COLS).astype(np.float32)
    x64 = rng.standard_normal((64, COLS)).astype(np.float32)
    out1 = np.empty(ROWS, np.float32)
    out64 = np.empty((64, ROWS), np.float32)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other processes "
          "slow wall-clock rows; 'per CPU-s' is bytes per second of this process's CPU time)")
    print(f"{'type':6} {'matrices':>8} {'MiB':>6} {'1-row GiB/s':>11} {'of read bw':>10} "
          f"{'per CPU-s':>9} {'int16 GiB/s':>11} {'of read bw':>10} {'64-row ms':>9} "
          f"{'numpy f32 ms':>12} {'ratio':>6}")
    for qtype in (Q.Q4_0, Q.Q4_K, Q.Q8_0):
        one = random_matrix(qtype, rng, "probe")
        count = -(-256 * MiB // one.nbytes)
        mats = [one] + [random_matrix(qtype, rng, f"m{i}") for i in range(1, count)]
        total = sum(m.nbytes for m in mats)

        def sweep(quantize=False):
            for m in mats:
                m.matmul(x1, out=out1, quantize_activations=quantize)

        sweep()
        t, cpu = median_times(sweep, 5)
        gbps = total / t
        sweep(True)
        t16 = median_time(lambda: sweep(True), 5)
        dense = one.dequantize()
        one.matmul(x64, out=out64)
        t64 = median_time(lambda: one.matmul(x64, out=out64), 5)
        np.matmul(x64, dense.T)
        tnp = median_time(lambda: np.matmul(x64, dense.T), 5)
        print(f"{qtype.name:6} {count:>8} {total / MiB:>6.0f} {gbps / GiB:>11.2f} "
              f"{gbps / bw:>9.0%} {total / cpu / GiB:>9.2f} {total / t16 / GiB:>11.2f} "
              f"{total / t16 / bw:>9.0%} {t64 * 1e3:>9.2f} {tnp * 1e3:>12.2f} {tnp / t64:>5.2f}x")
        del mats, one, dense
    print("1-row: weight bytes per second over matrices cycled cold (target >= 60% of read "
          "bandwidth); 64-row: ratio > 1 means faster than numpy on the dequantized float32")


if __name__ == "__main__":
    main()
