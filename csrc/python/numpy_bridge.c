/* numpy_bridge.c — NEP 49 glue: a PyDataMem_Handler whose malloc / calloc / realloc / free
 * go to a zigmem allocator.
 *
 * Each numpy buffer is preceded by a 64-byte header (which keeps the data 64-byte aligned)
 * holding its size — numpy's own idea of the size at free is not reliable after
 * ndarray.resize — and links in a list of live buffers, so that an arena reset or a deinit
 * can say exactly which arrays still hold memory, and how much.
 *
 * numpy calls the handler with or without the GIL; these functions touch no Python object.
 * Allocators that are not thread-safe are serialized by the process-wide Python lock, as
 * for calls from Python. Only the three functions at the end use the Python C API; the
 * Python layer calls them through ctypes.PyDLL, with the GIL held and real PyObject *s. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_22_API_VERSION
#define NPY_TARGET_VERSION NPY_1_22_API_VERSION
#include <numpy/arrayobject.h>
#include <string.h>

#include "internal.h"
#include "numpy_bridge.h"

struct zm_np_block {
    zm_np_block_t *prev, *next;
    zm_np_state_t *state;
    size_t nbytes;
    uint64_t site;
    uint64_t magic; /* MAGIC ^ address: a header that was overwritten is not trusted */
    uint64_t pad[2];
};
_Static_assert(sizeof(zm_np_block_t) == 64, "the header keeps numpy data 64-byte aligned");

#define MAGIC 0x7a69676d656d6e70ull /* "zigmemnp" */

/* The handler installed by one `with allocator.numpy():` block. */
typedef struct zm_np_handler {
    PyDataMem_Handler handler; /* allocator.ctx points back here */
    zm_np_state_t *state;
    uint64_t site;   /* the block's Python site, recorded by a general-purpose allocator */
    PyObject *owner; /* the Python allocator: alive while any array can free into it */
} zm_np_handler_t;

/* ---------------------------------------------------------------- the live list
 *
 * Guarded by the lock that already serializes the allocator when it is not thread-safe
 * (one lock per buffer, not two), else by the state's own spin lock. */

static void state_lock(zm_np_state_t *s) {
    if (s->serialize) {
        zm_py_lock();
        return;
    }
    zm_spin_lock(&s->lock);
}

static void state_unlock(zm_np_state_t *s) {
    if (s->serialize) zm_py_unlock();
    else zm_spin_unlock(&s->lock);
}

/* Both with the state locked. */
static void link_block(zm_np_state_t *s, zm_np_block_t *b) {
    b->prev = NULL;
    b->next = s->live;
    if (s->live) s->live->prev = b;
    s->live = b;
    s->live_count++;
    s->live_bytes += b->nbytes;
    s->total_count++;
}

static void unlink_block(zm_np_state_t *s, zm_np_block_t *b) {
    if (b->prev) b->prev->next = b->next;
    else s->live = b->next;
    if (b->next) b->next->prev = b->prev;
    s->live_count--;
    s->live_bytes -= b->nbytes;
}

void zm_np_state_init(zm_np_state_t *s, zm_allocator_t allocator, int serialize) {
    memset(s, 0, sizeof *s);
    s->allocator = allocator;
    s->serialize = serialize;
}

size_t zm_np_live(zm_np_state_t *s, zm_report_t *out, size_t max) {
    size_t n = 0;
    state_lock(s);
    for (zm_np_block_t *b = s->live; b; b = b->next, n++) {
        if (n >= max) continue;
        memset(&out[n], 0, sizeof out[n]);
        out[n].address = (uintptr_t)(b + 1);
        out[n].size = b->nbytes;
        out[n].alloc_site = b->site;
    }
    state_unlock(s);
    return n;
}

/* ---------------------------------------------------------------- the handler */

static void *np_malloc(void *ctx, size_t size) {
    zm_np_handler_t *h = ctx;
    zm_np_state_t *s = h->state;
    size_t total;
    if (__builtin_add_overflow(size, sizeof(zm_np_block_t), &total)) return NULL;
    if (h->site) zm_gpa_set_thread_site(h->site); /* recorded by a general-purpose allocator */
    state_lock(s);
    zm_np_block_t *b = zm_alloc(s->allocator, total, 64);
    if (b) {
        *b = (zm_np_block_t){.state = s, .nbytes = size, .site = h->site,
                             .magic = MAGIC ^ (uintptr_t)b};
        link_block(s, b);
    }
    state_unlock(s);
    if (h->site) zm_gpa_set_thread_site(0);
    return b ? b + 1 : NULL;
}

static void *np_calloc(void *ctx, size_t nelem, size_t elsize) {
    size_t size;
    if (__builtin_mul_overflow(nelem, elsize, &size)) return NULL;
    void *p = np_malloc(ctx, size);
    if (p) memset(p, 0, size);
    return p;
}

/* The header of a buffer this state handed out, or NULL (recorded) if it was overwritten. */
static zm_np_block_t *header_of(zm_np_state_t *s, void *ptr) {
    zm_np_block_t *b = (zm_np_block_t *)ptr - 1;
    if (b->magic == (MAGIC ^ (uintptr_t)b) && b->state == s) return b;
    if (__atomic_fetch_add(&s->bad_frees, 1, __ATOMIC_RELAXED) == 0) s->bad_address = (uintptr_t)ptr;
    return NULL;
}

static void np_free(void *ctx, void *ptr, size_t size) {
    (void)size; /* the header knows better */
    zm_np_handler_t *h = ctx;
    zm_np_state_t *s = h->state;
    if (!ptr) return;
    zm_np_block_t *b = header_of(s, ptr);
    if (!b) return; /* leak it rather than free with a size we cannot trust */
    if (h->site) zm_gpa_set_thread_site(h->site);
    state_lock(s);
    unlink_block(s, b);
    b->magic = 0; /* a second free of the same pointer is then caught above */
    zm_free(s->allocator, b, b->nbytes + sizeof *b, 64);
    state_unlock(s);
    if (h->site) zm_gpa_set_thread_site(0);
}

static void *np_realloc(void *ctx, void *ptr, size_t new_size) {
    zm_np_handler_t *h = ctx;
    zm_np_state_t *s = h->state;
    if (!ptr) return np_malloc(ctx, new_size);
    size_t total;
    zm_np_block_t *b = header_of(s, ptr);
    if (!b || __builtin_add_overflow(new_size, sizeof *b, &total)) return NULL;
    state_lock(s);
    unlink_block(s, b);
    zm_np_block_t *moved = zm_realloc(s->allocator, b, b->nbytes + sizeof *b, 64, total);
    if (moved) {
        moved->nbytes = new_size;
        moved->magic = MAGIC ^ (uintptr_t)moved;
        b = moved;
    }
    link_block(s, b); /* on failure numpy raises MemoryError; the old buffer is intact */
    state_unlock(s);
    return moved ? moved + 1 : NULL;
}

/* ---------------------------------------------------------------- Python C API (GIL held) */

static void handler_destroy(PyObject *capsule) {
    zm_np_handler_t *h = PyCapsule_GetPointer(capsule, "mem_handler");
    if (!h) return;
    Py_XDECREF(h->owner);
    PyMem_RawFree(h);
}

/* A new "mem_handler" capsule serving numpy from state; it holds owner alive. */
PyObject *zm_np_handler_new(zm_np_state_t *state, uint64_t site, PyObject *owner,
                            const char *name) {
    zm_np_handler_t *h = PyMem_RawCalloc(1, sizeof *h);
    if (!h) return PyErr_NoMemory();
    snprintf(h->handler.name, sizeof h->handler.name, "%s", name);
    h->handler.version = 1;
    h->handler.allocator = (PyDataMemAllocator){h, np_malloc, np_calloc, np_realloc, np_free};
    h->state = state;
    h->site = site;
    Py_INCREF(owner);
    h->owner = owner;
    /* The capsule's pointer must be the PyDataMem_Handler: it is h's first member. */
    PyObject *capsule = PyCapsule_New(&h->handler, "mem_handler", handler_destroy);
    if (!capsule) {
        Py_DECREF(owner);
        PyMem_RawFree(h);
    }
    return capsule;
}

/* Install handler for the current context (thread / asyncio task); returns the previous. */
PyObject *zm_np_set_handler(PyObject *handler) {
    if (PyArray_API == NULL && _import_array() < 0) return NULL;
    return PyDataMem_SetHandler(handler);
}
