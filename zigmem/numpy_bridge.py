"""``with allocator.numpy():`` — numpy's own data allocations served by a zigmem allocator.

Inside the block, every numpy data buffer (``np.empty``, ufunc and matmul outputs,
temporaries) comes from the allocator, through a NEP 49 memory handler. Each array
remembers the handler it was allocated with, and frees into it when it dies, also after the
block ended; the handler holds the allocator alive until then.

NumPy keeps the current handler in a ContextVar: the block affects only the current thread
(or asyncio task, and tasks created inside it, which copy the context). Other threads keep
their own handler; a new thread starts with numpy's default.

The C side (``csrc/python/numpy_bridge.c``) does the rest: the handler enters the
allocator's guard on every call, so it cannot race a reset or deinit and fails safely (numpy
raises ``MemoryError``) once the allocator is gone; ``ServeNumpy`` installs and restores
handlers in single C calls, keeping a chain of the handlers each one replaced, so that
nested blocks, a reused ``numpy()`` object and blocks exited out of order all leave a
consistent handler. Its Python-object functions are called through ``ctypes.PyDLL`` on the
extension module itself, since cffi cannot pass ``PyObject *``.
"""

from __future__ import annotations

import ctypes

from . import _sites
from ._binding import extension_path, failure, ffi, lib
from ._format import format_address, format_bytes
from .errors import InvalidArgumentError, UseAfterFreeError

_capi = ctypes.PyDLL(extension_path())
_serve_new = _capi.zm_np_serve_new
_serve_new.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.py_object, ctypes.c_char_p,
                       ctypes.py_object, ctypes.py_object]
_serve_new.restype = ctypes.py_object
_context_serves = _capi.zm_np_context_serves
_context_serves.argtypes = [ctypes.c_void_p]
_context_serves.restype = ctypes.c_int


class NumpyBridge:
    """What one allocator has handed to numpy: created at its first ``numpy()`` block."""

    def __init__(self, allocator) -> None:
        self.state = ffi.new("zm_np_state_t *")
        lib.zm_np_state_init(self.state, allocator._g)
        self.address = int(ffi.cast("uintptr_t", self.state))
        self.name = f"zigmem {type(allocator).__name__}".encode()[:120]

    def __del__(self) -> None:
        # Only when the allocator itself is collected: no array can free into it any more.
        try:
            lib.zm_np_state_deinit(self.state)
        except Exception:  # interpreter shutdown
            pass

    def serve(self, allocator, site: int):
        """A new ServeNumpy (C) for ``allocator``; it and its handlers hold the allocator."""
        return _serve_new(self.address, site, allocator, self.name, UseAfterFreeError,
                          InvalidArgumentError)

    def serving_this_context(self) -> bool:
        """Whether the calling context is inside one of this allocator's ``numpy()`` blocks."""
        return _context_serves(self.address) == 1

    @property
    def live_count(self) -> int:
        return self.state.live_count

    def live(self, limit: int = 8) -> tuple[int, int, list[tuple[int, int, int]]]:
        """(count, bytes, up to ``limit`` (address, nbytes, site) of live numpy buffers)."""
        out = ffi.new("zm_report_t[]", limit)
        count = lib.zm_np_live(self.state, out, limit)
        return count, self.state.live_bytes, [(r.address, r.size, r.alloc_site)
                                              for r in out[0:min(count, limit)]]

    def describe_live(self) -> str:
        count, nbytes, blocks = self.live()
        listed = ", ".join(f"{format_address(a)} ({format_bytes(n)}, from the block at "
                           f"{_sites.describe(site)})" for a, n, site in blocks)
        more = f" and {count - len(blocks)} more" if count > len(blocks) else ""
        arrays = "array" if count == 1 else "arrays"
        verb = "is" if count == 1 else "are"
        return (f"{count} numpy {arrays} ({format_bytes(nbytes)}) allocated inside "
                f"`with allocator.numpy()` {verb} still alive: {listed}{more}")

    def raise_error(self, what: str) -> None:
        """Raise the first write before a numpy array found since the last call, if any."""
        if not self.state.errors:
            return
        report = ffi.new("zm_report_t *")
        if lib.zm_np_take_error(self.state, report):
            raise failure(what, report=report)
