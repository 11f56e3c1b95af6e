/* numpy_bridge.h — NEP 49: numpy's data allocations served by a zigmem allocator.
 *
 * Compiled into the Python extension only (it needs Python.h and numpy's headers); the C
 * core does not depend on it. */
#ifndef ZIGMEM_NUMPY_BRIDGE_H
#define ZIGMEM_NUMPY_BRIDGE_H

#include "zigmem.h"

typedef struct zm_np_block zm_np_block_t;

/* One per zigmem allocator that serves numpy: what it has handed out and not got back. */
typedef struct zm_np_state {
    zm_allocator_t allocator;
    int serialize;          /* take the process-wide Python lock around allocator calls */
    int lock;               /* guards the live list */
    zm_np_block_t *live;    /* numpy buffers alive now, newest first */
    size_t live_count;
    size_t live_bytes;
    size_t total_count;     /* buffers ever served */
    size_t bad_frees;       /* frees whose header was overwritten: not freed (leaked) */
    uintptr_t bad_address;  /* the first of them */
} zm_np_state_t;

void zm_np_state_init(zm_np_state_t *s, zm_allocator_t allocator, int serialize);
/* Copy up to max live buffers (address, size, site in alloc_site) into out; returns how
 * many are live. */
size_t zm_np_live(zm_np_state_t *s, zm_report_t *out, size_t max);

#endif
