/* arena */
typedef struct { ...; } zm_arena_t;
typedef enum { ZM_ARENA_FREE_ALL, ZM_ARENA_RETAIN_CAPACITY, ZM_ARENA_RETAIN_WITH_LIMIT, ...
} zm_arena_reset_mode_t;
void zm_arena_init(zm_arena_t *a, zm_allocator_t child);
void zm_arena_allocator(zm_arena_t *a, zm_allocator_t *out);
size_t zm_py_arena_capacity(zm_guard_t *g, zm_arena_t *a);
int zm_py_arena_reset(zm_guard_t *const *chain, const uint64_t *holds, size_t n, zm_arena_t *a, int mode,
                      size_t limit, int *retained);
int zm_py_arena_deinit(zm_guard_t *const *chain, const uint64_t *holds, size_t n, zm_arena_t *a);
