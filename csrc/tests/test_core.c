/* test_core.c — the C core's tests, run by `make sanitize` under ASan + UBSan.
 *
 * One conformance suite runs against every allocator (as Zig's testAllocator), followed by
 * each allocator's own behaviour: arena resets, fixed-buffer exhaustion, induced failures,
 * counters under threads, and overflowing sizes that must fail cleanly. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "zigmem.h"

static void fill(void *p, size_t len, unsigned seed) {
    unsigned char *b = p;
    for (size_t i = 0; i < len; i++) b[i] = (unsigned char)(seed + i * 31);
}

static bool same(const void *p, size_t len, unsigned seed) {
    const unsigned char *b = p;
    for (size_t i = 0; i < len; i++)
        if (b[i] != (unsigned char)(seed + i * 31)) return false;
    return true;
}

/* ---------------------------------------------------------------- conformance */

static void conformance(const char *name, zm_allocator_t a, size_t max_align) {
    fprintf(stderr, "conformance: %s\n", name);
    /* zero length is well defined and never touches the allocator */
    void *z = zm_alloc(a, 0, 64);
    CHECK(z == (void *)64);
    zm_free(a, z, 0, 64);

    /* bad alignment is refused with a report */
    CHECK(zm_alloc(a, 16, 3) == NULL);
    CHECK(zm_last_report()->code == ZM_ERR_ALIGNMENT);

    static const size_t sizes[] = {1, 7, 64, 4095, 4096, 4097, 65536, 1 << 20, 5u << 20};
    for (size_t align = 1; align <= max_align; align <<= 3) {
        void *ptrs[sizeof sizes / sizeof *sizes];
        for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
            ptrs[i] = zm_alloc(a, sizes[i], align);
            CHECK(ptrs[i] != NULL);
            if (!ptrs[i]) return;
            CHECK(((uintptr_t)ptrs[i] & (align - 1)) == 0);
            fill(ptrs[i], sizes[i], (unsigned)i);
        }
        for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++)
            CHECK(same(ptrs[i], sizes[i], (unsigned)i));
        /* realloc keeps the contents, growing and shrinking */
        void *p = zm_realloc(a, ptrs[3], sizes[3], align, 3 * sizes[3]);
        CHECK(p && same(p, sizes[3], 3));
        if (p) ptrs[3] = p;
        p = zm_realloc(a, ptrs[3], 3 * sizes[3], align, 100);
        CHECK(p && same(p, 100, 3));
        if (p) ptrs[3] = p;
        size_t len3 = p ? 100 : 3 * sizes[3];
        /* resize in place: shrinking the last block always works for bump allocators */
        size_t last = sizeof sizes / sizeof *sizes - 1;
        if (zm_resize(a, ptrs[last], sizes[last], align, sizes[last] / 2))
            CHECK(same(ptrs[last], sizes[last] / 2, (unsigned)last));
        else
            CHECK(!"shrinking the most recent block in place failed");
        /* free in an order other than allocation */
        zm_free(a, ptrs[last], sizes[last] / 2, align);
        for (size_t i = 0; i < last; i++) zm_free(a, ptrs[i], i == 3 ? len3 : sizes[i], align);
    }
}

/* ---------------------------------------------------------------- each allocator */

static void test_page(void) {
    zm_page_t pa;
    zm_allocator_t a;
    zm_page_init(&pa, 0);
    zm_page_allocator(&pa, &a);
    conformance("page", a, 2u << 20);

    /* alignment far beyond a page */
    void *p = zm_alloc(a, 100, 1u << 30);
    CHECK(p && ((uintptr_t)p & ((1u << 30) - 1)) == 0);
    if (p) zm_free(a, p, 100, 1u << 30);

    /* sizes that overflow are refused, not wrapped */
    CHECK(zm_alloc(a, SIZE_MAX - 10, 1) == NULL);
    CHECK(zm_last_report()->code == ZM_ERR_TOO_LARGE);
    CHECK(zm_alloc(a, SIZE_MAX / 2, (size_t)1 << 62) == NULL);

    /* remap moves page table entries: content survives a big growth */
    size_t len = 8u << 20;
    char *q = zm_alloc(a, len, 4096);
    fill(q, len, 9);
    char *r = zm_remap(a, q, len, 4096, 64u << 20);
    CHECK(r && same(r, len, 9));
    if (r) zm_free(a, r, 64u << 20, 4096);

    /* huge pages and populate are hints: the memory works the same */
    zm_page_init(&pa, ZM_PAGE_HUGE_PAGES | ZM_PAGE_POPULATE);
    p = zm_alloc(a, 4u << 20, 2u << 20);
    CHECK(p != NULL);
    if (p) { fill(p, 4u << 20, 1); CHECK(same(p, 4u << 20, 1)); zm_free(a, p, 4u << 20, 2u << 20); }
}

static void test_arena(void) {
    zm_page_t pa;
    zm_allocator_t page, a;
    zm_page_init(&pa, 0);
    zm_page_allocator(&pa, &page);
    zm_counting_t cnt;
    zm_allocator_t counting;
    zm_counting_init(&cnt, page);
    zm_counting_allocator(&cnt, &counting);
    zm_arena_t arena;
    zm_arena_init(&arena, counting);
    zm_arena_allocator(&arena, &a);
    conformance("arena over counting over page", a, 2u << 20);

    /* consecutive small allocations are adjacent: a bump */
    zm_arena_reset(&arena, ZM_ARENA_FREE_ALL, 0);
    CHECK(cnt.current_bytes == 0 && zm_arena_capacity(&arena) == 0);
    char *x = zm_alloc(a, 64, 16), *y = zm_alloc(a, 64, 16);
    CHECK(y == x + 64);
    /* the most recent allocation can be freed and grown in place */
    zm_free(a, y, 64, 16);
    char *y2 = zm_alloc(a, 32, 16);
    CHECK(y2 == y);
    CHECK(zm_resize(a, y2, 32, 16, 128));
    CHECK(!zm_resize(a, x, 64, 16, 128)); /* not the last one */
    CHECK(zm_resize(a, x, 64, 16, 32));   /* shrinking keeps the bytes */

    /* retain_capacity merges the buffers into one and reuses it */
    for (int i = 0; i < 100; i++) CHECK(zm_alloc(a, 100000, 64) != NULL);
    size_t cap = zm_arena_capacity(&arena);
    CHECK(cap >= 100 * 100000);
    CHECK(zm_arena_reset(&arena, ZM_ARENA_RETAIN_CAPACITY, 0));
    CHECK(zm_arena_capacity(&arena) == cap);
    size_t calls = cnt.alloc_count;
    for (int i = 0; i < 100; i++) CHECK(zm_alloc(a, 100000, 64) != NULL);
    CHECK(cnt.alloc_count == calls); /* no new buffers from the child */

    CHECK(zm_arena_reset(&arena, ZM_ARENA_RETAIN_WITH_LIMIT, 1u << 20));
    CHECK(zm_arena_capacity(&arena) == 1u << 20);
    CHECK(zm_alloc(a, SIZE_MAX - 100, 1) == NULL);
    CHECK(zm_last_report()->code == ZM_ERR_TOO_LARGE);
    zm_arena_deinit(&arena);
    CHECK(cnt.current_bytes == 0 && cnt.current_count == 0);
}

static void test_fixed_buffer(void) {
    static unsigned char mem[64u << 20] __attribute__((aligned(4096)));
    zm_fixed_buffer_t f;
    zm_allocator_t a;
    zm_fixed_buffer_init(&f, mem, sizeof mem);
    zm_fixed_buffer_allocator(&f, &a);
    conformance("fixed buffer", a, 4096);
    zm_fixed_buffer_reset(&f);
    void *p = zm_alloc(a, sizeof mem, 1);
    CHECK(p == mem && zm_fixed_buffer_owns(&f, p) && !zm_fixed_buffer_owns(&f, mem + sizeof mem));
    CHECK(zm_alloc(a, 1, 1) == NULL);
    CHECK(zm_last_report()->code == ZM_ERR_OUT_OF_MEMORY);
    zm_free(a, p, sizeof mem, 1);
    CHECK(f.end == 0);
    CHECK(zm_alloc(a, SIZE_MAX, 1) == NULL);
}

static void test_failing(void) {
    zm_page_t pa;
    zm_allocator_t page, a;
    zm_page_init(&pa, 0);
    zm_page_allocator(&pa, &page);
    zm_failing_t f;
    zm_failing_init(&f, page, SIZE_MAX, SIZE_MAX);
    zm_failing_allocator(&f, &a);
    conformance("failing (never failing)", a, 2u << 20);

    zm_failing_init(&f, page, 2, 0);
    void *p0 = zm_alloc(a, 10, 8), *p1 = zm_alloc(a, 20, 8);
    CHECK(p0 && p1 && !f.has_induced_failure);
    CHECK(zm_alloc(a, 30, 8) == NULL && f.has_induced_failure);
    CHECK(zm_last_report()->code == ZM_ERR_INDUCED);
    CHECK(zm_alloc(a, 30, 8) == NULL); /* and every later one */
    CHECK(!zm_resize(a, p0, 10, 8, 5000));
    CHECK(f.allocations == 2 && f.allocated_bytes == 30);
    zm_free(a, p0, 10, 8);
    zm_free(a, p1, 20, 8);
    CHECK(f.deallocations == 2 && f.freed_bytes == 30);
}

static zm_allocator_t shared;

static void *hammer(void *arg) {
    (void)arg;
    for (int i = 0; i < 2000; i++) {
        size_t len = 1 + (size_t)(i * 7919) % 20000;
        void *p = zm_alloc(shared, len, 16);
        if (!p) return (void *)1;
        fill(p, len, (unsigned)i);
        if (!same(p, len, (unsigned)i)) return (void *)1;
        zm_free(shared, p, len, 16);
    }
    return NULL;
}

static void test_counting_threads(void) {
    zm_page_t pa;
    zm_allocator_t page;
    zm_page_init(&pa, 0);
    zm_page_allocator(&pa, &page);
    zm_counting_t c;
    zm_counting_init(&c, page);
    zm_counting_allocator(&c, &shared);
    conformance("counting", shared, 2u << 20);
    pthread_t t[4];
    for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, hammer, NULL);
    for (int i = 0; i < 4; i++) {
        void *r;
        pthread_join(t[i], &r);
        CHECK(r == NULL);
    }
    CHECK(c.current_bytes == 0 && c.current_count == 0);
    CHECK(c.alloc_count == c.free_count && c.peak_bytes > 0);
    zm_counting_reset_peak(&c);
    CHECK(c.peak_bytes == 0);
}

/* Tensor init is all-or-nothing: make each of its allocations fail in turn. */
static void test_tensor_errdefer(void) {
    zm_page_t pa;
    zm_allocator_t page, counting_a, a;
    zm_page_init(&pa, 0);
    zm_page_allocator(&pa, &page);
    zm_counting_t c;
    zm_counting_init(&c, page);
    zm_counting_allocator(&c, &counting_a);
    const int64_t shape[] = {3, 4, 5};
    zm_failing_t f;
    zm_tensor_t t;
    for (size_t fail = 0; fail < 3; fail++) {
        zm_failing_init(&f, counting_a, fail, SIZE_MAX);
        zm_failing_allocator(&f, &a);
        CHECK(zm_tensor_init(&t, a, shape, 3, 4) == ZM_ERR_INDUCED);
        CHECK(c.current_count == 0 && f.allocations == f.deallocations);
    }
    zm_failing_init(&f, counting_a, SIZE_MAX, SIZE_MAX);
    CHECK(zm_tensor_init(&t, a, shape, 3, 4) == ZM_OK);
    CHECK(t.nbytes == 240 && ((int64_t *)t.strides)[0] == 20 && ((int64_t *)t.strides)[2] == 1);
    CHECK(((int64_t *)t.shape)[1] == 4 && c.current_count == 3);
    zm_tensor_deinit(&t, a);
    CHECK(c.current_count == 0);
    const int64_t negative[] = {2, -1}, huge[] = {INT64_MAX, INT64_MAX};
    CHECK(zm_tensor_init(&t, a, negative, 2, 4) == ZM_ERR_INVALID_ARG);
    CHECK(zm_tensor_init(&t, a, huge, 2, 4) == ZM_ERR_TOO_LARGE);
    CHECK(c.current_count == 0);
}

int main(void) {
    test_tensor_errdefer();
    test_page();
    test_arena();
    test_fixed_buffer();
    test_failing();
    test_counting_threads();
    return check_summary();
}
