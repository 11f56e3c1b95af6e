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

/* ---------------------------------------------------------------- mixed small sizes
 *
 * A steady state of 256 live blocks: each step frees one and allocates a new one of a
 * size drawn log-uniformly from 16 B to 4 KiB (most allocations are small), as a program's
 * heap churns. Both sides see the same sizes in the same order. */

#define MIXED_LIVE 256
#define MIXED_STEPS (1 << 18)
static size_t mixed_sizes[MIXED_STEPS];

static void mixed_init(void) {
    unsigned rng = 42;
    for (int i = 0; i < MIXED_STEPS; i++) {
        rng = rng * 1103515245u + 12345u;
        double u = (double)(rng >> 8) / (double)(1u << 24); /* [0, 1) */
        mixed_sizes[i] = (size_t)(16.0 * __builtin_pow(256.0, u));
    }
}

static double mixed_malloc(void) {
    void *live[MIXED_LIVE] = {0};
    double t0 = now();
    for (int i = 0; i < MIXED_STEPS; i++) {
        int k = i % MIXED_LIVE;
        free(live[k]);
        live[k] = malloc(mixed_sizes[i]);
        escape(live[k]);
    }
    for (int k = 0; k < MIXED_LIVE; k++) free(live[k]);
    return (now() - t0) / MIXED_STEPS;
}

static double mixed_zm(zm_allocator_t a) {
    void *live[MIXED_LIVE] = {0};
    size_t len[MIXED_LIVE] = {0};
    double t0 = now();
    for (int i = 0; i < MIXED_STEPS; i++) {
        int k = i % MIXED_LIVE;
        zm_free(a, live[k], len[k], 16);
        len[k] = mixed_sizes[i];
        live[k] = zm_alloc(a, len[k], 16);
        escape(live[k]);
    }
    for (int k = 0; k < MIXED_LIVE; k++) zm_free(a, live[k], len[k], 16);
    return (now() - t0) / MIXED_STEPS;
}

/* The Python layer's default quarantine (zigmem/general_purpose_allocator.py). */
#define DEFAULT_QUARANTINE ((size_t)4 << 20)

static zm_allocator_t gpa_of(zm_gpa_t **g, bool safety, bool thread_safe, size_t quarantine) {
    zm_gpa_config_t cfg = {.safety = safety, .thread_safe = thread_safe,
                           .memory_limit = SIZE_MAX, .quarantine_bytes = quarantine};
    zm_allocator_t a;
    *g = zm_gpa_create(&cfg);
    zm_gpa_allocator(*g, &a);
    return a;
}

/* ---------------------------------------------------------------- table */

static void row(const char *name, double *v, double *base, const char *unit, double scale,
                const char *target) {
    double m = median(v, REPEATS), b = median(base, REPEATS);
    printf("%-52s %10.2f %-3s %8.3fx   %s\n", name, m * scale, unit, m / b, target);
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
    printf("%-52s %14s %9s   %s\n", "case", "median", "ratio", "target");
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

    mixed_init();
    zm_gpa_t *gs[5];
    zm_allocator_t ga[5] = {
        gpa_of(&gs[0], false, true, 0),
        gpa_of(&gs[1], false, false, 0),
        gpa_of(&gs[2], true, true, DEFAULT_QUARANTINE),
        gpa_of(&gs[3], true, true, 1u << 20),
        gpa_of(&gs[4], true, true, 0),
    };
    static const char *names[5] = {
        "mixed: gpa safety=False (thread_safe)",
        "mixed: gpa safety=False thread_safe=False",
        "mixed: gpa safety=True (default: 4 MiB quarantine)",
        "mixed: gpa safety=True, 1 MiB quarantine",
        "mixed: gpa safety=True, no quarantine",
    };
    static const char *targets[5] = {"<= 1.5x", "", "<= 5x", "", ""};
    double t[5][REPEATS];
    for (int i = 0; i < REPEATS; i++) {
        base[i] = mixed_malloc();
        for (int k = 0; k < 5; k++) t[k][i] = mixed_zm(ga[k]);
    }
    row("mixed 16 B-4 KiB: glibc malloc+free (baseline)", base, base, "ns", 1e9, "");
    for (int k = 0; k < 5; k++) {
        row(names[k], t[k], base, "ns", 1e9, targets[k]);
        zm_gpa_destroy(gs[k]);
    }
    return 0;
}
