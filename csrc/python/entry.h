/* entry.h — the extension's own entry points: the calls the Python layer makes that need
 * more than one guard (a release walks the allocators above the one released) or more than
 * one step under a guard (a Tensor's three blocks). Plain C; cffi releases the GIL around
 * each, and each is one call, so an exception in Python lands before or after it, never in
 * the middle. Status codes and the report as everywhere (zigmem.h). */
#ifndef ZIGMEM_ENTRY_H
#define ZIGMEM_ENTRY_H

#include "zigmem.h"

/* Releases: chain as zm_guard_release (ancestors newest first, the released one last). */
int zm_py_arena_reset(zm_guard_t *const *chain, const uint64_t *holds, size_t n, zm_arena_t *a, int mode,
                      size_t limit, int *retained);
int zm_py_arena_deinit(zm_guard_t *const *chain, const uint64_t *holds, size_t n, zm_arena_t *a);
int zm_py_fixed_buffer_reset(zm_guard_t *const *chain, const uint64_t *holds, size_t n, zm_fixed_buffer_t *f);
int zm_py_gpa_destroy(zm_guard_t *const *chain, const uint64_t *holds, size_t n, zm_gpa_t *gpa, int *op_status);
/* deinit of an allocator whose C state holds nothing to give back (page, counting,
 * failing, fixed buffer): closes it and ends its blocks. */
int zm_py_close(zm_guard_t *const *chain, const uint64_t *holds, size_t n);

/* Reads under the guard, so they never race a release or a fork. */
size_t zm_py_arena_capacity(zm_guard_t *g, zm_arena_t *a);
int zm_py_gpa_check(zm_guard_t *g, zm_gpa_t *gpa);
size_t zm_py_gpa_leaks(zm_guard_t *g, zm_gpa_t *gpa, zm_report_t *out, size_t max);
int zm_py_gpa_stats(zm_guard_t *g, zm_gpa_t *gpa, zm_gpa_stats_t *out);

/* A Tensor's three blocks in one guarded call, all or nothing. */
int zm_py_tensor_init(zm_guard_t *g, uint64_t gen, zm_tensor_t *t, const int64_t *shape,
                      size_t ndim, size_t itemsize, uint64_t site);
int zm_py_tensor_deinit(zm_guard_t *g, uint64_t gen, zm_tensor_t *t, uint64_t site);

/* tracemalloc: zigmem's domain, and installing the hooks that report to it. */
#define ZM_TRACEMALLOC_DOMAIN 0x7a6d656d /* "zmem" */
void zm_py_trace_install(void);

#endif
