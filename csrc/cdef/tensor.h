/* tensor */
typedef struct { uintptr_t data; uintptr_t shape; uintptr_t strides; size_t nbytes;
                 size_t ndim; } zm_tensor_t;
int zm_py_tensor_init(zm_tensor_t *t, const zm_allocator_t *a, const int64_t *shape,
                      size_t ndim, size_t itemsize, int serialize);
void zm_py_tensor_deinit(zm_tensor_t *t, const zm_allocator_t *a, int serialize);
