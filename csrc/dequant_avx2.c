/* dequant_avx2.c — the matrix kernels' dequantization with AVX2: the same floats as
 * dequant.c, eight at a time, stored to memory or fed straight into dot products.
 *
 * The AVX2 twin of dequant_avx512.c (read that file's comment for the design): part
 * functions leave 32 or 64 values of a block in registers (v[0] holds elements 0..7, v[1]
 * 8..15, ...), computed with dequant.c's operations in its order, each rounded on its own;
 * from them come a dequantizer and a fused dot whose accumulation order is that of
 * quant_matmul.c's AVX2 accumulate (column c into lane c % 8, in column order). Types not
 * here (Q2_K, Q3_K, IQ4_NL) use dequant.c. Only called when the CPU has AVX2, FMA, F16C. */
#include <immintrin.h>
#include <string.h>

#include "internal.h"

#define TARGET __attribute__((target("avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline)) TARGET

INLINE float half_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* Bytes 8 half .. 8 half + 7 of b, zero-extended to 8 int32. */
INLINE __m256i widen(__m128i b, int half) {
    return _mm256_cvtepu8_epi32(half ? _mm_srli_si128(b, 8) : b);
}

/* 16 bytes -> low nibbles and high nibbles, 16 bytes each. */
INLINE void nibbles(const uint8_t *q, __m128i *lo, __m128i *hi) {
    __m128i b = _mm_loadu_si128((const __m128i *)q), m = _mm_set1_epi8(0x0f);
    *lo = _mm_and_si128(b, m);
    *hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
}

/* Bits 8g .. 8g + 7 of qh as 16 (set) or 0 in lanes 0..7. */
INLINE __m256i high_bits(uint32_t qh, int g) {
    __m256i bits = _mm256_srlv_epi32(_mm256_set1_epi32((int)(qh >> (8 * g))),
                                     _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_slli_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(1)), 4);
}

/* ---------------------------------------------------------------- part functions */

INLINE void q4_0_part(const uint8_t *src, int p, __m256 *v) {
    (void)p;
    __m256 d = _mm256_set1_ps(half_at(src));
    __m256i eight = _mm256_set1_epi32(8);
    __m128i lo, hi;
    nibbles(src + 2, &lo, &hi);
    for (int g = 0; g < 4; g++) {
        __m256i q = widen(g < 2 ? lo : hi, g & 1);
        v[g] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, eight)), d);
    }
}

INLINE void q4_1_part(const uint8_t *src, int p, __m256 *v) {
    (void)p;
    __m256 d = _mm256_set1_ps(half_at(src)), m = _mm256_set1_ps(half_at(src + 2));
    __m128i lo, hi;
    nibbles(src + 4, &lo, &hi);
    for (int g = 0; g < 4; g++)
        v[g] = _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(widen(g < 2 ? lo : hi, g & 1))), m);
}

INLINE void q5_0_part(const uint8_t *src, int p, __m256 *v) {
    (void)p;
    __m256 d = _mm256_set1_ps(half_at(src));
    uint32_t qh;
    memcpy(&qh, src + 2, 4);
    __m128i lo, hi;
    nibbles(src + 6, &lo, &hi);
    for (int g = 0; g < 4; g++) {
        __m256i q = _mm256_or_si256(widen(g < 2 ? lo : hi, g & 1), high_bits(qh, g));
        v[g] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(q, _mm256_set1_epi32(16))));
    }
}

INLINE void q5_1_part(const uint8_t *src, int p, __m256 *v) {
    (void)p;
    __m256 d = _mm256_set1_ps(half_at(src)), m = _mm256_set1_ps(half_at(src + 2));
    uint32_t qh;
    memcpy(&qh, src + 4, 4);
    __m128i lo, hi;
    nibbles(src + 8, &lo, &hi);
    for (int g = 0; g < 4; g++) {
        __m256i q = _mm256_or_si256(widen(g < 2 ? lo : hi, g & 1), high_bits(qh, g));
        v[g] = _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(q)), m);
    }
}

INLINE void q8_0_part(const uint8_t *src, int p, __m256 *v) {
    (void)p;
    __m256 d = _mm256_set1_ps(half_at(src));
    for (int g = 0; g < 4; g++) {
        __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(src + 2 + 8 * g)));
        v[g] = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
    }
}

static inline void scale_min_k4(const uint8_t *scales, int s, int *sc, int *m) {
    if (s < 4) {
        *sc = scales[s] & 0x3f;
        *m = scales[s + 4] & 0x3f;
    } else {
        *sc = (scales[s + 4] & 0x0f) | ((scales[s - 4] >> 2) & 0x30);
        *m = (scales[s + 4] >> 4) | ((scales[s] >> 2) & 0x30);
    }
}

/* Q4_K / Q5_K part c: elements 64c .. 64c + 63 (sub-blocks 2c and 2c + 1). */
INLINE void k4_part(const uint8_t *src, const uint8_t *qh, const uint8_t *qs, int c, __m256 *v) {
    float d = half_at(src), dmin = half_at(src + 2);
    int sc0, m0, sc1, m1;
    scale_min_k4(src + 4, 2 * c, &sc0, &m0);
    scale_min_k4(src + 4, 2 * c + 1, &sc1, &m1);
    __m256 ds[2] = {_mm256_set1_ps(d * (float)sc0), _mm256_set1_ps(d * (float)sc1)};
    __m256 dm[2] = {_mm256_set1_ps(dmin * (float)m0), _mm256_set1_ps(dmin * (float)m1)};
    const __m256i one = _mm256_set1_epi32(1);
    for (int h = 0; h < 2; h++) {
        __m128i nib[2];
        nibbles(qs + 32 * c + 16 * h, &nib[0], &nib[1]);
        __m128i bits = qh ? _mm_loadu_si128((const __m128i *)(qh + 16 * h)) : _mm_setzero_si128();
        for (int s = 0; s < 2; s++) /* sub-block 2c + s: nibble s */
            for (int g = 0; g < 2; g++) {
                __m256i q = widen(nib[s], g);
                if (qh) {
                    __m256i b = _mm256_srli_epi32(widen(bits, g), 2 * c + s);
                    q = _mm256_or_si256(q, _mm256_slli_epi32(_mm256_and_si256(b, one), 4));
                }
                v[4 * s + 2 * h + g] = _mm256_sub_ps(_mm256_mul_ps(ds[s], _mm256_cvtepi32_ps(q)), dm[s]);
            }
    }
}

INLINE void q4_k_part(const uint8_t *src, int c, __m256 *v) { k4_part(src, NULL, src + 16, c, v); }
INLINE void q5_k_part(const uint8_t *src, int c, __m256 *v) { k4_part(src, src + 16, src + 48, c, v); }

INLINE void q6_k_part(const uint8_t *src, int p, __m256 *v) {
    const __m256i m4 = _mm256_set1_epi32(0x0f), m2 = _mm256_set1_epi32(3), off = _mm256_set1_epi32(32);
    const uint8_t *ql = src, *qh = src + 128;
    const int8_t *scales = (const int8_t *)(src + 192);
    float d = half_at(src + 208);
    for (int e = 64 * p; e < 64 * p + 64; e += 8) { /* see dequant.c */
        int h = e >> 7, k = (e >> 6) & 1, j = (e >> 5) & 3;
        __m256i low = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(ql + 64 * h + (e & 63))));
        __m256i high = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qh + 32 * h + (e & 31))));
        low = _mm256_and_si256(_mm256_srli_epi32(low, 4 * k), m4);
        high = _mm256_and_si256(_mm256_srli_epi32(high, 2 * j), m2);
        __m256i q = _mm256_sub_epi32(_mm256_or_si256(low, _mm256_slli_epi32(high, 4)), off);
        v[(e >> 3) & 7] = _mm256_mul_ps(_mm256_set1_ps(d * (float)scales[e >> 4]), _mm256_cvtepi32_ps(q));
    }
}

/* ---------------------------------------------------------------- dequantizers and fused dots */

#define ACC_STRIDE (4 * 16) /* quant_matmul.c's acc_t: row r's accumulator at r * 4 * 16 */

#define DEFINE(name, ELEMS, BYTES, PART)                                                     \
    static TARGET void name##_dequant(const uint8_t *src, size_t blocks, float *dst) {       \
        __m256 v[PART / 8];                                                                  \
        for (size_t b = 0; b < blocks; b++, src += BYTES)                                    \
            for (int p = 0; p < ELEMS / PART; p++, dst += PART) {                            \
                name##_part(src, p, v);                                                      \
                for (int c = 0; c < PART / 8; c++) _mm256_storeu_ps(dst + 8 * c, v[c]);     \
            }                                                                                \
    }                                                                                        \
    INLINE void name##_fused_n(const uint8_t *const *w, size_t blocks, const float *x,       \
                               float *acc, const unsigned NW) {                             \
        __m256 a[4], v[4][PART / 8];                                                         \
        for (unsigned r = 0; r < NW; r++) a[r] = _mm256_loadu_ps(acc + r * ACC_STRIDE);      \
        for (size_t b = 0; b < blocks; b++)                                                  \
            for (int p = 0; p < ELEMS / PART; p++, x += PART) {                              \
                for (unsigned r = 0; r < NW; r++) name##_part(w[r] + b * BYTES, p, v[r]);    \
                for (int c = 0; c < PART / 8; c++) {                                         \
                    __m256 xv = _mm256_loadu_ps(x + 8 * c);                                  \
                    for (unsigned r = 0; r < NW; r++) a[r] = _mm256_fmadd_ps(v[r][c], xv, a[r]); \
                }                                                                            \
            }                                                                                \
        for (unsigned r = 0; r < NW; r++) _mm256_storeu_ps(acc + r * ACC_STRIDE, a[r]);      \
    }                                                                                        \
    static TARGET void name##_fused(const uint8_t *const *w, unsigned nw, size_t blocks,     \
                                    const float *x, float *acc) {                           \
        switch (nw) {                                                                        \
        case 1: name##_fused_n(w, blocks, x, acc, 1); return;                                \
        case 2: name##_fused_n(w, blocks, x, acc, 2); return;                                \
        case 3: name##_fused_n(w, blocks, x, acc, 3); return;                                \
        default: name##_fused_n(w, blocks, x, acc, 4); return;                               \
        }                                                                                    \
    }

DEFINE(q4_0, 32, 18, 32)
DEFINE(q4_1, 32, 20, 32)
DEFINE(q5_0, 32, 22, 32)
DEFINE(q5_1, 32, 24, 32)
DEFINE(q8_0, 32, 34, 32)
DEFINE(q4_k, 256, 144, 64)
DEFINE(q5_k, 256, 176, 64)
DEFINE(q6_k, 256, 210, 64)

static TARGET void f16_dequant(const uint8_t *src, size_t n, float *dst) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * i))));
    for (; i < n; i++) dst[i] = half_at(src + 2 * i);
}

static TARGET void bf16_dequant(const uint8_t *src, size_t n, float *dst) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + 2 * i)));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_slli_epi32(h, 16));
    }
    for (; i < n; i++) {
        uint32_t bits = (uint32_t)(src[2 * i] | src[2 * i + 1] << 8) << 16;
        memcpy(dst + i, &bits, 4);
    }
}

zm_dequant_fn zm_dequant_kernel_avx2(uint32_t type) {
    switch (type) {
    case ZM_GGML_F16: return f16_dequant;
    case ZM_GGML_BF16: return bf16_dequant;
    case ZM_GGML_Q4_0: return q4_0_dequant;
    case ZM_GGML_Q4_1: return q4_1_dequant;
    case ZM_GGML_Q5_0: return q5_0_dequant;
    case ZM_GGML_Q5_1: return q5_1_dequant;
    case ZM_GGML_Q8_0: return q8_0_dequant;
    case ZM_GGML_Q4_K: return q4_k_dequant;
    case ZM_GGML_Q5_K: return q5_k_dequant;
    case ZM_GGML_Q6_K: return q6_k_dequant;
    default: return zm_dequant_kernel(type);
    }
}

zm_fused_fn zm_fused_kernel_avx2(uint32_t type) {
    switch (type) {
    case ZM_GGML_Q4_0: return q4_0_fused;
    case ZM_GGML_Q4_1: return q4_1_fused;
    case ZM_GGML_Q5_0: return q5_0_fused;
    case ZM_GGML_Q5_1: return q5_1_fused;
    case ZM_GGML_Q8_0: return q8_0_fused;
    case ZM_GGML_Q4_K: return q4_k_fused;
    case ZM_GGML_Q5_K: return q5_k_fused;
    case ZM_GGML_Q6_K: return q6_k_fused;
    default: return NULL;
    }
}
