"""cffi builder for ``zigmem._zigmem`` (API / out-of-line mode).

setup.py points ``cffi_modules`` here; setuptools compiles every ``csrc/*.c`` into the private
extension. Only the declarations below are visible to Python, and only ``zigmem._binding``
imports the result. Structs are declared with ``...;`` so cffi takes their real layout from
``zigmem.h`` and ``ffi.new`` can embed them in Python-owned memory.
"""

from pathlib import Path

import numpy
from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = """
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

/* tensor */
typedef struct { uintptr_t data; uintptr_t shape; uintptr_t strides; size_t nbytes;
                 size_t ndim; } zm_tensor_t;
int zm_py_tensor_init(zm_tensor_t *t, const zm_allocator_t *a, const int64_t *shape,
                      size_t ndim, size_t itemsize, int serialize);
void zm_py_tensor_deinit(zm_tensor_t *t, const zm_allocator_t *a, int serialize);

/* page */
#define ZM_PAGE_HUGE_PAGES ...
#define ZM_PAGE_POPULATE ...
#define ZM_PAGE_LOCK ...
typedef struct { unsigned flags; } zm_page_t;
void zm_page_init(zm_page_t *p, unsigned flags);
void zm_page_allocator(zm_page_t *p, zm_allocator_t *out);
size_t zm_page_size(void);

/* arena */
typedef struct { ...; } zm_arena_t;
typedef enum { ZM_ARENA_FREE_ALL, ZM_ARENA_RETAIN_CAPACITY, ZM_ARENA_RETAIN_WITH_LIMIT, ...
} zm_arena_reset_mode_t;
void zm_arena_init(zm_arena_t *a, zm_allocator_t child);
void zm_arena_allocator(zm_arena_t *a, zm_allocator_t *out);
size_t zm_arena_capacity(const zm_arena_t *a);
bool zm_arena_reset(zm_arena_t *a, zm_arena_reset_mode_t mode, size_t limit);
void zm_arena_deinit(zm_arena_t *a);

/* fixed buffer */
typedef struct { size_t len; size_t end; ...; } zm_fixed_buffer_t;
void zm_fixed_buffer_init(zm_fixed_buffer_t *f, void *buffer, size_t len);
void zm_fixed_buffer_allocator(zm_fixed_buffer_t *f, zm_allocator_t *out);
void zm_fixed_buffer_reset(zm_fixed_buffer_t *f);

/* failing */
typedef struct {
    size_t alloc_index; size_t resize_index; size_t fail_index; size_t resize_fail_index;
    size_t allocations; size_t deallocations; size_t allocated_bytes; size_t freed_bytes;
    bool has_induced_failure; ...;
} zm_failing_t;
void zm_failing_init(zm_failing_t *f, zm_allocator_t child, size_t fail_index,
                     size_t resize_fail_index);
void zm_failing_allocator(zm_failing_t *f, zm_allocator_t *out);

/* counting */
typedef struct {
    size_t current_bytes; size_t peak_bytes; size_t total_bytes;
    size_t current_count; size_t alloc_count; size_t free_count; ...;
} zm_counting_t;
void zm_counting_init(zm_counting_t *c, zm_allocator_t child);
void zm_counting_allocator(zm_counting_t *c, zm_allocator_t *out);
void zm_counting_reset_peak(zm_counting_t *c);

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

/* numpy bridge state (the handler functions themselves are reached through ctypes) */
typedef struct { size_t live_count; size_t live_bytes; size_t total_count; size_t bad_frees;
                 uintptr_t bad_address; ...; } zm_np_state_t;
void zm_np_state_init(zm_np_state_t *s, zm_allocator_t allocator, int serialize);
size_t zm_np_live(zm_np_state_t *s, zm_report_t *out, size_t max);

/* weight files */
typedef struct { uintptr_t addr; size_t size; } zm_mapping_t;
#define ZM_MAP_WRITABLE ...
#define ZM_MAP_POPULATE ...
#define ZM_MAP_LOCK ...
int zm_map_file(const char *path, unsigned flags, int advice, zm_mapping_t *out);
void zm_unmap(zm_mapping_t *m);
typedef struct { uint32_t version; uint64_t n_tensors; uint64_t n_kv; uint64_t alignment;
                 uint64_t data_offset; } zm_gguf_info_t;
typedef struct { uint64_t key; uint64_t key_len; uint32_t type; uint32_t item_type;
                 uint64_t value; uint64_t count; uint64_t end; } zm_gguf_kv_t;
typedef struct { uint64_t name; uint64_t name_len; uint32_t n_dims; uint32_t type;
                 uint64_t dims[4]; uint64_t offset; uint64_t nbytes; } zm_gguf_tensor_t;
int zm_gguf_header(const uint8_t *data, size_t size, zm_gguf_info_t *info, char *err,
                   size_t err_len);
int zm_gguf_parse(const uint8_t *data, size_t size, zm_gguf_info_t *info, zm_gguf_kv_t *kvs,
                  zm_gguf_tensor_t *tensors, void *scratch, char *err, size_t err_len);
bool zm_ggml_type_size(uint32_t type, uint32_t *block, uint32_t *bytes);
int zm_dequantize(uint32_t type, const void *src, size_t n, float *dst);
#define ZM_GGML_F32 ...
#define ZM_GGML_F16 ...
#define ZM_GGML_Q4_0 ...
#define ZM_GGML_Q4_1 ...
#define ZM_GGML_Q8_0 ...
#define ZM_GGML_BF16 ...
"""

# Status codes are plain ints on the Python side; cffi takes their values from zigmem.h.
STATUS = [
    "ZM_OK", "ZM_ERR_OUT_OF_MEMORY", "ZM_ERR_TOO_LARGE", "ZM_ERR_ALIGNMENT", "ZM_ERR_MLOCK",
    "ZM_ERR_LIMIT", "ZM_ERR_INDUCED", "ZM_ERR_INVALID_FREE", "ZM_ERR_DOUBLE_FREE",
    "ZM_ERR_OVERFLOW", "ZM_ERR_UNDERFLOW", "ZM_ERR_USE_AFTER_FREE", "ZM_ERR_LEAK",
    "ZM_ERR_INVALID_ARG",
]
CDEF += "".join(f"#define {name} ...\n" for name in STATUS)


def _relative(path: Path) -> str:
    # setuptools wants source paths relative to setup.py's directory.
    return str(path.relative_to(HERE.parent))


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "zigmem._zigmem",
    '#include "zigmem.h"\n#include "numpy_bridge.h"',
    # The C core, and the glue that needs Python.h and numpy's headers (python/).
    sources=sorted(_relative(p) for p in [*HERE.glob("*.c"), *HERE.glob("python/*.c")]),
    include_dirs=[_relative(HERE / "include"), _relative(HERE), _relative(HERE / "python"),
                  numpy.get_include()],
    # -ffp-contract=off: the dequantize kernels round like numpy (no fused multiply-add).
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function", "-ffp-contract=off"],
    py_limited_api=False,  # the numpy bridge needs the full C API
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
