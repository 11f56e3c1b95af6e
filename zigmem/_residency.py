"""How much of a memory range is resident right now (mincore), without touching it."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

_mincore = ctypes.CDLL(None, use_errno=True).mincore
_mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_LOW_BIT = bytes(b & 1 for b in range(256))  # translate table: keep bit 0 of each byte


def resident_bytes(address: int, nbytes: int) -> int:
    """Bytes of the pages of [address, address + nbytes) that are in memory.

    ``address`` must be page-aligned (mappings and page-allocator blocks are).
    """
    if nbytes <= 0:
        return 0
    pages = (nbytes + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    flags = bytearray(pages)
    if _mincore(address, nbytes, (ctypes.c_ubyte * pages).from_buffer(flags)) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    # Bit 0 of each page's byte; the other bits are reserved. No numpy array data is made:
    # a memory timeline may sample inside `with allocator.numpy()`, where it would come
    # from (and disturb) the allocator being measured.
    return int(np.count_nonzero(np.frombuffer(flags.translate(_LOW_BIT), np.uint8))) * mmap.PAGESIZE
