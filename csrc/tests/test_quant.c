/* test_quant.c — the matrix kernels under ASan + UBSan: every type on every kernel path
 * this CPU runs, against dequantize + a double-precision dot; batch invariance and thread
 * counts bitwise; row ids checked before anything is written. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "zigmem.h"

static const uint32_t types[] = {ZM_GGML_F32,  ZM_GGML_F16,  ZM_GGML_BF16, ZM_GGML_Q4_0,
                                 ZM_GGML_Q4_1, ZM_GGML_Q5_0, ZM_GGML_Q5_1, ZM_GGML_Q8_0,
                                 ZM_GGML_Q2_K, ZM_GGML_Q3_K, ZM_GGML_Q4_K, ZM_GGML_Q5_K,
                                 ZM_GGML_Q6_K, ZM_GGML_IQ4_NL};

static uint64_t rng = 88172645463325252ull;
static uint32_t next(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)rng;
}

/* A finite fp16 with magnitude below 2^-4 (exponent field <= 10). */
static uint16_t small_half(void) { return (uint16_t)((next() & 0x8000) | ((next() % 11) << 10) | (next() & 0x3ff)); }

/* Random blocks with finite fp16 scales (offsets per type); floats: small random values. */
static void fill(uint32_t type, uint8_t *w, size_t bytes, uint32_t block_bytes) {
    for (size_t i = 0; i < bytes; i++) w[i] = (uint8_t)next();
    if (type == ZM_GGML_F32) {
        for (size_t i = 0; i < bytes / 4; i++) {
            float f = (float)((int)(next() % 2001) - 1000) / 1000.0f;
            memcpy(w + 4 * i, &f, 4);
        }
        return;
    }
    if (type == ZM_GGML_F16 || type == ZM_GGML_BF16) {
        for (size_t i = 0; i < bytes / 2; i++) {
            uint16_t h = type == ZM_GGML_F16 ? small_half() : (uint16_t)((next() & 0x8000) | 0x3c00 | (next() & 0x7f));
            memcpy(w + 2 * i, &h, 2);
        }
        return;
    }
    int offs[2] = {-1, -1};
    switch (type) {
    case ZM_GGML_Q4_1: case ZM_GGML_Q5_1: case ZM_GGML_Q4_K: case ZM_GGML_Q5_K: offs[0] = 0, offs[1] = 2; break;
    case ZM_GGML_Q2_K: offs[0] = 80, offs[1] = 82; break;
    case ZM_GGML_Q3_K: offs[0] = 108; break;
    case ZM_GGML_Q6_K: offs[0] = 208; break;
    default: offs[0] = 0;
    }
    for (size_t b = 0; b < bytes / block_bytes; b++)
        for (int k = 0; k < 2; k++)
            if (offs[k] >= 0) {
                uint16_t h = small_half();
                memcpy(w + b * block_bytes + offs[k], &h, 2);
            }
}

static void check_type(uint32_t type, size_t rows, size_t cols, size_t n) {
    uint32_t block, bb;
    CHECK(zm_ggml_type_size(type, &block, &bb));
    size_t row_bytes = cols / block * bb, bytes = rows * row_bytes;
    uint8_t *w = malloc(bytes);
    float *dense = malloc(rows * cols * 4), *x = malloc(n * cols * 4);
    size_t spare = n * rows > 3 * cols ? n * rows : 3 * cols; /* matmul outputs or 3 rows */
    float *out = malloc(n * rows * 4), *one = malloc(rows * 4), *again = malloc(spare * 4);
    fill(type, w, bytes, bb);
    for (size_t i = 0; i < n * cols; i++) x[i] = (float)((int)(next() % 2001) - 1000) / 997.0f;
    CHECK(zm_dequantize(type, w, rows * cols, dense) == ZM_OK);
    for (int path = ZM_KERNELS_PORTABLE; path <= ZM_KERNELS_AVX512; path++) {
        if (!zm_kernels_supported(path)) continue;
        CHECK(zm_kernels_set(path) == ZM_OK && zm_kernels_get() == path);
        zm_set_num_threads(2);
        CHECK(zm_quant_matmul(type, w, rows, cols, x, n, out, 0) == ZM_OK);
        int close = 1, same = 1;
        for (size_t i = 0; i < n; i++)
            for (size_t r = 0; r < rows; r++) {
                double exact = 0, bound = 0;
                for (size_t k = 0; k < cols; k++) {
                    exact += (double)dense[r * cols + k] * x[i * cols + k];
                    bound += fabs((double)dense[r * cols + k] * x[i * cols + k]);
                }
                close &= fabs(out[i * rows + r] - exact) <= 1e-5 * bound + 1e-30;
            }
        for (size_t i = 0; i < n; i++) {
            CHECK(zm_quant_matmul(type, w, rows, cols, x + i * cols, 1, one, 0) == ZM_OK);
            same &= memcmp(one, out + i * rows, rows * 4) == 0;
        }
        for (unsigned t = 1; t <= 3; t++) {
            zm_set_num_threads(t);
            CHECK(zm_quant_matmul(type, w, rows, cols, x, n, again, 0) == ZM_OK);
            same &= memcmp(again, out, n * rows * 4) == 0;
        }
        CHECK(close);
        CHECK(same);
        if (!close || !same) fprintf(stderr, "  type %u path %d\n", type, path);
        /* rows dequantizes with the path's own code: bit-exact all the same */
        int64_t ids[3] = {(int64_t)rows - 1, 0, 1};
        CHECK(zm_quant_rows(type, w, rows, cols, ids, 3, again) == ZM_OK);
        CHECK(memcmp(again, dense + (rows - 1) * cols, cols * 4) == 0 && memcmp(again + cols, dense, 2 * cols * 4) == 0);
    }
    int64_t bad[2] = {0, (int64_t)rows};
    memset(again, 0, cols * 4);
    CHECK(zm_quant_rows(type, w, rows, cols, bad, 2, again) == ZM_ERR_INVALID_ARG && zm_last_report()->size == 1);
    bad[1] = -1;
    CHECK(zm_quant_rows(type, w, rows, cols, bad, 2, again) == ZM_ERR_INVALID_ARG && again[0] == 0);
    free(w), free(dense), free(x), free(out), free(one), free(again);
}

/* ZM_MATMUL_INT16: within the bound x's quantization allows (half a step, amax / 65534,
 * per element), batch invariant, the same for every thread count and bit for bit on every
 * path; a row with a NaN gives NaN and leaves the other rows alone. Types without
 * 32-element blocks ignore the flag. */
static void check_int16(uint32_t type, size_t rows, size_t cols, size_t n) {
    uint32_t block, bb;
    CHECK(zm_ggml_type_size(type, &block, &bb));
    size_t bytes = rows * (cols / block * bb);
    uint8_t *w = malloc(bytes);
    float *dense = malloc(rows * cols * 4), *x = malloc(n * cols * 4), *first = malloc(n * rows * 4);
    float *out = malloc(n * rows * 4), *one = malloc(rows * 4), *again = malloc(n * rows * 4);
    fill(type, w, bytes, bb);
    for (size_t i = 0; i < n * cols; i++) x[i] = (float)((int)(next() % 2001) - 1000) / 997.0f;
    for (size_t k = 0; k < cols; k++) x[k] = 0; /* an all-zero row */
    CHECK(zm_dequantize(type, w, rows * cols, dense) == ZM_OK);
    int have_first = 0;
    for (int path = ZM_KERNELS_PORTABLE; path <= ZM_KERNELS_AVX512; path++) {
        if (!zm_kernels_supported(path)) continue;
        CHECK(zm_kernels_set(path) == ZM_OK);
        zm_set_num_threads(2);
        CHECK(zm_quant_matmul(type, w, rows, cols, x, n, out, ZM_MATMUL_INT16) == ZM_OK);
        int close = 1, same = 1;
        for (size_t i = 0; i < n; i++)
            for (size_t r = 0; r < rows; r++) {
                double exact = 0, bound = 0;
                for (size_t k = 0; k < cols; k++) {
                    double amax = 0;
                    for (size_t j = k / 32 * 32; j < k / 32 * 32 + 32; j++) amax = fmax(amax, fabs(x[i * cols + j]));
                    exact += (double)dense[r * cols + k] * x[i * cols + k];
                    bound += fabs(dense[r * cols + k]) * (amax / 65534 * 1.001 + 1e-5 * fabs(x[i * cols + k]));
                }
                close &= fabs(out[i * rows + r] - exact) <= bound + 1e-30;
            }
        for (size_t i = 0; i < n; i++) {
            CHECK(zm_quant_matmul(type, w, rows, cols, x + i * cols, 1, one, ZM_MATMUL_INT16) == ZM_OK);
            same &= memcmp(one, out + i * rows, rows * 4) == 0;
        }
        for (unsigned t = 1; t <= 3; t++) {
            zm_set_num_threads(t);
            CHECK(zm_quant_matmul(type, w, rows, cols, x, n, again, ZM_MATMUL_INT16) == ZM_OK);
            same &= memcmp(again, out, n * rows * 4) == 0;
        }
        if (!have_first) memcpy(first, out, n * rows * 4), have_first = 1;
        if (block >= 32) same &= memcmp(first, out, n * rows * 4) == 0; /* the portable bits */
        CHECK(close);
        CHECK(same);
        if (!close || !same) fprintf(stderr, "  int16: type %u path %d\n", type, path);
        if (block >= 32 && n > 1) { /* a NaN in row 1: that row is NaN, the others unchanged */
            float kept = x[cols + 3];
            x[cols + 3] = NAN;
            CHECK(zm_quant_matmul(type, w, rows, cols, x, n, out, ZM_MATMUL_INT16) == ZM_OK);
            int nan_row = 1, others = 1;
            for (size_t r = 0; r < rows; r++) nan_row &= isnan(out[rows + r]);
            for (size_t i = 0; i < n; i++)
                if (i != 1) others &= memcmp(out + i * rows, first + i * rows, rows * 4) == 0;
            CHECK(nan_row && others);
            x[cols + 3] = kept;
        }
    }
    free(w), free(dense), free(x), free(first), free(out), free(one), free(again);
}

int main(void) {
    zm_page_t page;
    zm_allocator_t a;
    zm_page_init(&page, 0);
    zm_page_allocator(&page, &a);
    zm_pool_set_allocator(&a);
    for (size_t t = 0; t < sizeof types / sizeof *types; t++) {
        uint32_t block, bb;
        zm_ggml_type_size(types[t], &block, &bb);
        check_type(types[t], 13, 512, 6);
        check_type(types[t], 70, 256, 1);
        if (block == 1) check_type(types[t], 5, 37, 5); /* tails: no vector width divides 37 */
        check_int16(types[t], 13, 512, 6);
        check_int16(types[t], 70, 256, 1);
    }
    float out[4];
    uint8_t w[34] = {0};
    CHECK(zm_quant_matmul(ZM_GGML_Q8_0, w, 1, 31, out, 1, out, 0) == ZM_ERR_INVALID_ARG);
    CHECK(zm_quant_matmul(9 /* Q8_1: no kernel */, w, 1, 32, out, 1, out, 0) == ZM_ERR_INVALID_ARG);
    CHECK(zm_set_num_threads(0) == ZM_ERR_INVALID_ARG && zm_set_num_threads(100000) == ZM_ERR_INVALID_ARG);
    CHECK(zm_kernels_set(7) == ZM_ERR_INVALID_ARG);
    return check_summary();
}
