/* counting */
typedef struct {
    size_t current_bytes; size_t peak_bytes; size_t total_bytes;
    size_t current_count; size_t alloc_count; size_t free_count; ...;
} zm_counting_t;
void zm_counting_init(zm_counting_t *c, zm_allocator_t child);
void zm_counting_allocator(zm_counting_t *c, zm_allocator_t *out);
void zm_counting_reset_peak(zm_counting_t *c);
