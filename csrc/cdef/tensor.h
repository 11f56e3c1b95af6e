/* tensor */
typedef struct { uintptr_t data; uintptr_t shape; uintptr_t strides; size_t nbytes;
                 size_t ndim; } zm_tensor_t;
int zm_py_tensor_init(zm_guard_t *g, uint64_t gen, zm_tensor_t *t, const int64_t *shape,
                      size_t ndim, size_t itemsize, uint64_t site);
int zm_py_tensor_deinit(zm_guard_t *g, uint64_t gen, zm_tensor_t *t, uint64_t site);
