/* The vtable handle, the per-thread report, and the checked entry points. */
typedef struct { void *ctx; ...; } zm_allocator_t;

typedef struct {
    int code; int sys_errno; uintptr_t address; size_t size; size_t expected;
    size_t offset; size_t count; size_t limit; uint64_t alloc_site; uint64_t free_site;
    int detail; size_t given; size_t more;
} zm_report_t;
#define ZM_FREE_UNKNOWN_POINTER ...
#define ZM_FREE_INTERIOR_POINTER ...
#define ZM_FREE_WRONG_SIZE ...
#define ZM_FREE_WRONG_ALIGNMENT ...
zm_report_t *zm_last_report(void);

uintptr_t zm_py_alloc(const zm_allocator_t *a, size_t len, size_t align, int serialize);
int zm_py_resize(const zm_allocator_t *a, uintptr_t ptr, size_t len, size_t align,
                 size_t new_len, int serialize);
uintptr_t zm_py_remap(const zm_allocator_t *a, uintptr_t ptr, size_t len, size_t align,
                      size_t new_len, int serialize);
uintptr_t zm_py_realloc(const zm_allocator_t *a, uintptr_t ptr, size_t len, size_t align,
                        size_t new_len, int serialize);
void zm_py_free(const zm_allocator_t *a, uintptr_t ptr, size_t len, size_t align,
                int serialize);
void zm_py_lock(void);
void zm_py_unlock(void);
