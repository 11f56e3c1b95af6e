/* dequant.c — ggml's block formats to float32, bit for bit as gguf.quants.dequantize.
 *
 * Each value is one float multiply (and one add for Q4_1), rounded separately: this file
 * is compiled with -ffp-contract=off, so no fused multiply-add changes a rounding. */
#include <string.h>

#include "internal.h"

/* IEEE half to float, exactly (subnormals, infinities and NaNs included). */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        int e = -1;
        do {
            e++;
            man <<= 1;
        } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t load16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static void dequant_q4_0(const uint8_t *src, size_t blocks, float *dst) {
    for (size_t b = 0; b < blocks; b++, src += 18, dst += 32) {
        float d = half_to_float(load16(src));
        const uint8_t *q = src + 2;
        for (int j = 0; j < 16; j++) {
            dst[j] = (float)((q[j] & 0x0f) - 8) * d;
            dst[j + 16] = (float)((q[j] >> 4) - 8) * d;
        }
    }
}

static void dequant_q4_1(const uint8_t *src, size_t blocks, float *dst) {
    for (size_t b = 0; b < blocks; b++, src += 20, dst += 32) {
        float d = half_to_float(load16(src)), m = half_to_float(load16(src + 2));
        const uint8_t *q = src + 4;
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)(q[j] & 0x0f) + m;
            dst[j + 16] = d * (float)(q[j] >> 4) + m;
        }
    }
}

static void dequant_q8_0(const uint8_t *src, size_t blocks, float *dst) {
    for (size_t b = 0; b < blocks; b++, src += 34, dst += 32) {
        float d = half_to_float(load16(src));
        const int8_t *q = (const int8_t *)(src + 2);
        for (int j = 0; j < 32; j++) dst[j] = (float)q[j] * d;
    }
}

int zm_dequantize(uint32_t type, const void *src, size_t n, float *dst) {
    const uint8_t *s = src;
    switch (type) {
    case ZM_GGML_F32:
        memcpy(dst, src, n * 4);
        return ZM_OK;
    case ZM_GGML_F16:
        for (size_t i = 0; i < n; i++) dst[i] = half_to_float(load16(s + 2 * i));
        return ZM_OK;
    case ZM_GGML_BF16:
        for (size_t i = 0; i < n; i++) dst[i] = bf16_to_float(load16(s + 2 * i));
        return ZM_OK;
    case ZM_GGML_Q4_0:
    case ZM_GGML_Q4_1:
    case ZM_GGML_Q8_0:
        if (n % 32) return ZM_ERR_INVALID_ARG;
        if (type == ZM_GGML_Q4_0) dequant_q4_0(s, n / 32, dst);
        else if (type == ZM_GGML_Q4_1) dequant_q4_1(s, n / 32, dst);
        else dequant_q8_0(s, n / 32, dst);
        return ZM_OK;
    default:
        return ZM_ERR_INVALID_ARG;
    }
}
