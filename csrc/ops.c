/*
 * ops.c — the fused per-step kernels of a llama forward pass: RMSNorm, rotary embeddings,
 * SiLU-gated product and causal grouped-query attention over a float16 KV slab.
 *
 * Every kernel writes into memory the caller provides (the demo passes arena blocks) and
 * allocates nothing. Rows are independent and each row's arithmetic runs in a fixed order
 * that does not depend on how many rows are in the call, so row i of an n-row call is
 * bitwise equal to the 1-row call for that row (the batched generation relies on this).
 *
 * Dot products accumulate in 8 lanes (lane j takes elements j, j+8, ...; multiply, then add:
 * no fused multiply-add) and reduce the lanes in one fixed tree; the AVX2 path does exactly
 * this with one 256-bit register, so the portable and AVX2 paths give bitwise equal results
 * and the choice between them (zm_ops_simd) changes speed only.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ZM_OPS_X86 1
#endif

#define LANES 8

/* ---------------------------------------------------------------- SIMD selection */

static int ops_level = -1; /* -1: not chosen yet; else ZM_SIMD_PORTABLE / ZM_SIMD_AVX2 */

static int detect_level(void) {
#ifdef ZM_OPS_X86
    const char *forced = getenv("ZIGMEM_KERNELS");
    if (forced && strcmp(forced, "portable") == 0) return ZM_SIMD_PORTABLE;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return ZM_SIMD_AVX2;
#endif
    return ZM_SIMD_PORTABLE;
}

static inline int level(void) {
    int l = __atomic_load_n(&ops_level, __ATOMIC_RELAXED);
    if (ZM_UNLIKELY(l < 0)) {
        l = detect_level();
        __atomic_store_n(&ops_level, l, __ATOMIC_RELAXED);
    }
    return l;
}

int zm_ops_simd(int wanted) {
    int best = detect_level(), previous = level();
    if (wanted >= 0) __atomic_store_n(&ops_level, wanted < best ? wanted : best, __ATOMIC_RELAXED);
    return previous;
}

/* ---------------------------------------------------------------- portable helpers */

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) { /* subnormal: normalise */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* The fixed lane reduction both paths use: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)). */
static inline float reduce_lanes(const float l[LANES]) {
    float a0 = l[0] + l[4], a1 = l[1] + l[5], a2 = l[2] + l[6], a3 = l[3] + l[7];
    return (a0 + a2) + (a1 + a3);
}

/* exp(x) in float32 with the same arithmetic on every path: Cody-Waite reduction by ln 2
 * and Cephes' degree-6 polynomial (within 2 ulp of expf), then 2^n from the exponent bits.
 * x is clamped to [-87, 88], where 2^n stays a normal float; NaN turns into the upper
 * clamp, as the SIMD min does. Written as mul-then-add so the vector twin matches bitwise. */
#define EXP_HI 88.0f
#define EXP_LO (-87.0f)
#define EXP_LOG2E 1.44269504088896341f
#define EXP_C1 0.693359375f
#define EXP_C2 (-2.12194440e-4f)
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f

static inline float exp_portable(float x) {
    x = x < EXP_HI ? x : EXP_HI; /* as minps / maxps: the second operand when unordered */
    x = x > EXP_LO ? x : EXP_LO;
    float fx = floorf(x * EXP_LOG2E + 0.5f);
    float r = x - fx * EXP_C1;
    r = r - fx * EXP_C2;
    float z = r * r;
    float y = EXP_P0 * r + EXP_P1;
    y = y * r + EXP_P2;
    y = y * r + EXP_P3;
    y = y * r + EXP_P4;
    y = y * r + EXP_P5;
    y = y * z + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)fx + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

static void silu_mul_portable(const float *gate, const float *up, float *out, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + exp_portable(-g)) * up[i];
    }
}

/* p[t] = exp(p[t] - shift), then their sum in index order. */
static float softmax_exp_portable(float *p, size_t n, float shift) {
    float sum = 0.0f;
    for (size_t t = 0; t < n; t++) {
        p[t] = exp_portable(p[t] - shift);
        sum += p[t];
    }
    return sum;
}

static float dot_f32_portable(const float *a, const float *b, size_t n) {
    float acc[LANES] = {0};
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += a[i + j] * b[i + j];
    float s = reduce_lanes(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static float dot_f16_portable(const float *q, const uint16_t *k, size_t n) {
    float acc[LANES] = {0};
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += q[i + j] * half_to_float(k[i + j]);
    float s = reduce_lanes(acc);
    for (; i < n; i++) s += q[i] * half_to_float(k[i]);
    return s;
}

/* out[i] += p * v[i] */
static void axpy_f16_portable(float *out, float p, const uint16_t *v, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] += p * half_to_float(v[i]);
}

/* ---------------------------------------------------------------- AVX2 + F16C */

#ifdef ZM_OPS_X86
__attribute__((target("avx2,f16c"))) static inline float reduce_avx2(__m256 acc) {
    __m128 lo = _mm256_castps256_ps128(acc), hi = _mm256_extractf128_ps(acc, 1);
    __m128 a = _mm_add_ps(lo, hi); /* l0+l4, l1+l5, l2+l6, l3+l7 */
    __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a)); /* (a0+a2), (a1+a3) */
    __m128 c = _mm_add_ss(b, _mm_shuffle_ps(b, b, 1));
    return _mm_cvtss_f32(c);
}

__attribute__((target("avx2,f16c"))) static float dot_f32_avx2(const float *a, const float *b,
                                                               size_t n) {
    __m256 acc = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    float s = reduce_avx2(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

__attribute__((target("avx2,f16c"))) static float dot_f16_avx2(const float *q, const uint16_t *k,
                                                               size_t n) {
    __m256 acc = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        __m256 kf = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i)));
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(q + i), kf));
    }
    float s = reduce_avx2(acc);
    for (; i < n; i++) s += q[i] * half_to_float(k[i]);
    return s;
}

__attribute__((target("avx2,f16c"))) static void axpy_f16_avx2(float *out, float p,
                                                               const uint16_t *v, size_t n) {
    __m256 pv = _mm256_set1_ps(p);
    size_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        __m256 vf = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + i)));
        _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(out + i), _mm256_mul_ps(pv, vf)));
    }
    for (; i < n; i++) out[i] += p * half_to_float(v[i]);
}

__attribute__((target("avx2,f16c"))) static inline __m256 exp_avx2(__m256 x) {
    x = _mm256_min_ps(x, _mm256_set1_ps(EXP_HI));
    x = _mm256_max_ps(x, _mm256_set1_ps(EXP_LO));
    __m256 fx = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)),
                                              _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(EXP_C1)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(fx, _mm256_set1_ps(EXP_C2)));
    __m256 z = _mm256_mul_ps(r, r);
    __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(EXP_P0), r), _mm256_set1_ps(EXP_P1));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(EXP_P2));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(EXP_P3));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(EXP_P4));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(EXP_P5));
    y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(y, z), r), _mm256_set1_ps(1.0f));
    __m256i n = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
    return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
}

__attribute__((target("avx2,f16c"))) static void silu_mul_avx2(const float *gate, const float *up,
                                                               float *out, size_t n) {
    size_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g));
        __m256 o = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(o, _mm256_loadu_ps(up + i)));
    }
    silu_mul_portable(gate + i, up + i, out + i, n - i);
}

__attribute__((target("avx2,f16c"))) static float softmax_exp_avx2(float *p, size_t n,
                                                                   float shift) {
    __m256 s = _mm256_set1_ps(shift);
    size_t t = 0;
    for (; t + LANES <= n; t += LANES)
        _mm256_storeu_ps(p + t, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(p + t), s)));
    for (; t < n; t++) p[t] = exp_portable(p[t] - shift);
    float sum = 0.0f; /* in index order, as the portable path */
    for (t = 0; t < n; t++) sum += p[t];
    return sum;
}

/* Four keys' dots with q at once (independent accumulators: each equals dot_f16_avx2). */
__attribute__((target("avx2,f16c"))) static void dot4_f16_avx2(const float *q, const uint16_t *k,
                                                               size_t stride, size_t n,
                                                               float out[4]) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < n; i += LANES) { /* n % LANES == 0 */
        __m256 qv = _mm256_loadu_ps(q + i);
        a0 = _mm256_add_ps(a0, _mm256_mul_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i)))));
        a1 = _mm256_add_ps(a1, _mm256_mul_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + stride + i)))));
        a2 = _mm256_add_ps(a2, _mm256_mul_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + 2 * stride + i)))));
        a3 = _mm256_add_ps(a3, _mm256_mul_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + 3 * stride + i)))));
    }
    out[0] = reduce_avx2(a0), out[1] = reduce_avx2(a1), out[2] = reduce_avx2(a2);
    out[3] = reduce_avx2(a3);
}

#define MAX_REG_DIM 128
/* One query head over len positions, head_dim % 8 == 0 and <= MAX_REG_DIM: the output stays
 * in registers across positions. The same operations, in the same order, as the portable
 * head below, so the results are bitwise equal. */
__attribute__((target("avx2,f16c"))) static void attend_head_avx2(
    const float *qh, const uint16_t *k, const uint16_t *v, size_t stride, size_t len,
    size_t head_dim, float scale, float *scratch, float *o) {
    float best = -INFINITY;
    size_t t = 0;
    for (; t + 4 <= len; t += 4) {
        float d[4];
        dot4_f16_avx2(qh, k + t * stride, stride, head_dim, d);
        for (int j = 0; j < 4; j++) {
            float s = d[j] * scale;
            scratch[t + j] = s;
            if (s > best) best = s;
        }
    }
    for (; t < len; t++) {
        float s = dot_f16_avx2(qh, k + t * stride, head_dim) * scale;
        scratch[t] = s;
        if (s > best) best = s;
    }
    float sum = softmax_exp_avx2(scratch, len, best);
    __m256 acc[MAX_REG_DIM / LANES];
    size_t blocks = head_dim / LANES;
    for (size_t b = 0; b < blocks; b++) acc[b] = _mm256_setzero_ps();
    for (t = 0; t < len; t++) {
        __m256 p = _mm256_set1_ps(scratch[t]);
        const uint16_t *vt = v + t * stride;
        for (size_t b = 0; b < blocks; b++)
            acc[b] = _mm256_add_ps(acc[b], _mm256_mul_ps(p, _mm256_cvtph_ps(_mm_loadu_si128(
                                                            (const __m128i *)(vt + b * LANES)))));
    }
    __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (size_t b = 0; b < blocks; b++) _mm256_storeu_ps(o + b * LANES, _mm256_mul_ps(acc[b], inv));
}
#endif

static inline float dot_f32(const float *a, const float *b, size_t n, int l) {
#ifdef ZM_OPS_X86
    if (l >= ZM_SIMD_AVX2) return dot_f32_avx2(a, b, n);
#endif
    (void)l;
    return dot_f32_portable(a, b, n);
}

static inline float dot_f16(const float *q, const uint16_t *k, size_t n, int l) {
#ifdef ZM_OPS_X86
    if (l >= ZM_SIMD_AVX2) return dot_f16_avx2(q, k, n);
#endif
    (void)l;
    return dot_f16_portable(q, k, n);
}

static inline void axpy_f16(float *out, float p, const uint16_t *v, size_t n, int l) {
#ifdef ZM_OPS_X86
    if (l >= ZM_SIMD_AVX2) {
        axpy_f16_avx2(out, p, v, n);
        return;
    }
#endif
    (void)l;
    axpy_f16_portable(out, p, v, n);
}

/* ZM_ERR_INVALID_ARG, with the report's size saying which check failed (ZM_OPS_*). */
static inline void silu_mul(const float *gate, const float *up, float *out, size_t n, int l) {
#ifdef ZM_OPS_X86
    if (l >= ZM_SIMD_AVX2) {
        silu_mul_avx2(gate, up, out, n);
        return;
    }
#endif
    (void)l;
    silu_mul_portable(gate, up, out, n);
}

static inline float softmax_exp(float *p, size_t n, float shift, int l) {
#ifdef ZM_OPS_X86
    if (l >= ZM_SIMD_AVX2) return softmax_exp_avx2(p, n, shift);
#endif
    (void)l;
    return softmax_exp_portable(p, n, shift);
}

static int invalid(size_t what) {
    zm_fail(ZM_ERR_INVALID_ARG, what, 0, 0);
    return ZM_ERR_INVALID_ARG;
}

/* Whether [a, a + na) and [b, b + nb) (counts of float-sized or half-sized elements, given
 * in bytes) share a byte. */
static bool overlap(const void *a, size_t a_bytes, const void *b, size_t b_bytes) {
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return a_bytes && b_bytes && x < y + b_bytes && y < x + a_bytes;
}

/* out may be exactly `same` (read before written, element by element) but must not overlap
 * it otherwise. */
static bool bad_alias(const float *out, const float *same, size_t n) {
    return out != same && overlap(out, n * sizeof(float), same, n * sizeof(float));
}

/* ---------------------------------------------------------------- kernels */

int zm_rms_norm(const float *x, const float *weight, float *out, size_t rows, size_t dim,
                float eps) {
    if (!dim || !(eps >= 0.0f)) return invalid(ZM_OPS_GEOMETRY);
    if (bad_alias(out, x, rows * dim) || overlap(out, rows * dim * 4, weight, dim * 4))
        return invalid(ZM_OPS_OVERLAP);
    int l = level();
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        float mean = dot_f32(xr, xr, dim, l) / (float)dim;
        float scale = 1.0f / sqrtf(mean + eps);
        for (size_t i = 0; i < dim; i++) o[i] = xr[i] * scale * weight[i];
    }
    return ZM_OK;
}

int zm_rope(const float *x, float *out, size_t rows, size_t heads, size_t head_dim,
            const float *cos_table, const float *sin_table, size_t table_rows, size_t start) {
    size_t half = head_dim / 2;
    size_t n = rows * heads * head_dim, table = table_rows * half * sizeof(float);
    if (head_dim % 2 || !head_dim || start > table_rows || rows > table_rows - start)
        return invalid(ZM_OPS_GEOMETRY);
    if (bad_alias(out, x, n) || overlap(out, n * 4, cos_table, table) ||
        overlap(out, n * 4, sin_table, table))
        return invalid(ZM_OPS_OVERLAP);
    for (size_t r = 0; r < rows; r++) {
        const float *c = cos_table + (start + r) * half, *s = sin_table + (start + r) * half;
        for (size_t h = 0; h < heads; h++) {
            const float *xv = x + (r * heads + h) * head_dim;
            float *o = out + (r * heads + h) * head_dim;
            for (size_t i = 0; i < half; i++) { /* x and out may be the same memory */
                float even = xv[2 * i], odd = xv[2 * i + 1];
                o[2 * i] = even * c[i] - odd * s[i];
                o[2 * i + 1] = even * s[i] + odd * c[i];
            }
        }
    }
    return ZM_OK;
}

int zm_silu_mul(const float *gate, const float *up, float *out, size_t n) {
    if (bad_alias(out, gate, n) || bad_alias(out, up, n)) return invalid(ZM_OPS_OVERLAP);
    silu_mul(gate, up, out, n, level());
    return ZM_OK;
}

typedef struct {
    const float *q;
    size_t rows, n_heads, head_dim, group, kv_row, start, kv_len, tasks;
    const uint16_t *keys, *values;
    float *out, *scratch, scale;
    int level;
} attention_job_t;

/* Rows task, task + tasks, task + 2 tasks, ... (interleaved: later rows see more positions),
 * with scratch slot `task` (not the worker's id: a task owns its slot whoever runs it). */
static void attention_task(void *arg, size_t task, unsigned worker) {
    (void)worker;
    const attention_job_t *a = arg;
    int l = a->level;
    float *scratch = a->scratch + task * a->kv_len;
    for (size_t r = task; r < a->rows; r += a->tasks) {
        size_t len = a->start + r + 1; /* causal: position start + r sees 0 ..= start + r */
        for (size_t h = 0; h < a->n_heads; h++) {
            const float *qh = a->q + (r * a->n_heads + h) * a->head_dim;
            float *o = a->out + (r * a->n_heads + h) * a->head_dim;
            size_t kv = (h / a->group) * a->head_dim, head_dim = a->head_dim;
#ifdef ZM_OPS_X86
            if (l >= ZM_SIMD_AVX2 && head_dim % LANES == 0 && head_dim <= MAX_REG_DIM) {
                attend_head_avx2(qh, a->keys + kv, a->values + kv, a->kv_row, len, head_dim,
                                 a->scale, scratch, o);
                continue;
            }
#endif
            float best = -INFINITY;
            for (size_t t = 0; t < len; t++) {
                float s = dot_f16(qh, a->keys + t * a->kv_row + kv, head_dim, l) * a->scale;
                scratch[t] = s;
                if (s > best) best = s;
            }
            float sum = softmax_exp(scratch, len, best, l);
            memset(o, 0, head_dim * sizeof *o);
            for (size_t t = 0; t < len; t++)
                axpy_f16(o, scratch[t], a->values + t * a->kv_row + kv, head_dim, l);
            float inv = 1.0f / sum;
            for (size_t i = 0; i < head_dim; i++) o[i] *= inv;
        }
    }
}

/* Query-key products below which attention runs on the calling thread alone. */
#define ATTENTION_PARALLEL_MIN (1u << 14)

int zm_attention_f16(const float *q, size_t rows, size_t n_heads, size_t head_dim,
                     const uint16_t *keys, const uint16_t *values, size_t n_kv_heads,
                     size_t kv_len, size_t start, float *out, float *scratch,
                     size_t scratch_len) {
    if (!n_kv_heads || !head_dim || n_heads % n_kv_heads || start + rows > kv_len ||
        scratch_len < kv_len)
        return invalid(ZM_OPS_GEOMETRY);
    size_t kv_row = n_kv_heads * head_dim;
    size_t q_bytes = rows * n_heads * head_dim * 4, kv_bytes = kv_len * kv_row * 2;
    if (overlap(out, q_bytes, q, q_bytes) || overlap(out, q_bytes, keys, kv_bytes) ||
        overlap(out, q_bytes, values, kv_bytes) || overlap(out, q_bytes, scratch, scratch_len * 4) ||
        overlap(scratch, scratch_len * 4, q, q_bytes))
        return invalid(ZM_OPS_OVERLAP);
    attention_job_t a = {
        .q = q, .rows = rows, .n_heads = n_heads, .head_dim = head_dim,
        .group = n_heads / n_kv_heads, .kv_row = kv_row, .start = start, .kv_len = kv_len,
        .keys = keys, .values = values, .out = out, .scratch = scratch,
        .scale = 1.0f / sqrtf((float)head_dim), .level = level(), .tasks = 1,
    };
    /* Several rows (a prompt) and a scratch slot of kv_len floats per task: the pool's
     * threads share the rows. Each row's arithmetic is the same either way. */
    size_t slots = kv_len ? scratch_len / kv_len : 1;
    if (rows > 1 && slots > 1 && rows * n_heads * (start + rows) >= ATTENTION_PARALLEL_MIN) {
        a.tasks = slots < rows ? slots : rows;
        return zm_pool_run(attention_task, &a, a.tasks, 0); /* no pool scratch: cannot fail */
    }
    attention_task(&a, 0, 0);
    return ZM_OK;
}
