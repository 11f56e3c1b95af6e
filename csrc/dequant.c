/* dequant.c — ggml's block formats to float32, bit for bit as gguf.quants.dequantize.
 *
 * Every value is computed with the float operations gguf.quants uses, in its order, each
 * rounded separately: this file is compiled with -ffp-contract=off, so no fused
 * multiply-add changes a rounding. For the K-quants that means the sub-block scale is
 * rounded first (d * sc), then multiplied by the quant, then the rounded minimum
 * (dmin * m) is subtracted — exactly numpy's `d * q - dm`.
 *
 * Block layouts (bytes, little-endian; "half" is an IEEE fp16 scale):
 *   Q4_0  (32)  half d, 16 x nibbles              v = (q - 8) * d
 *   Q4_1  (32)  half d, half m, 16 x nibbles      v = d * q + m
 *   Q5_0  (32)  half d, u32 high bits, 16 x nib.  v = (q - 16) * d
 *   Q5_1  (32)  half d, half m, u32 qh, 16 x nib. v = d * q + m
 *   Q8_0  (32)  half d, 32 x int8                 v = q * d
 *   IQ4_NL(32)  half d, 16 x nibbles              v = d * kvalues[q]
 *   Q2_K (256)  scales[16], qs[64], half d, half dmin          16 sub-blocks of 16
 *   Q3_K (256)  hmask[32], qs[64], scales[12], half d         16 sub-blocks of 16
 *   Q4_K (256)  half d, half dmin, scales[12], qs[128]         8 sub-blocks of 32
 *   Q5_K (256)  half d, half dmin, scales[12], qh[32], qs[128] 8 sub-blocks of 32
 *   Q6_K (256)  ql[128], qh[64], int8 scales[16], half d      16 sub-blocks of 16
 * In the 32-element formats nibble j of byte i is element i + 16 j. */
#include <string.h>

#include "internal.h"

static inline uint16_t load16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static inline uint32_t load32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline float half_at(const uint8_t *p) { return zm_half_to_float(load16(p)); }

/* ---------------------------------------------------------------- 32-element blocks */

static void dequant_q4_0(const uint8_t *src, size_t blocks, float *dst) {
    for (size_t b = 0; b < blocks; b++, src += 18, dst += 32) {
        float d = half_at(src);
        const uint8_t *q = src + 2;
        for (int j = 0; j < 16; j++) {
            dst[j] = (float)((q[j] & 0x0f) - 8) * d;
            dst[j + 16] = (float)((q[j] >> 4) - 8) * d;
        }
    }
}

static void dequant_q4_1(const uint8_t *src, size_t blocks, float *dst) {
    for (size_t b = 0; b < blocks; b++, src += 20, dst += 32) {
        float d = half_at(src), m = half_at(src + 2);
        const uint8_t *q = src + 4;
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)(q[j] & 0x0f) + m;
            dst[j + 16] = d * (float)(q[j] >> 4) + m;
        }
    }
}

static void dequant_q5_0(const uint8_t *src, size_t blocks, float *dst) {
    for (size_t b = 0; b < blocks; b++, src += 22, dst += 32) {
        float d = half_at(src);
        uint32_t qh = load32(src + 2);
        const uint8_t *q = src + 6;
        for (int j = 0; j < 16; j++) {
            int lo = (q[j] & 0x0f) | (int)((qh >> j) & 1) << 4;
            int hi = (q[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            dst[j] = d * (float)(lo - 16);
            dst[j + 16] = d * (float)(hi - 16);
        }
    }
}

static void dequant_q5_1(const uint8_t *src, size_t blocks, float *dst) {
    for (size_t b = 0; b < blocks; b++, src += 24, dst += 32) {
        float d = half_at(src), m = half_at(src + 2);
        uint32_t qh = load32(src + 4);
        const uint8_t *q = src + 8;
        for (int j = 0; j < 16; j++) {
            int lo = (q[j] & 0x0f) | (int)((qh >> j) & 1) << 4;
            int hi = (q[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            dst[j] = d * (float)lo + m;
            dst[j + 16] = d * (float)hi + m;
        }
    }
}

static void dequant_q8_0(const uint8_t *src, size_t blocks, float *dst) {
    for (size_t b = 0; b < blocks; b++, src += 34, dst += 32) {
        float d = half_at(src);
        const int8_t *q = (const int8_t *)(src + 2);
        for (int j = 0; j < 32; j++) dst[j] = (float)q[j] * d;
    }
}

/* The non-linear 4-bit grid of IQ4_NL (ggml's kvalues_iq4nl). */
const int8_t zm_iq4nl_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                    1,    13,   25,  38,  53,  69,  89,  113};

static void dequant_iq4_nl(const uint8_t *src, size_t blocks, float *dst) {
    for (size_t b = 0; b < blocks; b++, src += 18, dst += 32) {
        float d = half_at(src);
        const uint8_t *q = src + 2;
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)zm_iq4nl_values[q[j] & 0x0f];
            dst[j + 16] = d * (float)zm_iq4nl_values[q[j] >> 4];
        }
    }
}

/* ---------------------------------------------------------------- 256-element K-quants */

static void dequant_q2_k(const uint8_t *src, size_t blocks, float *dst) {
    for (size_t b = 0; b < blocks; b++, src += 84, dst += 256) {
        const uint8_t *scales = src, *qs = src + 16;
        float d = half_at(src + 80), dmin = half_at(src + 82);
        /* element e = 128 h + 32 j + l holds bits 2j of qs[32 h + l] */
        for (int e = 0; e < 256; e++) {
            int h = e >> 7, j = (e >> 5) & 3, l = e & 31;
            int q = (qs[32 * h + l] >> (2 * j)) & 3;
            uint8_t s = scales[e >> 4];
            float dl = d * (float)(s & 0x0f), ml = dmin * (float)(s >> 4);
            dst[e] = dl * (float)q - ml;
        }
    }
}

static void dequant_q3_k(const uint8_t *src, size_t blocks, float *dst) {
    for (size_t b = 0; b < blocks; b++, src += 110, dst += 256) {
        const uint8_t *hmask = src, *qs = src + 32, *sc = src + 96;
        float d = half_at(src + 108);
        float dl[16];
        for (int s = 0; s < 16; s++) { /* 6-bit scales: low nibbles, then 2 high bits each */
            int lo = (sc[s & 7] >> (4 * (s >> 3))) & 0x0f;
            int hi = (sc[8 + (s & 3)] >> (2 * (s >> 2))) & 3;
            dl[s] = d * (float)((lo | hi << 4) - 32);
        }
        for (int e = 0; e < 256; e++) {
            int h = e >> 7, j = (e >> 5) & 3, l = e & 31;
            int low = (qs[32 * h + l] >> (2 * j)) & 3;
            int high = (hmask[l] >> (e >> 5)) & 1; /* a set bit means no offset */
            dst[e] = dl[e >> 4] * (float)(low - (high ? 0 : 4));
        }
    }
}

/* The 6-bit scale and minimum of sub-block s of a Q4_K / Q5_K block. */
static inline void scale_min_k4(const uint8_t *scales, int s, int *sc, int *m) {
    if (s < 4) {
        *sc = scales[s] & 0x3f;
        *m = scales[s + 4] & 0x3f;
    } else {
        *sc = (scales[s + 4] & 0x0f) | ((scales[s - 4] >> 2) & 0x30);
        *m = (scales[s + 4] >> 4) | ((scales[s] >> 2) & 0x30);
    }
}

static void dequant_q4_k(const uint8_t *src, size_t blocks, float *dst) {
    for (size_t b = 0; b < blocks; b++, src += 144, dst += 256) {
        float d = half_at(src), dmin = half_at(src + 2);
        const uint8_t *scales = src + 4, *qs = src + 16;
        for (int s = 0; s < 8; s++) { /* sub-block s: nibble s & 1 of qs[32 (s >> 1) + l] */
            int sc, m;
            scale_min_k4(scales, s, &sc, &m);
            float ds = d * (float)sc, dm = dmin * (float)m;
            const uint8_t *q = qs + 32 * (s >> 1);
            for (int l = 0; l < 32; l++) dst[32 * s + l] = ds * (float)((q[l] >> (4 * (s & 1))) & 0x0f) - dm;
        }
    }
}

static void dequant_q5_k(const uint8_t *src, size_t blocks, float *dst) {
    for (size_t b = 0; b < blocks; b++, src += 176, dst += 256) {
        float d = half_at(src), dmin = half_at(src + 2);
        const uint8_t *scales = src + 4, *qh = src + 16, *qs = src + 48;
        for (int s = 0; s < 8; s++) {
            int sc, m;
            scale_min_k4(scales, s, &sc, &m);
            float ds = d * (float)sc, dm = dmin * (float)m;
            const uint8_t *q = qs + 32 * (s >> 1);
            for (int l = 0; l < 32; l++) {
                int v = ((q[l] >> (4 * (s & 1))) & 0x0f) | ((qh[l] >> s) & 1) << 4;
                dst[32 * s + l] = ds * (float)v - dm;
            }
        }
    }
}

static void dequant_q6_k(const uint8_t *src, size_t blocks, float *dst) {
    for (size_t b = 0; b < blocks; b++, src += 210, dst += 256) {
        const uint8_t *ql = src, *qh = src + 128;
        const int8_t *scales = (const int8_t *)(src + 192);
        float d = half_at(src + 208);
        for (int e = 0; e < 256; e++) {
            int h = e >> 7, k = (e >> 6) & 1, m = e & 63, j = (e >> 5) & 3, l = e & 31;
            int low = (ql[64 * h + m] >> (4 * k)) & 0x0f;
            int high = (qh[32 * h + l] >> (2 * j)) & 3;
            dst[e] = (d * (float)scales[e >> 4]) * (float)((low | high << 4) - 32);
        }
    }
}

/* ---------------------------------------------------------------- plain floats */

static void dequant_f32(const uint8_t *src, size_t n, float *dst) { memcpy(dst, src, n * 4); }

static void dequant_f16(const uint8_t *src, size_t n, float *dst) {
    for (size_t i = 0; i < n; i++) dst[i] = half_at(src + 2 * i);
}

static void dequant_bf16(const uint8_t *src, size_t n, float *dst) {
    for (size_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)load16(src + 2 * i) << 16;
        memcpy(&dst[i], &bits, 4);
    }
}

/* ---------------------------------------------------------------- the table */

zm_dequant_fn zm_dequant_kernel(uint32_t type) {
    switch (type) {
    case ZM_GGML_F32: return dequant_f32;
    case ZM_GGML_F16: return dequant_f16;
    case ZM_GGML_BF16: return dequant_bf16;
    case ZM_GGML_Q4_0: return dequant_q4_0;
    case ZM_GGML_Q4_1: return dequant_q4_1;
    case ZM_GGML_Q5_0: return dequant_q5_0;
    case ZM_GGML_Q5_1: return dequant_q5_1;
    case ZM_GGML_Q8_0: return dequant_q8_0;
    case ZM_GGML_Q2_K: return dequant_q2_k;
    case ZM_GGML_Q3_K: return dequant_q3_k;
    case ZM_GGML_Q4_K: return dequant_q4_k;
    case ZM_GGML_Q5_K: return dequant_q5_k;
    case ZM_GGML_Q6_K: return dequant_q6_k;
    case ZM_GGML_IQ4_NL: return dequant_iq4_nl;
    default: return NULL;
    }
}

int zm_dequantize(uint32_t type, const void *src, size_t n, float *dst) {
    uint32_t block, bytes;
    zm_dequant_fn fn = zm_dequant_kernel(type);
    if (!fn || !zm_ggml_type_size(type, &block, &bytes) || n % block) return ZM_ERR_INVALID_ARG;
    fn(src, n / block, dst);
    return ZM_OK;
}
