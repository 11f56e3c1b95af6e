/* test_gpa.c — the general-purpose allocator: every case of the safety table, found by the
 * allocator itself (ASan runs alongside but the red zones live in our own pages). */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "zigmem.h"

static zm_gpa_t *make(bool safety, size_t quarantine, size_t limit) {
    zm_gpa_config_t cfg = {.safety = safety, .thread_safe = true, .never_unmap = false,
                           .memory_limit = limit, .quarantine_bytes = quarantine};
    return zm_gpa_create(&cfg);
}

static zm_report_t *last(void) { return zm_last_report(); }

/* Checked calls as the Python layer makes them: through a guard over the GPA (guard.c),
 * whose hooks report what the GPA finds in the call that found it. */
static struct { zm_gpa_t *gpa; zm_guard_t guard; } guards[64];

static zm_guard_t *guard_of(zm_gpa_t *g) {
    for (size_t i = 0; i < sizeof guards / sizeof guards[0]; i++) {
        if (guards[i].gpa == g) return &guards[i].guard;
        if (!guards[i].gpa) {
            guards[i].gpa = g;
            zm_gpa_guard_init(&guards[i].guard, g);
            return &guards[i].guard;
        }
    }
    return NULL;
}

static uintptr_t gpa_alloc(zm_gpa_t *g, size_t len, size_t align, uint64_t site) {
    return zm_guard_alloc(guard_of(g), 0, len, align, site);
}

static int gpa_free(zm_gpa_t *g, uintptr_t p, size_t len, size_t align, uint64_t site) {
    return zm_guard_free(guard_of(g), 0, p, len, align, site);
}

static int gpa_resize(zm_gpa_t *g, uintptr_t p, size_t len, size_t align, size_t new_len) {
    zm_block_t b = {p, len, align, 0};
    return zm_guard_resize(guard_of(g), 0, &b, new_len);
}

static uintptr_t gpa_realloc(zm_gpa_t *g, uintptr_t p, size_t len, size_t align, size_t new_len,
                             uint64_t site) {
    zm_block_t b = {p, len, align, 0};
    return zm_guard_move(guard_of(g), 0, &b, new_len, true, site) == ZM_OK ? b.address : 0;
}

static int gpa_destroy(zm_gpa_t *g) {
    for (size_t i = 0; i < sizeof guards / sizeof guards[0]; i++)
        if (guards[i].gpa == g) {
            zm_guard_deinit(&guards[i].guard);
            guards[i].gpa = NULL;
        }
    return zm_gpa_destroy(g);
}

static void test_fast_mode(void) {
    zm_gpa_t *g = make(false, 0, SIZE_MAX);
    zm_allocator_t a;
    zm_gpa_allocator(g, &a);
    void *p[200];
    for (int i = 0; i < 200; i++) {
        size_t n = 1 + (size_t)i * 331 % 40000, align = (size_t)1 << (i % 14);
        p[i] = zm_alloc(a, n, align);
        CHECK(p[i] && ((uintptr_t)p[i] & (align - 1)) == 0);
        memset(p[i], i, n);
    }
    for (int i = 0; i < 200; i++) {
        size_t n = 1 + (size_t)i * 331 % 40000, align = (size_t)1 << (i % 14);
        CHECK(((unsigned char *)p[i])[n - 1] == (unsigned char)i);
        zm_free(a, p[i], n, align);
    }
    /* freed small blocks are reused: same class, same slot */
    void *x = zm_alloc(a, 40, 8);
    zm_free(a, x, 40, 8);
    CHECK(zm_alloc(a, 33, 8) == x);
    zm_gpa_stats_t s;
    zm_gpa_stats(g, &s);
    CHECK(s.live_bytes == 33);
    CHECK(gpa_destroy(g) == ZM_OK);
}

static void test_overflow_and_underflow(void) {
    zm_gpa_t *g = make(true, 1 << 20, SIZE_MAX);
    uintptr_t p = gpa_alloc(g, 100, 8, 11);
    CHECK(p != 0);
    ((char *)p)[100] = 'x'; /* one byte past the end */
    CHECK(gpa_free(g, p, 100, 8, 12) == ZM_ERR_OVERFLOW);
    CHECK(last()->offset == 100 && last()->count == 1 && last()->alloc_site == 11);

    p = gpa_alloc(g, 64, 64, 13);
    memset((char *)p - 16, 0, 16); /* the whole red zone before */
    CHECK(zm_gpa_check(g) == ZM_ERR_UNDERFLOW);
    CHECK(last()->address == p && last()->offset == 16 && last()->count == 16);
    CHECK(zm_gpa_check(g) == ZM_OK); /* repaired: reported once */
    CHECK(gpa_free(g, p, 64, 64, 14) == ZM_OK);
    CHECK(gpa_destroy(g) == ZM_OK);
}

static void test_double_and_invalid_frees(void) {
    zm_gpa_t *g = make(true, 1 << 20, SIZE_MAX);
    uintptr_t p = gpa_alloc(g, 256, 16, 1);
    CHECK(gpa_free(g, p, 256, 16, 2) == ZM_OK);
    CHECK(gpa_free(g, p, 256, 16, 3) == ZM_ERR_DOUBLE_FREE);
    CHECK(last()->alloc_site == 1 && last()->free_site == 2);
    /* the freed address is not handed out again while quarantined */
    for (int i = 0; i < 100; i++) CHECK(gpa_alloc(g, 256, 16, 4) != p);

    uintptr_t q = gpa_alloc(g, 1000, 16, 5);
    CHECK(gpa_free(g, q + 10, 990, 16, 6) == ZM_ERR_INVALID_FREE);
    CHECK(last()->detail == ZM_FREE_INTERIOR_POINTER && last()->offset == 10 &&
          last()->size == 1000 && last()->address == q);
    CHECK(gpa_free(g, q, 999, 16, 6) == ZM_ERR_INVALID_FREE);
    CHECK(last()->detail == ZM_FREE_WRONG_SIZE && last()->given == 999 && last()->size == 1000);
    CHECK(gpa_free(g, q, 1000, 32, 6) == ZM_ERR_INVALID_FREE);
    CHECK(last()->detail == ZM_FREE_WRONG_ALIGNMENT && last()->given == 32 &&
          last()->alignment == 16);
    static char never[64];
    CHECK(gpa_free(g, (uintptr_t)never, 64, 16, 6) == ZM_ERR_INVALID_FREE);
    CHECK(last()->detail == ZM_FREE_UNKNOWN_POINTER);
    CHECK(gpa_free(g, q, 1000, 16, 7) == ZM_OK); /* the right free still works */
    zm_report_t leaks[4];
    CHECK(zm_gpa_leaks(g, leaks, 4) == 100);
    CHECK(gpa_destroy(g) == ZM_OK);
}

static void test_use_after_free(void) {
    zm_gpa_t *g = make(true, 4096, SIZE_MAX);
    uintptr_t p = gpa_alloc(g, 512, 16, 21);
    memset((void *)p, 7, 512);
    CHECK(gpa_free(g, p, 512, 16, 22) == ZM_OK);
    /* read after free sees poison, not the old data */
    CHECK(((unsigned char *)p)[0] != 7 || ((unsigned char *)p)[1] != 7);
    ((char *)p)[300] = 1; /* write after free */
    CHECK(zm_gpa_check(g) == ZM_ERR_USE_AFTER_FREE);
    CHECK(last()->offset == 300 && last()->alloc_site == 21 && last()->free_site == 22);
    /* found again when it leaves quarantine? no: check() repaired it */
    ((char *)p)[5] = 1;
    /* found when it leaves quarantine: the free that pushed it out reports it, once */
    int found = 0;
    for (int i = 0; i < 20; i++) {
        if (gpa_free(g, gpa_alloc(g, 512, 16, 23), 512, 16, 24) != ZM_OK) {
            found++;
            CHECK(last()->code == ZM_ERR_USE_AFTER_FREE && last()->offset == 5);
            CHECK(last()->address == p && last()->free_site == 22);
        }
    }
    CHECK(found == 1);
    /* a vtable free cannot return a status: its finding waits for the next checked call */
    zm_allocator_t a;
    zm_gpa_allocator(g, &a);
    uintptr_t q = gpa_alloc(g, 4000, 16, 26);
    zm_free(a, (void *)q, 4000, 16);
    ((char *)q)[0] ^= 1;
    for (int i = 0; i < 3; i++) zm_free(a, zm_alloc(a, 2000, 16), 2000, 16);
    CHECK(gpa_alloc(g, 8, 8, 25) == 0 && last()->code == ZM_ERR_USE_AFTER_FREE);
    CHECK(last()->address == q);
    CHECK(gpa_alloc(g, 8, 8, 25) != 0); /* and then it keeps working */
    CHECK(gpa_destroy(g) == ZM_OK);
}

static void test_limit_and_resize(void) {
    zm_gpa_t *g = make(true, 1 << 20, 10000);
    uintptr_t p = gpa_alloc(g, 6000, 16, 1);
    CHECK(p && gpa_alloc(g, 5000, 16, 1) == 0 && last()->code == ZM_ERR_LIMIT);
    CHECK(last()->limit == 10000);
    CHECK(gpa_resize(g, p, 6000, 16, 20000) == 0); /* refused, block untouched */
    CHECK(gpa_resize(g, p, 6000, 16, 5000) == 1);
    ((char *)p)[5000] = 1; /* the shrunk-away bytes are red zone now */
    CHECK(zm_gpa_check(g) == ZM_ERR_OVERFLOW && last()->offset == 5000);
    /* moving needs old and new at once: over the limit, refused, the old block intact */
    memset((void *)p, 3, 5000);
    CHECK(gpa_realloc(g, p, 5000, 16, 9000, 2) == 0 && last()->code == ZM_ERR_LIMIT);
    CHECK(((unsigned char *)p)[4999] == 3);
    uintptr_t q = gpa_realloc(g, p, 5000, 16, 4000, 2);
    CHECK(q == p);
    CHECK(gpa_free(g, q, 4000, 16, 3) == ZM_OK);
    CHECK(gpa_alloc(g, 1 << 30, 16, 1) == 0 && last()->code == ZM_ERR_LIMIT);
    CHECK(gpa_destroy(g) == ZM_OK);

    /* a block larger than the whole quarantine is still held: its double free is caught */
    g = make(true, 4096, SIZE_MAX);
    uintptr_t huge = gpa_alloc(g, 1u << 20, 16, 1);
    CHECK(gpa_free(g, huge, 1u << 20, 16, 2) == ZM_OK);
    CHECK(gpa_free(g, huge, 1u << 20, 16, 3) == ZM_ERR_DOUBLE_FREE);
    CHECK(gpa_destroy(g) == ZM_OK);

    g = make(true, 1 << 20, SIZE_MAX);
    CHECK(gpa_alloc(g, SIZE_MAX - 8, 16, 1) == 0 && last()->code == ZM_ERR_TOO_LARGE);
    uintptr_t big = gpa_alloc(g, 3u << 20, 2u << 20, 1); /* large, over-aligned */
    CHECK(big && (big & ((2u << 20) - 1)) == 0);
    ((char *)big)[(3u << 20) + 3] = 1;
    CHECK(gpa_free(g, big, 3u << 20, 2u << 20, 2) == ZM_ERR_OVERFLOW);
    CHECK(gpa_destroy(g) == ZM_OK);
}

static zm_gpa_t *shared;
static uintptr_t contested;
static int outcomes[2];

static void *free_contested(void *arg) {
    outcomes[(intptr_t)arg] = gpa_free(shared, contested, 128, 16, 1);
    return NULL;
}

static void *churn(void *arg) {
    (void)arg;
    for (int i = 0; i < 3000; i++) {
        size_t n = 16 + (size_t)i * 97 % 4000;
        uintptr_t p = gpa_alloc(shared, n, 16, 1);
        if (!p) return (void *)1;
        memset((void *)p, 1, n);
        if (gpa_free(shared, p, n, 16, 2) != ZM_OK) return (void *)1;
    }
    return NULL;
}

static void test_threads(void) {
    shared = make(true, 1 << 20, SIZE_MAX);
    for (int round = 0; round < 50; round++) {
        contested = gpa_alloc(shared, 128, 16, 1);
        pthread_t t[2];
        for (intptr_t i = 0; i < 2; i++) pthread_create(&t[i], NULL, free_contested, (void *)i);
        for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
        CHECK((outcomes[0] == ZM_OK) != (outcomes[1] == ZM_OK));
        CHECK(outcomes[0] == ZM_ERR_DOUBLE_FREE || outcomes[1] == ZM_ERR_DOUBLE_FREE);
    }
    pthread_t t[4];
    for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, churn, NULL);
    for (int i = 0; i < 4; i++) {
        void *r;
        pthread_join(t[i], &r);
        CHECK(r == NULL);
    }
    CHECK(zm_gpa_check(shared) == ZM_OK);
    zm_gpa_stats_t s;
    zm_gpa_stats(shared, &s);
    CHECK(s.live_count == 0 && s.live_bytes == 0);
    CHECK(gpa_destroy(shared) == ZM_OK);
}

static void test_vtable_composition(void) {
    /* An arena over the GPA: frees through the vtable report later, as pending errors. */
    zm_gpa_t *g = make(true, 1 << 20, SIZE_MAX);
    zm_allocator_t ga, aa;
    zm_gpa_allocator(g, &ga);
    zm_arena_t arena;
    zm_arena_init(&arena, ga);
    zm_arena_allocator(&arena, &aa);
    for (int i = 0; i < 1000; i++) CHECK(zm_alloc(aa, 100, 16) != NULL);
    zm_arena_deinit(&arena);
    zm_report_t leaks[1];
    CHECK(zm_gpa_leaks(g, leaks, 1) == 0);
    void *p = zm_alloc(ga, 50, 16);
    zm_free(ga, p, 50, 16);
    zm_free(ga, p, 50, 16); /* double free through the vtable */
    CHECK(zm_gpa_check(g) == ZM_ERR_DOUBLE_FREE);
    CHECK(gpa_destroy(g) == ZM_OK);
}

/* Random alloc / resize / realloc / free against a model, as the Python state machine does,
 * with sizes and alignments that cross every size-class and small/large boundary. */
typedef struct {
    uintptr_t p;
    size_t len, align;
    unsigned char seed;
} slot_t;

static bool holds(const slot_t *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (((unsigned char *)s->p)[i] != (unsigned char)(s->seed + i)) return false;
    return true;
}

static void stamp(slot_t *s, unsigned char seed) {
    s->seed = seed;
    for (size_t i = 0; i < s->len; i++) ((unsigned char *)s->p)[i] = (unsigned char)(seed + i);
}

static void test_random_model(bool safety) {
    zm_gpa_t *g = make(safety, 1 << 20, SIZE_MAX);
    slot_t slots[64] = {0};
    unsigned rng = 12345;
#define RAND() (rng = rng * 1103515245u + 12345u, (rng >> 8))
    for (int step = 0; step < 30000; step++) {
        slot_t *s = &slots[RAND() % 64];
        size_t n = RAND() % 3 ? RAND() % 300 : RAND() % 70000;
        size_t align = (size_t)1 << (RAND() % 17);
        if (!s->len) {
            s->p = gpa_alloc(g, n, align, 1);
            CHECK(s->p != 0 && (s->p & (align - 1)) == 0);
            s->len = n;
            s->align = align;
            stamp(s, (unsigned char)step);
            continue;
        }
        CHECK(holds(s, s->len));
        switch (RAND() % 3) {
        case 0:
            CHECK(gpa_free(g, s->p, s->len, s->align, 2) == ZM_OK);
            s->len = 0;
            break;
        case 1: {
            int ok = gpa_resize(g, s->p, s->len, s->align, n);
            CHECK(ok >= 0);
            if (ok == 1) {
                CHECK(holds(s, s->len < n ? s->len : n));
                s->len = n;
                stamp(s, (unsigned char)step);
            }
            break;
        }
        default: {
            uintptr_t q = gpa_realloc(g, s->p, s->len, s->align, n, 3);
            CHECK(q != 0);
            s->p = q;
            CHECK(holds(s, s->len < n ? s->len : n));
            s->len = n;
            stamp(s, (unsigned char)step);
        }
        }
        if (step % 1000 == 0) CHECK(zm_gpa_check(g) == ZM_OK);
    }
    for (int i = 0; i < 64; i++)
        if (slots[i].len) CHECK(gpa_free(g, slots[i].p, slots[i].len, slots[i].align, 4) == ZM_OK);
    zm_report_t none[1];
    CHECK(zm_gpa_leaks(g, none, 1) == 0);
    CHECK(gpa_destroy(g) == ZM_OK);
#undef RAND
}

int main(void) {
    test_random_model(true);
    test_random_model(false);
    test_fast_mode();
    test_overflow_and_underflow();
    test_double_and_invalid_frees();
    test_use_after_free();
    test_limit_and_resize();
    test_threads();
    test_vtable_composition();
    return check_summary();
}
