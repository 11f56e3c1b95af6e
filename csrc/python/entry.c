/* entry.c — the extension's own entry points (entry.h). */
#include "entry.h"

#include "internal.h"

typedef struct {
    int mode;
    size_t limit;
} arena_reset_args_t;

static int arena_reset_op(void *ctx, void *arg) {
    arena_reset_args_t *r = arg;
    return zm_arena_reset(ctx, (zm_arena_reset_mode_t)r->mode, r->limit);
}

int zm_py_arena_reset(zm_guard_t *const *chain, const uint64_t *holds, size_t n, zm_arena_t *a, int mode,
                      size_t limit, int *retained) {
    arena_reset_args_t args = {mode, limit};
    return zm_guard_release(chain, holds, n, false, arena_reset_op, a, &args, retained);
}

static int arena_deinit_op(void *ctx, void *arg) {
    (void)arg;
    zm_arena_deinit(ctx);
    return ZM_OK;
}

int zm_py_arena_deinit(zm_guard_t *const *chain, const uint64_t *holds, size_t n, zm_arena_t *a) {
    return zm_guard_release(chain, holds, n, true, arena_deinit_op, a, NULL, NULL);
}

static int fixed_reset_op(void *ctx, void *arg) {
    (void)arg;
    zm_fixed_buffer_reset(ctx);
    return ZM_OK;
}

int zm_py_fixed_buffer_reset(zm_guard_t *const *chain, const uint64_t *holds, size_t n, zm_fixed_buffer_t *f) {
    return zm_guard_release(chain, holds, n, false, fixed_reset_op, f, NULL, NULL);
}

static int gpa_destroy_op(void *ctx, void *arg) {
    (void)arg;
    return zm_gpa_destroy(ctx);
}

int zm_py_gpa_destroy(zm_guard_t *const *chain, const uint64_t *holds, size_t n, zm_gpa_t *gpa, int *op_status) {
    return zm_guard_release(chain, holds, n, true, gpa_destroy_op, gpa, NULL, op_status);
}

int zm_py_close(zm_guard_t *const *chain, const uint64_t *holds, size_t n) {
    return zm_guard_release(chain, holds, n, true, NULL, NULL, NULL, NULL);
}

size_t zm_py_arena_capacity(zm_guard_t *g, zm_arena_t *a) {
    if (!zm_guard_enter(g)) return 0;
    size_t capacity = zm_arena_capacity(a);
    zm_guard_leave(g);
    return capacity;
}

int zm_py_gpa_check(zm_guard_t *g, zm_gpa_t *gpa) {
    zm_last_report()->code = ZM_OK;
    if (!zm_guard_enter(g)) return ZM_ERR_CLOSED;
    int status = zm_gpa_check(gpa);
    zm_guard_leave(g);
    return status;
}

size_t zm_py_gpa_leaks(zm_guard_t *g, zm_gpa_t *gpa, zm_report_t *out, size_t max) {
    if (!zm_guard_enter(g)) return 0;
    size_t n = zm_gpa_leaks(gpa, out, max);
    zm_guard_leave(g);
    return n;
}

int zm_py_gpa_stats(zm_guard_t *g, zm_gpa_t *gpa, zm_gpa_stats_t *out) {
    if (!zm_guard_enter(g)) return ZM_ERR_CLOSED;
    zm_gpa_stats(gpa, out);
    zm_guard_leave(g);
    return ZM_OK;
}

int zm_py_tensor_init(zm_guard_t *g, uint64_t gen, zm_tensor_t *t, const int64_t *shape,
                      size_t ndim, size_t itemsize, uint64_t site) {
    if (!zm_guard_enter_checked(g, gen, site)) return zm_last_report()->code;
    int status = zm_tensor_init(t, g->inner, shape, ndim, itemsize);
    if (site) zm_set_thread_site(0);
    zm_guard_leave(g);
    return status;
}

int zm_py_tensor_deinit(zm_guard_t *g, uint64_t gen, zm_tensor_t *t, uint64_t site) {
    if (!zm_guard_enter_checked(g, gen, site)) return zm_last_report()->code;
    zm_tensor_deinit(t, g->inner);
    return zm_guard_leave_checked(g, ZM_OK);
}
