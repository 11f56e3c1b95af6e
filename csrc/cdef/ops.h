/* ops: fused per-step kernels of a llama forward pass (ops.c) */
#define ZM_SIMD_PORTABLE ...
#define ZM_SIMD_AVX2 ...
#define ZM_OPS_GEOMETRY ...
#define ZM_OPS_OVERLAP ...
int zm_ops_simd(int wanted);
int zm_rms_norm(const float *x, const float *weight, float *out, size_t rows, size_t dim,
                float eps);
int zm_rope(const float *x, float *out, size_t rows, size_t heads, size_t head_dim,
            const float *cos_table, const float *sin_table, size_t table_rows, size_t start);
int zm_silu_mul(const float *gate, const float *up, float *out, size_t n);
int zm_attention_f16(const float *q, size_t rows, size_t n_heads, size_t head_dim,
                     const uint16_t *keys, const uint16_t *values, size_t n_kv_heads,
                     size_t kv_len, size_t start, float *out, float *scratch,
                     size_t scratch_len);
