/* failing.c — a wrapper that fails on purpose, to test out-of-memory paths.
 *
 * As Zig's std.testing.FailingAllocator: the allocation with index fail_index (counting
 * from 0) and every one after it fail; resize_fail_index does the same for resize and remap.
 * The counters say what reached the child, so a test can sweep every failure point. */
#include "internal.h"

static void *failing_alloc(void *ctx, size_t len, size_t align) {
    zm_failing_t *f = ctx;
    if (f->alloc_index == f->fail_index) {
        f->has_induced_failure = true;
        zm_fail(ZM_ERR_INDUCED, len, 0, 0);
        zm_last_report()->index = f->fail_index;
        return NULL;
    }
    void *p = zm_child_alloc(f->child, len, align);
    if (!p) return NULL;
    f->allocations++;
    f->allocated_bytes += len;
    f->alloc_index++;
    return p;
}

static bool failing_resize_allowed(zm_failing_t *f, size_t new_len) {
    if (f->resize_index != f->resize_fail_index) return true;
    f->has_induced_failure = true;
    zm_fail(ZM_ERR_INDUCED, new_len, 0, 0);
    zm_last_report()->index = f->resize_fail_index;
    return false;
}

static void failing_count_resize(zm_failing_t *f, size_t len, size_t new_len) {
    if (new_len < len) f->freed_bytes += len - new_len;
    else f->allocated_bytes += new_len - len;
    f->resize_index++;
}

static bool failing_resize(void *ctx, void *ptr, size_t len, size_t align, size_t new_len) {
    zm_failing_t *f = ctx;
    if (!failing_resize_allowed(f, new_len)) return false;
    if (!zm_child_resize(f->child, ptr, len, align, new_len)) return false;
    failing_count_resize(f, len, new_len);
    return true;
}

static void *failing_remap(void *ctx, void *ptr, size_t len, size_t align, size_t new_len) {
    zm_failing_t *f = ctx;
    if (!failing_resize_allowed(f, new_len)) return NULL;
    void *p = zm_child_remap(f->child, ptr, len, align, new_len);
    if (p) failing_count_resize(f, len, new_len);
    return p;
}

static void failing_free(void *ctx, void *ptr, size_t len, size_t align) {
    zm_failing_t *f = ctx;
    zm_child_free(f->child, ptr, len, align);
    f->deallocations++;
    f->freed_bytes += len;
}

static const zm_vtable_t failing_vtable = {failing_alloc, failing_resize, failing_remap,
                                           failing_free};

void zm_failing_init(zm_failing_t *f, zm_allocator_t child, size_t fail_index,
                     size_t resize_fail_index) {
    *f = (zm_failing_t){
        .child = child, .fail_index = fail_index, .resize_fail_index = resize_fail_index};
}

void zm_failing_allocator(zm_failing_t *f, zm_allocator_t *out) {
    out->ctx = f;
    out->vtable = &failing_vtable;
}
