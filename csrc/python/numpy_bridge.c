/* numpy_bridge.c — NEP 49 glue: a PyDataMem_Handler whose malloc / calloc / realloc / free
 * go to a zigmem allocator, and ServeNumpy, the context manager that installs it.
 *
 * Each numpy buffer is preceded by a 64-byte prefix (which keeps the data 64-byte aligned).
 * The bookkeeping lives out of band, in the state's live table, so that a write just before
 * an array cannot break it: the prefix holds the block's table index and a pattern, and is
 * checked as a red zone when the array is freed (an overwrite is reported, the block is
 * freed all the same). The table gives numpy's own size back at free (numpy's idea of it
 * is not reliable after ndarray.resize) and lets a reset or deinit name the live arrays.
 *
 * Every handler call enters the allocator's guard (guard.c): the call cannot race a reset or
 * deinit, and after deinit the guard is closed, so a handler still captured somewhere (a
 * copied context, an asyncio task) returns NULL and numpy raises MemoryError. The table's
 * spin lock is taken only inside the guard, and nothing waits for a guard while holding it.
 *
 * The handler functions touch no Python object: numpy may call them without the GIL. The
 * rest (handler capsules, ServeNumpy) uses the Python C API with the GIL held; the Python
 * layer creates ServeNumpy objects through ctypes.PyDLL. ServeNumpy's __enter__ and __exit__
 * are C methods: installing or restoring a handler is one call, so an exception landing in
 * Python code (KeyboardInterrupt) can never leave a handler half-installed. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_22_API_VERSION
#define NPY_TARGET_VERSION NPY_1_22_API_VERSION
#include <numpy/arrayobject.h>
#include <string.h>

#include "internal.h"
#include "numpy_bridge.h"

#define PREFIX 64
#define MAGIC 0x7a69676d656d6e70ull /* "zigmemnp" */
#define PATTERN 0xa5

/* ---------------------------------------------------------------- the live table */

static zm_allocator_t table_pages(void) {
    static zm_page_t page_state; /* flags 0: plain pages */
    zm_allocator_t a;
    zm_page_allocator(&page_state, &a);
    return a;
}

void zm_np_state_init(zm_np_state_t *s, zm_guard_t *guard) {
    memset(s, 0, sizeof *s);
    s->guard = guard;
}

void zm_np_state_deinit(zm_np_state_t *s) {
    if (s->live) zm_free(table_pages(), s->live, s->live_cap * sizeof *s->live, 64);
    s->live = NULL;
    s->live_cap = s->live_count = 0;
}

static void write_prefix(uintptr_t data, size_t index) {
    uint8_t *p = (uint8_t *)data - PREFIX;
    uint64_t words[2] = {index, MAGIC ^ data};
    memcpy(p, words, sizeof words);
    memset(p + sizeof words, PATTERN, PREFIX - sizeof words);
}

static const uint8_t pattern[PREFIX - 16] = {
    [0 ... PREFIX - 17] = PATTERN,
};

/* Whether the prefix is what write_prefix left (the common case: one compare). */
static inline bool prefix_intact(uintptr_t data, size_t index) {
    const uint8_t *p = (const uint8_t *)data - PREFIX;
    uint64_t words[2];
    memcpy(words, p, sizeof words);
    return words[0] == index && words[1] == (MAGIC ^ data) &&
           memcmp(p + sizeof words, pattern, sizeof pattern) == 0;
}

/* Bytes of the prefix that differ from what write_prefix left; *first: the nearest to the
 * data, as a distance before it. */
static size_t prefix_damage(uintptr_t data, size_t index, size_t *first) {
    uint8_t expected[PREFIX];
    uint64_t words[2] = {index, MAGIC ^ data};
    memcpy(expected, words, sizeof words);
    memset(expected + sizeof words, PATTERN, PREFIX - sizeof words);
    const uint8_t *p = (const uint8_t *)data - PREFIX;
    size_t count = 0;
    for (size_t i = 0; i < PREFIX; i++) {
        if (p[i] == expected[i]) continue;
        count++;
        *first = PREFIX - i;
    }
    return count;
}

/* With the table locked: the index of data, or SIZE_MAX. The prefix says where to look;
 * only if it was overwritten does the search scan. */
static size_t table_find(const zm_np_state_t *s, uintptr_t data) {
    uint64_t hint;
    memcpy(&hint, (const uint8_t *)data - PREFIX, sizeof hint);
    if (hint < s->live_count && s->live[hint].data == data) return hint;
    for (size_t i = 0; i < s->live_count; i++)
        if (s->live[i].data == data) return i;
    return SIZE_MAX;
}

static bool table_add(zm_np_state_t *s, uintptr_t data, size_t nbytes, uint64_t site) {
    if (s->live_count == s->live_cap) {
        size_t cap = s->live_cap ? 2 * s->live_cap : 4096 / sizeof *s->live;
        void *grown = zm_realloc(table_pages(), s->live, s->live_cap * sizeof *s->live, 64,
                                 cap * sizeof *s->live);
        if (!grown) return false;
        s->live = grown;
        s->live_cap = cap;
    }
    size_t i = s->live_count++;
    s->live[i] = (zm_np_live_entry_t){data, nbytes, site};
    write_prefix(data, i);
    s->live_bytes += nbytes;
    s->total_count++;
    return true;
}

static void table_remove(zm_np_state_t *s, size_t i) {
    s->live_bytes -= s->live[i].nbytes;
    size_t last = --s->live_count;
    if (i != last) {
        s->live[i] = s->live[last];
        write_prefix(s->live[i].data, i); /* only the index word changes */
    }
}

/* Record an overwritten prefix, once per state until the Python layer takes it. */
static void check_prefix(zm_np_state_t *s, size_t i) {
    const zm_np_live_entry_t *e = &s->live[i];
    if (ZM_LIKELY(prefix_intact(e->data, i))) return;
    size_t first = 0, count = prefix_damage(e->data, i, &first);
    if (!count) return;
    if (s->errors++ == 0) {
        memset(&s->error, 0, sizeof s->error);
        s->error.code = ZM_ERR_UNDERFLOW;
        s->error.address = e->data;
        s->error.size = e->nbytes;
        s->error.alignment = 64;
        s->error.offset = first;
        s->error.count = count;
        s->error.alloc_site = e->site;
    }
}

size_t zm_np_live(zm_np_state_t *s, zm_report_t *out, size_t max) {
    zm_spin_lock(&s->lock);
    size_t n = s->live_count;
    for (size_t i = 0; i < n && i < max; i++) {
        memset(&out[i], 0, sizeof out[i]);
        out[i].address = s->live[i].data;
        out[i].size = s->live[i].nbytes;
        out[i].alloc_site = s->live[i].site;
    }
    zm_spin_unlock(&s->lock);
    return n;
}

size_t zm_np_take_error(zm_np_state_t *s, zm_report_t *out) {
    zm_spin_lock(&s->lock);
    size_t n = s->errors;
    if (n) {
        *out = s->error;
        out->more = n - 1;
        s->errors = 0;
    }
    zm_spin_unlock(&s->lock);
    return n;
}

/* ---------------------------------------------------------------- the handler */

/* The handler installed by one `with allocator.numpy():` block. */
typedef struct zm_np_handler {
    PyDataMem_Handler handler; /* first: the capsule's pointer; allocator.ctx points here */
    zm_np_state_t *state;
    uint64_t site;   /* the block's Python site, recorded by a general-purpose allocator */
    PyObject *owner; /* the Python allocator: alive while any array can free into it */
    PyObject *prev;  /* while installed: the handler it replaced; NULL once removed */
} zm_np_handler_t;

static void *np_malloc(void *ctx, size_t size) {
    zm_np_handler_t *h = ctx;
    zm_np_state_t *s = h->state;
    zm_guard_t *g = s->guard;
    size_t total;
    if (__builtin_add_overflow(size, PREFIX, &total)) return NULL;
    if (!zm_guard_enter(g)) return NULL; /* deinitialised: numpy raises MemoryError */
    if (h->site && g->take_error) zm_set_thread_site(h->site); /* a GPA records it */
    uint8_t *block = zm_alloc(g->inner, total, 64);
    uintptr_t data = 0;
    if (block) {
        data = (uintptr_t)block + PREFIX;
        zm_spin_lock(&s->lock);
        bool added = table_add(s, data, size, h->site);
        zm_spin_unlock(&s->lock);
        if (added) {
            __atomic_add_fetch(&g->foreign_live, 1, __ATOMIC_RELAXED);
        } else {
            zm_free(g->inner, block, total, 64);
            data = 0;
        }
    }
    if (h->site && g->take_error) zm_set_thread_site(0);
    zm_guard_leave(g);
    return (void *)data;
}

static void *np_calloc(void *ctx, size_t nelem, size_t elsize) {
    size_t size;
    if (__builtin_mul_overflow(nelem, elsize, &size)) return NULL;
    void *p = np_malloc(ctx, size);
    if (p) memset(p, 0, size);
    return p;
}

static void np_free(void *ctx, void *ptr, size_t size) {
    (void)size; /* the table knows better */
    zm_np_handler_t *h = ctx;
    zm_np_state_t *s = h->state;
    zm_guard_t *g = s->guard;
    if (!ptr || !zm_guard_enter(g)) return;
    zm_spin_lock(&s->lock);
    size_t i = table_find(s, (uintptr_t)ptr), nbytes = 0;
    if (i != SIZE_MAX) {
        check_prefix(s, i);
        nbytes = s->live[i].nbytes;
        table_remove(s, i);
    }
    zm_spin_unlock(&s->lock);
    if (i != SIZE_MAX) {
        __atomic_sub_fetch(&g->foreign_live, 1, __ATOMIC_RELAXED);
        if (h->site && g->take_error) zm_set_thread_site(h->site);
        zm_free(g->inner, (uint8_t *)ptr - PREFIX, nbytes + PREFIX, 64);
        if (h->site && g->take_error) zm_set_thread_site(0);
    }
    zm_guard_leave(g);
}

static void *np_realloc(void *ctx, void *ptr, size_t new_size) {
    zm_np_handler_t *h = ctx;
    zm_np_state_t *s = h->state;
    zm_guard_t *g = s->guard;
    size_t total;
    if (!ptr) return np_malloc(ctx, new_size);
    if (__builtin_add_overflow(new_size, PREFIX, &total) || !zm_guard_enter(g)) return NULL;
    /* The table stays locked across the move: the old prefix (which says where the entry
     * is) may be unmapped by it, and other threads must not move entries meanwhile. The
     * lock is a leaf: no path waits for a guard while holding it. */
    zm_spin_lock(&s->lock);
    size_t i = table_find(s, (uintptr_t)ptr);
    uint8_t *moved = NULL;
    if (i != SIZE_MAX) {
        check_prefix(s, i);
        size_t old = s->live[i].nbytes;
        zm_set_thread_site(h->site);
        moved = zm_realloc(g->inner, (uint8_t *)ptr - PREFIX, old + PREFIX, 64, total);
        zm_set_thread_site(0);
        if (moved) {
            s->live_bytes += new_size - old;
            s->live[i].data = (uintptr_t)moved + PREFIX;
            s->live[i].nbytes = new_size;
            write_prefix(s->live[i].data, i);
        }
    }
    zm_spin_unlock(&s->lock);
    zm_guard_leave(g);
    return moved ? moved + PREFIX : NULL; /* on failure numpy keeps the old buffer */
}

static bool is_ours(PyObject *capsule, zm_np_handler_t **out) {
    if (!capsule || !PyCapsule_IsValid(capsule, "mem_handler")) return false;
    zm_np_handler_t *h = PyCapsule_GetPointer(capsule, "mem_handler");
    if (h->handler.allocator.malloc != np_malloc) return false;
    *out = h;
    return true;
}

static void handler_destroy(PyObject *capsule) {
    zm_np_handler_t *h = PyCapsule_GetPointer(capsule, "mem_handler");
    if (!h) return;
    Py_XDECREF(h->prev);
    Py_XDECREF(h->owner);
    PyMem_RawFree(h);
}

static PyObject *handler_new(zm_np_state_t *state, uint64_t site, PyObject *owner,
                             const char *name, PyObject *prev) {
    zm_np_handler_t *h = PyMem_RawCalloc(1, sizeof *h);
    if (!h) return PyErr_NoMemory();
    snprintf(h->handler.name, sizeof h->handler.name, "%s", name);
    h->handler.version = 1;
    h->handler.allocator = (PyDataMemAllocator){h, np_malloc, np_calloc, np_realloc, np_free};
    h->state = state;
    h->site = site;
    Py_INCREF(owner);
    h->owner = owner;
    Py_INCREF(prev);
    h->prev = prev;
    PyObject *capsule = PyCapsule_New(&h->handler, "mem_handler", handler_destroy);
    if (!capsule) {
        Py_DECREF(owner);
        Py_DECREF(prev);
        PyMem_RawFree(h);
    }
    return capsule;
}

/* ---------------------------------------------------------------- ServeNumpy */

typedef struct {
    PyObject_HEAD
    zm_np_state_t *state;
    PyObject *owner;       /* the allocator */
    PyObject *installed;   /* list: the capsules this object installed, innermost last */
    PyObject *closed_error; /* exception classes of the Python layer */
    PyObject *order_error;
    uint64_t site;
    char name[128];
} serve_t;

static PyObject *serve_enter(serve_t *self, PyObject *unused) {
    (void)unused;
    if (__atomic_load_n(&self->state->guard->closed, __ATOMIC_ACQUIRE)) {
        PyErr_SetString(self->closed_error,
                        "cannot serve numpy from an allocator that was deinitialised");
        return NULL;
    }
    PyObject *prev = PyDataMem_GetHandler();
    if (!prev) return NULL;
    PyObject *capsule = handler_new(self->state, self->site, self->owner, self->name, prev);
    Py_DECREF(prev);
    if (!capsule) return NULL;
    if (PyList_Append(self->installed, capsule) < 0) {
        Py_DECREF(capsule);
        return NULL;
    }
    PyObject *replaced = PyDataMem_SetHandler(capsule);
    Py_DECREF(capsule);
    if (!replaced) {
        PySequence_DelItem(self->installed, PyList_GET_SIZE(self->installed) - 1);
        return NULL;
    }
    Py_DECREF(replaced);
    Py_INCREF(self->owner);
    return self->owner;
}

/* Remove capsule from the current context's chain of zigmem handlers: restore what it
 * replaced if it is the current handler, else splice it out from under the handlers
 * installed after it. 0: done in order; 1: done, out of order; -1: not found. */
static int remove_handler(PyObject *capsule) {
    zm_np_handler_t *h;
    if (!is_ours(capsule, &h)) return -1;
    PyObject *current = PyDataMem_GetHandler();
    if (!current) return -2;
    int result = -1;
    if (current == capsule) {
        PyObject *replaced = PyDataMem_SetHandler(h->prev);
        if (!replaced) {
            Py_DECREF(current);
            return -2;
        }
        Py_DECREF(replaced);
        result = 0;
    } else {
        zm_np_handler_t *above;
        for (PyObject *node = current; is_ours(node, &above) && above->prev; node = above->prev) {
            if (above->prev != capsule) continue;
            Py_INCREF(h->prev);
            above->prev = h->prev; /* steals the reference just taken */
            Py_DECREF(capsule);    /* the reference above->prev held */
            result = 1;
            break;
        }
    }
    Py_DECREF(current);
    if (result >= 0) Py_CLEAR(h->prev);
    return result;
}

static PyObject *serve_exit(serve_t *self, PyObject *args) {
    (void)args;
    Py_ssize_t n = PyList_GET_SIZE(self->installed);
    if (n == 0) {
        PyErr_SetString(self->order_error, "numpy() block exited more often than entered");
        return NULL;
    }
    PyObject *capsule = PyList_GET_ITEM(self->installed, n - 1);
    Py_INCREF(capsule);
    PySequence_DelItem(self->installed, n - 1);
    int how = remove_handler(capsule);
    Py_DECREF(capsule);
    if (how == -2) return NULL;
    if (how == 1)
        PyErr_SetString(self->order_error,
                        "numpy() blocks exited out of order (an inner block is still active, "
                        "e.g. in a suspended generator): this one was removed and the inner "
                        "one will restore the handler from before it");
    else if (how == -1)
        PyErr_SetString(self->order_error,
                        "numpy() block exited in another context than it was entered in "
                        "(its handler is not installed here); nothing was changed");
    if (how != 0) return NULL;
    Py_RETURN_FALSE;
}

static PyObject *serve_refuse_copy(serve_t *self, PyObject *args) {
    (void)self;
    (void)args;
    PyErr_SetString(PyExc_TypeError,
                    "cannot copy or pickle a ServeNumpy: it installs handlers that own C state; "
                    "call allocator.numpy() again instead");
    return NULL;
}

static void serve_dealloc(serve_t *self) {
    Py_XDECREF(self->owner);
    Py_XDECREF(self->installed);
    Py_XDECREF(self->closed_error);
    Py_XDECREF(self->order_error);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef serve_methods[] = {
    {"__enter__", (PyCFunction)serve_enter, METH_NOARGS,
     "Install the allocator as numpy's data allocator for this context; returns it."},
    {"__exit__", (PyCFunction)serve_exit, METH_VARARGS,
     "Restore the handler the matching __enter__ replaced."},
    {"__reduce_ex__", (PyCFunction)serve_refuse_copy, METH_VARARGS, NULL},
    {"__reduce__", (PyCFunction)serve_refuse_copy, METH_NOARGS, NULL},
    {"__copy__", (PyCFunction)serve_refuse_copy, METH_NOARGS, NULL},
    {"__deepcopy__", (PyCFunction)serve_refuse_copy, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject serve_type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "zigmem.ServeNumpy",
    .tp_basicsize = sizeof(serve_t),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .tp_doc = "What allocator.numpy() returns: a re-entrant context manager that serves "
              "numpy's data allocations from the allocator inside its block.",
    .tp_dealloc = (destructor)serve_dealloc,
    .tp_methods = serve_methods,
};

/* ---------------------------------------------------------------- Python C API (GIL held) */

static int ensure_ready(void) {
    if (PyArray_API == NULL && _import_array() < 0) return -1;
    if (!(serve_type.tp_flags & Py_TPFLAGS_READY) && PyType_Ready(&serve_type) < 0) return -1;
    return 0;
}

/* A new ServeNumpy for state; it holds owner (the allocator) and the exception classes. */
PyObject *zm_np_serve_new(zm_np_state_t *state, uint64_t site, PyObject *owner,
                          const char *name, PyObject *closed_error, PyObject *order_error) {
    if (ensure_ready() < 0) return NULL;
    serve_t *self = PyObject_New(serve_t, &serve_type);
    if (!self) return NULL;
    self->installed = PyList_New(0);
    if (!self->installed) {
        PyObject_Free(self);
        return NULL;
    }
    self->state = state;
    self->site = site;
    snprintf(self->name, sizeof self->name, "%s", name);
    Py_INCREF(owner);
    self->owner = owner;
    Py_INCREF(closed_error);
    self->closed_error = closed_error;
    Py_INCREF(order_error);
    self->order_error = order_error;
    return (PyObject *)self;
}

/* 1 if the current context is inside a numpy() block of state (its handler is installed,
 * now or under a later one), else 0; -1 on error. */
int zm_np_context_serves(zm_np_state_t *state) {
    if (ensure_ready() < 0) return -1;
    PyObject *current = PyDataMem_GetHandler();
    if (!current) return -1;
    int found = 0;
    zm_np_handler_t *h;
    for (PyObject *node = current; is_ours(node, &h); node = h->prev) {
        if (h->state == state) {
            found = 1;
            break;
        }
        if (!h->prev) break;
    }
    Py_DECREF(current);
    return found;
}
