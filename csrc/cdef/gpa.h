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
void zm_gpa_allocator(zm_gpa_t *g, zm_allocator_t *out);
void zm_gpa_set_thread_site(uint64_t site);
void zm_gpa_stats(zm_gpa_t *g, zm_gpa_stats_t *out);
int zm_gpa_check(zm_gpa_t *g);
size_t zm_gpa_leaks(zm_gpa_t *g, zm_report_t *out, size_t max);
int zm_gpa_destroy(zm_gpa_t *g);
uintptr_t zm_gpa_py_alloc(zm_gpa_t *g, size_t len, size_t align, uint64_t site);
int zm_gpa_py_free(zm_gpa_t *g, uintptr_t ptr, size_t len, size_t align, uint64_t site);
int zm_gpa_py_resize(zm_gpa_t *g, uintptr_t ptr, size_t len, size_t align, size_t new_len);
uintptr_t zm_gpa_py_realloc(zm_gpa_t *g, uintptr_t ptr, size_t len, size_t align,
                            size_t new_len, uint64_t site);
