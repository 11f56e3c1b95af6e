"""The activation buffers of one forward call, shared by the one-prompt and batched paths."""

from __future__ import annotations

import numpy as np


class Activations:
    """The buffers of one forward call over ``n`` tokens; the kernels write into them."""

    __slots__ = ("x", "h", "q", "k", "v", "attended", "o", "gate", "up")

    def __init__(self, n: int, dim: int, kv_dim: int, ff: int) -> None:
        self.x, self.h = np.empty((n, dim), np.float32), np.empty((n, dim), np.float32)
        self.q, self.attended = np.empty((n, dim), np.float32), np.empty((n, dim), np.float32)
        self.k, self.v = np.empty((n, kv_dim), np.float32), np.empty((n, kv_dim), np.float32)
        self.o = np.empty((n, dim), np.float32)
        self.gate, self.up = np.empty((n, ff), np.float32), np.empty((n, ff), np.float32)
