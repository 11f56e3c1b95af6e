/* arena */
typedef struct { ...; } zm_arena_t;
typedef enum { ZM_ARENA_FREE_ALL, ZM_ARENA_RETAIN_CAPACITY, ZM_ARENA_RETAIN_WITH_LIMIT, ...
} zm_arena_reset_mode_t;
void zm_arena_init(zm_arena_t *a, zm_allocator_t child);
void zm_arena_allocator(zm_arena_t *a, zm_allocator_t *out);
size_t zm_arena_capacity(const zm_arena_t *a);
bool zm_arena_reset(zm_arena_t *a, zm_arena_reset_mode_t mode, size_t limit);
void zm_arena_deinit(zm_arena_t *a);
