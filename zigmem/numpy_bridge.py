"""``with allocator.numpy():`` — numpy's own data allocations served by a zigmem allocator.

Inside the block, every numpy data buffer (``np.empty``, ufunc and matmul outputs,
temporaries) comes from the allocator, through a NEP 49 memory handler. Each array
remembers the handler it was allocated with, and frees into it when it dies, also after the
block ended; the handler holds the allocator alive until then.

NumPy keeps the current handler in a ContextVar: the block affects only the current thread
(or asyncio task, and tasks created inside it, which copy the context). Other threads keep
their own handler; a new thread starts with numpy's default. Nested blocks restore the
previous handler on exit.

The handler's Python-object functions (create a handler capsule, install it) are called
through ``ctypes.PyDLL`` on the extension module itself: cffi cannot pass ``PyObject *``,
and PyDLL calls them with the GIL held.
"""

from __future__ import annotations

import ctypes

from . import _sites, _zigmem
from ._binding import ffi, lib
from ._format import format_address, format_bytes

_capi = ctypes.PyDLL(_zigmem.__file__)
_handler_new = _capi.zm_np_handler_new
_handler_new.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.py_object, ctypes.c_char_p]
_handler_new.restype = ctypes.py_object
_set_handler = _capi.zm_np_set_handler
_set_handler.argtypes = [ctypes.py_object]
_set_handler.restype = ctypes.py_object


class NumpyBridge:
    """What one allocator has handed to numpy: created at its first ``numpy()`` block."""

    def __init__(self, allocator) -> None:
        self.state = ffi.new("zm_np_state_t *")
        lib.zm_np_state_init(self.state, allocator._c[0], allocator._serialize)
        self.address = int(ffi.cast("uintptr_t", self.state))
        self.name = f"zigmem {type(allocator).__name__}".encode()[:120]

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


class ServeNumpy:
    """The context manager ``allocator.numpy()`` returns: installs the allocator as numpy's
    data allocator for the current context on entry, restores the previous one on exit."""

    __slots__ = ("allocator", "frames", "previous")

    def __init__(self, allocator, frames: int) -> None:
        self.allocator, self.frames, self.previous = allocator, frames, None

    def __enter__(self):
        allocator = self.allocator
        allocator._check_open("serve numpy from")
        bridge = allocator._numpy_bridge
        if bridge is None:
            bridge = allocator._numpy_bridge = NumpyBridge(allocator)
        capsule = _handler_new(bridge.address, _sites.here(self.frames), allocator, bridge.name)
        self.previous = _set_handler(capsule)  # the context and the arrays own the capsule now
        return allocator

    def __exit__(self, *exc) -> None:
        _set_handler(self.previous)
        self.previous = None
