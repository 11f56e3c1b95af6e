/* test_paged_kv.c — the paged KV cache under ASan + UBSan: block bookkeeping, copy-on-write,
 * the prefix cache and its eviction, all-or-nothing appends at every allocation failure,
 * attention against a double-precision reference on every instruction set this CPU has,
 * batch invariance, and concurrent callers. */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "zigmem.h"

enum { L = 2, H = 2, D = 20, BS = 4 }; /* D not a multiple of 16: the tails run too */

static zm_page_t page;
static zm_allocator_t pa;

static float value(int64_t seq_seed, size_t pos, size_t layer, int which, size_t h, size_t d) {
    unsigned x = (unsigned)(seq_seed * 7919 + pos * 104729 + layer * 131 + which * 17 + h * 7 + d);
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    return (float)(x % 2001) / 1000.0f - 1.0f;
}

/* The storage dtype of the cache under test: step() and holds() convert to and from it. */
static int dtype_now = ZM_KV_F32;

static void store(void *dst, size_t i, float x) {
    if (dtype_now == ZM_KV_F32) {
        ((float *)dst)[i] = x;
    } else if (dtype_now == ZM_KV_F16) {
        ((_Float16 *)dst)[i] = (_Float16)x;
    } else {
        uint32_t bits;
        memcpy(&bits, &x, 4);
        bits += 0x7fff + ((bits >> 16) & 1); /* round to nearest even */
        ((uint16_t *)dst)[i] = (uint16_t)(bits >> 16);
    }
}

static float load(const void *src, size_t i) {
    if (dtype_now == ZM_KV_F32) return ((const float *)src)[i];
    if (dtype_now == ZM_KV_F16) return (float)((const _Float16 *)src)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)src)[i] << 16;
    float x;
    memcpy(&x, &bits, 4);
    return x;
}

static float stored(float x) {
    float tmp[1];
    store(tmp, 0, x);
    return load(tmp, 0);
}

/* One step of n positions for every layer, values from (seed, position). */
static int step(zm_paged_kv_t *kv, int64_t id, int64_t seed, size_t start, size_t n) {
    float k[64 * H * D], v[64 * H * D];
    for (size_t layer = 0; layer < L; layer++) {
        for (size_t i = 0; i < n; i++)
            for (size_t h = 0; h < H; h++)
                for (size_t d = 0; d < D; d++) {
                    store(k, (i * H + h) * D + d, value(seed, start + i, layer, 0, h, d));
                    store(v, (i * H + h) * D + d, value(seed, start + i, layer, 1, h, d));
                }
        int status = zm_paged_kv_append(kv, id, layer, k, v, n);
        if (status) return status;
    }
    return ZM_OK;
}

/* Positions [0, n) of `id` hold seed's values (positions < split) and then other's. */
static bool holds(zm_paged_kv_t *kv, int64_t id, size_t n, int64_t seed, size_t split,
                  int64_t other) {
    static _Thread_local float got[1024 * H * D];
    for (size_t layer = 0; layer < L; layer++)
        for (int which = 0; which < 2; which++) {
            if (zm_paged_kv_gather(kv, id, layer, which, got, n)) return false;
            for (size_t p = 0; p < n; p++)
                for (size_t h = 0; h < H; h++)
                    for (size_t d = 0; d < D; d++)
                        if (load(got, (p * H + h) * D + d) !=
                            stored(value(p < split ? seed : other, p, layer, which, h, d)))
                            return false;
        }
    return true;
}

static zm_paged_kv_t *make(zm_allocator_t a, size_t blocks, int dtype) {
    dtype_now = dtype;
    zm_paged_kv_config_t cfg = {L, H, D, blocks, BS, dtype};
    zm_paged_kv_t *kv = NULL;
    CHECK(zm_paged_kv_create(a, &cfg, &kv) == ZM_OK);
    return kv;
}

static void test_config(void) {
    zm_paged_kv_config_t bad[] = {
        {0, H, D, 8, BS, ZM_KV_F32}, {L, H, 0, 8, BS, ZM_KV_F32}, {L, H, 2048, 8, BS, ZM_KV_F32},
        {L, H, D, 8, 0, ZM_KV_F32},  {L, H, D, 8, BS, 9},
        {L, H, D, (size_t)1 << 30, (size_t)1 << 30, ZM_KV_F32}, /* the pool overflows */
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        zm_paged_kv_t *kv = (zm_paged_kv_t *)1;
        CHECK(zm_paged_kv_create(pa, &bad[i], &kv) != ZM_OK && kv == NULL);
    }
}

static void test_sequences_and_fork(void) {
    zm_paged_kv_t *kv = make(pa, 16, ZM_KV_F32);
    int64_t a, b, c;
    CHECK(zm_paged_kv_add_sequence(kv, NULL, 0, &a) == ZM_OK);
    CHECK(step(kv, a, 1, 0, 6) == ZM_OK); /* blocks 0 full, 1 half */
    CHECK(step(kv, a, 1, 6, 1) == ZM_OK);
    CHECK(zm_paged_kv_fork(kv, a, &b) == ZM_OK);
    int32_t ta[4], tb[4];
    zm_paged_kv_block_table(kv, a, ta, 4);
    zm_paged_kv_block_table(kv, b, tb, 4);
    CHECK(ta[0] == tb[0] && ta[1] == tb[1] && zm_paged_kv_refcount(kv, ta[1]) == 2);
    /* the child's first append copies the shared, partly filled block; the parent keeps it */
    CHECK(step(kv, b, 2, 7, 3) == ZM_OK);
    zm_paged_kv_block_table(kv, b, tb, 4);
    CHECK(tb[0] == ta[0] && tb[1] != ta[1]);
    CHECK(zm_paged_kv_refcount(kv, ta[1]) == 1 && zm_paged_kv_refcount(kv, ta[0]) == 2);
    CHECK(holds(kv, a, 7, 1, 7, 1));
    CHECK(holds(kv, b, 10, 1, 7, 2));
    CHECK(zm_paged_kv_check(kv) == ZM_OK);
    /* a mid-step fork is refused; a step is one size; a layer once */
    float k[H * D] = {0}, v[H * D] = {0};
    CHECK(zm_paged_kv_append(kv, a, 0, k, v, 1) == ZM_OK);
    CHECK(zm_paged_kv_fork(kv, a, &c) == ZM_ERR_INVALID_ARG &&
          zm_last_report()->detail == ZM_PKV_STEP_OPEN);
    CHECK(zm_paged_kv_append(kv, a, 0, k, v, 1) == ZM_ERR_INVALID_ARG &&
          zm_last_report()->detail == ZM_PKV_LAYER_WRITTEN);
    CHECK(zm_paged_kv_append(kv, a, 1, k, v, 2) == ZM_ERR_INVALID_ARG &&
          zm_last_report()->detail == ZM_PKV_STEP_SIZE);
    size_t len;
    CHECK(zm_paged_kv_layer_len(kv, a, 0, &len) == ZM_OK && len == 8);
    CHECK(zm_paged_kv_layer_len(kv, a, 1, &len) == ZM_OK && len == 7);
    CHECK(zm_paged_kv_append(kv, a, 1, k, v, 1) == ZM_OK);
    zm_paged_kv_seq_info_t info;
    CHECK(zm_paged_kv_seq_info(kv, a, &info) == ZM_OK && info.seq_len == 8);
    /* freed ids are detected forever, even when the slot is reused */
    CHECK(zm_paged_kv_free_sequence(kv, b) == ZM_OK);
    CHECK(zm_paged_kv_free_sequence(kv, b) == ZM_ERR_USE_AFTER_FREE);
    CHECK(zm_paged_kv_add_sequence(kv, NULL, 0, &c) == ZM_OK && c != b);
    CHECK(zm_paged_kv_seq_info(kv, b, &info) == ZM_ERR_USE_AFTER_FREE &&
          zm_last_report()->detail == ZM_PKV_FREED_SEQUENCE);
    CHECK(zm_paged_kv_seq_info(kv, 999, &info) == ZM_ERR_INVALID_ARG &&
          zm_last_report()->detail == ZM_PKV_UNKNOWN_SEQUENCE);
    CHECK(zm_paged_kv_seq_info(kv, -1, &info) == ZM_ERR_INVALID_ARG);
    zm_paged_kv_free_sequence(kv, a);
    zm_paged_kv_free_sequence(kv, c);
    zm_paged_kv_stats_t st;
    zm_paged_kv_stats(kv, &st);
    CHECK(st.blocks_free == 16 && st.blocks_in_use == 0 && st.sequences == 0);
    CHECK(zm_paged_kv_check(kv) == ZM_OK);
    zm_paged_kv_destroy(kv);
}

static void test_prefix_cache_and_eviction(void) {
    zm_paged_kv_t *kv = make(pa, 6, ZM_KV_F16);
    int32_t prompt[10] = {5, 6, 7, 8, 9, 10, 11, 12, 13, 14};
    int64_t a, b, c, d;
    zm_paged_kv_seq_info_t info;
    CHECK(zm_paged_kv_add_sequence(kv, prompt, 10, &a) == ZM_OK);
    CHECK(zm_paged_kv_seq_info(kv, a, &info) == ZM_OK && info.cached_tokens == 0);
    CHECK(step(kv, a, 1, 0, 10) == ZM_OK); /* registers blocks 0 and 1 */
    /* the same prompt: 8 positions cached (two blocks; at most len - 1 = 9) */
    CHECK(zm_paged_kv_add_sequence(kv, prompt, 10, &b) == ZM_OK);
    CHECK(zm_paged_kv_seq_info(kv, b, &info) == ZM_OK && info.cached_tokens == 8 &&
          info.seq_len == 8);
    /* exactly two blocks long: only one may be served (the last token needs its logits) */
    CHECK(zm_paged_kv_add_sequence(kv, prompt, 8, &c) == ZM_OK);
    CHECK(zm_paged_kv_seq_info(kv, c, &info) == ZM_OK && info.cached_tokens == 4);
    zm_paged_kv_free_sequence(kv, c);
    /* a different second block: the first is still shared */
    int32_t other[9] = {5, 6, 7, 8, 1, 1, 1, 1, 1};
    CHECK(zm_paged_kv_add_sequence(kv, other, 9, &c) == ZM_OK);
    CHECK(zm_paged_kv_seq_info(kv, c, &info) == ZM_OK && info.cached_tokens == 4);
    zm_paged_kv_free_sequence(kv, c);
    CHECK(holds(kv, b, 8, 1, 8, 1));
    zm_paged_kv_free_sequence(kv, a);
    zm_paged_kv_free_sequence(kv, b);
    zm_paged_kv_stats_t st;
    zm_paged_kv_stats(kv, &st);
    CHECK(st.blocks_cached == 2 && st.blocks_free == 4 && st.blocks_in_use == 0);
    /* cached blocks are evicted (the tail first) only when the pool needs them */
    CHECK(zm_paged_kv_add_sequence(kv, NULL, 0, &d) == ZM_OK);
    CHECK(step(kv, d, 3, 0, 17) == ZM_OK); /* 5 blocks: one eviction */
    zm_paged_kv_stats(kv, &st);
    CHECK(st.evictions == 1 && st.blocks_cached == 1);
    CHECK(zm_paged_kv_add_sequence(kv, prompt, 10, &a) == ZM_OK);
    CHECK(zm_paged_kv_seq_info(kv, a, &info) == ZM_OK && info.cached_tokens == 4);
    CHECK(holds(kv, a, 4, 1, 4, 1));
    /* the pool is full: nothing changes, can_append says so first */
    int ok;
    CHECK(zm_paged_kv_can_append(kv, d, 8, &ok) == ZM_OK && !ok);
    CHECK(step(kv, d, 3, 17, 8) == ZM_ERR_OUT_OF_MEMORY && /* 25 positions: never fits */
          zm_last_report()->detail == ZM_PKV_TOO_LONG);
    CHECK(step(kv, d, 3, 17, 7) == ZM_ERR_OUT_OF_MEMORY &&
          zm_last_report()->detail == ZM_PKV_POOL_FULL);
    CHECK(zm_paged_kv_seq_info(kv, d, &info) == ZM_OK && info.seq_len == 17 &&
          info.layers_written == 0);
    CHECK(zm_paged_kv_check(kv) == ZM_OK);
    CHECK(zm_paged_kv_can_append(kv, d, 3, &ok) == ZM_OK && ok);
    zm_paged_kv_free_sequence(kv, a);
    zm_paged_kv_free_sequence(kv, d);
    CHECK(zm_paged_kv_check(kv) == ZM_OK);
    zm_paged_kv_destroy(kv);
}

/* A scenario that allocates at create, slot growth and table growth; run with every
 * allocation failing in turn: it must fail cleanly and leak nothing. */
static int scenario(zm_allocator_t a) {
    zm_paged_kv_t *kv;
    zm_paged_kv_config_t cfg = {L, H, D, 40, BS, ZM_KV_BF16};
    dtype_now = ZM_KV_BF16;
    int status = zm_paged_kv_create(a, &cfg, &kv);
    if (status) return status;
    int64_t ids[12];
    size_t n = 0;
    for (; n < 12 && !status; n++) status = zm_paged_kv_add_sequence(kv, NULL, 0, &ids[n]);
    if (!status) status = step(kv, ids[0], 1, 0, 30); /* 8 blocks: the table grows */
    if (!status) {
        zm_paged_kv_seq_info_t info;
        status = step(kv, ids[0], 1, 30, 20); /* grows again */
        zm_paged_kv_seq_info(kv, ids[0], &info);
        CHECK(info.seq_len == (status ? 30u : 50u) && info.layers_written == 0);
        int checked = zm_paged_kv_check(kv); /* allocates too */
        CHECK(checked == ZM_OK || checked == ZM_ERR_INDUCED);
        if (!status) status = checked;
    }
    zm_paged_kv_destroy(kv);
    return status;
}

static void test_allocation_failures(void) {
    zm_failing_t f;
    zm_counting_t c;
    zm_allocator_t fa, ca;
    zm_counting_init(&c, pa);
    zm_counting_allocator(&c, &ca);
    zm_failing_init(&f, ca, SIZE_MAX, SIZE_MAX);
    zm_failing_allocator(&f, &fa);
    CHECK(scenario(fa) == ZM_OK && c.current_count == 0);
    size_t needed = f.alloc_index;
    CHECK(needed >= 5);
    for (size_t i = 0; i < needed; i++) {
        zm_counting_init(&c, pa);
        zm_failing_init(&f, ca, i, SIZE_MAX);
        CHECK(scenario(fa) == ZM_ERR_INDUCED);
        CHECK(c.current_count == 0);
    }
}

/* ---------------------------------------------------------------- attention */

static void reference(zm_paged_kv_t *kv, int64_t id, size_t layer, size_t len, size_t q_len,
                      const float *q, size_t nh, double *out) {
    static float k[1024 * H * D], v[1024 * H * D];
    zm_paged_kv_gather(kv, id, layer, 0, k, len);
    zm_paged_kv_gather(kv, id, layer, 1, v, len);
    for (size_t r = 0; r < q_len; r++)
        for (size_t h = 0; h < nh; h++) {
            size_t g = h / (nh / H), p = len - q_len + r;
            double s[1024], mx = -INFINITY, sum = 0;
            for (size_t j = 0; j <= p; j++) {
                s[j] = 0;
                for (size_t d = 0; d < D; d++)
                    s[j] += (double)q[(r * nh + h) * D + d] * load(k, (j * H + g) * D + d);
                s[j] /= sqrt((double)D);
                if (s[j] > mx) mx = s[j];
            }
            for (size_t j = 0; j <= p; j++) sum += s[j] = exp(s[j] - mx);
            for (size_t d = 0; d < D; d++) {
                double o = 0;
                for (size_t j = 0; j <= p; j++) o += s[j] * load(v, (j * H + g) * D + d);
                out[(r * nh + h) * D + d] = o / sum;
            }
        }
}

static void test_attention(const char *isa) {
    if (zm_paged_attention_use_isa(isa) != ZM_OK) {
        fprintf(stderr, "attention: %s not supported here, skipped\n", isa);
        return;
    }
    fprintf(stderr, "attention: %s\n", isa);
    const size_t nh = 6; /* 3 query heads per KV head */
    for (int dtype = ZM_KV_F32; dtype <= ZM_KV_BF16; dtype++) {
        zm_paged_kv_t *kv = make(pa, 64, dtype);
        int64_t a, b;
        zm_paged_kv_add_sequence(kv, NULL, 0, &a);
        zm_paged_kv_add_sequence(kv, NULL, 0, &b);
        CHECK(step(kv, a, 1, 0, 37) == ZM_OK);
        CHECK(step(kv, b, 2, 0, 9) == ZM_OK);
        int64_t ids[2] = {a, b}, lens[2] = {5, 1}; /* a prefill chunk and a decode row */
        float q[6 * nh * D], out[6 * nh * D], alone[6 * nh * D];
        for (size_t i = 0; i < 6 * nh * D; i++) q[i] = value(9, i, 0, 0, 0, 0);
        zm_set_num_threads(3);
        CHECK(zm_paged_kv_attention(kv, 1, ids, lens, 2, q, nh, out) == ZM_OK);
        double ref[6 * nh * D];
        reference(kv, a, 1, 37, 5, q, nh, ref);
        reference(kv, b, 1, 9, 1, q + 5 * nh * D, nh, ref + 5 * nh * D);
        double worst = 0;
        for (size_t i = 0; i < 6 * nh * D; i++)
            if (fabs(out[i] - ref[i]) > worst) worst = fabs(out[i] - ref[i]);
        CHECK(worst < 1e-5);
        /* batch invariance: b alone, on one thread, gives the same bits */
        int64_t one = 1;
        zm_set_num_threads(1);
        CHECK(zm_paged_kv_attention(kv, 1, &b, &one, 1, q + 5 * nh * D, nh, alone) == ZM_OK);
        zm_set_num_threads(2);
        CHECK(memcmp(alone, out + 5 * nh * D, nh * D * sizeof(float)) == 0);
        /* bad arguments write nothing */
        float untouched[6 * nh * D];
        memcpy(untouched, out, sizeof out);
        int64_t too_long[2] = {5, 10};
        CHECK(zm_paged_kv_attention(kv, 1, ids, too_long, 2, q, nh, out) == ZM_ERR_INVALID_ARG &&
              zm_last_report()->detail == ZM_PKV_ROWS && zm_last_report()->offset == 1);
        CHECK(zm_paged_kv_attention(kv, 1, ids, lens, 2, q, 5, out) == ZM_ERR_INVALID_ARG);
        CHECK(zm_paged_kv_attention(kv, 2, ids, lens, 2, q, nh, out) == ZM_ERR_INVALID_ARG);
        CHECK(memcmp(untouched, out, sizeof out) == 0);
        zm_paged_kv_destroy(kv);
    }
}

/* ---------------------------------------------------------------- threads */

static zm_paged_kv_t *shared_kv;

static void *worker(void *arg) {
    int64_t seed = (int64_t)(intptr_t)arg, id;
    for (int round = 0; round < 20; round++) {
        if (zm_paged_kv_add_sequence(shared_kv, NULL, 0, &id)) return (void *)1;
        for (size_t pos = 0; pos < 12; pos += 3)
            if (step(shared_kv, id, seed, pos, 3)) return (void *)1;
        if (!holds(shared_kv, id, 12, seed, 12, seed)) return (void *)1;
        int64_t one = 1;
        float q[H * D] = {0}, out[H * D];
        if (zm_paged_kv_attention(shared_kv, 0, &id, &one, 1, q, H, out)) return (void *)1;
        zm_paged_kv_free_sequence(shared_kv, id);
    }
    return NULL;
}

static void test_threads(void) {
    shared_kv = make(pa, 64, ZM_KV_F16);
    pthread_t t[4];
    for (intptr_t i = 0; i < 4; i++) pthread_create(&t[i], NULL, worker, (void *)(i + 1));
    for (int i = 0; i < 4; i++) {
        void *r;
        pthread_join(t[i], &r);
        CHECK(r == NULL);
    }
    CHECK(zm_paged_kv_check(shared_kv) == ZM_OK);
    zm_paged_kv_destroy(shared_kv);
}

int main(void) {
    zm_page_init(&page, 0);
    zm_page_allocator(&page, &pa);
    test_config();
    test_sequences_and_fork();
    test_prefix_cache_and_eviction();
    test_allocation_failures();
    test_attention("portable");
    test_attention("avx2");
    test_attention("avx512f");
    test_threads();
    return check_summary();
}
