/* internal.h — helpers shared by the files of csrc/; not part of the public interface. */
#ifndef ZIGMEM_INTERNAL_H
#define ZIGMEM_INTERNAL_H

#include "include/zigmem.h"

#define ZM_NOINLINE __attribute__((noinline))
#define ZM_LIKELY(x) __builtin_expect(!!(x), 1)
#define ZM_UNLIKELY(x) __builtin_expect(!!(x), 0)

/* Round len up to a multiple of align (a power of two); false on overflow. */
static inline bool zm_align_up(size_t len, size_t align, size_t *out) {
    size_t sum;
    if (__builtin_add_overflow(len, align - 1, &sum)) return false;
    *out = sum & ~(align - 1);
    return true;
}

static inline uintptr_t zm_align_addr(uintptr_t addr, size_t align) {
    return (addr + (align - 1)) & ~(uintptr_t)(align - 1);
}

size_t zm_memlock_limit(void);

/* A spin lock for critical sections of a few nanoseconds (a bump, a list link). A waiter
 * yields after a short spin, so a holder in a slow path (an mmap) does not starve it. */
void zm_spin_wait(int *lock);

static inline void zm_spin_lock(int *lock) {
    if (__atomic_exchange_n(lock, 1, __ATOMIC_ACQUIRE)) zm_spin_wait(lock);
}

static inline void zm_spin_unlock(int *lock) { __atomic_store_n(lock, 0, __ATOMIC_RELEASE); }

/* Raw vtable calls for wrappers, whose arguments the zm_* helpers already checked. */
static inline void *zm_child_alloc(zm_allocator_t c, size_t len, size_t align) {
    return c.vtable->alloc(c.ctx, len, align);
}
static inline bool zm_child_resize(zm_allocator_t c, void *p, size_t len, size_t align,
                                   size_t new_len) {
    return c.vtable->resize(c.ctx, p, len, align, new_len);
}
static inline void *zm_child_remap(zm_allocator_t c, void *p, size_t len, size_t align,
                                   size_t new_len) {
    return c.vtable->remap(c.ctx, p, len, align, new_len);
}
static inline void zm_child_free(zm_allocator_t c, void *p, size_t len, size_t align) {
    c.vtable->free(c.ctx, p, len, align);
}

/* ---------------------------------------------------------------- dequant.c */

/* IEEE half to float, exactly (subnormals, infinities and NaNs included). */
static inline float zm_half_to_float(uint16_t h) {
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
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

/* Dequantize `blocks` whole blocks (elements, for F32/F16/BF16) of one type. */
typedef void (*zm_dequant_fn)(const uint8_t *src, size_t blocks, float *dst);
/* NULL for types without a kernel. */
zm_dequant_fn zm_dequant_kernel(uint32_t type);
extern const int8_t zm_iq4nl_values[16];
/* The same, with AVX-512 where dequant_avx512.c has the type (callers check the CPU). */
zm_dequant_fn zm_dequant_kernel_avx512(uint32_t type);
/* Dot nw <= 4 rows of whole blocks with one row of x, adding to 16-lane accumulators laid
 * out as quant_matmul.c's (row r's at acc + 64 r); NULL: no fused kernel for the type. */
typedef void (*zm_fused_fn)(const uint8_t *const *w, unsigned nw, size_t blocks,
                            const float *x, float *acc);
zm_fused_fn zm_fused_kernel_avx512(uint32_t type);
/* The AVX2 twins (dequant_avx2.c): 8-lane accumulators, in the same layout. */
zm_dequant_fn zm_dequant_kernel_avx2(uint32_t type);
zm_fused_fn zm_fused_kernel_avx2(uint32_t type);

/* Rows of W per task when few rows of x stream the weights (quant_matmul.c, int16_matmul.c):
 * two long runs per thread, each prefetched ahead, and a late thread's share still taken;
 * at least 16, a multiple of 4 (the register blocks). */
static inline size_t zm_stream_task_rows(size_t rows) {
    size_t threads = zm_get_num_threads(), per = (rows + 2 * threads - 1) / (2 * threads);
    return per < 16 ? 16 : (per + 3) & ~(size_t)3;
}

/* Ask for [p, p + bytes) ahead of use: a decode step reads each weight once, and the mapped
 * file's 4 KiB pages stop the hardware prefetchers. */
static inline void zm_prefetch(const void *p, size_t bytes) {
    for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch((const char *)p + off, 0, 3);
}

/* int16_matmul.c: out = x @ W^T with x quantized to int16 (see ZM_MATMUL_INT16); the
 * caller has checked the arguments. path: a ZM_KERNELS_* path the CPU runs. */
bool zm_int16_supported(uint32_t type);
int zm_int16_matmul(uint32_t type, const void *w, size_t rows, size_t cols, size_t row_bytes,
                    const float *x, size_t n, float *out, int path);

#endif
