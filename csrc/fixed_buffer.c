/* fixed_buffer.c — bump allocation inside memory the caller owns; never asks for more.
 *
 * As Zig's FixedBufferAllocator: the most recent allocation can be freed or resized in
 * place, reset() forgets everything at once. Useful for scratch space of a known bound and
 * for memory that must live inside a given buffer (a pinned region, a shared mapping). */
#include "internal.h"

static void *fixed_alloc(void *ctx, size_t len, size_t align) {
    zm_fixed_buffer_t *f = ctx;
    uintptr_t base = (uintptr_t)f->buffer, start;
    if (__builtin_add_overflow(base + f->end, align - 1, &start)) goto full;
    start &= ~(uintptr_t)(align - 1);
    size_t off = start - base;
    if (off > f->len || len > f->len - off) goto full;
    f->end = off + len;
    return (void *)start;
full:
    zm_fail(ZM_ERR_OUT_OF_MEMORY, len, f->len - f->end, 0);
    return NULL;
}

static inline bool fixed_is_last(const zm_fixed_buffer_t *f, const void *ptr, size_t len) {
    return (uintptr_t)ptr + len == (uintptr_t)f->buffer + f->end;
}

static bool fixed_resize(void *ctx, void *ptr, size_t len, size_t align, size_t new_len) {
    zm_fixed_buffer_t *f = ctx;
    (void)align;
    if (!fixed_is_last(f, ptr, len)) return new_len <= len;
    size_t off = (uintptr_t)ptr - (uintptr_t)f->buffer;
    if (new_len > f->len - off) return false;
    f->end = off + new_len;
    return true;
}

static void *fixed_remap(void *ctx, void *ptr, size_t len, size_t align, size_t new_len) {
    return fixed_resize(ctx, ptr, len, align, new_len) ? ptr : NULL;
}

static void fixed_free(void *ctx, void *ptr, size_t len, size_t align) {
    zm_fixed_buffer_t *f = ctx;
    (void)align;
    if (fixed_is_last(f, ptr, len)) f->end -= len;
}

static const zm_vtable_t fixed_vtable = {fixed_alloc, fixed_resize, fixed_remap, fixed_free};

void zm_fixed_buffer_init(zm_fixed_buffer_t *f, void *buffer, size_t len) {
    f->buffer = buffer;
    f->len = len;
    f->end = 0;
}

void zm_fixed_buffer_allocator(zm_fixed_buffer_t *f, zm_allocator_t *out) {
    out->ctx = f;
    out->vtable = &fixed_vtable;
}

bool zm_fixed_buffer_owns(const zm_fixed_buffer_t *f, const void *ptr) {
    uintptr_t p = (uintptr_t)ptr, base = (uintptr_t)f->buffer;
    return p >= base && p - base < f->len;
}

void zm_fixed_buffer_reset(zm_fixed_buffer_t *f) { f->end = 0; }
