/* trace.c — telling a memory tracer (Python's tracemalloc, through the extension's hook)
 * about the memory zigmem takes from the OS: each mapping the page allocator makes, grows,
 * moves or unmaps, which covers arena and pool chunks, GPA slabs and large blocks and page
 * allocations; not each bump allocation inside them.
 *
 * The hook may need Python's GIL, so it is never called while a guard is held: events made
 * inside a guard are queued per thread and delivered when the thread leaves its outermost
 * guard (zm_trace_leave). Threads marked quiet (the kernels' workers) deliver nothing. With
 * no hook set an event costs one load and a branch. */
#include <string.h>
#include <sys/mman.h>

#include "internal.h"

static zm_trace_hooks_t hooks;

typedef struct {
    uintptr_t ptr;
    size_t size; /* 0: untrack */
} trace_event_t;

static _Thread_local int depth;
static _Thread_local bool quiet;
static _Thread_local trace_event_t *queue;
static _Thread_local size_t queued, queue_cap;

void zm_trace_set(const zm_trace_hooks_t *h) {
    if (h) hooks = *h;
    else memset(&hooks, 0, sizeof hooks);
}

void zm_trace_quiet(bool on) { quiet = on; }

static void deliver(uintptr_t ptr, size_t size) {
    if (size) hooks.track(ptr, size);
    else hooks.untrack(ptr);
}

/* The queue grows by mmap, outside every allocator: it is the tracer's bookkeeping. An
 * event that cannot be queued is dropped (a tracer may then show a stale block). */
static void enqueue(uintptr_t ptr, size_t size) {
    if (queued == queue_cap) {
        size_t cap = queue_cap ? 2 * queue_cap : 256;
        void *grown = mmap(NULL, cap * sizeof *queue, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (grown == MAP_FAILED) return;
        if (queue) {
            memcpy(grown, queue, queued * sizeof *queue);
            munmap(queue, queue_cap * sizeof *queue);
        }
        queue = grown;
        queue_cap = cap;
    }
    queue[queued++] = (trace_event_t){ptr, size};
}

void zm_trace_event(uintptr_t ptr, size_t size) {
    if (ZM_LIKELY(!hooks.track) || quiet) return;
    if (depth == 0) deliver(ptr, size);
    else enqueue(ptr, size);
}

void zm_trace_enter(void) { depth++; }

void zm_trace_leave(void) {
    if (--depth > 0 || ZM_LIKELY(queued == 0)) return;
    if (!hooks.track || quiet) {
        queued = 0;
        return;
    }
    for (size_t i = 0; i < queued; i++) deliver(queue[i].ptr, queue[i].size);
    queued = 0;
}
