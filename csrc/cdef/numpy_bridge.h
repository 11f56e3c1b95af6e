/* numpy bridge state (the handler functions themselves are reached through ctypes) */
typedef struct { size_t live_count; size_t live_bytes; size_t total_count; size_t bad_frees;
                 uintptr_t bad_address; ...; } zm_np_state_t;
void zm_np_state_init(zm_np_state_t *s, zm_allocator_t allocator, int serialize);
size_t zm_np_live(zm_np_state_t *s, zm_report_t *out, size_t max);
