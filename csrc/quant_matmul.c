/* quant_matmul.c — out = x @ W^T with W read in place from its ggml blocks.
 *
 * A task owns a tile of consecutive rows of W. It dequantizes them once into its worker's
 * scratch (bit for bit as dequant.c) and then dots that tile against every row of x, so a
 * prompt of n rows dequantizes W once, not n times. F32 weights are dotted in place.
 *
 * Determinism. Each output element (row r of W, row i of x) is one dot product with its
 * own accumulator: lane l of a vector accumulator sums the products of columns l, l + L,
 * l + 2L, ... in column order (L = 16 with AVX-512, 8 with AVX2 and in portable C), then the
 * lanes are added in a fixed tree. Blocking computes up to 4 x 4 of these dots at once to
 * reuse loads, but never mixes their sums, and the dequantized values are the same floats
 * on every path. So the bits of an element depend only on the columns and the kernel path:
 * not on n, not on which rows share a block or a task, not on the thread count.
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

/* Dot products of nw rows of w (stride ldw) with nx rows of x (stride ldx) over k columns:
 * out[i * ldo + r] = w[r] . x[i]. */
typedef void (*dot_fn)(const float *w, size_t ldw, unsigned nw, const float *x, size_t ldx,
                       unsigned nx, size_t k, float *out, size_t ldo);

typedef struct {
    const char *name;
    dot_fn dot;
    unsigned max_nx; /* rows of x per block (register budget) */
} kernels_t;

/* ---------------------------------------------------------------- portable C */

#define P_LANES 8

static ALWAYS_INLINE float reduce8(const float *a) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

static void dot_portable(const float *w, size_t ldw, unsigned nw, const float *x, size_t ldx,
                         unsigned nx, size_t k, float *out, size_t ldo) {
    for (unsigned i = 0; i < nx; i++) {
        for (unsigned r = 0; r < nw; r++) {
            const float *wr = w + r * ldw, *xi = x + i * ldx;
            float acc[P_LANES] = {0};
            size_t j = 0;
            for (; j + P_LANES <= k; j += P_LANES)
                for (int l = 0; l < P_LANES; l++) acc[l] += wr[j + l] * xi[j + l];
            for (int l = 0; j + l < k; l++) acc[l] += wr[j + l] * xi[j + l];
            out[i * ldo + r] = reduce8(acc);
        }
    }
}

/* ---------------------------------------------------------------- AVX2 + FMA */

static ALWAYS_INLINE TARGET_AVX2 float reduce256(__m256 v) {
    float a[8];
    _mm256_storeu_ps(a, v);
    return reduce8(a);
}

static ALWAYS_INLINE TARGET_AVX2 void dot_avx2_block(const float *w, size_t ldw, const float *x,
                                                     size_t ldx, size_t k, float *out,
                                                     size_t ldo, const unsigned NW,
                                                     const unsigned NX) {
    __m256 acc[4][2];
    for (unsigned r = 0; r < NW; r++)
        for (unsigned i = 0; i < NX; i++) acc[r][i] = _mm256_setzero_ps();
    size_t j = 0;
    for (; j + 8 <= k; j += 8) {
        __m256 xv[2];
        for (unsigned i = 0; i < NX; i++) xv[i] = _mm256_loadu_ps(x + i * ldx + j);
        for (unsigned r = 0; r < NW; r++) {
            __m256 wv = _mm256_loadu_ps(w + r * ldw + j);
            for (unsigned i = 0; i < NX; i++) acc[r][i] = _mm256_fmadd_ps(wv, xv[i], acc[r][i]);
        }
    }
    if (j < k) {
        static const int32_t ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
        __m256i mask = _mm256_loadu_si256((const __m256i *)(ones + 8 - (k - j)));
        __m256 xv[2];
        for (unsigned i = 0; i < NX; i++) xv[i] = _mm256_maskload_ps(x + i * ldx + j, mask);
        for (unsigned r = 0; r < NW; r++) {
            __m256 wv = _mm256_maskload_ps(w + r * ldw + j, mask);
            for (unsigned i = 0; i < NX; i++) acc[r][i] = _mm256_fmadd_ps(wv, xv[i], acc[r][i]);
        }
    }
    for (unsigned r = 0; r < NW; r++)
        for (unsigned i = 0; i < NX; i++) out[i * ldo + r] = reduce256(acc[r][i]);
}

#define DOT_CASE(fn, block, a, b) \
    case (a) * 8 + (b): block(w, ldw, x, ldx, k, out, ldo, a, b); return;

static TARGET_AVX2 void dot_avx2(const float *w, size_t ldw, unsigned nw, const float *x,
                                 size_t ldx, unsigned nx, size_t k, float *out, size_t ldo) {
    switch (nw * 8 + nx) {
        DOT_CASE(dot_avx2, dot_avx2_block, 1, 1) DOT_CASE(dot_avx2, dot_avx2_block, 1, 2)
        DOT_CASE(dot_avx2, dot_avx2_block, 2, 1) DOT_CASE(dot_avx2, dot_avx2_block, 2, 2)
        DOT_CASE(dot_avx2, dot_avx2_block, 3, 1) DOT_CASE(dot_avx2, dot_avx2_block, 3, 2)
        DOT_CASE(dot_avx2, dot_avx2_block, 4, 1) DOT_CASE(dot_avx2, dot_avx2_block, 4, 2)
    }
}

/* ---------------------------------------------------------------- AVX-512 */

static ALWAYS_INLINE TARGET_AVX512 float reduce512(__m512 v) {
    float a[16];
    _mm512_storeu_ps(a, v);
    return (reduce8(a) + reduce8(a + 8));
}

static ALWAYS_INLINE TARGET_AVX512 void dot_avx512_block(const float *w, size_t ldw,
                                                         const float *x, size_t ldx, size_t k,
                                                         float *out, size_t ldo,
                                                         const unsigned NW, const unsigned NX) {
    __m512 acc[4][4];
    for (unsigned r = 0; r < NW; r++)
        for (unsigned i = 0; i < NX; i++) acc[r][i] = _mm512_setzero_ps();
    size_t j = 0;
    for (; j + 16 <= k; j += 16) {
        __m512 xv[4];
        for (unsigned i = 0; i < NX; i++) xv[i] = _mm512_loadu_ps(x + i * ldx + j);
        for (unsigned r = 0; r < NW; r++) {
            __m512 wv = _mm512_loadu_ps(w + r * ldw + j);
            for (unsigned i = 0; i < NX; i++) acc[r][i] = _mm512_fmadd_ps(wv, xv[i], acc[r][i]);
        }
    }
    if (j < k) {
        __mmask16 mask = (__mmask16)((1u << (k - j)) - 1);
        __m512 xv[4];
        for (unsigned i = 0; i < NX; i++) xv[i] = _mm512_maskz_loadu_ps(mask, x + i * ldx + j);
        for (unsigned r = 0; r < NW; r++) {
            __m512 wv = _mm512_maskz_loadu_ps(mask, w + r * ldw + j);
            for (unsigned i = 0; i < NX; i++) acc[r][i] = _mm512_fmadd_ps(wv, xv[i], acc[r][i]);
        }
    }
    for (unsigned r = 0; r < NW; r++)
        for (unsigned i = 0; i < NX; i++) out[i * ldo + r] = reduce512(acc[r][i]);
}

static TARGET_AVX512 void dot_avx512(const float *w, size_t ldw, unsigned nw, const float *x,
                                     size_t ldx, unsigned nx, size_t k, float *out, size_t ldo) {
#define C4(a) DOT_CASE(dot_avx512, dot_avx512_block, a, 1) DOT_CASE(dot_avx512, dot_avx512_block, a, 2) \
              DOT_CASE(dot_avx512, dot_avx512_block, a, 3) DOT_CASE(dot_avx512, dot_avx512_block, a, 4)
    switch (nw * 8 + nx) { C4(1) C4(2) C4(3) C4(4) }
#undef C4
}

/* ---------------------------------------------------------------- dispatch */

static const kernels_t paths[] = {
    [ZM_KERNELS_PORTABLE] = {"portable", dot_portable, 4},
    [ZM_KERNELS_AVX2] = {"avx2", dot_avx2, 2},
    [ZM_KERNELS_AVX512] = {"avx512", dot_avx512, 4},
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

typedef struct {
    zm_dequant_fn dequant;
    const kernels_t *k;
    const uint8_t *w;
    size_t rows, cols, row_bytes, blocks_per_row;
    const float *x;
    size_t n;
    float *out;
    size_t tile_rows;
    bool in_place; /* F32: dot the mapped rows directly */
} matmul_job_t;

static void matmul_task(void *arg, size_t task, unsigned worker) {
    const matmul_job_t *job = arg;
    size_t r0 = task * job->tile_rows, cols = job->cols;
    size_t nrows = job->rows - r0 < job->tile_rows ? job->rows - r0 : job->tile_rows;
    const float *tile;
    if (job->in_place) {
        tile = (const float *)(job->w + r0 * job->row_bytes);
    } else {
        float *scratch = zm_pool_scratch(worker);
        for (size_t r = 0; r < nrows; r++)
            job->dequant(job->w + (r0 + r) * job->row_bytes, job->blocks_per_row, scratch + r * cols);
        tile = scratch;
    }
    unsigned max_nx = job->k->max_nx;
    for (size_t i = 0; i < job->n; i += max_nx) {
        unsigned nx = job->n - i < max_nx ? (unsigned)(job->n - i) : max_nx;
        for (size_t r = 0; r < nrows; r += 4) {
            unsigned nw = nrows - r < 4 ? (unsigned)(nrows - r) : 4;
            job->k->dot(tile + r * cols, cols, nw, job->x + i * cols, cols, nx, cols,
                        job->out + i * job->rows + r0 + r, job->rows);
        }
    }
}

/* Elements below which a matmul runs on the calling thread alone: waking workers costs
 * more than it saves. */
#define PARALLEL_MIN_WORK (1u << 16)

int zm_quant_matmul(uint32_t type, const void *w, size_t rows, size_t cols, const float *x,
                    size_t n, float *out) {
    uint32_t block, bytes;
    zm_dequant_fn dequant = zm_dequant_kernel(type);
    if (!dequant || !zm_ggml_type_size(type, &block, &bytes) || cols % block) {
        zm_fail(ZM_ERR_INVALID_ARG, type, 0, 0);
        return ZM_ERR_INVALID_ARG;
    }
    if (!rows || !n) return ZM_OK;
    size_t scratch_row;
    if (__builtin_mul_overflow(cols, sizeof(float), &scratch_row)) {
        zm_fail(ZM_ERR_TOO_LARGE, cols, 0, 0);
        return ZM_ERR_TOO_LARGE;
    }
    matmul_job_t job = {
        .dequant = dequant, .k = &paths[zm_kernels_get()], .w = w, .rows = rows, .cols = cols,
        .row_bytes = cols / block * bytes, .blocks_per_row = cols / block, .x = x, .n = n,
        .out = out, .in_place = type == ZM_GGML_F32,
    };
    /* Few rows of x: small tiles stay in L1/L2 and spread over the threads; many rows: the
     * largest tile that fits the scratch target, so each dequantized row serves them all. */
    size_t tile = n <= 4 ? 4 : SCRATCH_TARGET / (scratch_row ? scratch_row : 1);
    tile = tile < 4 ? 4 : tile > 64 ? 64 : tile & ~(size_t)3;
    uint64_t work = (uint64_t)rows * cols * n;
    if (work < PARALLEL_MIN_WORK && rows <= 64) tile = rows;
    job.tile_rows = tile;
    size_t n_tasks = (rows + tile - 1) / tile;
    size_t scratch = 0;
    if (!job.in_place && __builtin_mul_overflow(tile, scratch_row, &scratch)) {
        zm_fail(ZM_ERR_TOO_LARGE, cols, 0, 0);
        return ZM_ERR_TOO_LARGE;
    }
    return zm_pool_run(matmul_task, &job, n_tasks, scratch);
}

int zm_quant_rows(uint32_t type, const void *w, size_t rows, size_t cols, const int64_t *ids,
                  size_t n_ids, float *out) {
    uint32_t block, bytes;
    zm_dequant_fn dequant = zm_dequant_kernel(type);
    if (!dequant || !zm_ggml_type_size(type, &block, &bytes) || cols % block) {
        zm_fail(ZM_ERR_INVALID_ARG, type, 0, 0);
        return ZM_ERR_INVALID_ARG;
    }
    for (size_t i = 0; i < n_ids; i++)
        if (ids[i] < 0 || (uint64_t)ids[i] >= rows) {
            zm_fail(ZM_ERR_INVALID_ARG, i, rows, 0);
            return ZM_ERR_INVALID_ARG;
        }
    size_t row_bytes = cols / block * bytes;
    for (size_t i = 0; i < n_ids; i++)
        dequant((const uint8_t *)w + (size_t)ids[i] * row_bytes, cols / block, out + i * cols);
    return ZM_OK;
}
