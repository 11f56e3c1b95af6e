"""The worker pool of the C kernels: how many threads, and where their scratch comes from.

The pool (csrc/thread_pool.c) is the core's own: persistent threads that ``QuantizedMatrix``
matmuls share, split by output rows so results are bitwise equal for every thread count.
It is independent of numpy's BLAS threads. Its scratch (a tile of dequantized weight rows
per thread) comes from one process-wide :class:`CountingAllocator` named "kernel scratch",
so :func:`zigmem.memory_report` shows it.
"""

from __future__ import annotations

import threading

from ._binding import lib, raise_failure
from .counting_allocator import CountingAllocator
from .errors import InvalidArgumentError
from .page_allocator import page_allocator

MAX_THREADS = 256

_scratch: CountingAllocator | None = None
_scratch_lock = threading.Lock()


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (the calling thread included) for each kernel call.

    Args:
        n: 1 to 256. Results do not depend on it, only speed does.

    Raises:
        InvalidArgumentError: ``n`` is not an integer in 1..256.

    Example:
        >>> zm.set_num_threads(2)
    """
    if isinstance(n, bool) or not hasattr(n, "__index__"):
        raise InvalidArgumentError(f"the thread count must be an integer, not {type(n).__name__}")
    n = n.__index__()
    if not 1 <= n <= MAX_THREADS:
        raise InvalidArgumentError(f"the thread count must be in 1..{MAX_THREADS}, not {n}")
    if lib.zm_set_num_threads(n):
        raise_failure(f"set_num_threads({n})")


def get_num_threads() -> int:
    """Threads each kernel call uses; by default the CPUs this process may run on.

    Example:
        >>> zm.get_num_threads()
        2
    """
    return int(lib.zm_get_num_threads())


def scratch_allocator() -> CountingAllocator:
    """The "kernel scratch" counting allocator, handed to the C pool on first use."""
    global _scratch
    if _scratch is None:
        with _scratch_lock:
            if _scratch is None:
                scratch = CountingAllocator(page_allocator, name="kernel scratch")
                scratch._add_c_user(None, "the kernel thread pool")  # C holds it for good
                lib.zm_pool_set_allocator(scratch._c)
                _scratch = scratch
    return _scratch
