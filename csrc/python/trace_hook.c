/* trace_hook.c — zigmem's memory in Python's tracemalloc, under its own domain.
 *
 * The C core reports every mapping it takes from or gives back to the OS (trace.c), never
 * while holding a lock; these hooks forward that to PyTraceMalloc_Track / _Untrack, which
 * return at once when tracemalloc is not tracing and take the GIL themselves when it is.
 * Nothing is reported once the interpreter is finalizing. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "entry.h"

#if PY_VERSION_HEX >= 0x030D0000
#define ZM_FINALIZING() Py_IsFinalizing()
#else
#define ZM_FINALIZING() _Py_IsFinalizing()
#endif

static void track(uintptr_t ptr, size_t size) {
    if (!Py_IsInitialized() || ZM_FINALIZING()) return;
    (void)PyTraceMalloc_Track(ZM_TRACEMALLOC_DOMAIN, ptr, size);
}

static void untrack(uintptr_t ptr) {
    if (!Py_IsInitialized() || ZM_FINALIZING()) return;
    (void)PyTraceMalloc_Untrack(ZM_TRACEMALLOC_DOMAIN, ptr);
}

void zm_py_trace_install(void) {
    static const zm_trace_hooks_t hooks = {track, untrack};
    zm_trace_set(&hooks);
}
