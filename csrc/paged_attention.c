/* paged_attention.c — attention straight over a PagedKVCache's blocks, no gather.
 *
 * For each sequence i the query rows are its last q_lens[i] positions of `layer`; each row
 * attends causally over the sequence's whole history, grouped-query heads sharing their KV
 * head, float32 math over float16 / bfloat16 / float32 storage, scale 1/sqrt(head_dim).
 *
 * Work is split in tasks of (sequence, KV head, up to ZM_PKV_TASK_ROWS rows), run by the
 * core's worker pool (thread_pool.c, zm_set_num_threads). A task's result depends only on
 * its own sequence and rows (see paged_attention_kernel.h), so the output is the same bits
 * whatever the batch, the thread count or the scheduling. The instruction set is chosen once
 * at run time (__builtin_cpu_supports): AVX-512, AVX2 + F16C + FMA, or portable C.
 */
#include <math.h>
#include <string.h>
#include <immintrin.h>

#include "paged_kv_types.h"

/* The kernel's small vector helpers are static and inlined, so the ABI GCC warns about
 * (how a 64-byte vector is passed without AVX-512) never applies. */
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float zm_v16f __attribute__((vector_size(64)));
typedef float zm_v8f __attribute__((vector_size(32)));
typedef float zm_v4f __attribute__((vector_size(16)));
/* Unaligned 16-float loads and stores (memcpy: no aliasing or alignment assumption). */
#define ZM_LOAD16(p) ({ zm_v16f v_; memcpy(&v_, (p), sizeof v_); v_; })
#define ZM_STORE16(p, v) do { zm_v16f v_ = (v); memcpy((p), &v_, sizeof v_); } while (0)

enum {
    ZM_PKV_TILE = 64,           /* positions converted to float32 at once (at most) */
    ZM_PKV_TILE_FLOATS = 4096,  /* K (and V) tile: 16 KiB of stack each */
    ZM_PKV_STATE_FLOATS = 4096, /* running outputs of the rows x heads in flight */
    ZM_PKV_STATES = 256,        /* rows x heads in flight, at most */
    ZM_PKV_TASK_ROWS = 32,      /* a long prefill is split so that threads share it */
    ZM_PKV_MAX_WORKERS = 256,   /* the pool's limit */
};

/* Where a worker is in the list of sequences: tasks reach each worker in increasing order
 * (one atomic counter), so it walks the sequences forward only. */
typedef struct {
    size_t seq, first_task, first_row;
} zm_pkv_cursor_t;

/* One attention call, shared by the threads that work on it. */
typedef struct zm_pkv_attention {
    const zm_paged_kv_t *kv;
    size_t layer, n_heads, n_seqs, tile;
    float scale;
    const int64_t *ids, *q_lens;
    const float *q;
    float *out;
    size_t n_tasks;
    zm_pkv_cursor_t cursors[ZM_PKV_MAX_WORKERS];
    void (*task)(const struct zm_pkv_attention *, const zm_pkv_seq_t *, size_t, size_t,
                 size_t, size_t, const float *, float *);
} zm_pkv_attention_t;

/* ---------------------------------------------------------------- the kernel, three times */

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#define KERNEL(name) name##_avx512
#include "paged_attention_kernel.h"
#undef KERNEL
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define KERNEL(name) name##_avx2
#include "paged_attention_kernel.h"
#undef KERNEL
#pragma GCC pop_options

#define KERNEL(name) name##_portable
#include "paged_attention_kernel.h"
#undef KERNEL

typedef struct {
    const char *name;
    void (*task)(const zm_pkv_attention_t *, const zm_pkv_seq_t *, size_t, size_t, size_t,
                 size_t, const float *, float *);
} zm_pkv_isa_t;

static const zm_pkv_isa_t isas[] = {
    {"avx512f", task_avx512}, {"avx2", task_avx2}, {"portable", task_portable}};

static bool isa_supported(size_t i) {
    __builtin_cpu_init();
    if (i == 0) return __builtin_cpu_supports("avx512f");
    if (i == 1)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    return true;
}

static const zm_pkv_isa_t *chosen_isa; /* atomic; NULL until the first call */

static const zm_pkv_isa_t *current_isa(void) {
    const zm_pkv_isa_t *isa = __atomic_load_n(&chosen_isa, __ATOMIC_ACQUIRE);
    if (isa) return isa;
    size_t i = 0;
    while (!isa_supported(i)) i++;
    __atomic_store_n(&chosen_isa, &isas[i], __ATOMIC_RELEASE);
    return &isas[i];
}

const char *zm_paged_attention_isa(void) { return current_isa()->name; }

int zm_paged_attention_use_isa(const char *name) {
    for (size_t i = 0; i < sizeof isas / sizeof *isas; i++) {
        if (strcmp(isas[i].name, name) == 0) {
            if (!isa_supported(i)) break;
            __atomic_store_n(&chosen_isa, &isas[i], __ATOMIC_RELEASE);
            return ZM_OK;
        }
    }
    return zm_pkv_problem(ZM_ERR_INVALID_ARG, ZM_PKV_CONFIG, 6, 0, 0);
}

/* ---------------------------------------------------------------- tasks and threads */

static size_t tasks_of(const zm_pkv_attention_t *c, size_t q_len) {
    return c->kv->n_kv_heads * ((q_len + ZM_PKV_TASK_ROWS - 1) / ZM_PKV_TASK_ROWS);
}

/* One task: KV head g of up to ZM_PKV_TASK_ROWS rows of one sequence. */
static void run_task(void *arg, size_t t, unsigned worker) {
    zm_pkv_attention_t *c = arg;
    zm_paged_kv_t *kv = (zm_paged_kv_t *)c->kv;
    zm_pkv_cursor_t *at = &c->cursors[worker];
    if (t < at->first_task) *at = (zm_pkv_cursor_t){0, 0, 0}; /* never, but stay correct */
    while (t >= at->first_task + tasks_of(c, (size_t)c->q_lens[at->seq])) {
        at->first_task += tasks_of(c, (size_t)c->q_lens[at->seq]);
        at->first_row += (size_t)c->q_lens[at->seq];
        at->seq++;
    }
    zm_pkv_seq_t *s;
    zm_pkv_lookup(kv, c->ids[at->seq], &s); /* validated before the job started */
    size_t q_len = (size_t)c->q_lens[at->seq], local = t - at->first_task;
    size_t g = local % kv->n_kv_heads, r0 = local / kv->n_kv_heads * ZM_PKV_TASK_ROWS;
    size_t r1 = r0 + ZM_PKV_TASK_ROWS < q_len ? r0 + ZM_PKV_TASK_ROWS : q_len;
    size_t row = c->n_heads * kv->head_dim;
    c->task(c, s, g, zm_pkv_layer_len(s, c->layer) - q_len, r0, r1, c->q + at->first_row * row,
            c->out + at->first_row * row);
}

/* Check every argument before any output is written. */
static int validate(zm_paged_kv_t *kv, zm_pkv_attention_t *c) {
    if (c->layer >= kv->n_layers)
        return zm_pkv_problem(ZM_ERR_INVALID_ARG, ZM_PKV_BAD_LAYER, c->layer, kv->n_layers, 0);
    if (c->n_heads == 0 || c->n_heads % kv->n_kv_heads)
        return zm_pkv_problem(ZM_ERR_INVALID_ARG, ZM_PKV_HEADS, c->n_heads, kv->n_kv_heads, 0);
    for (size_t i = 0; i < c->n_seqs; i++) {
        zm_pkv_seq_t *s;
        int status = zm_pkv_lookup(kv, c->ids[i], &s);
        if (status) {
            zm_last_report()->offset = i;
            return status;
        }
        size_t len = zm_pkv_layer_len(s, c->layer);
        if (c->q_lens[i] < 0 || (uint64_t)c->q_lens[i] > len)
            return zm_pkv_problem(ZM_ERR_INVALID_ARG, ZM_PKV_ROWS, (size_t)c->q_lens[i], len, i);
        c->n_tasks += tasks_of(c, (size_t)c->q_lens[i]);
    }
    return ZM_OK;
}

int zm_paged_kv_attention(zm_paged_kv_t *kv, size_t layer, const int64_t *ids,
                          const int64_t *q_lens, size_t n_seqs, const float *q,
                          size_t n_heads, float *out) {
    size_t tile = ZM_PKV_TILE_FLOATS / kv->head_dim;
    zm_pkv_attention_t c = {
        .kv = kv, .layer = layer, .n_heads = n_heads, .n_seqs = n_seqs,
        .tile = tile < ZM_PKV_TILE ? tile : ZM_PKV_TILE,
        .scale = 1.0f / sqrtf((float)kv->head_dim), .ids = ids, .q_lens = q_lens, .q = q,
        .out = out, .task = current_isa()->task,
    };
    pthread_mutex_lock(&kv->lock);
    int status = validate(kv, &c);
    if (!status) status = zm_pool_run(run_task, &c, c.n_tasks, 0); /* no scratch: cannot fail */
    pthread_mutex_unlock(&kv->lock);
    return status;
}
