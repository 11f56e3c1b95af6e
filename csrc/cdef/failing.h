/* failing */
typedef struct {
    size_t alloc_index; size_t resize_index; size_t fail_index; size_t resize_fail_index;
    size_t allocations; size_t deallocations; size_t allocated_bytes; size_t freed_bytes;
    bool has_induced_failure; ...;
} zm_failing_t;
void zm_failing_init(zm_failing_t *f, zm_allocator_t child, size_t fail_index,
                     size_t resize_fail_index);
void zm_failing_allocator(zm_failing_t *f, zm_allocator_t *out);
