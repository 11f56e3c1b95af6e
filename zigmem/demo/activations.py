"""The activation buffers of one forward call, shared by the one-prompt and batched paths,
and the one place that multiplies them by a weight."""

from __future__ import annotations

import numpy as np


class Activations:
    """The buffers of one forward call over ``n`` tokens; the kernels write into them.

    ``decode_rows``: the first rows are decode steps (one generated token each); their
    products quantize the activations to int16 (``QuantizedMatrix.matmul(...,
    quantize_activations=True)``: integer dots, faster for the few rows of a step; each
    element within half a step of its 32-column block, ~1e-5 relative). Prompt rows stay float32: they are many, and the float kernels reuse
    each dequantized tile across them. Each row's result depends only on the row and its
    kind, so batching sequences together never changes them.
    """

    __slots__ = ("x", "h", "q", "k", "v", "attended", "o", "gate", "up", "decode_rows")

    def __init__(self, n: int, dim: int, kv_dim: int, ff: int, decode_rows: int = 0) -> None:
        self.x, self.h = np.empty((n, dim), np.float32), np.empty((n, dim), np.float32)
        self.q, self.attended = np.empty((n, dim), np.float32), np.empty((n, dim), np.float32)
        self.k, self.v = np.empty((n, kv_dim), np.float32), np.empty((n, kv_dim), np.float32)
        self.o = np.empty((n, dim), np.float32)
        self.gate, self.up = np.empty((n, ff), np.float32), np.empty((n, ff), np.float32)
        self.decode_rows = decode_rows

    def product(self, weight, x: np.ndarray, out: np.ndarray) -> None:
        """``out = x @ weight.T``: decode rows with int16 activations, prompt rows in float32."""
        d = self.decode_rows
        if d >= x.shape[0]:
            weight.matmul(x, out=out, quantize_activations=True)
        elif d == 0:
            weight.matmul(x, out=out)
        else:
            weight.matmul(x[:d], out=out[:d], quantize_activations=True)
            weight.matmul(x[d:], out=out[d:])
