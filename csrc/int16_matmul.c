/* int16_matmul.c — out = x @ W^T with the activations quantized to 16 bits: integer dots.
 *
 * Why. A decode step multiplies one row of x by every weight once, so its cost is the work
 * per weight. In float, every weight is dequantized to a float and multiplied (quant_matmul.c);
 * here the weights stay small integers and meet x as int16 in one multiply-add of 32 pairs
 * (vpmaddwd), leaving one conversion and one scaled add per 32 weights. llama.cpp does the
 * same with int8 activations (Q8_0/Q8_K), which costs it accuracy (min cosine ~0.96-0.99
 * against float32 logits); 16 bits keep x within 2^-16 of each block's largest value.
 *
 * The arithmetic, one definition for every kernel path (so paths agree bit for bit):
 *   x, per row: first multiplied by the power of two p that brings the row's largest
 *     magnitude into [0.5, 1) (row_power: exact, and tiny or huge rows stay in range); then
 *     per chunk c of 32 columns: amax = max |x|, s[c] = amax / 32767,
 *     X = round-to-nearest-even(x * (32767 / amax)) as int16 (0 when amax is 0), and
 *     xs[2c + h] = s[c] * (sum of the 16 X of half h). A row with a NaN or infinity gets
 *     s = NaN: its outputs are NaN.
 *   W, per chunk of 32 columns of a row (the part_* functions): 32 integers w, a float dw and a
 *     minimum per half, mw[h], such that element j is dw * w[j] + mw[j / 16] (K-quant
 *     sub-block scales are folded into w; they fit int16 for every type).
 *   Each output element keeps 16 float lanes and a float offset:
 *     D[l] = w[2l] X[2l] + w[2l+1] X[2l+1] (exact, int32),
 *     lane[l] = fma((float)D[l], dw * s[c], lane[l]), off = fma(mw[h], xs[2c+h], off),
 *   chunk by chunk in column order; the result is the lanes added in a fixed tree, plus off,
 *   times 1 / p.
 * Each element of x thus moves by at most half a step of its block (amax / 65534): an
 * element much smaller than its block's largest keeps correspondingly fewer bits.
 * Each element depends only on its own row of x and row of W: the results are the same
 * for every n, every row's neighbours and every thread count (batch invariant), and the
 * same on the portable, AVX2 and AVX-512 paths.
 *
 * Tasks get long runs of W rows (two tasks per thread) and loop over x four rows at a time,
 * so a chunk of W is decoded once per four rows of x; software prefetches keep the weights
 * streaming (4 KiB file pages stop the hardware prefetchers, and rows are read once). x is
 * quantized once per matmul, by the caller, into the pool's shared scratch. */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "internal.h"

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define ALWAYS_INLINE inline __attribute__((always_inline))
#define BLOCK_W 4
#define BLOCK_X 4
/* Software prefetch runs this many 4-row groups ahead: file pages are 4 KiB, where the
 * hardware prefetchers stop, and a decode step reads each weight once, cold. */
#define PREFETCH_GROUPS 2
/* The K-quants' 8 sub-blocks unrolled: their scale indexes become constants (Q4_K streams
 * ~1.4x faster). Sanitizer builds keep the loop rolled: the same results, and minutes less
 * of compiling. */
#ifdef __SANITIZE_ADDRESS__
#define UNROLL_PARTS _Pragma("GCC unroll 1")
#else
#define UNROLL_PARTS _Pragma("GCC unroll 8")
#endif

static inline uint32_t load32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline float half_at(const uint8_t *p) { return zm_half_to_float((uint16_t)(p[0] | p[1] << 8)); }

/* ---------------------------------------------------------------- W: chunks as integers */

typedef struct {
    int16_t w[32] __attribute__((aligned(64)));
    float dw, mw[2];
} chunk_t;

/* Chunk c (32 elements) of the block at src. */
typedef void (*part_fn)(const uint8_t *src, unsigned c, chunk_t *out);

static void part_q4_0(const uint8_t *src, unsigned c, chunk_t *o) {
    (void)c;
    for (int j = 0; j < 16; j++) {
        o->w[j] = (int16_t)((src[2 + j] & 0x0f) - 8);
        o->w[j + 16] = (int16_t)((src[2 + j] >> 4) - 8);
    }
    o->dw = half_at(src), o->mw[0] = o->mw[1] = 0;
}

static void part_q4_1(const uint8_t *src, unsigned c, chunk_t *o) {
    (void)c;
    for (int j = 0; j < 16; j++) {
        o->w[j] = (int16_t)(src[4 + j] & 0x0f);
        o->w[j + 16] = (int16_t)(src[4 + j] >> 4);
    }
    o->dw = half_at(src), o->mw[0] = o->mw[1] = half_at(src + 2);
}

static void part_q5(const uint8_t *q, uint32_t qh, int offset, chunk_t *o) {
    for (int j = 0; j < 16; j++) {
        o->w[j] = (int16_t)(((q[j] & 0x0f) | (int)((qh >> j) & 1) << 4) - offset);
        o->w[j + 16] = (int16_t)(((q[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4) - offset);
    }
}

static void part_q5_0(const uint8_t *src, unsigned c, chunk_t *o) {
    (void)c;
    part_q5(src + 6, load32(src + 2), 16, o);
    o->dw = half_at(src), o->mw[0] = o->mw[1] = 0;
}

static void part_q5_1(const uint8_t *src, unsigned c, chunk_t *o) {
    (void)c;
    part_q5(src + 8, load32(src + 4), 0, o);
    o->dw = half_at(src), o->mw[0] = o->mw[1] = half_at(src + 2);
}

static void part_q8_0(const uint8_t *src, unsigned c, chunk_t *o) {
    (void)c;
    for (int j = 0; j < 32; j++) o->w[j] = (int8_t)src[2 + j];
    o->dw = half_at(src), o->mw[0] = o->mw[1] = 0;
}

static void part_iq4_nl(const uint8_t *src, unsigned c, chunk_t *o) {
    (void)c;
    for (int j = 0; j < 16; j++) {
        o->w[j] = zm_iq4nl_values[src[2 + j] & 0x0f];
        o->w[j + 16] = zm_iq4nl_values[src[2 + j] >> 4];
    }
    o->dw = half_at(src), o->mw[0] = o->mw[1] = 0;
}

/* Q2_K / Q3_K: chunk c is (h, j) = (c / 4, c % 4); element l takes bits 2j of
 * qs[32 h + l] and lies in sub-block 8 h + 2 j + l / 16 (see dequant.c). */
static void part_q2_k(const uint8_t *src, unsigned c, chunk_t *o) {
    const uint8_t *scales = src, *qs = src + 16 + 32 * (c >> 2);
    unsigned j = c & 3;
    float dmin = half_at(src + 82);
    for (int half = 0; half < 2; half++) {
        uint8_t s = scales[2 * c + half]; /* 8 h + 2 j + half */
        for (int l = 16 * half; l < 16 * half + 16; l++) o->w[l] = (int16_t)((s & 0x0f) * ((qs[l] >> (2 * j)) & 3));
        o->mw[half] = -(dmin * (float)(s >> 4));
    }
    o->dw = half_at(src + 80);
}

static void part_q3_k(const uint8_t *src, unsigned c, chunk_t *o) {
    const uint8_t *hmask = src, *qs = src + 32 + 32 * (c >> 2), *sc = src + 96;
    unsigned h = c >> 2, j = c & 3;
    for (int half = 0; half < 2; half++) {
        unsigned s = 2 * c + half;
        int lo = (sc[s & 7] >> (4 * (s >> 3))) & 0x0f, hi = (sc[8 + (s & 3)] >> (2 * (s >> 2))) & 3;
        int scale = (lo | hi << 4) - 32;
        for (int l = 16 * half; l < 16 * half + 16; l++) {
            int low = (qs[l] >> (2 * j)) & 3, high = (hmask[l] >> (4 * h + j)) & 1;
            o->w[l] = (int16_t)(scale * (low - (high ? 0 : 4)));
        }
    }
    o->dw = half_at(src + 108), o->mw[0] = o->mw[1] = 0;
}

static inline void scale_min_k4(const uint8_t *scales, unsigned s, int *sc, int *m) {
    if (s < 4) {
        *sc = scales[s] & 0x3f;
        *m = scales[s + 4] & 0x3f;
    } else {
        *sc = (scales[s + 4] & 0x0f) | ((scales[s - 4] >> 2) & 0x30);
        *m = (scales[s + 4] >> 4) | ((scales[s] >> 2) & 0x30);
    }
}

/* Q4_K / Q5_K: chunk c is sub-block c, nibble c & 1 of qs[32 (c / 2) + l] (+ bit c of qh[l]). */
static void part_k4(const uint8_t *src, const uint8_t *qh, const uint8_t *qs, unsigned c, chunk_t *o) {
    int sc, m;
    scale_min_k4(src + 4, c, &sc, &m);
    const uint8_t *q = qs + 32 * (c >> 1);
    for (int l = 0; l < 32; l++) {
        int v = (q[l] >> (4 * (c & 1))) & 0x0f;
        if (qh) v |= ((qh[l] >> c) & 1) << 4;
        o->w[l] = (int16_t)(sc * v);
    }
    o->dw = half_at(src), o->mw[0] = o->mw[1] = -(half_at(src + 2) * (float)m);
}

static void part_q4_k(const uint8_t *src, unsigned c, chunk_t *o) { part_k4(src, NULL, src + 16, c, o); }
static void part_q5_k(const uint8_t *src, unsigned c, chunk_t *o) { part_k4(src, src + 16, src + 48, c, o); }

static void part_q6_k(const uint8_t *src, unsigned c, chunk_t *o) {
    const uint8_t *ql = src, *qh = src + 128;
    const int8_t *scales = (const int8_t *)(src + 192);
    for (int l = 0; l < 32; l++) {
        unsigned e = 32 * c + l, h = e >> 7, k = (e >> 6) & 1, j = (e >> 5) & 3;
        int low = (ql[64 * h + (e & 63)] >> (4 * k)) & 0x0f, high = (qh[32 * h + l] >> (2 * j)) & 3;
        o->w[l] = (int16_t)(scales[e >> 4] * ((low | high << 4) - 32));
    }
    o->dw = half_at(src + 208), o->mw[0] = o->mw[1] = 0;
}

static part_fn part_of(uint32_t type) {
    switch (type) {
    case ZM_GGML_Q4_0: return part_q4_0;
    case ZM_GGML_Q4_1: return part_q4_1;
    case ZM_GGML_Q5_0: return part_q5_0;
    case ZM_GGML_Q5_1: return part_q5_1;
    case ZM_GGML_Q8_0: return part_q8_0;
    case ZM_GGML_IQ4_NL: return part_iq4_nl;
    case ZM_GGML_Q2_K: return part_q2_k;
    case ZM_GGML_Q3_K: return part_q3_k;
    case ZM_GGML_Q4_K: return part_q4_k;
    case ZM_GGML_Q5_K: return part_q5_k;
    case ZM_GGML_Q6_K: return part_q6_k;
    default: return NULL;
    }
}

bool zm_int16_supported(uint32_t type) { return part_of(type) != NULL; }

/* ---------------------------------------------------------------- x: rows as int16 */

/* One quantized row: X[cols], then s[cols / 32], then xs[cols / 16], then its unscale; rows
 * `stride` apart. */
static size_t row_stride(size_t cols) {
    size_t bytes = cols * 2 + cols / 32 * 4 + cols / 16 * 4 + 4;
    return (bytes + 63) & ~(size_t)63;
}

static inline float *row_scales(const uint8_t *row, size_t cols) { return (float *)(row + cols * 2); }
static inline float row_unscale(const uint8_t *row, size_t cols) { return row_scales(row, cols)[cols / 32 + cols / 16]; }

/* Rounding to nearest even by adding and subtracting 1.5 * 2^23: exact for |v| < 2^22, the
 * same as the vector conversion (cvtps) in the default rounding mode, and no libm call. */
#define ROUNDER 12582912.0f

/* The block's scales: 32767 / amax to quantize with, amax / 32767 to keep. */
static inline void block_scales(float amax, float *id, float *s) {
    *id = amax > 0 ? 32767.0f / amax : 0;
    *s = amax / 32767.0f;
}

/* A row is first scaled by a power of two that brings its largest magnitude into [0.5, 1)
 * (exact; the results are scaled back at the end), so a row of tiny or huge values keeps
 * its block scales and sums inside the normal float range. For a row whose values are
 * around 1 this changes no bit. Returns the scale; *unscale is its inverse. */
static float row_power(float amax, float *unscale) {
    int e = 0;
    if (amax > 0) frexpf(amax, &e);
    int k = -e < -126 ? -126 : -e > 126 ? 126 : -e;
    *unscale = ldexpf(1.0f, -k);
    return ldexpf(1.0f, k);
}

static void quantize_row(const float *x, size_t cols, uint8_t *row) {
    int16_t *X = (int16_t *)row;
    float *s = row_scales(row, cols), *xs = s + cols / 32, row_max = 0;
    bool finite = true;
    for (size_t j = 0; j < cols; j++) {
        finite &= isfinite(x[j]);
        row_max = fabsf(x[j]) > row_max ? fabsf(x[j]) : row_max;
    }
    float p = row_power(finite ? row_max : 0, &xs[cols / 16]);
    for (size_t c = 0; c < cols / 32; c++) {
        float v[32], amax = 0, id;
        for (int j = 0; j < 32; j++) {
            v[j] = finite ? x[32 * c + j] * p : 0;
            amax = fabsf(v[j]) > amax ? fabsf(v[j]) : amax;
        }
        block_scales(amax, &id, &s[c]);
        for (int h = 0; h < 2; h++) {
            int32_t sum = 0;
            for (int j = 16 * h; j < 16 * h + 16; j++) {
                X[32 * c + j] = (int16_t)((v[j] * id + ROUNDER) - ROUNDER);
                sum += X[32 * c + j];
            }
            xs[2 * c + h] = s[c] * (float)sum;
        }
        if (!finite) s[c] = NAN;
    }
}

/* The same values, 32 at a time. */
static TARGET void quantize_row_avx512(const float *x, size_t cols, uint8_t *row) {
    int16_t *X = (int16_t *)row;
    float *s = row_scales(row, cols), *xs = s + cols / 32;
    __mmask16 bad = 0;
    __m512 top = _mm512_setzero_ps();
    for (size_t j = 0; j < cols; j += 16) { /* NaN (quiet, signalling) or infinity */
        __m512 v = _mm512_loadu_ps(x + j);
        bad |= _mm512_fpclass_ps_mask(v, 0x01 | 0x80 | 0x08 | 0x10);
        top = _mm512_max_ps(top, _mm512_abs_ps(v));
    }
    const __m512 rounder = _mm512_set1_ps(ROUNDER);
    const __m512 p = _mm512_set1_ps(row_power(bad ? 0 : _mm512_reduce_max_ps(top), &xs[cols / 16]));
    for (size_t c = 0; c < cols / 32; c++) {
        __m512 v0 = _mm512_mul_ps(_mm512_loadu_ps(x + 32 * c), p);
        __m512 v1 = _mm512_mul_ps(_mm512_loadu_ps(x + 32 * c + 16), p), id;
        float amax = bad ? 0 : _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float idf;
        block_scales(amax, &idf, &s[c]);
        id = _mm512_set1_ps(bad ? 0 : idf);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(v0, id), rounder), rounder));
        __m512i q1 = _mm512_cvtps_epi32(_mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(v1, id), rounder), rounder));
        _mm256_storeu_si256((__m256i *)(X + 32 * c), _mm512_cvtepi32_epi16(q0));
        _mm256_storeu_si256((__m256i *)(X + 32 * c + 16), _mm512_cvtepi32_epi16(q1));
        xs[2 * c] = s[c] * (float)_mm512_reduce_add_epi32(q0);
        xs[2 * c + 1] = s[c] * (float)_mm512_reduce_add_epi32(q1);
        if (bad) s[c] = NAN;
    }
}

/* ---------------------------------------------------------------- the job */

typedef struct int16_job int16_job_t;
typedef void (*rows_fn)(const int16_job_t *job, size_t r0, unsigned nw, size_t i0, unsigned nx);

struct int16_job {
    part_fn part;
    rows_fn rows_kernel;
    const uint8_t *w;
    size_t rows, cols, row_bytes, block_bytes, chunks_per_block;
    const float *x;
    size_t n, stride;
    const uint8_t *xq; /* the quantized rows of x (the pool's shared scratch) */
    float *out;
    size_t task_rows;
    bool avx512;  /* quantize x with the AVX-512 code (the same values) */
    bool has_min; /* the type has minimums (mw); without, off stays 0 and is skipped */
};

static ALWAYS_INLINE float reduce16(const float *a) {
    float lo = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    float hi = ((a[8] + a[9]) + (a[10] + a[11])) + ((a[12] + a[13]) + (a[14] + a[15]));
    return lo + hi;
}

static ALWAYS_INLINE const uint8_t *block_of(const int16_job_t *job, size_t r, size_t c) {
    return job->w + r * job->row_bytes + c / job->chunks_per_block * job->block_bytes;
}

/* Portable: one output element at a time, chunk by chunk, exactly as the header says. */
static void rows_portable(const int16_job_t *job, size_t r0, unsigned nw, size_t i0, unsigned nx) {
    size_t chunks = job->cols / 32;
    for (unsigned r = 0; r < nw; r++)
        for (unsigned i = 0; i < nx; i++) {
            const uint8_t *row = job->xq + (i0 + i) * job->stride;
            const int16_t *X = (const int16_t *)row;
            const float *s = row_scales(row, job->cols), *xs = s + chunks;
            float lane[16] = {0}, off = 0;
            chunk_t ch;
            for (size_t c = 0; c < chunks; c++) {
                job->part(block_of(job, r0 + r, c), (unsigned)(c % job->chunks_per_block), &ch);
                float scale = ch.dw * s[c];
                for (int l = 0; l < 16; l++) {
                    int32_t d = ch.w[2 * l] * X[32 * c + 2 * l] + ch.w[2 * l + 1] * X[32 * c + 2 * l + 1];
                    lane[l] = fmaf((float)d, scale, lane[l]);
                }
                if (job->has_min) {
                    off = fmaf(ch.mw[0], xs[2 * c], off);
                    off = fmaf(ch.mw[1], xs[2 * c + 1], off);
                }
            }
            job->out[(i0 + i) * job->rows + r0 + r] = (reduce16(lane) + off) * row_unscale(row, job->cols);
        }
}

/* ---------------------------------------------------------------- bytes of a K-quant chunk
 *
 * Shared by the AVX2 and AVX-512 parts (AVX-512 machines have AVX2): a chunk's 32 quants as
 * bytes, before widening to int16. */

#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))

/* Q4_K / Q5_K chunk c: nibble c & 1 of qs[32 (c / 2) + l], plus 16 where bit c of qh[l]. */
static ALWAYS_INLINE TARGET_AVX2 __m256i k4_bytes(uint32_t type, const uint8_t *src, unsigned c) {
    const uint8_t *qs = src + (type == ZM_GGML_Q4_K ? 16 : 48) + 32 * (c >> 1);
    __m256i b = _mm256_loadu_si256((const __m256i *)qs);
    if (c & 1) b = _mm256_srli_epi16(b, 4);
    b = _mm256_and_si256(b, _mm256_set1_epi8(0x0f));
    if (type == ZM_GGML_Q5_K) {
        __m256i bit = _mm256_set1_epi8((char)(1u << c));
        __m256i qh = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(src + 16)), bit);
        b = _mm256_add_epi8(b, _mm256_and_si256(_mm256_cmpeq_epi8(qh, bit), _mm256_set1_epi8(16)));
    }
    return b;
}

/* Q6_K chunk c: the 6-bit quants (0..63), see part_q6_k. */
static ALWAYS_INLINE TARGET_AVX2 __m256i q6_k_bytes(const uint8_t *src, unsigned c) {
    unsigned h = c >> 2, k = (c >> 1) & 1, j = c & 3;
    __m256i low = _mm256_loadu_si256((const __m256i *)(src + 64 * h + 32 * (c & 1)));
    __m256i high = _mm256_loadu_si256((const __m256i *)(src + 128 + 32 * h));
    low = _mm256_and_si256(_mm256_srli_epi16(low, 4 * k), _mm256_set1_epi8(0x0f));
    high = _mm256_and_si256(_mm256_srli_epi16(high, 2 * j), _mm256_set1_epi8(3));
    return _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
}

/* ---------------------------------------------------------------- AVX-512 */

typedef struct {
    __m512i w;
    float dw, mw[2];
} vchunk_t;

/* 16 bytes -> 32 int16: low nibbles (elements 0..15), then high nibbles (16..31). */
static ALWAYS_INLINE TARGET __m512i nibbles16(const uint8_t *q) {
    __m128i b = _mm_loadu_si128((const __m128i *)q), m = _mm_set1_epi8(0x0f);
    __m256i both = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
    return _mm512_cvtepu8_epi16(both);
}

static ALWAYS_INLINE TARGET float vhalf(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static ALWAYS_INLINE TARGET void vpart(uint32_t type, part_fn part, const uint8_t *src,
                                       unsigned c, vchunk_t *o) {
    switch (type) {
    case ZM_GGML_Q4_0:
        o->w = _mm512_sub_epi16(nibbles16(src + 2), _mm512_set1_epi16(8));
        o->dw = vhalf(src), o->mw[0] = o->mw[1] = 0;
        return;
    case ZM_GGML_Q4_1:
        o->w = nibbles16(src + 4);
        o->dw = vhalf(src), o->mw[0] = o->mw[1] = vhalf(src + 2);
        return;
    case ZM_GGML_Q5_0:
        o->w = _mm512_mask_add_epi16(nibbles16(src + 6), (__mmask32)load32(src + 2),
                                     nibbles16(src + 6), _mm512_set1_epi16(16));
        o->w = _mm512_sub_epi16(o->w, _mm512_set1_epi16(16));
        o->dw = vhalf(src), o->mw[0] = o->mw[1] = 0;
        return;
    case ZM_GGML_Q5_1: {
        __m512i q = nibbles16(src + 8);
        o->w = _mm512_mask_add_epi16(q, (__mmask32)load32(src + 4), q, _mm512_set1_epi16(16));
        o->dw = vhalf(src), o->mw[0] = o->mw[1] = vhalf(src + 2);
        return;
    }
    case ZM_GGML_Q8_0:
        o->w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(src + 2)));
        o->dw = vhalf(src), o->mw[0] = o->mw[1] = 0;
        return;
    case ZM_GGML_Q4_K:
    case ZM_GGML_Q5_K: {
        __m256i b = k4_bytes(type, src, c);
        int sc, m;
        scale_min_k4(src + 4, c, &sc, &m);
        o->w = _mm512_mullo_epi16(_mm512_cvtepu8_epi16(b), _mm512_set1_epi16((short)sc));
        o->dw = vhalf(src), o->mw[0] = o->mw[1] = -(vhalf(src + 2) * (float)m);
        return;
    }
    case ZM_GGML_Q6_K: {
        __m512i q = _mm512_cvtepu8_epi16(q6_k_bytes(src, c));
        const int8_t *scales = (const int8_t *)(src + 192);
        __m512i sc = _mm512_mask_blend_epi16(0xffff0000u, _mm512_set1_epi16(scales[2 * c]),
                                             _mm512_set1_epi16(scales[2 * c + 1]));
        o->w = _mm512_mullo_epi16(_mm512_sub_epi16(q, _mm512_set1_epi16(32)), sc);
        o->dw = vhalf(src + 208), o->mw[0] = o->mw[1] = 0;
        return;
    }
    default: { /* IQ4_NL, Q2_K, Q3_K: the portable part, loaded */
        chunk_t ch;
        part(src, c, &ch);
        o->w = _mm512_load_si512(ch.w);
        o->dw = ch.dw, o->mw[0] = ch.mw[0], o->mw[1] = ch.mw[1];
        return;
    }
    }
}

static ALWAYS_INLINE bool has_min(uint32_t type) {
    return type == ZM_GGML_Q4_1 || type == ZM_GGML_Q5_1 || type == ZM_GGML_Q4_K ||
           type == ZM_GGML_Q5_K || type == ZM_GGML_Q2_K;
}

/* Chunks per block: 8 for the K-quants, 1 for the 32-element formats. */
static ALWAYS_INLINE unsigned chunks_per_block(uint32_t type) {
    switch (type) {
    case ZM_GGML_Q2_K: case ZM_GGML_Q3_K: case ZM_GGML_Q4_K: case ZM_GGML_Q5_K:
    case ZM_GGML_Q6_K: return 8;
    default: return 1;
    }
}

/* reduce16's tree with shuffles, bit for bit (each addition has the same two operands, and
 * IEEE addition commutes): ((a0+a1)+(a2+a3))+((a4+a5)+(a6+a7)) per half, then the halves. */
static ALWAYS_INLINE TARGET float reduce16_avx512(__m512 v) {
    v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xb1));       /* lane 2j: a2j + a2j+1 */
    v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4e));       /* lane 4j: pairs of pairs */
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xb1)); /* lanes 0 and 8: the halves */
    return _mm512_cvtss_f32(v) + _mm512_cvtss_f32(_mm512_shuffle_f32x4(v, v, 0x02));
}

static ALWAYS_INLINE TARGET void rows_avx512_block(const int16_job_t *job, uint32_t type,
                                                   size_t r0, size_t i0, const unsigned NW,
                                                   const unsigned NX) {
    size_t chunks = job->cols / 32;
    const unsigned CPB = chunks_per_block(type);
    __m512 acc[BLOCK_W][BLOCK_X];
    float off[BLOCK_W][BLOCK_X];
    const int16_t *X[BLOCK_X];
    const float *s[BLOCK_X], *xs[BLOCK_X];
    const uint8_t *w_row[BLOCK_W];
    #pragma GCC unroll 16
    for (unsigned r = 0; r < NW; r++) w_row[r] = job->w + (r0 + r) * job->row_bytes;
    #pragma GCC unroll 16
    for (unsigned i = 0; i < NX; i++) {
        const uint8_t *row = job->xq + (i0 + i) * job->stride;
        X[i] = (const int16_t *)row;
        s[i] = row_scales(row, job->cols);
        xs[i] = s[i] + chunks;
        #pragma GCC unroll 16
        for (unsigned r = 0; r < NW; r++) acc[r][i] = _mm512_setzero_ps(), off[r][i] = 0;
    }
    for (size_t c0 = 0, b = 0; c0 < chunks; c0 += CPB, b += job->block_bytes)
        UNROLL_PARTS
        for (unsigned part = 0; part < CPB; part++) {
            size_t c = c0 + part;
            vchunk_t w[BLOCK_W];
            if (PREFETCH_GROUPS) { /* the rows PREFETCH_GROUPS groups on, as far along */
                const uint8_t *ahead = w_row[0] + PREFETCH_GROUPS * BLOCK_W * job->row_bytes +
                                       BLOCK_W * (b + part * job->block_bytes / CPB);
                _mm_prefetch((const char *)ahead, _MM_HINT_T0);
                _mm_prefetch((const char *)ahead + 64, _MM_HINT_T0);
                _mm_prefetch((const char *)ahead + 128, _MM_HINT_T0);
            }
            #pragma GCC unroll 16
            for (unsigned r = 0; r < NW; r++) vpart(type, job->part, w_row[r] + b, part, &w[r]);
            #pragma GCC unroll 16
            for (unsigned i = 0; i < NX; i++) {
                __m512i xv = _mm512_load_si512(X[i] + 32 * c);
                float sc = s[i][c], xs0 = xs[i][2 * c], xs1 = xs[i][2 * c + 1];
                #pragma GCC unroll 16
                for (unsigned r = 0; r < NW; r++) {
                    __m512 d = _mm512_cvtepi32_ps(_mm512_madd_epi16(w[r].w, xv));
                    acc[r][i] = _mm512_fmadd_ps(d, _mm512_set1_ps(w[r].dw * sc), acc[r][i]);
                    if (has_min(type)) {
                        off[r][i] = fmaf(w[r].mw[0], xs0, off[r][i]);
                        off[r][i] = fmaf(w[r].mw[1], xs1, off[r][i]);
                    }
                }
            }
        }
    #pragma GCC unroll 16
    for (unsigned r = 0; r < NW; r++)
        #pragma GCC unroll 16
        for (unsigned i = 0; i < NX; i++)
            job->out[(i0 + i) * job->rows + r0 + r] = (reduce16_avx512(acc[r][i]) + off[r][i]) *
                                                      row_unscale(job->xq + (i0 + i) * job->stride, job->cols);
}

#define CASE(type, a, b) \
    case (a) * 8 + (b): rows_avx512_block(job, type, r0, i0, a, b); return;
#define CASES(type, a) CASE(type, a, 1) CASE(type, a, 2) CASE(type, a, 3) CASE(type, a, 4)
#define DEFINE_ROWS(name, type)                                                               \
    static TARGET void rows_avx512_##name(const int16_job_t *job, size_t r0, unsigned nw,    \
                                          size_t i0, unsigned nx) {                          \
        switch (nw * 8 + nx) { CASES(type, 1) CASES(type, 4) } \
    }

DEFINE_ROWS(q4_0, ZM_GGML_Q4_0)
DEFINE_ROWS(q4_1, ZM_GGML_Q4_1)
DEFINE_ROWS(q5_0, ZM_GGML_Q5_0)
DEFINE_ROWS(q5_1, ZM_GGML_Q5_1)
DEFINE_ROWS(q8_0, ZM_GGML_Q8_0)
DEFINE_ROWS(q4_k, ZM_GGML_Q4_K)
DEFINE_ROWS(q5_k, ZM_GGML_Q5_K)
DEFINE_ROWS(q6_k, ZM_GGML_Q6_K)
DEFINE_ROWS(iq4_nl, ZM_GGML_IQ4_NL) /* these three: the portable parts, loaded */
DEFINE_ROWS(q2_k, ZM_GGML_Q2_K)
DEFINE_ROWS(q3_k, ZM_GGML_Q3_K)

static rows_fn rows_avx512(uint32_t type) {
    switch (type) {
    case ZM_GGML_Q4_0: return rows_avx512_q4_0;
    case ZM_GGML_Q4_1: return rows_avx512_q4_1;
    case ZM_GGML_Q5_0: return rows_avx512_q5_0;
    case ZM_GGML_Q5_1: return rows_avx512_q5_1;
    case ZM_GGML_Q8_0: return rows_avx512_q8_0;
    case ZM_GGML_Q4_K: return rows_avx512_q4_k;
    case ZM_GGML_Q5_K: return rows_avx512_q5_k;
    case ZM_GGML_Q6_K: return rows_avx512_q6_k;
    case ZM_GGML_IQ4_NL: return rows_avx512_iq4_nl;
    case ZM_GGML_Q2_K: return rows_avx512_q2_k;
    default: return rows_avx512_q3_k;
    }
}

/* ---------------------------------------------------------------- AVX2 */

/* A chunk's 32 integers as two halves of 16 (elements 0..15, 16..31). */
typedef struct {
    __m256i lo, hi;
    float dw, mw[2];
} ychunk_t;

static ALWAYS_INLINE TARGET_AVX2 void nibbles16_avx2(const uint8_t *q, __m256i *lo, __m256i *hi) {
    __m128i b = _mm_loadu_si128((const __m128i *)q), m = _mm_set1_epi8(0x0f);
    *lo = _mm256_cvtepu8_epi16(_mm_and_si128(b, m));
    *hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), m));
}

/* 16 in lane l where bit l of `bits` is set, else 0 (16 int16 lanes). */
static ALWAYS_INLINE TARGET_AVX2 __m256i bit_lanes16(uint32_t bits) {
    const __m256i lane_bits = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                                4096, 8192, 16384, (short)0x8000);
    __m256i set = _mm256_and_si256(_mm256_set1_epi16((short)bits), lane_bits);
    return _mm256_and_si256(_mm256_cmpeq_epi16(set, lane_bits), _mm256_set1_epi16(16));
}

static ALWAYS_INLINE TARGET_AVX2 float yhalf(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* 32 bytes -> two halves of 16 int16 (zero-extended). */
static ALWAYS_INLINE TARGET_AVX2 void widen32(__m256i b, ychunk_t *o) {
    o->lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(b));
    o->hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(b, 1));
}

static ALWAYS_INLINE TARGET_AVX2 void ypart(uint32_t type, part_fn part, const uint8_t *src,
                                            unsigned c, ychunk_t *o) {
    switch (type) {
    case ZM_GGML_Q4_0:
        nibbles16_avx2(src + 2, &o->lo, &o->hi);
        o->lo = _mm256_sub_epi16(o->lo, _mm256_set1_epi16(8));
        o->hi = _mm256_sub_epi16(o->hi, _mm256_set1_epi16(8));
        o->dw = yhalf(src), o->mw[0] = o->mw[1] = 0;
        return;
    case ZM_GGML_Q4_1:
        nibbles16_avx2(src + 4, &o->lo, &o->hi);
        o->dw = yhalf(src), o->mw[0] = o->mw[1] = yhalf(src + 2);
        return;
    case ZM_GGML_Q5_0:
    case ZM_GGML_Q5_1: {
        bool q5_1 = type == ZM_GGML_Q5_1;
        uint32_t qh = load32(src + (q5_1 ? 4 : 2));
        nibbles16_avx2(src + (q5_1 ? 8 : 6), &o->lo, &o->hi);
        o->lo = _mm256_add_epi16(o->lo, bit_lanes16(qh));
        o->hi = _mm256_add_epi16(o->hi, bit_lanes16(qh >> 16));
        if (!q5_1) {
            o->lo = _mm256_sub_epi16(o->lo, _mm256_set1_epi16(16));
            o->hi = _mm256_sub_epi16(o->hi, _mm256_set1_epi16(16));
        }
        o->dw = yhalf(src), o->mw[0] = o->mw[1] = q5_1 ? yhalf(src + 2) : 0;
        return;
    }
    case ZM_GGML_Q8_0:
        o->lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(src + 2)));
        o->hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(src + 18)));
        o->dw = yhalf(src), o->mw[0] = o->mw[1] = 0;
        return;
    case ZM_GGML_Q4_K:
    case ZM_GGML_Q5_K: {
        __m256i b = k4_bytes(type, src, c);
        int sc, m;
        scale_min_k4(src + 4, c, &sc, &m);
        widen32(b, o);
        o->lo = _mm256_mullo_epi16(o->lo, _mm256_set1_epi16((short)sc));
        o->hi = _mm256_mullo_epi16(o->hi, _mm256_set1_epi16((short)sc));
        o->dw = yhalf(src), o->mw[0] = o->mw[1] = -(yhalf(src + 2) * (float)m);
        return;
    }
    case ZM_GGML_Q6_K: {
        widen32(q6_k_bytes(src, c), o);
        const int8_t *scales = (const int8_t *)(src + 192);
        o->lo = _mm256_mullo_epi16(_mm256_sub_epi16(o->lo, _mm256_set1_epi16(32)), _mm256_set1_epi16(scales[2 * c]));
        o->hi = _mm256_mullo_epi16(_mm256_sub_epi16(o->hi, _mm256_set1_epi16(32)), _mm256_set1_epi16(scales[2 * c + 1]));
        o->dw = yhalf(src + 208), o->mw[0] = o->mw[1] = 0;
        return;
    }
    default: { /* IQ4_NL, Q2_K, Q3_K: the portable part, loaded */
        chunk_t ch;
        part(src, c, &ch);
        o->lo = _mm256_load_si256((const __m256i *)ch.w);
        o->hi = _mm256_load_si256((const __m256i *)(ch.w + 16));
        o->dw = ch.dw, o->mw[0] = ch.mw[0], o->mw[1] = ch.mw[1];
        return;
    }
    }
}

/* Rows [r0, r0 + NW) against one row of x: lanes 0..7 in one register, 8..15 in another,
 * the same sums as the 16-lane definition. */
static ALWAYS_INLINE TARGET_AVX2 void rows_avx2_block(const int16_job_t *job, uint32_t type,
                                                      size_t r0, size_t i, const unsigned NW) {
    size_t chunks = job->cols / 32;
    const unsigned CPB = chunks_per_block(type);
    const uint8_t *row = job->xq + i * job->stride;
    const int16_t *X = (const int16_t *)row;
    const float *s = row_scales(row, job->cols), *xs = s + chunks;
    __m256 acc[BLOCK_W][2];
    float off[BLOCK_W];
    const uint8_t *w_row[BLOCK_W];
    #pragma GCC unroll 16
    for (unsigned r = 0; r < NW; r++) {
        w_row[r] = job->w + (r0 + r) * job->row_bytes;
        acc[r][0] = acc[r][1] = _mm256_setzero_ps(), off[r] = 0;
    }
    for (size_t c0 = 0, b = 0; c0 < chunks; c0 += CPB, b += job->block_bytes)
        UNROLL_PARTS
        for (unsigned part = 0; part < CPB; part++) {
            size_t c = c0 + part;
            if (PREFETCH_GROUPS) {
                const uint8_t *ahead = w_row[0] + PREFETCH_GROUPS * BLOCK_W * job->row_bytes +
                                       BLOCK_W * (b + part * job->block_bytes / CPB);
                _mm_prefetch((const char *)ahead, _MM_HINT_T0);
                _mm_prefetch((const char *)ahead + 64, _MM_HINT_T0);
                _mm_prefetch((const char *)ahead + 128, _MM_HINT_T0);
            }
            __m256i x0 = _mm256_load_si256((const __m256i *)(X + 32 * c));
            __m256i x1 = _mm256_load_si256((const __m256i *)(X + 32 * c + 16));
            float sc = s[c];
            #pragma GCC unroll 16
            for (unsigned r = 0; r < NW; r++) {
                ychunk_t w;
                ypart(type, job->part, w_row[r] + b, part, &w);
                __m256 scale = _mm256_set1_ps(w.dw * sc);
                acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(w.lo, x0)), scale, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(w.hi, x1)), scale, acc[r][1]);
                if (has_min(type)) {
                    off[r] = fmaf(w.mw[0], xs[2 * c], off[r]);
                    off[r] = fmaf(w.mw[1], xs[2 * c + 1], off[r]);
                }
            }
        }
    #pragma GCC unroll 16
    for (unsigned r = 0; r < NW; r++) {
        float lane[16];
        _mm256_storeu_ps(lane, acc[r][0]);
        _mm256_storeu_ps(lane + 8, acc[r][1]);
        job->out[i * job->rows + r0 + r] = (reduce16(lane) + off[r]) * row_unscale(row, job->cols);
    }
}

#define DEFINE_ROWS_AVX2(name, type)                                                         \
    static TARGET_AVX2 void rows_avx2_##name(const int16_job_t *job, size_t r0, unsigned nw, \
                                             size_t i0, unsigned nx) {                      \
        for (size_t i = i0; i < i0 + nx; i++) {                                             \
            if (nw == BLOCK_W) rows_avx2_block(job, type, r0, i, BLOCK_W);                  \
            else rows_avx2_block(job, type, r0, i, 1);                                      \
        }                                                                                    \
    }

DEFINE_ROWS_AVX2(q4_0, ZM_GGML_Q4_0)
DEFINE_ROWS_AVX2(q4_1, ZM_GGML_Q4_1)
DEFINE_ROWS_AVX2(q5_0, ZM_GGML_Q5_0)
DEFINE_ROWS_AVX2(q5_1, ZM_GGML_Q5_1)
DEFINE_ROWS_AVX2(q8_0, ZM_GGML_Q8_0)
DEFINE_ROWS_AVX2(q4_k, ZM_GGML_Q4_K)
DEFINE_ROWS_AVX2(q5_k, ZM_GGML_Q5_K)
DEFINE_ROWS_AVX2(q6_k, ZM_GGML_Q6_K)
DEFINE_ROWS_AVX2(iq4_nl, ZM_GGML_IQ4_NL)
DEFINE_ROWS_AVX2(q2_k, ZM_GGML_Q2_K)
DEFINE_ROWS_AVX2(q3_k, ZM_GGML_Q3_K)

static rows_fn rows_avx2(uint32_t type) {
    switch (type) {
    case ZM_GGML_Q4_0: return rows_avx2_q4_0;
    case ZM_GGML_Q4_1: return rows_avx2_q4_1;
    case ZM_GGML_Q5_0: return rows_avx2_q5_0;
    case ZM_GGML_Q5_1: return rows_avx2_q5_1;
    case ZM_GGML_Q8_0: return rows_avx2_q8_0;
    case ZM_GGML_Q4_K: return rows_avx2_q4_k;
    case ZM_GGML_Q5_K: return rows_avx2_q5_k;
    case ZM_GGML_Q6_K: return rows_avx2_q6_k;
    case ZM_GGML_IQ4_NL: return rows_avx2_iq4_nl;
    case ZM_GGML_Q2_K: return rows_avx2_q2_k;
    default: return rows_avx2_q3_k;
    }
}

/* ---------------------------------------------------------------- running it */

static void prepare(void *arg, void *shared) {
    int16_job_t *job = arg;
    job->xq = shared;
    for (size_t i = 0; i < job->n; i++)
        (job->avx512 ? quantize_row_avx512 : quantize_row)(job->x + i * job->cols, job->cols,
                                                           (uint8_t *)shared + i * job->stride);
}

static void task(void *arg, size_t t, unsigned worker) {
    (void)worker;
    const int16_job_t *job = arg;
    size_t r0 = t * job->task_rows, end = r0 + job->task_rows < job->rows ? r0 + job->task_rows : job->rows;
    /* the task's first groups: the prefetches in the kernel reach only later ones */
    size_t first = end - r0 < PREFETCH_GROUPS * BLOCK_W ? end - r0 : PREFETCH_GROUPS * BLOCK_W;
    zm_prefetch(job->w + r0 * job->row_bytes, first * job->row_bytes);
    for (size_t i = 0; i < job->n; i += BLOCK_X) {
        unsigned nx = job->n - i < BLOCK_X ? (unsigned)(job->n - i) : BLOCK_X;
        size_t r = r0;
        for (; r + BLOCK_W <= end; r += BLOCK_W) job->rows_kernel(job, r, BLOCK_W, i, nx);
        for (; r < end; r++) job->rows_kernel(job, r, 1, i, nx); /* the last rows, one by one */
    }
}

int zm_int16_matmul(uint32_t type, const void *w, size_t rows, size_t cols, size_t row_bytes,
                    const float *x, size_t n, float *out, int path) {
    bool avx512 = path == ZM_KERNELS_AVX512;
    uint32_t block, bytes;
    part_fn part = part_of(type);
    if (!part || !zm_ggml_type_size(type, &block, &bytes) || cols % 32 || block % 32) {
        zm_fail(ZM_ERR_INVALID_ARG, type, 0, 0);
        return ZM_ERR_INVALID_ARG;
    }
    int16_job_t job = {
        .part = part, .rows_kernel = avx512 ? rows_avx512(type) : path == ZM_KERNELS_AVX2 ? rows_avx2(type) : rows_portable, .w = w,
        .rows = rows, .cols = cols, .row_bytes = row_bytes, .block_bytes = bytes,
        .chunks_per_block = block / 32, .x = x, .n = n, .stride = row_stride(cols), .out = out,
        .has_min = has_min(type), .avx512 = avx512,
    };
    size_t shared;
    if (__builtin_mul_overflow(n, job.stride, &shared)) {
        zm_fail(ZM_ERR_TOO_LARGE, n, 0, 0);
        return ZM_ERR_TOO_LARGE;
    }
    job.task_rows = zm_stream_task_rows(rows);
    return zm_pool_run_shared(task, &job, (rows + job.task_rows - 1) / job.task_rows, 0, prepare, shared);
}
