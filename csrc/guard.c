/* guard.c — what makes one allocator safe to share: a lock of its own, a generation, and a
 * closed flag, checked in the same C call that does the work.
 *
 * Every allocator the Python layer builds sits behind a guard, and wrappers above it wrap the
 * guard's vtable, so a call from any path (Python, an arena on top, the numpy bridge) takes
 * the lock of each allocator it passes through:
 *
 *   - an allocator that is not thread-safe (arena, fixed buffer, failing, a GPA without
 *     thread_safe) is entered exclusively; a thread-safe one (page, counting, GPA) is shared;
 *   - a release (reset, deinit) enters exclusively the guard of the allocator released and of
 *     every allocator above it, newest first, so no call through any of them is in flight; it
 *     refuses while numpy arrays still hold blocks of any of them (foreign_live), and bumps
 *     every generation in the same critical section, so a Buffer stamped before is stale at
 *     once and a Buffer stamped after cannot be allocated before the release;
 *   - checked entry points take the generation the caller stamped its Buffer with and refuse
 *     (ZM_ERR_STALE) when it changed: check and act cannot be torn apart.
 *
 * No lock is held across a return to the caller, and no lock holder ever needs Python's GIL:
 * a thread holding the GIL may spin on a guard (the numpy bridge does), because the holder is
 * always C code that finishes on its own. Locks are taken in one global order (newest guard
 * first), which is the order a call travels down a wrapper chain (a wrapper is always newer
 * than its child), so two releases or a release and a call cannot deadlock.
 *
 * fork(): a prepare handler takes every guard exclusively (newest first) so the child never
 * inherits an allocator half-way through an operation; both processes release them after. */
#include <pthread.h>
#include <sched.h>
#include <string.h>

#include "internal.h"

/* ---------------------------------------------------------------- the lock */

static inline void cpu_relax(unsigned n) {
    if (n < 64) __builtin_ia32_pause();
    else sched_yield();
}

static void lock_exclusive(zm_guard_t *g) {
    for (unsigned n = 0;; n++) {
        int32_t free_ = 0;
        if (__atomic_load_n(&g->lock, __ATOMIC_RELAXED) == 0 &&
            __atomic_compare_exchange_n(&g->lock, &free_, -1, false, __ATOMIC_ACQUIRE,
                                        __ATOMIC_RELAXED))
            return;
        cpu_relax(n);
    }
}

static void lock_shared(zm_guard_t *g) {
    for (unsigned n = 0;; n++) {
        int32_t held = __atomic_load_n(&g->lock, __ATOMIC_RELAXED);
        if (held >= 0 && __atomic_compare_exchange_n(&g->lock, &held, held + 1, true,
                                                     __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            return;
        cpu_relax(n);
    }
}

static inline void unlock_exclusive(zm_guard_t *g) { __atomic_store_n(&g->lock, 0, __ATOMIC_RELEASE); }

bool zm_guard_enter(zm_guard_t *g) {
    zm_trace_enter();
    if (g->shared) lock_shared(g);
    else lock_exclusive(g);
    if (ZM_LIKELY(!g->closed)) return true;
    zm_guard_leave(g);
    zm_fail(ZM_ERR_CLOSED, 0, 0, 0);
    return false;
}

void zm_guard_leave(zm_guard_t *g) {
    if (g->shared) __atomic_sub_fetch(&g->lock, 1, __ATOMIC_RELEASE);
    else unlock_exclusive(g);
    zm_trace_leave(); /* after the unlock: a tracer may need Python's GIL */
}

/* ---------------------------------------------------------------- registry and fork */

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static zm_guard_t *registry; /* newest first */
static uint64_t registry_serial;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void fork_prepare(void) {
    pthread_mutex_lock(&registry_lock);
    for (zm_guard_t *g = registry; g; g = g->next) lock_exclusive(g);
}

static void fork_release(void) {
    for (zm_guard_t *g = registry; g; g = g->next) unlock_exclusive(g);
    pthread_mutex_unlock(&registry_lock);
}

static void install_atfork(void) { pthread_atfork(fork_prepare, fork_release, fork_release); }

void zm_guard_init(zm_guard_t *g, zm_allocator_t inner, bool thread_safe) {
    pthread_once(&atfork_once, install_atfork);
    memset(g, 0, sizeof *g);
    g->inner = inner;
    g->shared = thread_safe;
    g->closed = inner.vtable == NULL; /* an allocator with no implementation refuses all */
    pthread_mutex_lock(&registry_lock);
    g->serial = ++registry_serial;
    g->next = registry;
    if (registry) registry->prev = g;
    registry = g;
    g->registered = true;
    pthread_mutex_unlock(&registry_lock);
}

void zm_guard_deinit(zm_guard_t *g) {
    pthread_mutex_lock(&registry_lock);
    if (g->registered) {
        if (g->prev) g->prev->next = g->next;
        else registry = g->next;
        if (g->next) g->next->prev = g->prev;
        g->registered = false;
    }
    pthread_mutex_unlock(&registry_lock);
}

/* ---------------------------------------------------------------- the guarded vtable */

static void *guard_alloc(void *ctx, size_t len, size_t align) {
    zm_guard_t *g = ctx;
    if (!zm_guard_enter(g)) return NULL;
    void *p = zm_child_alloc(g->inner, len, align);
    zm_guard_leave(g);
    return p;
}

static bool guard_resize(void *ctx, void *ptr, size_t len, size_t align, size_t new_len) {
    zm_guard_t *g = ctx;
    if (!zm_guard_enter(g)) return false;
    bool ok = zm_child_resize(g->inner, ptr, len, align, new_len);
    zm_guard_leave(g);
    return ok;
}

static void *guard_remap(void *ctx, void *ptr, size_t len, size_t align, size_t new_len) {
    zm_guard_t *g = ctx;
    if (!zm_guard_enter(g)) return NULL;
    void *p = zm_child_remap(g->inner, ptr, len, align, new_len);
    zm_guard_leave(g);
    return p;
}

static void guard_free(void *ctx, void *ptr, size_t len, size_t align) {
    zm_guard_t *g = ctx;
    if (!zm_guard_enter(g)) return; /* closed: its memory is gone with it */
    zm_child_free(g->inner, ptr, len, align);
    zm_guard_leave(g);
}

static const zm_vtable_t guard_vtable = {guard_alloc, guard_resize, guard_remap, guard_free};

void zm_guard_allocator(zm_guard_t *g, zm_allocator_t *out) {
    out->ctx = g;
    out->vtable = &guard_vtable;
}

/* ---------------------------------------------------------------- checked entry points */

/* Enter g for a caller whose Buffer is stamped gen; false (report filled) if it is closed, a
 * release happened since, or the allocator holds an error found by an earlier call that
 * could not return it (a GPA's pending error: reported before anything else happens). The
 * thread's site is what a GPA below records. */
bool zm_guard_enter_checked(zm_guard_t *g, uint64_t gen, uint64_t site) {
    zm_report_t *r = zm_last_report();
    r->code = ZM_OK;
    if (!zm_guard_enter(g)) return false;
    if (ZM_UNLIKELY(g->generation != gen)) {
        zm_guard_leave(g);
        zm_fail(ZM_ERR_STALE, 0, 0, 0);
        return false;
    }
    if (g->take_error && g->take_error(g->inner.ctx, r) != ZM_OK) {
        zm_guard_leave(g);
        return false;
    }
    if (site) zm_set_thread_site(site);
    return true;
}

/* Leave g, reporting an error the operation found but could not return (a GPA free that
 * found an overflow) if nothing else was reported. */
int zm_guard_leave_checked(zm_guard_t *g, int status) {
    if (zm_thread_site()) zm_set_thread_site(0);
    if (g->take_error && status == ZM_OK) status = g->take_error(g->inner.ctx, zm_last_report());
    zm_guard_leave(g);
    return status;
}

uintptr_t zm_guard_alloc(zm_guard_t *g, uint64_t gen, size_t len, size_t align, uint64_t site) {
    if (!zm_guard_enter_checked(g, gen, site)) return 0;
    void *p = zm_alloc(g->inner, len, align);
    if (site) zm_set_thread_site(0);
    zm_guard_leave(g);
    return (uintptr_t)p;
}

int zm_guard_free(zm_guard_t *g, uint64_t gen, uintptr_t ptr, size_t len, size_t align,
                  uint64_t site) {
    if (!zm_guard_enter_checked(g, gen, site)) return zm_last_report()->code;
    zm_free(g->inner, (void *)ptr, len, align);
    return zm_guard_leave_checked(g, ZM_OK);
}

int zm_guard_resize(zm_guard_t *g, uint64_t gen, zm_block_t *b, size_t new_len) {
    if (!zm_guard_enter_checked(g, gen, 0)) return -1;
    bool ok = zm_resize(g->inner, (void *)b->address, b->nbytes, b->alignment, new_len);
    if (zm_guard_leave_checked(g, ZM_OK) != ZM_OK) return -1;
    if (ok) b->nbytes = new_len;
    return ok;
}

/* remap (copy = false) or realloc (copy = true) of the block b describes. On success b is
 * rewritten in the same call (address, nbytes, moved = 1), so that an exception landing in
 * the caller right after the return cannot lose the block: the record already says where it
 * is. remap that cannot move without a copy returns ZM_OK with moved = 0. */
int zm_guard_move(zm_guard_t *g, uint64_t gen, zm_block_t *b, size_t new_len, bool copy,
                  uint64_t site) {
    if (!zm_guard_enter_checked(g, gen, site)) return zm_last_report()->code;
    int status = ZM_OK;
    if (copy && g->check_block)
        status = g->check_block(g->inner.ctx, b->address, b->nbytes, b->alignment,
                                zm_last_report());
    void *p = NULL;
    if (status == ZM_OK) {
        void *old = (void *)b->address;
        p = copy ? zm_realloc(g->inner, old, b->nbytes, b->alignment, new_len)
                 : zm_remap(g->inner, old, b->nbytes, b->alignment, new_len);
        if (p) {
            b->address = (uintptr_t)p;
            b->nbytes = new_len;
            b->moved = 1;
        } else if (copy && zm_last_report()->code == ZM_OK) {
            zm_fail(ZM_ERR_OUT_OF_MEMORY, new_len, 0, 0);
        }
        if (copy && !p) status = zm_last_report()->code;
    }
    return zm_guard_leave_checked(g, status);
}

/* ---------------------------------------------------------------- release */

int zm_guard_hold(zm_guard_t *g, uint64_t gen) {
    if (!zm_guard_enter_checked(g, gen, 0)) return zm_last_report()->code;
    __atomic_add_fetch(&g->holds_made, 1, __ATOMIC_RELAXED);
    zm_guard_leave(g);
    return ZM_OK;
}

/* chain: newest first, so the allocator released (the oldest: a wrapper is newer than what it
 * wraps) comes last. Locks are taken in that order, the global one. */
int zm_guard_release(zm_guard_t *const *chain, const uint64_t *holds, size_t n, bool close,
                     int (*op)(void *ctx, void *arg), void *ctx, void *arg, int *op_status) {
    zm_report_t *r = zm_last_report();
    r->code = ZM_OK;
    zm_trace_enter();
    for (size_t i = 0; i < n; i++) lock_exclusive(chain[i]);
    int status = ZM_OK;
    zm_guard_t *target = chain[n - 1];
    if (target->closed) {
        zm_fail(ZM_ERR_CLOSED, 0, 0, 0);
        status = ZM_ERR_CLOSED;
    }
    for (size_t i = 0; i < n && status == ZM_OK; i++) {
        if (chain[i]->holds_made != holds[i]) { /* a view was made since the caller looked */
            zm_fail(ZM_ERR_RETRY, 0, 0, 0);
            status = ZM_ERR_RETRY;
            break;
        }
        size_t live = __atomic_load_n(&chain[i]->foreign_live, __ATOMIC_RELAXED);
        if (live) {
            zm_fail(ZM_ERR_LIVE, live, 0, 0);
            r->offset = i; /* which allocator of the chain */
            status = ZM_ERR_LIVE;
        }
    }
    if (status == ZM_OK) {
        int done = op ? op(ctx, arg) : ZM_OK;
        if (op_status) *op_status = done;
        for (size_t i = 0; i < n; i++) chain[i]->generation++;
        if (close) target->closed = true;
    }
    for (size_t i = n; i-- > 0;) unlock_exclusive(chain[i]);
    zm_trace_leave();
    return status;
}
