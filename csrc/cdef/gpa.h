/* general-purpose allocator */
typedef struct zm_gpa zm_gpa_t;
typedef struct {
    bool safety; bool thread_safe; bool never_unmap; size_t memory_limit;
    size_t quarantine_bytes;
} zm_gpa_config_t;
typedef struct {
    size_t live_bytes; size_t live_count; size_t peak_bytes; size_t quarantine_bytes;
    size_t quarantine_count;
} zm_gpa_stats_t;
zm_gpa_t *zm_gpa_create(const zm_gpa_config_t *config);
void zm_gpa_guard_init(zm_guard_t *guard, zm_gpa_t *g);
int zm_py_gpa_stats(zm_guard_t *g, zm_gpa_t *gpa, zm_gpa_stats_t *out);
int zm_py_gpa_check(zm_guard_t *g, zm_gpa_t *gpa);
size_t zm_py_gpa_leaks(zm_guard_t *g, zm_gpa_t *gpa, zm_report_t *out, size_t max);
int zm_py_gpa_destroy(zm_guard_t *const *chain, const uint64_t *holds, size_t n, zm_gpa_t *gpa, int *op_status);
