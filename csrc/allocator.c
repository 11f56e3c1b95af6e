/* allocator.c — what every allocator shares: the per-thread failure report and call site,
 * realloc, and the spin lock's slow path. */
#include <sched.h>
#include <sys/resource.h>
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

/* The soft RLIMIT_MEMLOCK, for reports of a refused mlock (SIZE_MAX: unlimited). */
size_t zm_memlock_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_MEMLOCK, &rl) != 0) return 0;
    return rl.rlim_cur == RLIM_INFINITY ? SIZE_MAX : (size_t)rl.rlim_cur;
}

/* ---------------------------------------------------------------- call sites */

static _Thread_local uint64_t zm_site;

void zm_set_thread_site(uint64_t site) { zm_site = site; }
uint64_t zm_thread_site(void) { return zm_site; }

/* ---------------------------------------------------------------- spin locks */

ZM_NOINLINE void zm_spin_wait(int *lock) {
    for (unsigned n = 0;; n++) {
        if (!__atomic_load_n(lock, __ATOMIC_RELAXED) && !__atomic_exchange_n(lock, 1, __ATOMIC_ACQUIRE))
            return;
        if (n > 100) sched_yield();
    }
}
