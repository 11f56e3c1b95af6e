/* quant_matmul.c — out = x @ W^T with W read in place from its ggml blocks.
 *
 * Two schedules, one arithmetic:
 *   - few rows of x (decode): a task streams 4 rows of W at a time, dequantizing 256
 *     columns of each into an L1-sized buffer and folding them at once into the dot
 *     products with every row of x; the weights are read once and never leave L1 as floats.
 *   - many rows of x (a prompt): a task dequantizes a tile of W rows once into its worker's
 *     scratch (about half an L2) and dots the tile against every row of x, so W is
 *     dequantized once per matmul, not once per row of x.
 * F32 weights are dotted in place.
 *
 * Determinism. Each output element (row r of W, row i of x) has its own accumulator of L
 * lanes (L = 16 with AVX-512, 8 with AVX2 and in portable C): lane l sums the products of
 * columns l, l + L, l + 2L, ... in column order, then the lanes are added in a fixed tree.
 * Both schedules feed an accumulator the same products in the same order (chunks are
 * multiples of L, and the accumulator state is carried exactly between chunks), blocking
 * never mixes two elements' sums, and dequantized values are the same floats on every path
 * (dequant.c, dequant_avx2.c, dequant_avx512.c). So the bits of an element depend only on the columns and
 * the kernel path: not on n, not on which rows share a task, not on the thread count.
 *
 * Kernel paths are chosen at run time: AVX-512 and AVX2 + FMA functions are compiled with
 * target attributes into the same object as the portable one, and the best the CPU
 * supports is used unless ZIGMEM_KERNELS (or zm_kernels_set) forces another. */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define ALWAYS_INLINE inline __attribute__((always_inline))

#define MAX_LANES 16
#define BLOCK_W 4 /* rows of W per register block */
#define BLOCK_X 4 /* rows of x per register block, at most */

/* Accumulator states of a register block: acc[(r * BLOCK_X + i) * MAX_LANES + lane]. */
typedef float acc_t[BLOCK_W * BLOCK_X * MAX_LANES];

/* Add the products of columns [0, len) of rows w[0..nw) and x[0..nx) (x rows ldx apart) to
 * the accumulators. len is a multiple of the lane count except at the end of a row. */
typedef void (*accumulate_fn)(const float *const *w, unsigned nw, const float *x, size_t ldx,
                              unsigned nx, size_t len, float *acc);

typedef struct {
    const char *name;
    accumulate_fn accumulate;
    unsigned lanes;
    unsigned max_nx; /* rows of x per register block (register budget) */
    zm_dequant_fn (*dequant)(uint32_t type);
    zm_fused_fn (*fused)(uint32_t type); /* NULL: none on this path */
} kernels_t;

static ALWAYS_INLINE float reduce8(const float *a) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

static float reduce_lanes(const float *a, unsigned lanes) {
    return lanes == 16 ? reduce8(a) + reduce8(a + 8) : reduce8(a);
}

/* ---------------------------------------------------------------- portable C */

static void accumulate_portable(const float *const *w, unsigned nw, const float *x, size_t ldx,
                                unsigned nx, size_t len, float *acc) {
    for (unsigned r = 0; r < nw; r++)
        for (unsigned i = 0; i < nx; i++) {
            float *a = acc + (r * BLOCK_X + i) * MAX_LANES;
            const float *wr = w[r], *xi = x + i * ldx;
            size_t j = 0;
            for (; j + 8 <= len; j += 8)
                for (int l = 0; l < 8; l++) a[l] += wr[j + l] * xi[j + l];
            for (int l = 0; j + l < len; l++) a[l] += wr[j + l] * xi[j + l];
        }
}

/* ---------------------------------------------------------------- AVX2 + FMA */

static ALWAYS_INLINE TARGET_AVX2 void accumulate_avx2_block(const float *const *w,
                                                            const float *x, size_t ldx,
                                                            size_t len, float *acc,
                                                            const unsigned NW, const unsigned NX) {
    __m256 a[BLOCK_W][2];
    #pragma GCC unroll 16
    for (unsigned r = 0; r < NW; r++)
        #pragma GCC unroll 16
        for (unsigned i = 0; i < NX; i++) a[r][i] = _mm256_loadu_ps(acc + (r * BLOCK_X + i) * MAX_LANES);
    size_t j = 0;
    for (; j + 8 <= len; j += 8) {
        __m256 xv[2];
        #pragma GCC unroll 16
        for (unsigned i = 0; i < NX; i++) xv[i] = _mm256_loadu_ps(x + i * ldx + j);
        #pragma GCC unroll 16
        for (unsigned r = 0; r < NW; r++) {
            __m256 wv = _mm256_loadu_ps(w[r] + j);
            #pragma GCC unroll 16
            for (unsigned i = 0; i < NX; i++) a[r][i] = _mm256_fmadd_ps(wv, xv[i], a[r][i]);
        }
    }
    if (j < len) { /* the row's last columns: masked loads read zeros past them */
        static const int32_t ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
        __m256i mask = _mm256_loadu_si256((const __m256i *)(ones + 8 - (len - j)));
        __m256 xv[2];
        #pragma GCC unroll 16
        for (unsigned i = 0; i < NX; i++) xv[i] = _mm256_maskload_ps(x + i * ldx + j, mask);
        #pragma GCC unroll 16
        for (unsigned r = 0; r < NW; r++) {
            __m256 wv = _mm256_maskload_ps(w[r] + j, mask);
            #pragma GCC unroll 16
            for (unsigned i = 0; i < NX; i++) a[r][i] = _mm256_fmadd_ps(wv, xv[i], a[r][i]);
        }
    }
    #pragma GCC unroll 16
    for (unsigned r = 0; r < NW; r++)
        #pragma GCC unroll 16
        for (unsigned i = 0; i < NX; i++) _mm256_storeu_ps(acc + (r * BLOCK_X + i) * MAX_LANES, a[r][i]);
}

#define CASE(block, a, b) \
    case (a) * 8 + (b): block(w, x, ldx, len, acc, a, b); return;
#define CASES2(block, a) CASE(block, a, 1) CASE(block, a, 2)
#define CASES4(block, a) CASE(block, a, 1) CASE(block, a, 2) CASE(block, a, 3) CASE(block, a, 4)

static TARGET_AVX2 void accumulate_avx2(const float *const *w, unsigned nw, const float *x,
                                        size_t ldx, unsigned nx, size_t len, float *acc) {
    switch (nw * 8 + nx) {
        CASES2(accumulate_avx2_block, 1) CASES2(accumulate_avx2_block, 2)
        CASES2(accumulate_avx2_block, 3) CASES2(accumulate_avx2_block, 4)
    }
}

/* ---------------------------------------------------------------- AVX-512 */

static ALWAYS_INLINE TARGET_AVX512 void accumulate_avx512_block(const float *const *w,
                                                                const float *x, size_t ldx,
                                                                size_t len, float *acc,
                                                                const unsigned NW,
                                                                const unsigned NX) {
    __m512 a[BLOCK_W][BLOCK_X];
    #pragma GCC unroll 16
    for (unsigned r = 0; r < NW; r++)
        #pragma GCC unroll 16
        for (unsigned i = 0; i < NX; i++) a[r][i] = _mm512_loadu_ps(acc + (r * BLOCK_X + i) * MAX_LANES);
    size_t j = 0;
    for (; j + 16 <= len; j += 16) {
        __m512 xv[BLOCK_X];
        #pragma GCC unroll 16
        for (unsigned i = 0; i < NX; i++) xv[i] = _mm512_loadu_ps(x + i * ldx + j);
        #pragma GCC unroll 16
        for (unsigned r = 0; r < NW; r++) {
            __m512 wv = _mm512_loadu_ps(w[r] + j);
            #pragma GCC unroll 16
            for (unsigned i = 0; i < NX; i++) a[r][i] = _mm512_fmadd_ps(wv, xv[i], a[r][i]);
        }
    }
    if (j < len) {
        __mmask16 mask = (__mmask16)((1u << (len - j)) - 1);
        __m512 xv[BLOCK_X];
        #pragma GCC unroll 16
        for (unsigned i = 0; i < NX; i++) xv[i] = _mm512_maskz_loadu_ps(mask, x + i * ldx + j);
        #pragma GCC unroll 16
        for (unsigned r = 0; r < NW; r++) {
            __m512 wv = _mm512_maskz_loadu_ps(mask, w[r] + j);
            #pragma GCC unroll 16
            for (unsigned i = 0; i < NX; i++) a[r][i] = _mm512_fmadd_ps(wv, xv[i], a[r][i]);
        }
    }
    #pragma GCC unroll 16
    for (unsigned r = 0; r < NW; r++)
        #pragma GCC unroll 16
        for (unsigned i = 0; i < NX; i++) _mm512_storeu_ps(acc + (r * BLOCK_X + i) * MAX_LANES, a[r][i]);
}

static TARGET_AVX512 void accumulate_avx512(const float *const *w, unsigned nw, const float *x,
                                            size_t ldx, unsigned nx, size_t len, float *acc) {
    switch (nw * 8 + nx) {
        CASES4(accumulate_avx512_block, 1) CASES4(accumulate_avx512_block, 2)
        CASES4(accumulate_avx512_block, 3) CASES4(accumulate_avx512_block, 4)
    }
}

/* ---------------------------------------------------------------- dispatch */

static const kernels_t paths[] = {
    [ZM_KERNELS_PORTABLE] = {"portable", accumulate_portable, 8, 4, zm_dequant_kernel, NULL},
    [ZM_KERNELS_AVX2] = {"avx2", accumulate_avx2, 8, 2, zm_dequant_kernel_avx2,
                         zm_fused_kernel_avx2},
    [ZM_KERNELS_AVX512] = {"avx512", accumulate_avx512, 16, 4, zm_dequant_kernel_avx512,
                           zm_fused_kernel_avx512},
};

static int current_path = -1;

bool zm_kernels_supported(int path) {
    __builtin_cpu_init();
    switch (path) {
    case ZM_KERNELS_PORTABLE: return true;
    case ZM_KERNELS_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    case ZM_KERNELS_AVX512:
        return zm_kernels_supported(ZM_KERNELS_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512dq");
    default: return false;
    }
}

static int initial_path(void) {
    const char *forced = getenv("ZIGMEM_KERNELS");
    for (int p = 0; forced && p < (int)(sizeof paths / sizeof *paths); p++)
        if (strcmp(forced, paths[p].name) == 0 && zm_kernels_supported(p)) return p;
    for (int p = ZM_KERNELS_AVX512; p > ZM_KERNELS_PORTABLE; p--)
        if (zm_kernels_supported(p)) return p;
    return ZM_KERNELS_PORTABLE;
}

int zm_kernels_get(void) {
    int p = __atomic_load_n(&current_path, __ATOMIC_ACQUIRE);
    if (p < 0) {
        p = initial_path();
        __atomic_store_n(&current_path, p, __ATOMIC_RELEASE);
    }
    return p;
}

int zm_kernels_set(int path) {
    if (!zm_kernels_supported(path)) {
        zm_fail(ZM_ERR_INVALID_ARG, (size_t)path, 0, 0);
        return ZM_ERR_INVALID_ARG;
    }
    __atomic_store_n(&current_path, path, __ATOMIC_RELEASE);
    return ZM_OK;
}

/* ---------------------------------------------------------------- the job */

#define SCRATCH_TARGET (256u << 10) /* a tile of dequantized rows: about half an L2 */
#define CHUNK 256                   /* columns per streaming step: a multiple of every block */

typedef struct {
    zm_dequant_fn dequant;
    const kernels_t *k;
    const uint8_t *w;
    size_t rows, cols, row_bytes, block, block_bytes;
    const float *x;
    size_t n;
    float *out;
    size_t tile_rows;
    bool in_place; /* F32: dot the mapped rows directly */
    bool stream;   /* few rows of x: the streaming schedule */
    zm_fused_fn fused; /* one row of x and a fused kernel for the type: dequantize in registers */
} matmul_job_t;

static void store_results(const matmul_job_t *job, const float *acc, size_t r0, unsigned nw,
                          size_t i0, unsigned nx) {
    for (unsigned r = 0; r < nw; r++)
        for (unsigned i = 0; i < nx; i++)
            job->out[(i0 + i) * job->rows + r0 + r] =
                reduce_lanes(acc + (r * BLOCK_X + i) * MAX_LANES, job->k->lanes);
}

/* Rows [r0, r0 + nw) against every row of x (n <= max_nx), 256 columns at a time. */
static void stream_rows(const matmul_job_t *job, size_t r0, unsigned nw, float *buf) {
    acc_t acc = {0};
    const float *w[BLOCK_W];
    unsigned nx = (unsigned)job->n;
    for (size_t c = 0; c < job->cols; c += CHUNK) {
        size_t len = job->cols - c < CHUNK ? job->cols - c : CHUNK;
        for (unsigned r = 0; r < nw; r++) {
            const uint8_t *row = job->w + (r0 + r) * job->row_bytes;
            if (job->in_place) {
                w[r] = (const float *)row + c;
            } else {
                job->dequant(row + c / job->block * job->block_bytes, len / job->block, buf + r * CHUNK);
                w[r] = buf + r * CHUNK;
            }
        }
        job->k->accumulate(w, nw, job->x + c, job->cols, nx, len, acc);
    }
    store_results(job, acc, r0, nw, 0, nx);
}

/* One row of x against rows [r0, r0 + nw), dequantized in registers. */
static void fused_rows(const matmul_job_t *job, size_t r0, unsigned nw) {
    acc_t acc = {0};
    const uint8_t *w[BLOCK_W];
    for (unsigned r = 0; r < nw; r++) w[r] = job->w + (r0 + r) * job->row_bytes;
    job->fused(w, nw, job->cols / job->block, job->x, acc);
    store_results(job, acc, r0, nw, 0, 1);
}

/* Rows [r, r + n) of W ahead of use, within the task's rows (up to end). */
static void prefetch_rows(const matmul_job_t *job, size_t r, size_t n, size_t end) {
    if (r < end) zm_prefetch(job->w + r * job->row_bytes, (r + n < end ? n : end - r) * job->row_bytes);
}

static void matmul_task(void *arg, size_t task, unsigned worker) {
    const matmul_job_t *job = arg;
    size_t r0 = task * job->tile_rows, cols = job->cols;
    size_t nrows = job->rows - r0 < job->tile_rows ? job->rows - r0 : job->tile_rows;
    if (job->fused || job->stream) { /* one group of rows at a time, the next two prefetched */
        float buf[BLOCK_W * CHUNK] __attribute__((aligned(64)));
        prefetch_rows(job, r0, BLOCK_W, r0 + nrows);
        for (size_t r = 0; r < nrows; r += BLOCK_W) {
            prefetch_rows(job, r0 + r + BLOCK_W * (r ? 2 : 1), BLOCK_W * (r ? 1 : 2), r0 + nrows);
            unsigned nw = nrows - r < BLOCK_W ? (unsigned)(nrows - r) : BLOCK_W;
            if (job->fused) fused_rows(job, r0 + r, nw);
            else stream_rows(job, r0 + r, nw, buf);
        }
        return;
    }
    const float *tile;
    if (job->in_place) {
        tile = (const float *)(job->w + r0 * job->row_bytes);
    } else {
        float *scratch = zm_pool_scratch(worker);
        for (size_t r = 0; r < nrows; r++)
            job->dequant(job->w + (r0 + r) * job->row_bytes, cols / job->block, scratch + r * cols);
        tile = scratch;
    }
    unsigned max_nx = job->k->max_nx;
    for (size_t i = 0; i < job->n; i += max_nx) {
        unsigned nx = job->n - i < max_nx ? (unsigned)(job->n - i) : max_nx;
        for (size_t r = 0; r < nrows; r += BLOCK_W) {
            unsigned nw = nrows - r < BLOCK_W ? (unsigned)(nrows - r) : BLOCK_W;
            const float *w[BLOCK_W];
            #pragma GCC unroll 16
            for (unsigned k = 0; k < nw; k++) w[k] = tile + (r + k) * cols;
            acc_t acc = {0};
            job->k->accumulate(w, nw, job->x + i * cols, cols, nx, cols, acc);
            store_results(job, acc, r0 + r, nw, i, nx);
        }
    }
}

/* Multiply-adds below which a matmul runs on the calling thread alone: waking workers
 * costs more than it saves. */
#define PARALLEL_MIN_WORK (1u << 16)

static bool overlaps(const void *a, size_t a_len, const void *b, size_t b_len) {
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return a_len && b_len && x < y + b_len && y < x + a_len;
}

int zm_quant_matmul(uint32_t type, const void *w, size_t rows, size_t cols, const float *x,
                    size_t n, float *out, unsigned flags) {
    uint32_t block, bytes;
    if (!zm_dequant_kernel(type) || !zm_ggml_type_size(type, &block, &bytes) || cols % block) {
        zm_fail(ZM_ERR_INVALID_ARG, type, 0, 0);
        return ZM_ERR_INVALID_ARG;
    }
    if (!rows || !n) return ZM_OK;
    size_t row_bytes = cols / block * bytes, x_bytes, out_bytes, w_bytes;
    if (__builtin_mul_overflow(n * 4, cols, &x_bytes) || __builtin_mul_overflow(n * 4, rows, &out_bytes) ||
        __builtin_mul_overflow(rows, row_bytes, &w_bytes) || n > SIZE_MAX / 4) {
        zm_fail(ZM_ERR_TOO_LARGE, n, 0, 0);
        return ZM_ERR_TOO_LARGE;
    }
    /* out must not overlap what is read while it is written (report.limit = 1 says so) */
    if (overlaps(out, out_bytes, x, x_bytes) || overlaps(out, out_bytes, w, w_bytes)) {
        zm_fail(ZM_ERR_INVALID_ARG, out_bytes, 1, 0);
        return ZM_ERR_INVALID_ARG;
    }
    if ((flags & ZM_MATMUL_INT16) && zm_int16_supported(type))
        return zm_int16_matmul(type, w, rows, cols, row_bytes, x, n, out, zm_kernels_get());
    size_t scratch_row;
    if (__builtin_mul_overflow(cols, sizeof(float), &scratch_row)) {
        zm_fail(ZM_ERR_TOO_LARGE, cols, 0, 0);
        return ZM_ERR_TOO_LARGE;
    }
    const kernels_t *k = &paths[zm_kernels_get()];
    matmul_job_t job = {
        .dequant = k->dequant(type), .k = k, .w = w, .rows = rows, .cols = cols,
        .row_bytes = row_bytes, .block = block, .block_bytes = bytes, .x = x,
        .n = n, .out = out, .in_place = type == ZM_GGML_F32, .stream = n <= k->max_nx,
    };
    /* Streaming: two long runs of rows per thread (each prefetched ahead). Tiles: the
     * largest that fits the scratch target, so each dequantized row serves every row of x. */
    size_t tile = job.stream ? zm_stream_task_rows(rows) : SCRATCH_TARGET / (scratch_row ? scratch_row : 1);
    if (!job.stream) tile = tile < BLOCK_W ? BLOCK_W : tile > 64 ? 64 : tile & ~(size_t)(BLOCK_W - 1);
    uint64_t work = (uint64_t)rows * cols * n;
    if (work < PARALLEL_MIN_WORK && rows <= 64) tile = rows;
    job.tile_rows = tile;
    if (n == 1 && k->fused) job.fused = k->fused(type);
    size_t n_tasks = (rows + tile - 1) / tile;
    size_t scratch = 0;
    if (!job.in_place && !job.stream && __builtin_mul_overflow(tile, scratch_row, &scratch)) {
        zm_fail(ZM_ERR_TOO_LARGE, cols, 0, 0);
        return ZM_ERR_TOO_LARGE;
    }
    return zm_pool_run(matmul_task, &job, n_tasks, scratch);
}

int zm_quant_rows(uint32_t type, const void *w, size_t rows, size_t cols, const int64_t *ids,
                  size_t n_ids, float *out) {
    uint32_t block, bytes;
    if (!zm_dequant_kernel(type) || !zm_ggml_type_size(type, &block, &bytes) || cols % block) {
        zm_fail(ZM_ERR_INVALID_ARG, type, 0, 0);
        return ZM_ERR_INVALID_ARG;
    }
    for (size_t i = 0; i < n_ids; i++)
        if (ids[i] < 0 || (uint64_t)ids[i] >= rows) {
            zm_fail(ZM_ERR_INVALID_ARG, i, rows, 0);
            return ZM_ERR_INVALID_ARG;
        }
    size_t row_bytes = cols / block * bytes;
    zm_dequant_fn dequant = paths[zm_kernels_get()].dequant(type); /* the same floats */
    for (size_t i = 0; i < n_ids; i++)
        dequant((const uint8_t *)w + (size_t)ids[i] * row_bytes, cols / block, out + i * cols);
    return ZM_OK;
}
