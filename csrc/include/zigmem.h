/*
 * zigmem.h — the public C interface of zigmem's allocators.
 *
 * Every allocator exposes one vtable, as Zig's std.mem.Allocator:
 *
 *   alloc(ctx, len, align)                 -> ptr | NULL   (NULL: out of memory)
 *   resize(ctx, ptr, len, align, new_len)  -> bool         (in place only)
 *   remap(ctx, ptr, len, align, new_len)   -> ptr | NULL   (may move; NULL: caller copies)
 *   free(ctx, ptr, len, align)
 *
 * The caller remembers each block's length and alignment and passes them back, so allocators
 * keep no per-block headers unless they want to (the general-purpose allocator does, for
 * safety checks).
 *
 * Vtable functions are only ever called with len > 0, new_len > 0 and a power-of-two align;
 * the zm_alloc / zm_resize / zm_remap / zm_free helpers below enforce that, give zero-length
 * blocks a well-defined meaning (a unique-per-alignment, never-dereferenced address, as Zig),
 * and are what both C callers and wrappers use.
 *
 * The core never aborts and never prints. Failures return NULL / false / a status, and the
 * calling thread's zm_report_t (zm_last_report) says why: which code, which sizes, which limit.
 *
 * Struct bodies are declared here so that allocators can be embedded by value (as Zig's
 * allocators are values); their fields are private to csrc/.
 */
#ifndef ZIGMEM_H
#define ZIGMEM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- vtable */

typedef struct zm_vtable {
    void *(*alloc)(void *ctx, size_t len, size_t align);
    bool (*resize)(void *ctx, void *ptr, size_t len, size_t align, size_t new_len);
    void *(*remap)(void *ctx, void *ptr, size_t len, size_t align, size_t new_len);
    void (*free)(void *ctx, void *ptr, size_t len, size_t align);
} zm_vtable_t;

typedef struct zm_allocator {
    void *ctx;
    const zm_vtable_t *vtable;
} zm_allocator_t;

/* ---------------------------------------------------------------- status and report */

typedef enum zm_status {
    ZM_OK = 0,
    ZM_ERR_OUT_OF_MEMORY = 1,   /* the child / the OS refused; sys_errno says why */
    ZM_ERR_TOO_LARGE = 2,       /* a size computation overflowed */
    ZM_ERR_ALIGNMENT = 3,       /* alignment is not a power of two */
    ZM_ERR_MLOCK = 4,           /* mlock refused; limit = RLIMIT_MEMLOCK soft limit */
    ZM_ERR_LIMIT = 5,           /* an allocator's own memory limit; limit = that limit */
    ZM_ERR_INDUCED = 6,         /* a FailingAllocator failed on purpose */
    ZM_ERR_INVALID_FREE = 7,
    ZM_ERR_DOUBLE_FREE = 8,
    ZM_ERR_OVERFLOW = 9,        /* red zone after the block changed */
    ZM_ERR_UNDERFLOW = 10,      /* red zone before the block changed */
    ZM_ERR_USE_AFTER_FREE = 11, /* poison of a freed block changed */
    ZM_ERR_LEAK = 12,
    ZM_ERR_INVALID_ARG = 13,
    ZM_ERR_CLOSED = 14,         /* the allocator was deinitialised */
    ZM_ERR_STALE = 15,          /* a reset or deinit released the block since it was stamped */
    ZM_ERR_LIVE = 16,           /* numpy arrays still hold blocks; size = how many */
    ZM_ERR_RETRY = 17,          /* a view was made while a release was being decided */
} zm_status_t;

/* What went wrong, for the caller to turn into a precise message. Fields that do not apply
 * to a code are zero. */
typedef struct zm_report {
    int code;             /* zm_status_t */
    int sys_errno;        /* errno from the OS call that failed, if any */
    uintptr_t address;    /* the block concerned */
    size_t size;          /* the size requested, or the block's size */
    size_t alignment;     /* the block's alignment */
    size_t expected;      /* the value a check expected (a shape, a length) */
    size_t offset;        /* where corruption starts, relative to the block */
    size_t count;         /* how many bytes are corrupted */
    size_t limit;         /* the limit that refused the request (bytes) */
    size_t index;         /* ZM_ERR_INDUCED: the failing allocator's fail index */
    uint64_t alloc_site;  /* caller-provided site ids (general-purpose allocator) */
    uint64_t free_site;
    int detail;           /* zm_free_detail_t for ZM_ERR_INVALID_FREE; S_IFMT type of a
                             file zm_map_file refused as not regular */
    size_t given;         /* the size or alignment an invalid free passed */
    size_t more;          /* further errors found after this one and not reported */
} zm_report_t;

/* What exactly was wrong with an invalid free. */
typedef enum zm_free_detail {
    ZM_FREE_UNKNOWN_POINTER = 1, /* never returned by this allocator (or long recycled) */
    ZM_FREE_INTERIOR_POINTER = 2, /* offset bytes inside the block at address */
    ZM_FREE_WRONG_SIZE = 3,       /* given: the size passed; size: the block's */
    ZM_FREE_WRONG_ALIGNMENT = 4,  /* given: the alignment passed; alignment: the block's */
} zm_free_detail_t;

/* The calling thread's report of its last failure. */
zm_report_t *zm_last_report(void);

/* The calling thread's current call site (an id the caller interns, 0: none): recorded by
 * allocators that keep sites (the general-purpose allocator) for calls that carry none. */
void zm_set_thread_site(uint64_t site);
uint64_t zm_thread_site(void);

/* ---------------------------------------------------------------- the Allocator interface */

static inline bool zm_is_pow2(size_t x) { return x != 0 && (x & (x - 1)) == 0; }

void zm_fail(int code, size_t size, size_t limit, int sys_errno);

/* Allocate len bytes aligned to align. len == 0 returns (void *)align, never dereferenced. */
static inline void *zm_alloc(zm_allocator_t a, size_t len, size_t align) {
    if (!zm_is_pow2(align)) { zm_fail(ZM_ERR_ALIGNMENT, align, 0, 0); return NULL; }
    if (len == 0) return (void *)(uintptr_t)align;
    return a.vtable->alloc(a.ctx, len, align);
}

/* Grow or shrink in place; false leaves the block as it was. */
static inline bool zm_resize(zm_allocator_t a, void *ptr, size_t len, size_t align,
                             size_t new_len) {
    if (len == 0 || new_len == 0) return len == new_len;
    return a.vtable->resize(a.ctx, ptr, len, align, new_len);
}

/* Resize, moving the block if the allocator can do so cheaply (mremap); NULL: not possible,
 * the block is unchanged. */
static inline void *zm_remap(zm_allocator_t a, void *ptr, size_t len, size_t align,
                             size_t new_len) {
    if (len == 0 || new_len == 0) return len == new_len ? ptr : NULL;
    return a.vtable->remap(a.ctx, ptr, len, align, new_len);
}

static inline void zm_free(zm_allocator_t a, void *ptr, size_t len, size_t align) {
    if (len != 0) a.vtable->free(a.ctx, ptr, len, align);
}

/* remap, else alloc + copy + free. NULL: out of memory, the old block is untouched. */
void *zm_realloc(zm_allocator_t a, void *ptr, size_t len, size_t align, size_t new_len);

/* ---------------------------------------------------------------- memory tracing
 *
 * Hooks told about every mapping the page allocator makes (track: address and size) or
 * gives back (untrack), for a tracer such as Python's tracemalloc (see trace.c). Calls made
 * inside a guard are delivered when the thread leaves its outermost guard, never under a
 * lock; threads marked quiet deliver nothing. */
typedef struct zm_trace_hooks {
    void (*track)(uintptr_t ptr, size_t size);
    void (*untrack)(uintptr_t ptr);
} zm_trace_hooks_t;

/* Install hooks (NULL: none, the default). */
void zm_trace_set(const zm_trace_hooks_t *hooks);
/* Mark the calling thread quiet (worker threads that must not call into the tracer). */
void zm_trace_quiet(bool on);
/* For allocators: memory from the OS (size > 0) or given back (size 0). */
void zm_trace_event(uintptr_t ptr, size_t size);
/* For guards: the thread enters / leaves a lock; leaving the outermost delivers events. */
void zm_trace_enter(void);
void zm_trace_leave(void);

/* ---------------------------------------------------------------- guard
 *
 * An allocator made safe to share between threads and wrappers, with every release checked
 * (see guard.c): a lock of its own (shared when the allocator is thread-safe), a generation
 * that every reset or deinit bumps, a closed flag, and the count of blocks numpy holds. */

typedef struct zm_guard zm_guard_t;
struct zm_guard {
    zm_allocator_t inner;
    uint64_t generation;  /* bumped by every release of this allocator or one below it */
    int32_t lock;         /* -1: held exclusively; n > 0: n shared holders */
    bool shared;          /* the inner allocator is thread-safe: calls share the lock */
    bool closed;          /* deinitialised: every call fails with ZM_ERR_CLOSED */
    bool registered;
    size_t foreign_live;  /* blocks handed to numpy (the bridge) and not yet given back */
    uint64_t holds_made;  /* views ever made of its blocks (zm_guard_hold) */
    /* Optional hooks of the inner allocator (a GPA's zm_gpa_take_error / _check_block). */
    int (*take_error)(void *ctx, zm_report_t *r);
    int (*check_block)(void *ctx, uintptr_t ptr, size_t len, size_t align, zm_report_t *r);
    uint64_t serial;      /* creation order */
    zm_guard_t *prev, *next;
};

/* A block as a caller records it; the checked calls that move it rewrite it in place. */
typedef struct zm_block {
    uintptr_t address;
    size_t nbytes;
    size_t alignment;
    int moved;
} zm_block_t;

/* Register g (for fork) guarding inner; a NULL vtable makes a guard that refuses every call. */
void zm_guard_init(zm_guard_t *g, zm_allocator_t inner, bool thread_safe);
/* Unregister; idempotent. g must not be used after. */
void zm_guard_deinit(zm_guard_t *g);
/* A vtable that enters the guard around each call: what wrappers above it wrap. */
void zm_guard_allocator(zm_guard_t *g, zm_allocator_t *out);
/* Take and drop the lock, for callers that run several steps inside it (the numpy bridge);
 * false (ZM_ERR_CLOSED reported) when the allocator is closed. */
bool zm_guard_enter(zm_guard_t *g);
void zm_guard_leave(zm_guard_t *g);

/* Enter for a caller whose blocks are stamped with generation gen, recording site: false
 * (report filled) if closed, released since (ZM_ERR_STALE) or an error is pending; leave,
 * picking up an error the steps found but could not return. For multi-step C callers. */
bool zm_guard_enter_checked(zm_guard_t *g, uint64_t gen, uint64_t site);
int zm_guard_leave_checked(zm_guard_t *g, int status);

/* Checked operations for a caller whose block is stamped with generation gen: ZM_ERR_STALE if
 * a release happened since, ZM_ERR_CLOSED after deinit; site is recorded by a GPA. alloc
 * returns 0 on failure; resize 1 / 0 (cannot in place) / -1 (error); the others a status. */
uintptr_t zm_guard_alloc(zm_guard_t *g, uint64_t gen, size_t len, size_t align, uint64_t site);
int zm_guard_free(zm_guard_t *g, uint64_t gen, uintptr_t ptr, size_t len, size_t align,
                  uint64_t site);
int zm_guard_resize(zm_guard_t *g, uint64_t gen, zm_block_t *b, size_t new_len);
int zm_guard_move(zm_guard_t *g, uint64_t gen, zm_block_t *b, size_t new_len, bool copy,
                  uint64_t site);
/* Count a view of a block stamped gen (ZM_ERR_STALE / ZM_ERR_CLOSED if it is gone). The caller
 * registers the view before, so a release that looked at the views before this call sees
 * holds_made change and asks again (ZM_ERR_RETRY) instead of releasing under the view. */
int zm_guard_hold(zm_guard_t *g, uint64_t gen);
/* Release (reset / deinit) the allocator of chain[n-1] under its guard and the guards of
 * every allocator above it (chain[0..n-1), newest first: the global lock order): refused
 * with ZM_ERR_RETRY if a view was made since the caller read holds[i] (holds_made), with
 * ZM_ERR_LIVE while numpy holds blocks of any of them, or ZM_ERR_CLOSED; else runs
 * op(ctx, arg) (its status in *op_status), bumps every generation and, with close, marks
 * chain[n-1] closed, all in one critical section. */
int zm_guard_release(zm_guard_t *const *chain, const uint64_t *holds, size_t n, bool close,
                     int (*op)(void *ctx, void *arg), void *ctx, void *arg, int *op_status);

/* ---------------------------------------------------------------- page allocator */

enum {
    ZM_PAGE_HUGE_PAGES = 1u << 0, /* madvise(MADV_HUGEPAGE) */
    ZM_PAGE_POPULATE = 1u << 1,   /* MAP_POPULATE: fault pages in at allocation */
    ZM_PAGE_LOCK = 1u << 2,       /* mlock: page-locked, never swapped */
};

typedef struct zm_page {
    unsigned flags;
} zm_page_t;

void zm_page_init(zm_page_t *p, unsigned flags);
void zm_page_allocator(zm_page_t *p, zm_allocator_t *out);
size_t zm_page_size(void);

/* ---------------------------------------------------------------- arena */

typedef struct zm_arena_node zm_arena_node_t;

typedef struct zm_arena {
    zm_allocator_t child;
    zm_arena_node_t *head; /* newest buffer; older ones follow through ->next */
    size_t end;            /* bytes used in head, counted from head itself */
} zm_arena_t;

typedef enum zm_arena_reset_mode {
    ZM_ARENA_FREE_ALL = 0,
    ZM_ARENA_RETAIN_CAPACITY = 1,
    ZM_ARENA_RETAIN_WITH_LIMIT = 2,
} zm_arena_reset_mode_t;

void zm_arena_init(zm_arena_t *a, zm_allocator_t child);
void zm_arena_allocator(zm_arena_t *a, zm_allocator_t *out);
void *zm_arena_alloc(zm_arena_t *a, size_t len, size_t align);
/* Bytes usable without asking the child again. */
size_t zm_arena_capacity(const zm_arena_t *a);
/* Release all allocations. Returns false when the retained capacity could not be kept in
 * one buffer (the arena is reset all the same, with less capacity). */
bool zm_arena_reset(zm_arena_t *a, zm_arena_reset_mode_t mode, size_t limit);
void zm_arena_deinit(zm_arena_t *a);

/* ---------------------------------------------------------------- fixed buffer */

typedef struct zm_fixed_buffer {
    uint8_t *buffer;
    size_t len;
    size_t end;
} zm_fixed_buffer_t;

void zm_fixed_buffer_init(zm_fixed_buffer_t *f, void *buffer, size_t len);
void zm_fixed_buffer_allocator(zm_fixed_buffer_t *f, zm_allocator_t *out);
bool zm_fixed_buffer_owns(const zm_fixed_buffer_t *f, const void *ptr);
void zm_fixed_buffer_reset(zm_fixed_buffer_t *f);

/* ---------------------------------------------------------------- failing (testing) */

typedef struct zm_failing {
    zm_allocator_t child;
    size_t alloc_index;
    size_t resize_index;
    size_t fail_index;        /* SIZE_MAX: never */
    size_t resize_fail_index; /* SIZE_MAX: never */
    size_t allocations;
    size_t deallocations;
    size_t allocated_bytes;
    size_t freed_bytes;
    bool has_induced_failure;
} zm_failing_t;

void zm_failing_init(zm_failing_t *f, zm_allocator_t child, size_t fail_index,
                     size_t resize_fail_index);
void zm_failing_allocator(zm_failing_t *f, zm_allocator_t *out);

/* ---------------------------------------------------------------- counting */

typedef struct zm_counting {
    zm_allocator_t child;
    size_t current_bytes; /* updated atomically: a counting allocator may be shared */
    size_t peak_bytes;
    size_t total_bytes;   /* every byte ever handed out, growth included */
    size_t current_count;
    size_t alloc_count;
    size_t free_count;
} zm_counting_t;

void zm_counting_init(zm_counting_t *c, zm_allocator_t child);
void zm_counting_allocator(zm_counting_t *c, zm_allocator_t *out);
void zm_counting_reset_peak(zm_counting_t *c);

/* ---------------------------------------------------------------- general-purpose allocator
 *
 * A size-class allocator for any block size (see gpa.c). With safety on, every block is
 * tracked with its call sites, surrounded by red zones and poisoned when freed; misuse is
 * reported through statuses and zm_report_t, never by aborting. Errors found where no status
 * can be returned (a free through the vtable, e.g. by an arena on top) are kept as the
 * allocator's pending error and reported by its next checked call. */

typedef struct zm_gpa zm_gpa_t;

typedef struct zm_gpa_config {
    bool safety;             /* track blocks, red zones, poison, quarantine */
    bool thread_safe;        /* a lock around every operation */
    bool never_unmap;        /* keep freed large blocks mapped until deinit */
    size_t memory_limit;     /* live requested bytes; SIZE_MAX for none */
    size_t quarantine_bytes; /* freed bytes held poisoned before their memory is reused */
} zm_gpa_config_t;

typedef struct zm_gpa_stats {
    size_t live_bytes;  /* requested bytes of live blocks */
    size_t live_count;  /* live blocks (tracked with safety on) */
    size_t peak_bytes;
    size_t quarantine_bytes;
    size_t quarantine_count;
} zm_gpa_stats_t;

zm_gpa_t *zm_gpa_create(const zm_gpa_config_t *config);
/* Its vtable. Operations record zm_thread_site() as their site. */
void zm_gpa_allocator(zm_gpa_t *g, zm_allocator_t *out);
void zm_gpa_stats(zm_gpa_t *g, zm_gpa_stats_t *out);
/* Verify every live block's red zones and every quarantined block's poison. Returns the
 * first problem (report in zm_last_report) after repairing it, or ZM_OK. */
int zm_gpa_check(zm_gpa_t *g);
/* Fill out[0..max) with live blocks (address, size, alignment, alloc_site);
 * returns how many blocks are live. */
size_t zm_gpa_leaks(zm_gpa_t *g, zm_report_t *out, size_t max);
/* Release everything. Returns the first corruption found on the way (report filled). */
int zm_gpa_destroy(zm_gpa_t *g);

/* Hooks for a guard (zm_guard_t): the pending error of an earlier vtable call (ZM_OK if
 * none), and a check of a live block before it moves (ZM_OK, or the problem). */
int zm_gpa_take_error(void *ctx, zm_report_t *r);
int zm_gpa_check_block(void *ctx, uintptr_t ptr, size_t len, size_t align, zm_report_t *r);
/* A guard over g with those hooks (shared when g is thread_safe). */
void zm_gpa_guard_init(zm_guard_t *guard, zm_gpa_t *g);

/* ---------------------------------------------------------------- tensor */

/* Data (64-byte aligned), and owned copies of the shape and of the strides in elements
 * (C order). Addresses are integers so that Python reads them without conversion. */
typedef struct zm_tensor {
    uintptr_t data;
    uintptr_t shape;   /* int64_t[ndim] */
    uintptr_t strides; /* int64_t[ndim] */
    size_t nbytes;
    size_t ndim;
} zm_tensor_t;

/* All three allocations, or none (status returned, zm_last_report filled). */
int zm_tensor_init(zm_tensor_t *t, zm_allocator_t a, const int64_t *shape, size_t ndim,
                   size_t itemsize);
void zm_tensor_deinit(zm_tensor_t *t, zm_allocator_t a);

/* ---------------------------------------------------------------- ops (ops.c)
 *
 * The fused per-step kernels of a llama forward pass, on C-contiguous float32 rows, writing
 * into caller memory. Row i of an n-row call is bitwise equal to the 1-row call for that
 * row. Elementwise kernels accept out == an input (exactly); any other overlap of out with
 * an input, or bad geometry, is ZM_ERR_INVALID_ARG with the report's size saying which
 * (ZM_OPS_OVERLAP / ZM_OPS_GEOMETRY). Buffer sizes follow from the geometry: the caller
 * checks them, these kernels trust them. */
enum { ZM_SIMD_PORTABLE = 0, ZM_SIMD_AVX2 = 1 };
enum { ZM_OPS_GEOMETRY = 1, ZM_OPS_OVERLAP = 2 };
/* The SIMD path the ops use: at most `wanted` (-1: just ask), capped at what the CPU has;
 * returns the previous one. ZIGMEM_KERNELS=portable in the environment starts portable. Both
 * paths give bitwise equal results. */
int zm_ops_simd(int wanted);
/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight */
int zm_rms_norm(const float *x, const float *weight, float *out, size_t rows, size_t dim,
                float eps);
/* Rotate adjacent pairs (2i, 2i+1) of x[rows][heads][head_dim] by row r's angles, the table
 * row start + r of cos/sin[table_rows][head_dim / 2]. */
int zm_rope(const float *x, float *out, size_t rows, size_t heads, size_t head_dim,
            const float *cos_table, const float *sin_table, size_t table_rows, size_t start);
/* out = gate * sigmoid(gate) * up, n elements */
int zm_silu_mul(const float *gate, const float *up, float *out, size_t n);
/* Causal grouped-query attention: q[rows][n_heads][head_dim], the query of row r at position
 * start + r, over keys/values[kv_len][n_kv_heads][head_dim] (float16 bits), scale
 * 1/sqrt(head_dim), float32 math; out like q; scratch holds kv_len floats, or k * kv_len
 * for up to k pool threads to share the rows (the same results). */
int zm_attention_f16(const float *q, size_t rows, size_t n_heads, size_t head_dim,
                     const uint16_t *keys, const uint16_t *values, size_t n_kv_heads,
                     size_t kv_len, size_t start, float *out, float *scratch,
                     size_t scratch_len);

/* ---------------------------------------------------------------- weight files */

/* A file mapped into memory: shared read-only, or private copy-on-write (WRITABLE). */
typedef struct zm_mapping {
    uintptr_t addr;
    size_t size;
} zm_mapping_t;

enum { ZM_MAP_WRITABLE = 1u << 0, ZM_MAP_POPULATE = 1u << 1, ZM_MAP_LOCK = 1u << 2 };
enum { ZM_ADVICE_NONE = 0, ZM_ADVICE_SEQUENTIAL = 1, ZM_ADVICE_RANDOM = 2, ZM_ADVICE_WILLNEED = 3 };

/* An empty file maps to {0, 0}. Failures: status, with errno / the memlock limit reported;
 * a path that is not a regular file is ZM_ERR_INVALID_ARG with its S_IFMT type in detail
 * (and sys_errno EISDIR for a directory). Never blocks on a FIFO. */
int zm_map_file(const char *path, unsigned flags, int advice, zm_mapping_t *out);
void zm_unmap(zm_mapping_t *m);

/* GGUF (see gguf.c for the byte layout and the phases). Records are found by their file
 * position ("pos"); offsets in decoded records are absolute in the file. */
typedef struct zm_gguf_info {
    uint32_t version;
    uint64_t n_tensors, n_kv;
    uint64_t alignment;
    uint64_t tensors_offset; /* the first tensor info (the first key-value is at 24) */
    uint64_t data_offset;
} zm_gguf_info_t;

typedef struct zm_gguf_kv {
    uint64_t pos;       /* the record */
    uint64_t key, key_len;
    uint32_t type;      /* GGUF value type */
    uint32_t item_type; /* arrays: the items' type */
    uint64_t value;     /* offset of the value; of the first item for arrays; of the bytes
                           for strings */
    uint64_t count;     /* arrays: items; strings: bytes */
    uint64_t end;       /* offset just past the value: the next record */
} zm_gguf_kv_t;

typedef struct zm_gguf_tensor {
    uint64_t pos;          /* the record */
    uint64_t name, name_len;
    uint32_t n_dims, type; /* ggml type */
    uint64_t dims[4];      /* dims[0] varies fastest */
    uint64_t offset;
    uint64_t nbytes;
    uint64_t end;          /* the next record */
} zm_gguf_tensor_t;

/* Phase 1: the magic, the version, the counts against the file size, then every key-value
 * and tensor info walked and validated; fills info. Nothing is stored: the caller can then
 * size the indexes (one u64 per record) knowing every counted record exists. */
int zm_gguf_header(const uint8_t *data, size_t size, zm_gguf_info_t *info, char *err,
                   size_t err_len);
/* Phase 3: tensor data inside the file and not overlapping, names and keys unique. Fills
 * kv_index[n_kv] and tensor_index[n_tensors] with record positions sorted by name.
 * Errors: ZM_ERR_INVALID_ARG, described in err. */
int zm_gguf_parse(const uint8_t *data, size_t size, const zm_gguf_info_t *info,
                  uint64_t *kv_index, uint64_t *tensor_index, char *err, size_t err_len);
/* Decode the record at pos of a file that passed zm_gguf_parse: bounds are checked again
 * (a wrong pos gives ZM_ERR_INVALID_ARG, never a wild read), UTF-8 is not. */
int zm_gguf_kv_at(const uint8_t *data, size_t size, uint64_t pos, zm_gguf_kv_t *kv);
int zm_gguf_tensor_at(const uint8_t *data, size_t size, const zm_gguf_info_t *info, uint64_t pos,
                      zm_gguf_tensor_t *t);
/* Where each of count items of item_type starting at first begins (nested arrays). */
int zm_gguf_item_offsets(const uint8_t *data, size_t size, uint64_t first, uint32_t item_type,
                         uint64_t count, uint64_t *offsets);
/* The position in index (sorted by zm_gguf_parse) of the record named name, or -1. */
int64_t zm_gguf_find(const uint8_t *data, const uint64_t *index, uint64_t n, const char *name,
                     size_t name_len);
bool zm_ggml_type_size(uint32_t type, uint32_t *block, uint32_t *bytes);

enum { ZM_GGML_F32 = 0, ZM_GGML_F16 = 1, ZM_GGML_Q4_0 = 2, ZM_GGML_Q4_1 = 3, ZM_GGML_Q5_0 = 6,
       ZM_GGML_Q5_1 = 7, ZM_GGML_Q8_0 = 8, ZM_GGML_Q2_K = 10, ZM_GGML_Q3_K = 11,
       ZM_GGML_Q4_K = 12, ZM_GGML_Q5_K = 13, ZM_GGML_Q6_K = 14, ZM_GGML_IQ4_NL = 20,
       ZM_GGML_BF16 = 30 };
/* n elements of a ggml type to float32, bit for bit as gguf.quants.dequantize: F32, F16,
 * BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL; n a multiple of
 * the type's block. Else ZM_ERR_INVALID_ARG. */
int zm_dequantize(uint32_t type, const void *src, size_t n, float *dst);

/* ---------------------------------------------------------------- paged KV cache
 *
 * Keys and values of many sequences in one pool of fixed-size blocks (vLLM's paging): block
 * tables, reference counts with copy-on-write for fork, a prefix cache of full prompt blocks
 * (hash chained from the parent block, confirmed by comparing tokens), LRU eviction of
 * unreferenced cached blocks, and attention straight over the blocks (see paged_kv.c and
 * paged_attention.c). Every call is serialized by the cache's own mutex. Failures return a
 * status with zm_last_report filled; report.detail is a zm_pkv_problem_t. */

typedef struct zm_paged_kv zm_paged_kv_t;

enum { ZM_KV_F32 = 0, ZM_KV_F16 = 1, ZM_KV_BF16 = 2 };

typedef struct zm_paged_kv_config {
    size_t n_layers, n_kv_heads, head_dim; /* head_dim <= ZM_PKV_MAX_HEAD_DIM */
    size_t num_blocks;                     /* < 2^31 */
    size_t block_size;                     /* positions per block */
    int dtype;                             /* ZM_KV_* */
} zm_paged_kv_config_t;

enum { ZM_PKV_MAX_HEAD_DIM = 1024 };

typedef struct zm_paged_kv_stats {
    size_t blocks_total, blocks_in_use, blocks_cached, blocks_free;
    size_t tokens_held;  /* positions written in blocks in use (a shared block counts once) */
    size_t slots_held;   /* blocks_in_use * block_size */
    size_t sequences;    /* live */
    size_t prefix_hits;  /* blocks served by the prefix cache */
    size_t evictions;    /* cached blocks reused for something else */
    size_t block_bytes, pool_bytes, meta_bytes;
} zm_paged_kv_stats_t;

typedef struct zm_paged_kv_seq_info {
    size_t seq_len, cached_tokens, n_blocks, step_len; /* step_len: the open step's n_new */
    size_t layers_written;                              /* in the open step */
} zm_paged_kv_seq_info_t;

/* What a failed call found wrong (zm_report_t.detail). given: the offending value;
 * expected: the limit it broke; offset: its index in an array argument. */
typedef enum zm_pkv_problem {
    ZM_PKV_UNKNOWN_SEQUENCE = 1, /* ZM_ERR_INVALID_ARG: no such id */
    ZM_PKV_FREED_SEQUENCE = 2,   /* ZM_ERR_USE_AFTER_FREE: the id was freed */
    ZM_PKV_BAD_LAYER = 3,
    ZM_PKV_LAYER_WRITTEN = 4,    /* this layer was already appended in the open step */
    ZM_PKV_STEP_SIZE = 5,        /* n_new differs from the open step's (expected) */
    ZM_PKV_STEP_OPEN = 6,        /* fork needs every layer of the step written */
    ZM_PKV_ROWS = 7,             /* q_len (given) exceeds the layer's length (expected) */
    ZM_PKV_HEADS = 8,            /* n_heads not a positive multiple of n_kv_heads */
    ZM_PKV_POOL_FULL = 9,        /* ZM_ERR_OUT_OF_MEMORY: size blocks needed, limit available */
    ZM_PKV_CONFIG = 10,          /* a bad geometry (given: which field, 0-based) */
    ZM_PKV_TOO_LONG = 11,        /* ZM_ERR_OUT_OF_MEMORY: more positions (given) than the
                                    whole pool could ever hold (expected) */
} zm_pkv_problem_t;

/* All allocations (pool, per-block arrays) or none, from a (for Python: guarded) allocator. */
int zm_paged_kv_create(zm_allocator_t a, const zm_paged_kv_config_t *cfg, zm_paged_kv_t **out);
void zm_paged_kv_destroy(zm_paged_kv_t *kv);
/* tokens may be NULL (no prompt: nothing cached, nothing registered). */
int zm_paged_kv_add_sequence(zm_paged_kv_t *kv, const int32_t *tokens, size_t n_tokens,
                             int64_t *out_id);
int zm_paged_kv_fork(zm_paged_kv_t *kv, int64_t id, int64_t *out_id);
int zm_paged_kv_free_sequence(zm_paged_kv_t *kv, int64_t id);
/* k, v: [n_new][n_kv_heads][head_dim] in the cache's dtype, contiguous. */
int zm_paged_kv_append(zm_paged_kv_t *kv, int64_t id, size_t layer, const void *k,
                       const void *v, size_t n_new);
/* *out = 1 when a step of n_new positions can be appended now (evicting cached blocks). */
int zm_paged_kv_can_append(zm_paged_kv_t *kv, int64_t id, size_t n_new, int *out);
int zm_paged_kv_seq_info(zm_paged_kv_t *kv, int64_t id, zm_paged_kv_seq_info_t *out);
/* Positions `layer` holds (seq_len, or the open step's end once the layer is written). */
int zm_paged_kv_layer_len(zm_paged_kv_t *kv, int64_t id, size_t layer, size_t *out);
/* Copy min(cap, n_blocks) block ids into out. */
int zm_paged_kv_block_table(zm_paged_kv_t *kv, int64_t id, int32_t *out, size_t cap);
/* which: 0 keys, 1 values. Copies the layer's first n positions ([n][heads][dim], the cache's
 * dtype); n must be <= zm_paged_kv_layer_len. */
int zm_paged_kv_gather(zm_paged_kv_t *kv, int64_t id, size_t layer, int which, void *out,
                       size_t n);
void zm_paged_kv_stats(zm_paged_kv_t *kv, zm_paged_kv_stats_t *out);
/* Where the pool lies (to measure its resident pages). */
void zm_paged_kv_pool_span(zm_paged_kv_t *kv, uintptr_t *address, size_t *nbytes);
/* The block's reference count, or -1 for no such block (tests). */
int32_t zm_paged_kv_refcount(zm_paged_kv_t *kv, int32_t block);
/* Verify the bookkeeping (every block in exactly one state, refcounts equal the tables'
 * references, hash chains and LRU consistent): ZM_OK or ZM_ERR_INVALID_ARG. */
int zm_paged_kv_check(zm_paged_kv_t *kv);
/* Attention of `layer` for n_seqs sequences: q [sum(q_lens)][n_heads][head_dim] float32,
 * the rows of sequence i being its last q_lens[i] positions (causal over its whole
 * history); out, same shape. Each (sequence, head) is computed alone in a fixed order, so
 * the result does not depend on the other sequences or on the worker pool's thread count
 * (zm_set_num_threads), which runs it. */
int zm_paged_kv_attention(zm_paged_kv_t *kv, size_t layer, const int64_t *ids,
                          const int64_t *q_lens, size_t n_seqs, const float *q,
                          size_t n_heads, float *out);
/* The instruction set the kernel uses here: "avx512f", "avx2" or "portable". */
const char *zm_paged_attention_isa(void);
/* Use another supported instruction set ("avx512f", "avx2", "portable"), for tests;
 * ZM_ERR_INVALID_ARG if this CPU lacks it. */
int zm_paged_attention_use_isa(const char *name);

/* ---------------------------------------------------------------- quantized matrix kernels
 *
 * A weight matrix W of `rows` x `cols` elements of a ggml type (rows of blocks, as in GGUF),
 * read in place. Results are deterministic: every output element is summed in an order that
 * depends only on `cols` and the kernel path, never on n, the row or the thread count. */

/* out[n][rows] = x[n][cols] @ W^T. Types: those of zm_dequantize. Scratch comes from the
 * pool's allocator (zm_pool_set_allocator). ZM_ERR_INVALID_ARG: unsupported type or cols
 * not a multiple of its block, or out overlapping x or W (report.limit = 1);
 * ZM_ERR_OUT_OF_MEMORY: scratch refused. On any error out is untouched. */
int zm_quant_matmul(uint32_t type, const void *w, size_t rows, size_t cols, const float *x,
                    size_t n, float *out, unsigned flags);
/* flags: ZM_MATMUL_INT16 quantizes each row of x to int16 per 32 columns and multiplies
 * with integer dots (int16_matmul.c: faster for few rows; ~2^-16 relative error per block
 * of x; batch invariant too). Types without 32-element blocks (F32, F16, BF16) ignore it. */
enum { ZM_MATMUL_INT16 = 1 };
/* out[i][cols] = row ids[i] of W, dequantized. Every id is checked before anything is
 * written: one out of [0, rows) is ZM_ERR_INVALID_ARG, with report.size = its index. */
int zm_quant_rows(uint32_t type, const void *w, size_t rows, size_t cols, const int64_t *ids,
                  size_t n_ids, float *out);

/* Kernel paths: the fastest the CPU has, chosen at first use; the environment variable
 * ZIGMEM_KERNELS=portable|avx2|avx512 (or zm_kernels_set) forces one. */
enum { ZM_KERNELS_PORTABLE = 0, ZM_KERNELS_AVX2 = 1, ZM_KERNELS_AVX512 = 2 };
/* ZM_ERR_INVALID_ARG when this CPU cannot run that path (the current one stays). */
int zm_kernels_set(int path);
int zm_kernels_get(void);
bool zm_kernels_supported(int path);

/* ---------------------------------------------------------------- worker pool
 *
 * One process-wide pool of the core's own threads (thread_pool.c). A job is n_tasks calls of
 * fn(arg, task, worker), shared by the caller and the workers; one job runs at a time
 * (concurrent callers wait their turn). Fork-safe: a child starts its workers afresh. */
typedef void (*zm_task_fn)(void *arg, size_t task, unsigned worker);
/* Threads a job uses, the caller included: >= 1. Default: the CPUs this process may use. */
int zm_set_num_threads(unsigned n);
unsigned zm_get_num_threads(void);
/* Where per-worker scratch comes from. The allocator must outlive the pool (process-wide). */
void zm_pool_set_allocator(const zm_allocator_t *a);
/* Run a job. Before it starts, every worker gets scratch_bytes of 64-byte-aligned scratch
 * (zm_pool_scratch); ZM_ERR_OUT_OF_MEMORY if that is refused (nothing ran). */
int zm_pool_run(zm_task_fn fn, void *arg, size_t n_tasks, size_t scratch_bytes);
/* The same, and before the tasks start the caller runs prepare(arg, shared) with
 * shared_bytes of 64-byte-aligned scratch that every task may then read. */
int zm_pool_run_shared(zm_task_fn fn, void *arg, size_t n_tasks, size_t scratch_bytes,
                       void (*prepare)(void *arg, void *shared), size_t shared_bytes);
/* The scratch of `worker` during a job. */
void *zm_pool_scratch(unsigned worker);

#ifdef __cplusplus
}
#endif
#endif /* ZIGMEM_H */
