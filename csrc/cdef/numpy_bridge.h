/* numpy bridge state (ServeNumpy and the handler are reached through ctypes.PyDLL) */
typedef struct { uintptr_t data; size_t nbytes; uint64_t site; } zm_np_live_entry_t;
typedef struct { size_t live_count; size_t live_bytes; size_t total_count; size_t errors;
                 ...; } zm_np_state_t;
void zm_np_state_init(zm_np_state_t *s, zm_guard_t *guard);
void zm_np_state_deinit(zm_np_state_t *s);
size_t zm_np_live(zm_np_state_t *s, zm_report_t *out, size_t max);
size_t zm_np_take_error(zm_np_state_t *s, zm_report_t *out);
