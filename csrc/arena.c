/* arena.c — bump allocation over a child allocator, freed all at once.
 *
 * The arena asks its child for buffers and hands out consecutive slices of the newest one.
 * Each buffer starts with a node that links it to the older buffers; a full buffer is
 * followed by one at least 1.5x the size of the last, so a workload of N bytes costs
 * O(log N) child calls. Only the most recent allocation can be freed or grown in place.
 *
 * reset(retain_capacity) is the per-token pattern: all allocations are released but the
 * memory is kept, merged into a single buffer, so the next token bumps through pages that
 * are already faulted in. */
#include "internal.h"

struct zm_arena_node {
    zm_arena_node_t *next;
    size_t size; /* bytes of this buffer, node included */
};

/* Buffers are aligned like malloc; the first allocation starts right after the node. */
#define NODE_ALIGN 16
#define NODE_SIZE ((sizeof(zm_arena_node_t) + NODE_ALIGN - 1) & ~(size_t)(NODE_ALIGN - 1))
#define MIN_BUFFER 4096

static zm_arena_node_t *arena_new_buffer(zm_arena_t *a, size_t size) {
    zm_arena_node_t *n = zm_child_alloc(a->child, size, NODE_ALIGN);
    if (!n) return NULL;
    n->next = a->head;
    n->size = size;
    a->head = n;
    a->end = NODE_SIZE;
    return n;
}

/* Where an allocation of len/align would start in the head buffer, or 0 if it does not fit. */
static inline uintptr_t arena_fit(const zm_arena_t *a, size_t len, size_t align) {
    const zm_arena_node_t *n = a->head;
    if (!n) return 0;
    uintptr_t base = (uintptr_t)n, start;
    if (__builtin_add_overflow(base + a->end, align - 1, &start)) return 0;
    start &= ~(uintptr_t)(align - 1);
    size_t off = start - base;
    if (off > n->size || len > n->size - off) return 0;
    return start;
}

static ZM_NOINLINE void *arena_alloc_slow(zm_arena_t *a, size_t len, size_t align) {
    size_t need, grown = 0, size;
    if (__builtin_add_overflow(len, NODE_SIZE, &need) ||
        __builtin_add_overflow(need, align > NODE_ALIGN ? align - 1 : 0, &need)) {
        zm_fail(ZM_ERR_TOO_LARGE, len, 0, 0);
        return NULL;
    }
    if (a->head) {
        size_t prev = a->head->size;
        grown = prev + prev / 2;
        if (grown < prev) grown = SIZE_MAX;
    }
    size = need > grown ? need : grown;
    /* Whole pages: a page-backed child would round up anyway. */
    if (!zm_align_up(size, MIN_BUFFER, &size)) size = need;
    if (!arena_new_buffer(a, size)) {
        /* The geometric size may be what the child refused; the request alone may fit. */
        if (size == need || !arena_new_buffer(a, need)) return NULL;
    }
    uintptr_t p = arena_fit(a, len, align);
    a->end = p - (uintptr_t)a->head + len;
    return (void *)p;
}

void *zm_arena_alloc(zm_arena_t *a, size_t len, size_t align) {
    uintptr_t p = arena_fit(a, len, align);
    if (ZM_LIKELY(p)) {
        a->end = p - (uintptr_t)a->head + len;
        return (void *)p;
    }
    return arena_alloc_slow(a, len, align);
}

static void *arena_alloc(void *ctx, size_t len, size_t align) {
    return zm_arena_alloc(ctx, len, align);
}

static inline bool arena_is_last(const zm_arena_t *a, const void *ptr, size_t len) {
    return a->head && (uintptr_t)ptr + len == (uintptr_t)a->head + a->end;
}

static bool arena_resize(void *ctx, void *ptr, size_t len, size_t align, size_t new_len) {
    zm_arena_t *a = ctx;
    (void)align;
    if (!arena_is_last(a, ptr, len)) return new_len <= len; /* shrink keeps the bytes */
    size_t off = (uintptr_t)ptr - (uintptr_t)a->head;
    if (new_len > a->head->size - off) return false;
    a->end = off + new_len;
    return true;
}

static void *arena_remap(void *ctx, void *ptr, size_t len, size_t align, size_t new_len) {
    return arena_resize(ctx, ptr, len, align, new_len) ? ptr : NULL;
}

static void arena_free(void *ctx, void *ptr, size_t len, size_t align) {
    zm_arena_t *a = ctx;
    (void)align;
    if (arena_is_last(a, ptr, len)) a->end -= len;
}

static const zm_vtable_t arena_vtable = {arena_alloc, arena_resize, arena_remap, arena_free};

void zm_arena_init(zm_arena_t *a, zm_allocator_t child) {
    a->child = child;
    a->head = NULL;
    a->end = 0;
}

void zm_arena_allocator(zm_arena_t *a, zm_allocator_t *out) {
    out->ctx = a;
    out->vtable = &arena_vtable;
}

size_t zm_arena_capacity(const zm_arena_t *a) {
    size_t total = 0;
    for (const zm_arena_node_t *n = a->head; n; n = n->next) total += n->size - NODE_SIZE;
    return total;
}

static void arena_free_list(zm_arena_t *a, zm_arena_node_t *n) {
    while (n) {
        zm_arena_node_t *next = n->next;
        zm_child_free(a->child, n, n->size, NODE_ALIGN);
        n = next;
    }
}

bool zm_arena_reset(zm_arena_t *a, zm_arena_reset_mode_t mode, size_t limit) {
    size_t keep = 0;
    if (mode != ZM_ARENA_FREE_ALL) keep = zm_arena_capacity(a);
    if (mode == ZM_ARENA_RETAIN_WITH_LIMIT && limit < keep) keep = limit;
    if (keep == 0) {
        zm_arena_deinit(a);
        return true;
    }
    size_t want = keep + NODE_SIZE; /* no overflow: keep <= capacity, which fit in memory */
    /* Keep the newest (largest) buffer, free the rest, and bring it to the retained size. */
    zm_arena_node_t *head = a->head;
    arena_free_list(a, head->next);
    head->next = NULL;
    a->end = NODE_SIZE;
    if (head->size == want) return true;
    if (zm_child_resize(a->child, head, head->size, NODE_ALIGN, want)) {
        head->size = want;
        return true;
    }
    zm_child_free(a->child, head, head->size, NODE_ALIGN);
    a->head = NULL;
    a->end = 0;
    return arena_new_buffer(a, want) != NULL;
}

void zm_arena_deinit(zm_arena_t *a) {
    arena_free_list(a, a->head);
    a->head = NULL;
    a->end = 0;
}
