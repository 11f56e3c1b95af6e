/* counting.c — a wrapper that counts what passes through it: current, peak and total bytes
 * and the number of blocks, so that each subsystem (weights, KV cache, activations) can say
 * exactly how much memory it holds.
 *
 * Counters are updated with relaxed atomics: one counting allocator may sit under several
 * threads' allocations, and a statistic needs no ordering with the memory it describes. */
#include "internal.h"

#define ADD(field, n) __atomic_add_fetch(&(field), (n), __ATOMIC_RELAXED)
#define SUB(field, n) __atomic_sub_fetch(&(field), (n), __ATOMIC_RELAXED)

static void counting_grow(zm_counting_t *c, size_t n) {
    size_t now = ADD(c->current_bytes, n);
    ADD(c->total_bytes, n);
    size_t peak = __atomic_load_n(&c->peak_bytes, __ATOMIC_RELAXED);
    while (now > peak && !__atomic_compare_exchange_n(&c->peak_bytes, &peak, now, true,
                                                      __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

static void counting_change(zm_counting_t *c, size_t len, size_t new_len) {
    if (new_len > len) counting_grow(c, new_len - len);
    else SUB(c->current_bytes, len - new_len);
}

static void *counting_alloc(void *ctx, size_t len, size_t align) {
    zm_counting_t *c = ctx;
    void *p = zm_child_alloc(c->child, len, align);
    if (!p) return NULL;
    counting_grow(c, len);
    ADD(c->current_count, 1);
    ADD(c->alloc_count, 1);
    return p;
}

static bool counting_resize(void *ctx, void *ptr, size_t len, size_t align, size_t new_len) {
    zm_counting_t *c = ctx;
    if (!zm_child_resize(c->child, ptr, len, align, new_len)) return false;
    counting_change(c, len, new_len);
    return true;
}

static void *counting_remap(void *ctx, void *ptr, size_t len, size_t align, size_t new_len) {
    zm_counting_t *c = ctx;
    void *p = zm_child_remap(c->child, ptr, len, align, new_len);
    if (p) counting_change(c, len, new_len);
    return p;
}

static void counting_free(void *ctx, void *ptr, size_t len, size_t align) {
    zm_counting_t *c = ctx;
    zm_child_free(c->child, ptr, len, align);
    SUB(c->current_bytes, len);
    SUB(c->current_count, 1);
    ADD(c->free_count, 1);
}

static const zm_vtable_t counting_vtable = {counting_alloc, counting_resize, counting_remap,
                                            counting_free};

void zm_counting_init(zm_counting_t *c, zm_allocator_t child) {
    *c = (zm_counting_t){.child = child};
}

void zm_counting_allocator(zm_counting_t *c, zm_allocator_t *out) {
    out->ctx = c;
    out->vtable = &counting_vtable;
}

void zm_counting_reset_peak(zm_counting_t *c) {
    __atomic_store_n(&c->peak_bytes, __atomic_load_n(&c->current_bytes, __ATOMIC_RELAXED),
                     __ATOMIC_RELAXED);
}
