/* dequant_avx512.c — the matrix kernels' dequantization with AVX-512: the same floats as
 * dequant.c, sixteen at a time, stored to memory or fed straight into dot products.
 *
 * Each type has one part function that leaves a part of a block (32 or 64 values) in
 * registers (v[0] holds its elements 0..15, v[1] 16..31, ...). Every value goes through the operations dequant.c
 * uses, in its order (integer unpacking, one conversion, a multiply, and an add or
 * subtract where the format has a minimum), each rounded on its own (-ffp-contract=off:
 * no fused multiply-add), so the results are bitwise those of the portable code and the
 * kernel path never changes a dequantized value.
 *
 * From the part functions come, per type: a dequantizer (zm_dequant_kernel_avx512) and a
 * fused dot (zm_fused_kernel_avx512): up to 4 rows of W against one row of x, adding
 * column c's product to lane c % 16 of the row's accumulator in column order — the exact
 * sequence quant_matmul.c's AVX-512 accumulate performs on dequantized rows, so the two
 * are interchangeable bit for bit, and the fused one never writes the floats out.
 * Types without a part function here (Q2_K, Q3_K) use dequant.c. The functions carry
 * target attributes and are only called when the CPU has AVX-512 (quant_matmul.c). */
#include <immintrin.h>
#include <string.h>

#include "internal.h"

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline)) TARGET

/* F16C's conversion: exact, as zm_half_to_float, for every finite and infinite half. */
INLINE float half_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* 16 bytes -> their low nibbles and their high nibbles, as 16 int32 each. */
INLINE void nibbles(const uint8_t *q, __m512i *lo, __m512i *hi) {
    __m128i b = _mm_loadu_si128((const __m128i *)q), m = _mm_set1_epi8(0x0f);
    *lo = _mm512_cvtepu8_epi32(_mm_and_si128(b, m));
    *hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m));
}

/* Bit j of qh (j = 0..15 of the chosen half) as 16 in lane j, else 0. */
INLINE __m512i high_bits(uint32_t qh, int half) {
    return _mm512_maskz_mov_epi32((__mmask16)(qh >> (16 * half)), _mm512_set1_epi32(16));
}

/* ---------------------------------------------------------------- block functions */

INLINE void q4_0_block(const uint8_t *src, __m512 *v) {
    const __m512i eight = _mm512_set1_epi32(8);
    __m512 d = _mm512_set1_ps(half_at(src));
    __m512i lo, hi;
    nibbles(src + 2, &lo, &hi);
    v[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, eight)), d);
    v[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, eight)), d);
}

INLINE void q4_1_block(const uint8_t *src, __m512 *v) {
    __m512 d = _mm512_set1_ps(half_at(src)), m = _mm512_set1_ps(half_at(src + 2));
    __m512i lo, hi;
    nibbles(src + 4, &lo, &hi);
    v[0] = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(lo)), m);
    v[1] = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(hi)), m);
}

INLINE void q5_0_block(const uint8_t *src, __m512 *v) {
    const __m512i sixteen = _mm512_set1_epi32(16);
    __m512 d = _mm512_set1_ps(half_at(src));
    uint32_t qh;
    memcpy(&qh, src + 2, 4);
    __m512i lo, hi;
    nibbles(src + 6, &lo, &hi);
    lo = _mm512_sub_epi32(_mm512_or_si512(lo, high_bits(qh, 0)), sixteen);
    hi = _mm512_sub_epi32(_mm512_or_si512(hi, high_bits(qh, 1)), sixteen);
    v[0] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(lo));
    v[1] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(hi));
}

INLINE void q5_1_block(const uint8_t *src, __m512 *v) {
    __m512 d = _mm512_set1_ps(half_at(src)), m = _mm512_set1_ps(half_at(src + 2));
    uint32_t qh;
    memcpy(&qh, src + 4, 4);
    __m512i lo, hi;
    nibbles(src + 8, &lo, &hi);
    lo = _mm512_or_si512(lo, high_bits(qh, 0));
    hi = _mm512_or_si512(hi, high_bits(qh, 1));
    v[0] = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(lo)), m);
    v[1] = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(hi)), m);
}

INLINE void q8_0_block(const uint8_t *src, __m512 *v) {
    __m512 d = _mm512_set1_ps(half_at(src));
    for (int h = 0; h < 2; h++) {
        __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + 2 + 16 * h)));
        v[h] = _mm512_mul_ps(_mm512_cvtepi32_ps(q), d);
    }
}

INLINE void iq4_nl_block(const uint8_t *src, __m512 *v) {
    __m512 grid = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)zm_iq4nl_values)));
    __m512 d = _mm512_set1_ps(half_at(src));
    __m512i lo, hi;
    nibbles(src + 2, &lo, &hi);
    v[0] = _mm512_mul_ps(d, _mm512_permutexvar_ps(lo, grid));
    v[1] = _mm512_mul_ps(d, _mm512_permutexvar_ps(hi, grid));
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

/* Q4_K and Q5_K, part c (elements 64c..64c+63): 32 bytes of qs hold sub-block 2c in low
 * nibbles and 2c + 1 in high ones; Q5_K adds bit s of qh[l] as the fifth bit of sub-block
 * s (qh NULL: Q4_K). */
INLINE void k4_part(const uint8_t *src, const uint8_t *qh, const uint8_t *qs, int c, __m512 *v) {
    float d = half_at(src), dmin = half_at(src + 2);
    const uint8_t *scales = src + 4;
    const __m512i one = _mm512_set1_epi32(1);
    int sc0, m0, sc1, m1;
    scale_min_k4(scales, 2 * c, &sc0, &m0);
    scale_min_k4(scales, 2 * c + 1, &sc1, &m1);
    __m512 ds0 = _mm512_set1_ps(d * (float)sc0), dm0 = _mm512_set1_ps(dmin * (float)m0);
    __m512 ds1 = _mm512_set1_ps(d * (float)sc1), dm1 = _mm512_set1_ps(dmin * (float)m1);
    for (int h = 0; h < 2; h++) {
        __m512i lo, hi;
        nibbles(qs + 32 * c + 16 * h, &lo, &hi);
        if (qh) {
            __m512i bits = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qh + 16 * h)));
            lo = _mm512_or_si512(lo, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 2 * c), one), 4));
            hi = _mm512_or_si512(hi, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 2 * c + 1), one), 4));
        }
        v[h] = _mm512_sub_ps(_mm512_mul_ps(ds0, _mm512_cvtepi32_ps(lo)), dm0);
        v[2 + h] = _mm512_sub_ps(_mm512_mul_ps(ds1, _mm512_cvtepi32_ps(hi)), dm1);
    }
}

INLINE void q4_k_part(const uint8_t *src, int c, __m512 *v) { k4_part(src, NULL, src + 16, c, v); }
INLINE void q5_k_part(const uint8_t *src, int c, __m512 *v) { k4_part(src, src + 16, src + 48, c, v); }

/* Q6_K, part p (elements 64p..64p+63); see dequant.c: h, k, j are fixed over 16 elements. */
INLINE void q6_k_part(const uint8_t *src, int p, __m512 *v) {
    const __m512i m4 = _mm512_set1_epi32(0x0f), m2 = _mm512_set1_epi32(3), off = _mm512_set1_epi32(32);
    const uint8_t *ql = src, *qh = src + 128;
    const int8_t *scales = (const int8_t *)(src + 192);
    float d = half_at(src + 208);
    for (int e = 64 * p; e < 64 * p + 64; e += 16) {
        int h = e >> 7, k = (e >> 6) & 1, j = (e >> 5) & 3;
        __m512i low = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ql + 64 * h + (e & 63))));
        __m512i high = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qh + 32 * h + (e & 31))));
        low = _mm512_and_si512(_mm512_srli_epi32(low, 4 * k), m4);
        high = _mm512_and_si512(_mm512_srli_epi32(high, 2 * j), m2);
        __m512i q = _mm512_sub_epi32(_mm512_or_si512(low, _mm512_slli_epi32(high, 4)), off);
        v[(e >> 4) & 3] = _mm512_mul_ps(_mm512_set1_ps(d * (float)scales[e >> 4]), _mm512_cvtepi32_ps(q));
    }
}

/* The 32-element formats are one part each. */
#define WHOLE(name) \
    INLINE void name##_part(const uint8_t *src, int p, __m512 *v) { (void)p; name##_block(src, v); }
WHOLE(q4_0)
WHOLE(q4_1)
WHOLE(q5_0)
WHOLE(q5_1)
WHOLE(q8_0)
WHOLE(iq4_nl)

INLINE void f16_block(const uint8_t *src, __m512 *v) {
    v[0] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)src));
}

INLINE void bf16_block(const uint8_t *src, __m512 *v) {
    __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src));
    v[0] = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}

/* ---------------------------------------------------------------- dequantizers and fused dots
 *
 * DEFINE(name, elements per block, bytes per block, elements per part): the part function
 * name##_part (a block is one or more parts of at most 64 elements) becomes name##_dequant
 * (a zm_dequant_fn) and name##_fused. The fused dot makes one part of each of its rows,
 * then feeds their 16-element chunks to the rows' accumulators in turn, so the rows'
 * dependency chains interleave. */

#define ACC_STRIDE (4 * 16) /* quant_matmul.c's acc_t: row r's accumulator at r * 4 * 16 */

#define DEFINE(name, ELEMS, BYTES, PART)                                                     \
    static TARGET void name##_dequant(const uint8_t *src, size_t blocks, float *dst) {       \
        __m512 v[PART / 16];                                                                 \
        for (size_t b = 0; b < blocks; b++, src += BYTES)                                    \
            for (int p = 0; p < ELEMS / PART; p++, dst += PART) {                            \
                name##_part(src, p, v);                                                      \
                for (int c = 0; c < PART / 16; c++) _mm512_storeu_ps(dst + 16 * c, v[c]);   \
            }                                                                                \
    }                                                                                        \
    INLINE void name##_fused_n(const uint8_t *const *w, size_t blocks, const float *x,       \
                               float *acc, const unsigned NW) {                             \
        __m512 a[4], v[4][PART / 16];                                                        \
        for (unsigned r = 0; r < NW; r++) a[r] = _mm512_loadu_ps(acc + r * ACC_STRIDE);      \
        for (size_t b = 0; b < blocks; b++)                                                  \
            for (int p = 0; p < ELEMS / PART; p++, x += PART) {                              \
                for (unsigned r = 0; r < NW; r++) name##_part(w[r] + b * BYTES, p, v[r]);    \
                for (int c = 0; c < PART / 16; c++) {                                        \
                    __m512 xv = _mm512_loadu_ps(x + 16 * c);                                 \
                    for (unsigned r = 0; r < NW; r++) a[r] = _mm512_fmadd_ps(v[r][c], xv, a[r]); \
                }                                                                            \
            }                                                                                \
        for (unsigned r = 0; r < NW; r++) _mm512_storeu_ps(acc + r * ACC_STRIDE, a[r]);      \
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
DEFINE(iq4_nl, 32, 18, 32)
DEFINE(q4_k, 256, 144, 64)
DEFINE(q5_k, 256, 176, 64)
DEFINE(q6_k, 256, 210, 64)

static TARGET void f16_dequant(const uint8_t *src, size_t n, float *dst) {
    size_t i = 0;
    __m512 v[1];
    for (; i + 16 <= n; i += 16) {
        f16_block(src + 2 * i, v);
        _mm512_storeu_ps(dst + i, v[0]);
    }
    for (; i < n; i++) dst[i] = half_at(src + 2 * i);
}

static TARGET void bf16_dequant(const uint8_t *src, size_t n, float *dst) {
    size_t i = 0;
    __m512 v[1];
    for (; i + 16 <= n; i += 16) {
        bf16_block(src + 2 * i, v);
        _mm512_storeu_ps(dst + i, v[0]);
    }
    for (; i < n; i++) {
        uint32_t bits = (uint32_t)(src[2 * i] | src[2 * i + 1] << 8) << 16;
        memcpy(dst + i, &bits, 4);
    }
}

zm_dequant_fn zm_dequant_kernel_avx512(uint32_t type) {
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
    case ZM_GGML_IQ4_NL: return iq4_nl_dequant;
    default: return zm_dequant_kernel(type);
    }
}

zm_fused_fn zm_fused_kernel_avx512(uint32_t type) {
    switch (type) {
    case ZM_GGML_Q4_0: return q4_0_fused;
    case ZM_GGML_Q4_1: return q4_1_fused;
    case ZM_GGML_Q5_0: return q5_0_fused;
    case ZM_GGML_Q5_1: return q5_1_fused;
    case ZM_GGML_Q8_0: return q8_0_fused;
    case ZM_GGML_Q4_K: return q4_k_fused;
    case ZM_GGML_Q5_K: return q5_k_fused;
    case ZM_GGML_Q6_K: return q6_k_fused;
    case ZM_GGML_IQ4_NL: return iq4_nl_fused;
    default: return NULL;
    }
}
