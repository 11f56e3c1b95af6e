"""TensorInfo: where a tensor lies in its weight file and what it holds (imports nothing from zigmem)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lies in its file and what it holds."""

    name: str
    dtype: str                # as the file names it: "F16", "BF16", "Q4_1", ...
    shape: tuple[int, ...]    # numpy axis order (GGUF dims reversed)
    offset: int               # absolute byte offset in the file
    nbytes: int
    numpy_dtype: np.dtype[Any]  # of w[name]; raw bytes / unsigned words where numpy lacks one
    view_shape: tuple[int, ...]  # of w[name]: shape, or rows of raw blocks when quantized
