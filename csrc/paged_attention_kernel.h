/* paged_attention_kernel.h — the attention kernel's body, compiled once per instruction set.
 *
 * paged_attention.c includes this file three times, under `#pragma GCC target` for
 * AVX-512 and AVX2 and with none for the portable build; KERNEL(name) gives each copy its
 * own names. The arithmetic is written with GCC vector extensions (16 float lanes), which
 * each target lowers to its own registers; only float16 loads need intrinsics.
 *
 * One call computes rows [r0, r1) of one sequence for heads [h0, h1) of one KV group, in an
 * order that depends on nothing else: positions in tiles that start at block boundaries
 * (split every ZM_PKV_TILE positions), dot products in 16 lanes summed as a fixed tree, the
 * softmax kept online (running max and sum, rescaled per tile). That is what makes each
 * (sequence, head) bitwise independent of the batch it shares a call with.
 */

static inline __attribute__((always_inline)) float KERNEL(hsum)(const zm_v16f *p) {
    zm_v16f v = *p;
    zm_v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    zm_v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) +
               __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* n values of the cache's dtype to float32. */
static void KERNEL(convert)(int dtype, const uint8_t *src, float *dst, size_t n) {
    size_t i = 0;
    if (dtype == ZM_KV_F32) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    if (dtype == ZM_KV_BF16) {
        for (; i < n; i++) { /* integer shifts: the compiler vectorises this loop */
            uint32_t bits = (uint32_t)((uint16_t)(src[2 * i] | src[2 * i + 1] << 8)) << 16;
            memcpy(dst + i, &bits, 4);
        }
        return;
    }
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i,
                         _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + 2 * i))));
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * i))));
#endif
    for (; i < n; i++) dst[i] = zm_half_to_float((uint16_t)(src[2 * i] | src[2 * i + 1] << 8));
}

static inline float KERNEL(dot)(const float *a, const float *b, size_t n) {
    zm_v16f acc = {0};
    size_t i = 0;
    for (; i + 16 <= n; i += 16) acc += ZM_LOAD16(a + i) * ZM_LOAD16(b + i);
    float s = KERNEL(hsum)(&acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y = y * c + p * x */
static inline void KERNEL(scale_axpy)(float *y, float c, float p, const float *x, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        ZM_STORE16(y + i, ZM_LOAD16(y + i) * c + ZM_LOAD16(x + i) * p);
    for (; i < n; i++) y[i] = y[i] * c + x[i] * p;
}

/* Rows [r0, r1) of the sequence (row r at position first_pos + r), heads [h0, h1). */
static void KERNEL(attend)(const zm_pkv_attention_t *c, const zm_pkv_seq_t *s, size_t g,
                           size_t first_pos, size_t r0, size_t r1, size_t h0, size_t h1,
                           const float *q, float *out) {
    const zm_paged_kv_t *kv = c->kv;
    size_t d = kv->head_dim, bs = kv->block_size, tile = c->tile, nh = h1 - h0;
    size_t q_row = c->n_heads * d;
    float k_tile[ZM_PKV_TILE_FLOATS], v_tile[ZM_PKV_TILE_FLOATS], scores[ZM_PKV_TILE];
    float acc[ZM_PKV_STATE_FLOATS], m[ZM_PKV_STATES], l[ZM_PKV_STATES];
    size_t n_states = (r1 - r0) * nh;
    for (size_t i = 0; i < n_states; i++) {
        m[i] = -__builtin_inff();
        l[i] = 0.0f;
    }
    memset(acc, 0, n_states * d * sizeof(float));
    size_t end = first_pos + r1; /* positions the last row sees */
    for (size_t b0 = 0; b0 < end; b0 += bs) {
        int32_t block = s->table[b0 / bs];
        const uint8_t *kb = zm_pkv_block_head(kv, block, c->layer, 0, g);
        const uint8_t *vb = zm_pkv_block_head(kv, block, c->layer, 1, g);
        for (size_t t0 = b0; t0 < b0 + bs && t0 < end; t0 += tile) {
            size_t tn = b0 + bs - t0 < tile ? b0 + bs - t0 : tile;
            if (tn > end - t0) tn = end - t0;
            size_t at = (t0 - b0) * d * kv->itemsize;
            KERNEL(convert)(kv->dtype, kb + at, k_tile, tn * d);
            KERNEL(convert)(kv->dtype, vb + at, v_tile, tn * d);
            for (size_t r = r0; r < r1; r++) {
                size_t limit = first_pos + r + 1; /* causal: positions < limit */
                if (t0 >= limit) continue;
                size_t n = limit - t0 < tn ? limit - t0 : tn;
                for (size_t h = h0; h < h1; h++) {
                    size_t st = (r - r0) * nh + (h - h0);
                    const float *qv = q + r * q_row + h * d;
                    float *a = acc + st * d, mx = m[st];
                    for (size_t j = 0; j < n; j++) {
                        scores[j] = KERNEL(dot)(qv, k_tile + j * d, d) * c->scale;
                        if (scores[j] > mx) mx = scores[j];
                    }
                    float corr = expf(m[st] - mx), sum = l[st] * corr;
                    bool rescale = mx != m[st];
                    for (size_t j = 0; j < n; j++) {
                        float p = expf(scores[j] - mx);
                        sum += p;
                        KERNEL(scale_axpy)(a, rescale && j == 0 ? corr : 1.0f, p,
                                           v_tile + j * d, d);
                    }
                    m[st] = mx;
                    l[st] = sum;
                }
            }
        }
    }
    for (size_t r = r0; r < r1; r++)
        for (size_t h = h0; h < h1; h++) {
            size_t st = (r - r0) * nh + (h - h0);
            float *o = out + r * q_row + h * d;
            for (size_t i = 0; i < d; i++) o[i] = acc[st * d + i] / l[st];
        }
}

/* Every row and head of KV group g of one sequence: heads and rows in chunks whose state
 * fits the stack. */
static void KERNEL(task)(const zm_pkv_attention_t *c, const zm_pkv_seq_t *s, size_t g,
                         size_t first_pos, size_t r0, size_t r1, const float *q, float *out) {
    size_t group = c->n_heads / c->kv->n_kv_heads, d = c->kv->head_dim;
    size_t states = ZM_PKV_STATE_FLOATS / d; /* >= 4: head_dim <= 1024 */
    if (states > ZM_PKV_STATES) states = ZM_PKV_STATES;
    size_t hc = group < states ? group : states, rc = states / hc;
    for (size_t h0 = g * group; h0 < (g + 1) * group; h0 += hc) {
        size_t h1 = h0 + hc < (g + 1) * group ? h0 + hc : (g + 1) * group;
        for (size_t a = r0; a < r1; a += rc)
            KERNEL(attend)(c, s, g, first_pos, a, a + rc < r1 ? a + rc : r1, h0, h1, q, out);
    }
}
