/* tensor.c — the seed design's Tensor(T): data, an owned copy of the shape and the strides
 * (in elements), three allocations from one allocator, made and released in one call.
 *
 * init is all-or-nothing (Zig's errdefer): if the second or third allocation fails, the
 * ones already made are freed before the failure is returned. */
#include <string.h>

#include "internal.h"

int zm_tensor_init(zm_tensor_t *t, zm_allocator_t a, const int64_t *shape, size_t ndim,
                   size_t itemsize) {
    /* As numpy: the product of the non-zero dims (the strides) must fit in int64 even when
     * a zero dim makes the tensor empty. */
    size_t span = itemsize, meta;
    bool empty = false;
    memset(t, 0, sizeof *t);
    for (size_t i = 0; i < ndim; i++) {
        if (shape[i] < 0) {
            zm_fail(ZM_ERR_INVALID_ARG, i, 0, 0);
            return ZM_ERR_INVALID_ARG;
        }
        if (shape[i] == 0) {
            empty = true;
        } else if (__builtin_mul_overflow(span, (size_t)shape[i], &span) || span > INT64_MAX) {
            zm_fail(ZM_ERR_TOO_LARGE, 0, 0, 0);
            return ZM_ERR_TOO_LARGE;
        }
    }
    size_t n = empty ? 0 : span;
    if (__builtin_mul_overflow(ndim, sizeof(int64_t), &meta)) return ZM_ERR_TOO_LARGE;
    void *data = zm_alloc(a, n, 64);
    if (!data) return zm_last_report()->code ? zm_last_report()->code : ZM_ERR_OUT_OF_MEMORY;
    int64_t *shape_copy = zm_alloc(a, meta, 8);
    if (!shape_copy) goto free_data;
    int64_t *strides = zm_alloc(a, meta, 8);
    if (!strides) goto free_shape;
    memcpy(shape_copy, shape, meta);
    int64_t stride = 1;
    for (size_t i = ndim; i-- > 0;) {
        strides[i] = stride;
        stride *= shape[i] ? shape[i] : 1; /* no overflow: the product fit in size_t */
    }
    *t = (zm_tensor_t){(uintptr_t)data, (uintptr_t)shape_copy, (uintptr_t)strides, n, ndim};
    return ZM_OK;
free_shape:
    zm_free(a, shape_copy, meta, 8);
free_data:
    zm_free(a, data, n, 64);
    return zm_last_report()->code ? zm_last_report()->code : ZM_ERR_OUT_OF_MEMORY;
}

void zm_tensor_deinit(zm_tensor_t *t, zm_allocator_t a) {
    size_t meta = t->ndim * sizeof(int64_t);
    zm_free(a, (void *)t->strides, meta, 8);
    zm_free(a, (void *)t->shape, meta, 8);
    zm_free(a, (void *)t->data, t->nbytes, 64);
    memset(t, 0, sizeof *t);
}
