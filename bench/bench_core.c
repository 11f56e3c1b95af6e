/* bench_core.c — the C core against glibc malloc/free, in one binary and one run.
 *
 * Each case runs REPEATS times; the table prints medians and the ratio to the baseline
 * measured right beside it. Machines are noisy: read the ratios, not the nanoseconds. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "zigmem.h"

#define REPEATS 15

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, n, sizeof *v, cmp);
    return v[n / 2];
}

/* Keep the compiler from deleting work whose result is otherwise unused. */
static void escape(void *p) { __asm__ volatile("" : : "g"(p) : "memory"); }

/* ---------------------------------------------------------------- small allocations */

#define SMALL_N 4096
#define SMALL_ROUNDS 256

static double malloc_free_64(void) {
    double t0 = now();
    for (int r = 0; r < SMALL_ROUNDS; r++)
        for (int i = 0; i < SMALL_N; i++) {
            void *p = malloc(64);
            escape(p);
            free(p);
        }
    return (now() - t0) / (SMALL_ROUNDS * SMALL_N);
}

/* An arena's pattern: many allocations, then one reset. The reset is in the timing. */
static double arena_64(zm_arena_t *arena, zm_allocator_t a, int via_vtable) {
    double t0 = now();
    for (int r = 0; r < SMALL_ROUNDS; r++) {
        for (int i = 0; i < SMALL_N; i++) {
            void *p = via_vtable ? zm_alloc(a, 64, 16) : zm_arena_alloc(arena, 64, 16);
            escape(p);
        }
        zm_arena_reset(arena, ZM_ARENA_RETAIN_CAPACITY, 0);
    }
    return (now() - t0) / (SMALL_ROUNDS * SMALL_N);
}

/* ---------------------------------------------------------------- per-token activations */

#define TOKEN_BYTES (64u << 20)

static double malloc_token(void) {
    double t0 = now();
    char *p = malloc(TOKEN_BYTES);
    memset(p, 1, TOKEN_BYTES);
    escape(p);
    free(p);
    return now() - t0;
}

static double arena_token(zm_arena_t *arena, zm_allocator_t a) {
    double t0 = now();
    char *p = zm_alloc(a, TOKEN_BYTES, 64);
    memset(p, 1, TOKEN_BYTES);
    escape(p);
    zm_arena_reset(arena, ZM_ARENA_RETAIN_CAPACITY, 0);
    return now() - t0;
}

/* ---------------------------------------------------------------- table */

static void row(const char *name, double *v, double *base, const char *unit, double scale,
                const char *target) {
    double m = median(v, REPEATS), b = median(base, REPEATS);
    printf("%-44s %10.2f %-3s %8.3fx   %s\n", name, m * scale, unit, m / b, target);
}

int main(void) {
    zm_page_t pa;
    zm_allocator_t page, counting_a, arena_a;
    zm_page_init(&pa, 0);
    zm_page_allocator(&pa, &page);
    zm_counting_t counting;
    zm_counting_init(&counting, page);
    zm_counting_allocator(&counting, &counting_a);
    zm_arena_t arena;
    zm_arena_init(&arena, counting_a); /* arena over counting over page: composed in C */
    zm_arena_allocator(&arena, &arena_a);

    double base[REPEATS], direct[REPEATS], vt[REPEATS];
    arena_64(&arena, arena_a, 1); /* warm up: the arena's buffer is retained from here on */
    for (int i = 0; i < REPEATS; i++) {
        base[i] = malloc_free_64();
        direct[i] = arena_64(&arena, arena_a, 0);
        vt[i] = arena_64(&arena, arena_a, 1);
    }
    printf("%-44s %14s %9s   %s\n", "case", "median", "ratio", "target");
    row("glibc malloc+free 64 B (baseline)", base, base, "ns", 1e9, "");
    row("arena alloc 64 B (zm_arena_alloc)", direct, base, "ns", 1e9, "<= 0.40x");
    row("arena alloc 64 B (through the vtable)", vt, base, "ns", 1e9, "<= 0.40x");

    zm_arena_reset(&arena, ZM_ARENA_FREE_ALL, 0);
    arena_token(&arena, arena_a); /* first token maps and faults the pages */
    for (int i = 0; i < REPEATS; i++) {
        base[i] = malloc_token();
        vt[i] = arena_token(&arena, arena_a);
    }
    row("token: malloc+memset+free 64 MiB (baseline)", base, base, "ms", 1e3, "");
    row("token: arena+memset+reset(retain) 64 MiB", vt, base, "ms", 1e3, "<= 0.20x (>= 5x faster)");
    zm_arena_deinit(&arena);
    return 0;
}
