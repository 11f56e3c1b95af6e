/* test_ops.c — the forward-pass kernels (ops.c) under ASan + UBSan: exact-size heap buffers
 * with odd geometries (tails after the 8-lane blocks), both SIMD paths bitwise equal, row i
 * of an n-row call equal to the 1-row call, overlap and geometry refused before writing. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "zigmem.h"

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static float uniform(void) { /* in [-1, 1) */
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (float)(rng >> 40) / (float)(1u << 23) - 1.0f;
}

static float *floats(size_t n) {
    float *p = malloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++) p[i] = uniform() * 3.0f;
    return p;
}

static uint16_t *halves(size_t n) { /* small normal float16 values */
    uint16_t *p = malloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++) {
        rng = rng * 6364136223846793005ull + 1;
        p[i] = (uint16_t)((rng >> 63) << 15 | (12 + (rng >> 40) % 4) << 10 | ((rng >> 20) & 0x3ff));
    }
    return p;
}

static bool same(const float *a, const float *b, size_t n) { return memcmp(a, b, n * 4) == 0; }

static void test_paths_and_batch_invariance(size_t rows, size_t heads, size_t kv_heads,
                                            size_t head_dim, size_t start) {
    size_t dim = heads * head_dim, n = rows * dim, kv_len = start + rows + 3;
    size_t half = head_dim / 2, table_rows = start + rows + 1;
    float *x = floats(n), *w = floats(dim), *cs = floats(table_rows * half),
          *sn = floats(table_rows * half), *up = floats(n), *scratch = malloc(kv_len * 4);
    uint16_t *k = halves(kv_len * kv_heads * head_dim), *v = halves(kv_len * kv_heads * head_dim);
    float *out[2][4], *one = malloc(dim * 4);
    for (int path = 0; path < 2; path++) {
        zm_ops_simd(path);
        for (int op = 0; op < 4; op++) out[path][op] = malloc(n * 4);
        CHECK(zm_rms_norm(x, w, out[path][0], rows, dim, 1e-5f) == ZM_OK);
        CHECK(zm_rope(x, out[path][1], rows, heads, head_dim, cs, sn, table_rows, start) == ZM_OK);
        CHECK(zm_silu_mul(x, up, out[path][2], n) == ZM_OK);
        CHECK(zm_attention_f16(x, rows, heads, head_dim, k, v, kv_heads, kv_len, start,
                               out[path][3], scratch, kv_len) == ZM_OK);
        for (size_t r = 0; r < rows; r++) {
            const float *xr = x + r * dim;
            CHECK(zm_rms_norm(xr, w, one, 1, dim, 1e-5f) == ZM_OK);
            CHECK(same(one, out[path][0] + r * dim, dim));
            CHECK(zm_rope(xr, one, 1, heads, head_dim, cs, sn, table_rows, start + r) == ZM_OK);
            CHECK(same(one, out[path][1] + r * dim, dim));
            CHECK(zm_attention_f16(xr, 1, heads, head_dim, k, v, kv_heads, kv_len, start + r,
                                   one, scratch, kv_len) == ZM_OK);
            CHECK(same(one, out[path][3] + r * dim, dim));
        }
        for (size_t i = 0; i < n; i++) CHECK(isfinite(out[path][3][i]) || !"attention finite");
    }
    for (int op = 0; op < 4; op++) {
        CHECK(same(out[0][op], out[1][op], n));
        free(out[0][op]);
        free(out[1][op]);
    }
    free(x), free(w), free(cs), free(sn), free(up), free(scratch), free(k), free(v), free(one);
}

static void test_refusals(void) {
    float buf[64], sentinel[64];
    for (int i = 0; i < 64; i++) buf[i] = sentinel[i] = (float)i;
    uint16_t kv[4 * 2 * 8] = {0};
    float scratch[4];
    /* partial overlap of out with an input; out == x is fine for the elementwise kernels */
    CHECK(zm_rms_norm(buf, buf + 48, buf + 1, 1, 16, 1e-5f) == ZM_ERR_INVALID_ARG);
    CHECK(zm_last_report()->size == ZM_OPS_OVERLAP);
    CHECK(zm_silu_mul(buf, buf + 32, buf + 4, 16) == ZM_ERR_INVALID_ARG);
    CHECK(zm_attention_f16(buf, 1, 2, 8, kv, kv, 2, 4, 0, buf, scratch, 4) == ZM_ERR_INVALID_ARG);
    CHECK(zm_last_report()->size == ZM_OPS_OVERLAP);
    CHECK(memcmp(buf, sentinel, sizeof buf) == 0);
    CHECK(zm_silu_mul(buf, buf + 32, buf, 16) == ZM_OK); /* in place */
    /* geometry */
    CHECK(zm_rms_norm(buf, buf, buf + 32, 1, 0, 1e-5f) == ZM_ERR_INVALID_ARG);
    CHECK(zm_last_report()->size == ZM_OPS_GEOMETRY);
    CHECK(zm_rms_norm(buf, buf + 16, buf + 32, 1, 16, NAN) == ZM_ERR_INVALID_ARG);
    CHECK(zm_rope(buf, buf + 32, 1, 1, 7, buf, buf, 4, 0) == ZM_ERR_INVALID_ARG);    /* odd */
    CHECK(zm_rope(buf, buf + 32, 2, 1, 8, buf, buf, 4, 3) == ZM_ERR_INVALID_ARG);    /* table */
    CHECK(zm_rope(buf, buf + 32, 1, 1, 8, buf, buf, 4, SIZE_MAX) == ZM_ERR_INVALID_ARG);
    CHECK(zm_attention_f16(buf, 1, 3, 8, kv, kv, 2, 4, 0, buf + 32, scratch, 4) ==
          ZM_ERR_INVALID_ARG); /* 3 heads over 2 KV heads */
    CHECK(zm_attention_f16(buf, 2, 2, 8, kv, kv, 2, 4, 3, buf + 32, scratch, 4) ==
          ZM_ERR_INVALID_ARG); /* positions beyond the cache */
    CHECK(zm_attention_f16(buf, 1, 2, 8, kv, kv, 2, 4, 0, buf + 32, scratch, 3) ==
          ZM_ERR_INVALID_ARG); /* scratch too small */
}

int main(void) {
    int best = zm_ops_simd(-1);
    test_paths_and_batch_invariance(1, 9, 3, 64, 0);
    test_paths_and_batch_invariance(7, 9, 3, 64, 40);
    test_paths_and_batch_invariance(5, 4, 2, 12, 3); /* tails after 8 lanes */
    test_paths_and_batch_invariance(3, 2, 1, 2, 0);
    test_refusals();
    zm_ops_simd(best);
    return check_summary();
}
