/* fixed buffer */
typedef struct { size_t len; size_t end; ...; } zm_fixed_buffer_t;
void zm_fixed_buffer_init(zm_fixed_buffer_t *f, void *buffer, size_t len);
void zm_fixed_buffer_allocator(zm_fixed_buffer_t *f, zm_allocator_t *out);
void zm_fixed_buffer_reset(zm_fixed_buffer_t *f);
