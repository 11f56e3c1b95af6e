"""cffi builder for ``zigmem._zigmem`` (API / out-of-line mode).

setup.py points ``cffi_modules`` here; setuptools compiles every ``csrc/*.c`` into the private
extension. Only the declarations in ``cdef/*.h`` are visible to Python, and only ``zigmem._binding``
imports the result. Structs are declared with ``...;`` so cffi takes their real layout from
``zigmem.h`` and ``ffi.new`` can embed them in Python-owned memory.
"""

from pathlib import Path

import numpy
from cffi import FFI

HERE = Path(__file__).resolve().parent

# The declarations Python sees: one fragment per C module in cdef/ (as PyNaCl's bindings/),
# so a new module adds a file rather than editing a shared string.
CDEF = "".join(p.read_text() + "\n" for p in sorted((HERE / "cdef").glob("*.h")))

# Status codes are plain ints on the Python side; cffi takes their values from zigmem.h.
STATUS = [
    "ZM_OK", "ZM_ERR_OUT_OF_MEMORY", "ZM_ERR_TOO_LARGE", "ZM_ERR_ALIGNMENT", "ZM_ERR_MLOCK",
    "ZM_ERR_LIMIT", "ZM_ERR_INDUCED", "ZM_ERR_INVALID_FREE", "ZM_ERR_DOUBLE_FREE",
    "ZM_ERR_OVERFLOW", "ZM_ERR_UNDERFLOW", "ZM_ERR_USE_AFTER_FREE", "ZM_ERR_LEAK",
    "ZM_ERR_INVALID_ARG", "ZM_ERR_CLOSED", "ZM_ERR_STALE", "ZM_ERR_LIVE", "ZM_ERR_RETRY",
]
CDEF += "".join(f"#define {name} ...\n" for name in STATUS)


def _relative(path: Path) -> str:
    # setuptools wants source paths relative to setup.py's directory.
    return str(path.relative_to(HERE.parent))


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "zigmem._zigmem",
    '#include "zigmem.h"\n#include "entry.h"\n#include "numpy_bridge.h"',
    # The C core, and the glue that needs Python.h and numpy's headers (python/).
    sources=sorted(_relative(p) for p in [*HERE.glob("*.c"), *HERE.glob("python/*.c")]),
    include_dirs=[_relative(HERE / "include"), _relative(HERE), _relative(HERE / "python"),
                  numpy.get_include()],
    # -ffp-contract=off: the dequantize kernels round like numpy (no fused multiply-add).
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function", "-ffp-contract=off"],
    py_limited_api=False,  # the numpy bridge needs the full C API
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
