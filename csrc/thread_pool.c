/* thread_pool.c — the core's own worker threads, for the matrix kernels.
 *
 * One process-wide pool. A job is n_tasks calls of fn(arg, task, worker): the caller takes
 * part as worker 0 and the workers 1..threads-1 claim tasks from one atomic counter, so an
 * idle core picks up what a descheduled one left. Which worker runs a task never changes a
 * result: the kernels give each task its own output rows.
 *
 * Hand-off has to be cheap (a decode step runs ~200 jobs of tens of microseconds): the
 * caller publishes a job by bumping a generation word; workers spin on it for a while after
 * each job and only then sleep on a futex, so back-to-back jobs never pay a system call.
 * The caller waits for finished tasks, not for workers: on a busy machine a worker that
 * has not been scheduled yet costs nothing (the caller runs its share), and one that wakes
 * late finds the job's generation gone and claims nothing. A futex wake is issued only
 * when someone actually sleeps (a sleeper flag, checked with sequentially consistent
 * atomics on both sides, so a wake is never lost).
 *
 * One job at a time: `submit` serialises callers (two Python threads calling matmul at once
 * take turns; each gets its own results). Scratch is per worker, grown before a job starts
 * from the allocator Python hands us (a counting allocator the memory report shows), so a
 * task never allocates. Workers block every signal: Ctrl-C reaches the Python thread.
 *
 * fork(): pthread_atfork takes `submit` around the fork, so the child never inherits a job
 * in flight; the child has no workers (threads do not survive fork) and starts new ones on
 * its first job. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define MAX_THREADS 256
/* How long a waiter spins before it sleeps. Measured in time, not in pause instructions:
 * a pause lasts ~10 cycles on some CPUs and ~150 on others, and a worker that falls asleep
 * between the ~200 back-to-back jobs of a decode step costs a futex wake plus a scheduler
 * round trip (tens of microseconds in a VM) on every job. */
#define SPIN_NS 300000
#define SCRATCH_ALIGN 64
#define SHARED_KEEP (1u << 20) /* shared scratch kept between jobs; larger is freed after */

typedef struct {
    void *ptr;
    size_t len;
} scratch_t;

/* A job, in one of two slots: a late worker may still read the slot of the job before
 * the current one, and must find it intact (see claim). */
typedef struct {
    zm_task_fn fn;
    void *arg;
    size_t n_tasks;
} job_t;

static struct {
    pthread_mutex_t submit;
    unsigned want;    /* threads per job, caller included; 0: not decided yet */
    unsigned running; /* workers alive: ids 1..running */
    pthread_t threads[MAX_THREADS];
    uint32_t start_generation[MAX_THREADS];
    scratch_t scratch[MAX_THREADS];
    scratch_t shared; /* written by the caller before a job's tasks start, read by all */
    zm_allocator_t alloc;
    bool has_alloc;
    job_t jobs[2];       /* job g lives in jobs[g & 1] */
    uint64_t claim;      /* generation << 32 | next task: tasks are claimed with a CAS on it */
    uint32_t generation; /* futex word: bumped to publish a job (or to stop) */
    uint32_t done;       /* futex word: tasks finished in the current job */
    int sleepers;        /* workers asleep on `generation` */
    int caller_sleeping; /* the caller is asleep on `done` */
    int stop;
} pool = {.submit = PTHREAD_MUTEX_INITIALIZER};

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Spin step `spins` of a wait that began at *since (0: not yet read): true while the wait
 * should keep spinning. The clock is read every 64 steps. */
static bool keep_spinning(unsigned spins, uint64_t *since) {
    if (spins % 64) return true;
    uint64_t t = now_ns();
    if (!*since) *since = t;
    return t - *since < SPIN_NS;
}

static void futex_wait(uint32_t *word, uint32_t expected) {
    syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake_all(uint32_t *word) {
    syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* Claim the next task of job `gen`; false when it has none left or is no longer current.
 * The generation in `claim` makes a late worker harmless: its CAS fails once the caller
 * has moved on, and until then the job it read cannot have been replaced (the caller
 * waits for every task of a job before publishing the next, and writes the other slot). */
static bool claim(uint32_t gen, size_t *task) {
    uint64_t c = __atomic_load_n(&pool.claim, __ATOMIC_ACQUIRE);
    for (;;) {
        if ((uint32_t)(c >> 32) != gen) return false;
        uint32_t next = (uint32_t)c;
        /* atomic: a caller two jobs ahead may be rewriting this slot (then the CAS fails) */
        if (next >= __atomic_load_n(&pool.jobs[gen & 1].n_tasks, __ATOMIC_RELAXED)) return false;
        if (__atomic_compare_exchange_n(&pool.claim, &c, c + 1, true, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE)) {
            *task = next;
            return true;
        }
    }
}

/* Run tasks of job `gen` until none is left; each finished task is counted in `done`. */
static void run_tasks(uint32_t gen, unsigned worker) {
    const job_t *job = &pool.jobs[gen & 1];
    size_t t;
    while (claim(gen, &t)) {
        job->fn(job->arg, t, worker);
        if (__atomic_add_fetch(&pool.done, 1, __ATOMIC_SEQ_CST) == job->n_tasks &&
            __atomic_load_n(&pool.caller_sleeping, __ATOMIC_SEQ_CST))
            futex_wake_all(&pool.done);
    }
}

static void *worker_main(void *p) {
    unsigned id = (unsigned)(uintptr_t)p;
    uint32_t seen = pool.start_generation[id];
    for (;;) {
        uint32_t g;
        unsigned spins = 0;
        uint64_t since = 0;
        while ((g = __atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE)) == seen) {
            if (keep_spinning(spins++, &since)) {
                cpu_relax();
                continue;
            }
            __atomic_add_fetch(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
            if (__atomic_load_n(&pool.generation, __ATOMIC_SEQ_CST) == seen)
                futex_wait(&pool.generation, seen);
            __atomic_sub_fetch(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
        }
        seen = g;
        if (__atomic_load_n(&pool.stop, __ATOMIC_ACQUIRE)) return NULL;
        run_tasks(g, id);
    }
}

/* Publish the next generation: a job (already in its slot), or a stop. */
static uint32_t publish(void) {
    uint32_t gen = pool.generation + 1;
    __atomic_store_n(&pool.done, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool.claim, (uint64_t)gen << 32, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool.generation, gen, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&pool.sleepers, __ATOMIC_SEQ_CST)) futex_wake_all(&pool.generation);
    return gen;
}

/* Wait until every task of the job is finished: only workers that claimed a task are
 * waited for, never one that has not woken up yet (the caller ran what it left). */
static void wait_done(size_t n_tasks) {
    unsigned spins = 0;
    uint64_t since = 0;
    uint32_t done;
    while ((done = __atomic_load_n(&pool.done, __ATOMIC_ACQUIRE)) != n_tasks) {
        if (keep_spinning(spins++, &since)) {
            cpu_relax();
            continue;
        }
        __atomic_store_n(&pool.caller_sleeping, 1, __ATOMIC_SEQ_CST);
        done = __atomic_load_n(&pool.done, __ATOMIC_SEQ_CST);
        if (done != n_tasks) futex_wait(&pool.done, done);
        __atomic_store_n(&pool.caller_sleeping, 0, __ATOMIC_SEQ_CST);
    }
}

static void stop_workers(void) {
    if (!pool.running) return;
    __atomic_store_n(&pool.stop, 1, __ATOMIC_RELEASE);
    publish();
    for (unsigned i = 1; i <= pool.running; i++) pthread_join(pool.threads[i], NULL);
    pool.running = 0;
    __atomic_store_n(&pool.stop, 0, __ATOMIC_RELEASE);
}

/* Start workers up to want - 1; fewer if the system refuses threads (jobs still run). */
static void start_workers(void) {
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    while (pool.running + 1 < pool.want) {
        unsigned id = pool.running + 1;
        pool.start_generation[id] = __atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE);
        if (pthread_create(&pool.threads[id], NULL, worker_main, (void *)(uintptr_t)id) != 0) break;
        pool.running = id;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

static void atfork_prepare(void) { pthread_mutex_lock(&pool.submit); }
static void atfork_parent(void) { pthread_mutex_unlock(&pool.submit); }
static void atfork_child(void) {
    pool.running = 0;
    pool.sleepers = 0;
    pool.caller_sleeping = 0;
    pool.stop = 0;
    pthread_mutex_init(&pool.submit, NULL);
}

static void register_atfork(void) { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); }

static unsigned default_threads(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n > MAX_THREADS ? MAX_THREADS : (unsigned)n;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : (unsigned)n;
}

static void lock_pool(void) {
    pthread_once(&atfork_once, register_atfork);
    pthread_mutex_lock(&pool.submit);
    if (!pool.want) pool.want = default_threads();
}

int zm_set_num_threads(unsigned n) {
    if (n < 1 || n > MAX_THREADS) {
        zm_fail(ZM_ERR_INVALID_ARG, n, MAX_THREADS, 0);
        return ZM_ERR_INVALID_ARG;
    }
    lock_pool();
    if (n != pool.want) {
        stop_workers();
        pool.want = n;
    }
    pthread_mutex_unlock(&pool.submit);
    return ZM_OK;
}

unsigned zm_get_num_threads(void) {
    lock_pool();
    unsigned n = pool.want;
    pthread_mutex_unlock(&pool.submit);
    return n;
}

void zm_pool_set_allocator(const zm_allocator_t *a) {
    lock_pool();
    if (!pool.has_alloc) { /* the first allocator stays: scratch already handed out is its */
        pool.alloc = *a;
        pool.has_alloc = true;
    }
    pthread_mutex_unlock(&pool.submit);
}

void *zm_pool_scratch(unsigned worker) { return pool.scratch[worker].ptr; }

/* Grow one scratch block to at least `bytes`, from the pool's allocator. */
static int grow(scratch_t *s, size_t bytes) {
    if (s->len >= bytes) return ZM_OK;
    if (!pool.has_alloc) {
        zm_fail(ZM_ERR_INVALID_ARG, bytes, 0, 0);
        return ZM_ERR_INVALID_ARG;
    }
    zm_fail(ZM_OK, 0, 0, 0); /* allocators that fail without a report still get one */
    void *p = zm_alloc(pool.alloc, bytes, SCRATCH_ALIGN);
    if (!p) {
        if (!zm_last_report()->code) zm_fail(ZM_ERR_OUT_OF_MEMORY, bytes, 0, 0);
        return ZM_ERR_OUT_OF_MEMORY;
    }
    zm_free(pool.alloc, s->ptr, s->len, SCRATCH_ALIGN);
    s->ptr = p;
    s->len = bytes;
    return ZM_OK;
}

static int reserve_scratch(unsigned workers, size_t bytes, size_t shared_bytes) {
    int status = ZM_OK;
    for (unsigned i = 0; i < workers && bytes && status == ZM_OK; i++) status = grow(&pool.scratch[i], bytes);
    if (status == ZM_OK && shared_bytes) status = grow(&pool.shared, shared_bytes);
    return status;
}

int zm_pool_run(zm_task_fn fn, void *arg, size_t n_tasks, size_t scratch_bytes) {
    return zm_pool_run_shared(fn, arg, n_tasks, scratch_bytes, NULL, 0);
}

int zm_pool_run_shared(zm_task_fn fn, void *arg, size_t n_tasks, size_t scratch_bytes,
                       void (*prepare)(void *arg, void *shared), size_t shared_bytes) {
    if (!n_tasks) return ZM_OK;
    if (n_tasks > UINT32_MAX) {
        zm_fail(ZM_ERR_TOO_LARGE, n_tasks, UINT32_MAX, 0);
        return ZM_ERR_TOO_LARGE;
    }
    lock_pool();
    bool parallel = pool.want > 1 && n_tasks > 1;
    if (parallel && pool.running + 1 != pool.want) start_workers();
    parallel = parallel && pool.running > 0;
    int status = reserve_scratch(parallel ? pool.running + 1 : 1, scratch_bytes, shared_bytes);
    if (status == ZM_OK && prepare) prepare(arg, pool.shared.ptr);
    if (status == ZM_OK && !parallel) {
        for (size_t t = 0; t < n_tasks; t++) fn(arg, t, 0);
    } else if (status == ZM_OK) {
        job_t *job = &pool.jobs[(pool.generation + 1) & 1];
        job->fn = fn;
        job->arg = arg;
        __atomic_store_n(&job->n_tasks, n_tasks, __ATOMIC_RELAXED);
        uint32_t gen = publish();
        run_tasks(gen, 0);
        wait_done(n_tasks);
    }
    if (pool.shared.len > SHARED_KEEP) { /* a one-off big job does not pin its scratch */
        zm_free(pool.alloc, pool.shared.ptr, pool.shared.len, SCRATCH_ALIGN);
        pool.shared = (scratch_t){0};
    }
    pthread_mutex_unlock(&pool.submit);
    return status;
}
