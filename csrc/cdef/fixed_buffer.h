/* fixed buffer */
typedef struct { size_t len; size_t end; ...; } zm_fixed_buffer_t;
void zm_fixed_buffer_init(zm_fixed_buffer_t *f, void *buffer, size_t len);
void zm_fixed_buffer_allocator(zm_fixed_buffer_t *f, zm_allocator_t *out);
int zm_py_fixed_buffer_reset(zm_guard_t *const *chain, const uint64_t *holds, size_t n, zm_fixed_buffer_t *f);
