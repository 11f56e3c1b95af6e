"""How much of a memory range is resident right now (mincore), without touching it."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

_mincore = ctypes.CDLL(None, use_errno=True).mincore
_mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def resident_bytes(address: int, nbytes: int) -> int:
    """Bytes of the pages of [address, address + nbytes) that are in memory.

    ``address`` must be page-aligned (mappings and page-allocator blocks are).
    """
    if nbytes <= 0:
        return 0
    pages = (nbytes + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    if _mincore(address, nbytes, vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return int(np.count_nonzero(np.frombuffer(vec, np.uint8) & 1)) * mmap.PAGESIZE
