"""Types of the compiled cffi extension (built from csrc/ by build_ffi.py).

cffi generates ``ffi`` and ``lib`` at build time from the cdef fragments in csrc/cdef/; their
attributes are C functions, constants and struct pointers that no stub can follow, so both are
``Any`` on purpose. Only ``zigmem._binding`` imports this module.
"""

from typing import Any

ffi: Any
lib: Any
