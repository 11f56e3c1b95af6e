/* The vtable handle, the per-thread report, and the guard with its checked entry points. */
typedef struct { void *ctx; ...; } zm_allocator_t;

typedef struct {
    int code; int sys_errno; uintptr_t address; size_t size; size_t alignment;
    size_t expected; size_t offset; size_t count; size_t limit; size_t index; uint64_t alloc_site; uint64_t free_site;
    int detail; size_t given; size_t more;
} zm_report_t;
#define ZM_FREE_UNKNOWN_POINTER ...
#define ZM_FREE_INTERIOR_POINTER ...
#define ZM_FREE_WRONG_SIZE ...
#define ZM_FREE_WRONG_ALIGNMENT ...
zm_report_t *zm_last_report(void);

typedef struct { uint64_t generation; bool closed; size_t foreign_live; uint64_t holds_made;
                 uint64_t serial; ...; } zm_guard_t;
typedef struct { uintptr_t address; size_t nbytes; size_t alignment; int moved; } zm_block_t;
void zm_guard_init(zm_guard_t *g, zm_allocator_t inner, bool thread_safe);
void zm_guard_deinit(zm_guard_t *g);
void zm_guard_allocator(zm_guard_t *g, zm_allocator_t *out);
uintptr_t zm_guard_alloc(zm_guard_t *g, uint64_t gen, size_t len, size_t align, uint64_t site);
int zm_guard_free(zm_guard_t *g, uint64_t gen, uintptr_t ptr, size_t len, size_t align,
                  uint64_t site);
int zm_guard_resize(zm_guard_t *g, uint64_t gen, zm_block_t *b, size_t new_len);
int zm_guard_move(zm_guard_t *g, uint64_t gen, zm_block_t *b, size_t new_len, bool copy,
                  uint64_t site);
int zm_guard_hold(zm_guard_t *g, uint64_t gen);
int zm_py_close(zm_guard_t *const *chain, const uint64_t *holds, size_t n);
#define ZM_TRACEMALLOC_DOMAIN ...
void zm_py_trace_install(void);
