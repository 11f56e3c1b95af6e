/* test_guard.c — guards (guard.c): checked calls, releases that refuse while numpy or a view
 * holds memory, generations, closing, a wrapper chain serialized on its child, and fork
 * while other threads are inside allocators. Run by `make sanitize` under ASan + UBSan. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "zigmem.h"

static int arena_reset_op(void *ctx, void *arg) {
    (void)arg;
    return zm_arena_reset(ctx, ZM_ARENA_FREE_ALL, 0);
}

static int release(zm_guard_t **chain, size_t n, bool close, zm_arena_t *arena) {
    uint64_t holds[4];
    for (size_t i = 0; i < n; i++) holds[i] = chain[i]->holds_made;
    int op_status = -1;
    return zm_guard_release(chain, holds, n, close, arena ? arena_reset_op : NULL, arena, NULL,
                            &op_status);
}

/* An arena over the page allocator, behind a guard (exclusive: an arena is not thread-safe). */
static void guarded_arena(zm_page_t *page, zm_arena_t *arena, zm_guard_t *g) {
    zm_allocator_t pa, aa;
    zm_page_init(page, 0);
    zm_page_allocator(page, &pa);
    zm_arena_init(arena, pa);
    zm_arena_allocator(arena, &aa);
    zm_guard_init(g, aa, false);
}

static void test_checked_calls_and_generations(void) {
    static zm_page_t page;
    zm_arena_t arena;
    zm_guard_t g;
    guarded_arena(&page, &arena, &g);

    uintptr_t p = zm_guard_alloc(&g, 0, 100, 16, 0);
    CHECK(p != 0);
    CHECK(zm_guard_alloc(&g, 1, 100, 16, 0) == 0 && zm_last_report()->code == ZM_ERR_STALE);

    /* a view made between a caller's look and the release makes the release ask again */
    uint64_t holds[1] = {g.holds_made};
    CHECK(zm_guard_hold(&g, 0) == ZM_OK);
    zm_guard_t *chain[1] = {&g};
    CHECK(zm_guard_release(chain, holds, 1, false, arena_reset_op, &arena, NULL, NULL) ==
          ZM_ERR_RETRY);
    CHECK(g.generation == 0); /* nothing happened */

    /* numpy holding a block refuses the release, then the release bumps the generation */
    g.foreign_live = 1;
    CHECK(release(chain, 1, false, &arena) == ZM_ERR_LIVE && zm_last_report()->size == 1);
    g.foreign_live = 0;
    CHECK(release(chain, 1, false, &arena) == ZM_OK && g.generation == 1);
    CHECK(zm_guard_free(&g, 0, p, 100, 16, 0) == ZM_ERR_STALE); /* released by the reset */
    CHECK(zm_guard_hold(&g, 0) == ZM_ERR_STALE);

    /* closing: every call fails, through the vtable too */
    CHECK(release(chain, 1, true, NULL) == ZM_OK && g.closed);
    CHECK(zm_guard_alloc(&g, 2, 10, 16, 0) == 0 && zm_last_report()->code == ZM_ERR_CLOSED);
    zm_allocator_t ga;
    zm_guard_allocator(&g, &ga);
    CHECK(zm_alloc(ga, 10, 16) == NULL);
    CHECK(release(chain, 1, true, NULL) == ZM_ERR_CLOSED);
    zm_guard_deinit(&g);
    zm_arena_deinit(&arena);

    /* a guard over no allocator refuses everything */
    zm_guard_t empty;
    zm_guard_init(&empty, (zm_allocator_t){NULL, NULL}, true);
    CHECK(zm_guard_alloc(&empty, 0, 10, 16, 0) == 0 && zm_last_report()->code == ZM_ERR_CLOSED);
    zm_guard_deinit(&empty);
}

/* ---------------------------------------------------------------- a chain under threads */

static zm_guard_t page_guard, arena_guard, counting_guard;
static zm_arena_t shared_arena;
static zm_counting_t counting;
static volatile int stop;

static void build_chain(void) {
    static zm_page_t page;
    zm_allocator_t a;
    zm_page_init(&page, 0);
    zm_page_allocator(&page, &a);
    zm_guard_init(&page_guard, a, true);
    zm_guard_allocator(&page_guard, &a);
    zm_arena_init(&shared_arena, a);
    zm_arena_allocator(&shared_arena, &a);
    zm_guard_init(&arena_guard, a, false);
    zm_guard_allocator(&arena_guard, &a);
    zm_counting_init(&counting, a);
    zm_counting_allocator(&counting, &a);
    zm_guard_init(&counting_guard, a, true); /* shared: but calls serialize on the arena */
}

/* Uses blocks as the numpy bridge does: allocated and counted in foreign_live inside the
 * guard, used outside it, given back inside it. A release refuses while any is out. */
static void *hammer(void *arg) {
    unsigned seed = (unsigned)(uintptr_t)arg;
    long corrupted = 0;
    zm_guard_t *g = &counting_guard;
    while (!__atomic_load_n(&stop, __ATOMIC_RELAXED)) {
        size_t n = 16 + (seed = seed * 1103515245u + 12345u) % 2000;
        if (!zm_guard_enter(g)) break;
        uint8_t *p = zm_alloc(g->inner, n, 16);
        if (p) __atomic_add_fetch(&g->foreign_live, 1, __ATOMIC_RELAXED);
        zm_guard_leave(g);
        if (!p) continue;
        memset(p, (int)(seed & 0xff), n);
        for (size_t i = 0; i < n; i++) corrupted += p[i] != (uint8_t)(seed & 0xff);
        if (!zm_guard_enter(g)) break;
        __atomic_sub_fetch(&g->foreign_live, 1, __ATOMIC_RELAXED);
        zm_free(g->inner, p, n, 16);
        zm_guard_leave(g);
    }
    return (void *)corrupted;
}

static void test_chain_under_threads_and_resets(void) {
    build_chain();
    pthread_t t[3];
    for (uintptr_t i = 0; i < 3; i++) pthread_create(&t[i], NULL, hammer, (void *)(i + 1));
    zm_guard_t *chain[2] = {&counting_guard, &arena_guard}; /* newest first */
    int resets = 0, refused = 0;
    for (int i = 0; i < 2000; i++) {
        int status = release(chain, 2, false, &shared_arena);
        resets += status == ZM_OK;
        refused += status == ZM_ERR_LIVE;
    }
    CHECK(resets + refused == 2000); /* refused only while a thread holds a block */
    CHECK(counting_guard.generation == (uint64_t)resets && arena_guard.generation == (uint64_t)resets);

    /* fork while the threads are inside the chain: the child finds every lock free */
    for (int i = 0; i < 20; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            uint64_t gen = counting_guard.generation;
            void *p = (void *)zm_guard_alloc(&counting_guard, gen, 64, 16, 0);
            int ok = p && zm_guard_free(&counting_guard, gen, (uintptr_t)p, 64, 16, 0) == ZM_OK;
            _exit(ok ? 0 : 1);
        }
        int status = 0;
        int waited = 0;
        while (waitpid(pid, &status, WNOHANG) == 0 && waited < 2000) {
            usleep(1000);
            waited++;
        }
        if (waited >= 2000) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
        }
        CHECK(waited < 2000 && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
    for (int i = 0; i < 3; i++) {
        void *corrupted;
        pthread_join(t[i], &corrupted);
        CHECK(corrupted == NULL);
    }
    CHECK(counting_guard.foreign_live == 0);
    CHECK(release(chain, 2, false, &shared_arena) == ZM_OK); /* nothing is out any more */
    CHECK(release(chain + 0, 1, true, NULL) == ZM_OK);  /* counting: nothing to free */
    zm_guard_t *arena_only[1] = {&arena_guard};
    CHECK(release(arena_only, 1, true, NULL) == ZM_OK);
    zm_arena_deinit(&shared_arena);
    zm_guard_deinit(&counting_guard);
    zm_guard_deinit(&arena_guard);
    zm_guard_deinit(&page_guard);
}

/* ---------------------------------------------------------------- tracing */

static zm_guard_t *traced_guard;
static long tracked, untracked, delivered_under_lock;

static void on_track(uintptr_t ptr, size_t size) {
    (void)ptr;
    (void)size;
    tracked++;
    delivered_under_lock += __atomic_load_n(&traced_guard->lock, __ATOMIC_RELAXED) != 0;
}

static void on_untrack(uintptr_t ptr) {
    (void)ptr;
    untracked++;
    delivered_under_lock += __atomic_load_n(&traced_guard->lock, __ATOMIC_RELAXED) != 0;
}

static void test_trace_events_leave_the_lock_first(void) {
    static zm_page_t page;
    zm_arena_t arena;
    zm_guard_t g;
    guarded_arena(&page, &arena, &g);
    traced_guard = &g;
    zm_trace_hooks_t hooks = {on_track, on_untrack};
    zm_trace_set(&hooks);
    for (int i = 0; i < 600; i++) CHECK(zm_guard_alloc(&g, 0, 1 << 14, 16, 0) != 0);
    long chunks = tracked;
    CHECK(chunks > 0 && chunks < 600); /* chunks, not bump allocations */
    zm_guard_t *chain[1] = {&g};
    CHECK(release(chain, 1, false, &arena) == ZM_OK);
    CHECK(untracked >= chunks - 1); /* free_all gave every chunk back, all delivered */
    CHECK(delivered_under_lock == 0);
    zm_trace_set(NULL);
    CHECK(release(chain, 1, true, NULL) == ZM_OK);
    zm_arena_deinit(&arena);
    zm_guard_deinit(&g);
}

int main(void) {
    test_trace_events_leave_the_lock_first();
    test_checked_calls_and_generations();
    test_chain_under_threads_and_resets();
    return check_summary();
}
