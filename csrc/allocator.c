/* allocator.c — what every allocator shares: the per-thread failure report, realloc, and the
 * entry points the Python layer calls. */
#include <sched.h>
#include <string.h>

#include "internal.h"

static _Thread_local zm_report_t zm_report;

zm_report_t *zm_last_report(void) { return &zm_report; }

ZM_NOINLINE void zm_fail(int code, size_t size, size_t limit, int sys_errno) {
    memset(&zm_report, 0, sizeof zm_report);
    zm_report.code = code;
    zm_report.size = size;
    zm_report.limit = limit;
    zm_report.sys_errno = sys_errno;
}

void *zm_realloc(zm_allocator_t a, void *ptr, size_t len, size_t align, size_t new_len) {
    if (!zm_is_pow2(align)) { zm_fail(ZM_ERR_ALIGNMENT, align, 0, 0); return NULL; }
    if (len == 0) return zm_alloc(a, new_len, align);
    if (new_len == 0) {
        zm_free(a, ptr, len, align);
        return (void *)(uintptr_t)align;
    }
    void *moved = a.vtable->remap(a.ctx, ptr, len, align, new_len);
    if (moved) return moved;
    void *fresh = a.vtable->alloc(a.ctx, new_len, align);
    if (!fresh) return NULL;
    memcpy(fresh, ptr, len < new_len ? len : new_len);
    a.vtable->free(a.ctx, ptr, len, align);
    return fresh;
}

/* ---------------------------------------------------------------- Python entry points */

ZM_NOINLINE void zm_spin_wait(int *lock) {
    for (unsigned n = 0;; n++) {
        if (!__atomic_load_n(lock, __ATOMIC_RELAXED) && !__atomic_exchange_n(lock, 1, __ATOMIC_ACQUIRE))
            return;
        if (n > 100) sched_yield();
    }
}

/* A spin lock, not a mutex: what it guards is a few nanoseconds of C, taken twice for
 * every numpy buffer served by a bridge. */
static int zm_py_locked;

void zm_py_lock(void) { zm_spin_lock(&zm_py_locked); }
void zm_py_unlock(void) { zm_spin_unlock(&zm_py_locked); }

#define ZM_SERIALIZED(serialize, stmt)            \
    do {                                          \
        zm_report.code = ZM_OK;                   \
        if (serialize) zm_py_lock();              \
        stmt;                                     \
        if (serialize) zm_py_unlock();            \
    } while (0)

uintptr_t zm_py_alloc(const zm_allocator_t *a, size_t len, size_t align, int serialize) {
    void *p;
    ZM_SERIALIZED(serialize, p = zm_alloc(*a, len, align));
    return (uintptr_t)p;
}

int zm_py_resize(const zm_allocator_t *a, uintptr_t ptr, size_t len, size_t align,
                 size_t new_len, int serialize) {
    bool ok;
    ZM_SERIALIZED(serialize, ok = zm_resize(*a, (void *)ptr, len, align, new_len));
    return ok;
}

uintptr_t zm_py_remap(const zm_allocator_t *a, uintptr_t ptr, size_t len, size_t align,
                      size_t new_len, int serialize) {
    void *p;
    ZM_SERIALIZED(serialize, p = zm_remap(*a, (void *)ptr, len, align, new_len));
    return (uintptr_t)p;
}

uintptr_t zm_py_realloc(const zm_allocator_t *a, uintptr_t ptr, size_t len, size_t align,
                        size_t new_len, int serialize) {
    void *p;
    ZM_SERIALIZED(serialize, p = zm_realloc(*a, (void *)ptr, len, align, new_len));
    return (uintptr_t)p;
}

void zm_py_free(const zm_allocator_t *a, uintptr_t ptr, size_t len, size_t align,
                int serialize) {
    ZM_SERIALIZED(serialize, zm_free(*a, (void *)ptr, len, align));
}
