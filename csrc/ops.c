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
    const char *forced = getenv("ZIGMEM_SIMD");
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

static int invalid(size_t what) {
    zm_fail(ZM_ERR_INVALID_ARG, what, 0, 0);
    return ZM_ERR_INVALID_ARG;
}

/* ---------------------------------------------------------------- kernels */

int zm_rms_norm(const float *x, const float *weight, float *out, size_t rows, size_t dim,
                float eps) {
    if (!dim || !(eps >= 0.0f)) return invalid(dim);
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
    if (head_dim % 2 || !head_dim || start > table_rows || rows > table_rows - start)
        return invalid(head_dim);
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
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
    return ZM_OK;
}

int zm_attention_f16(const float *q, size_t rows, size_t n_heads, size_t head_dim,
                     const uint16_t *keys, const uint16_t *values, size_t n_kv_heads,
                     size_t kv_len, size_t start, float *out, float *scratch,
                     size_t scratch_len) {
    if (!n_kv_heads || !head_dim || n_heads % n_kv_heads || start + rows > kv_len ||
        scratch_len < kv_len)
        return invalid(kv_len);
    int l = level();
    size_t group = n_heads / n_kv_heads, kv_row = n_kv_heads * head_dim;
    float scale = 1.0f / sqrtf((float)head_dim);
    for (size_t r = 0; r < rows; r++) {
        size_t len = start + r + 1; /* causal: position start + r sees 0 ..= start + r */
        for (size_t h = 0; h < n_heads; h++) {
            const float *qh = q + (r * n_heads + h) * head_dim;
            float *o = out + (r * n_heads + h) * head_dim;
            size_t kv = (h / group) * head_dim;
            float best = -INFINITY;
            for (size_t t = 0; t < len; t++) {
                float s = dot_f16(qh, keys + t * kv_row + kv, head_dim, l) * scale;
                scratch[t] = s;
                if (s > best) best = s;
            }
            float sum = 0.0f;
            for (size_t t = 0; t < len; t++) {
                float p = expf(scratch[t] - best);
                scratch[t] = p;
                sum += p;
            }
            memset(o, 0, head_dim * sizeof *o);
            for (size_t t = 0; t < len; t++)
                axpy_f16(o, scratch[t], values + t * kv_row + kv, head_dim, l);
            float inv = 1.0f / sum;
            for (size_t i = 0; i < head_dim; i++) o[i] *= inv;
        }
    }
    return ZM_OK;
}
