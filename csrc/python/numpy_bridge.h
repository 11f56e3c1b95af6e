/* numpy_bridge.h — NEP 49: numpy's data allocations served by a zigmem allocator.
 *
 * Compiled into the Python extension only (it needs Python.h and numpy's headers); the C
 * core does not depend on it. */
#ifndef ZIGMEM_NUMPY_BRIDGE_H
#define ZIGMEM_NUMPY_BRIDGE_H

#include "zigmem.h"

typedef struct zm_np_live_entry {
    uintptr_t data;  /* what numpy holds: the block's address + ZM_NP_PREFIX */
    size_t nbytes;   /* numpy's size (the block is ZM_NP_PREFIX bytes more) */
    uint64_t site;
} zm_np_live_entry_t;

/* One per zigmem allocator that serves numpy: what it has handed out and not got back.
 * The live table is out of band, so a write before an array (into its prefix) cannot break
 * the bookkeeping: the prefix is a red zone, checked when the array is freed. */
typedef struct zm_np_state {
    zm_guard_t *guard;          /* the allocator's guard: every call enters it */
    int lock;                   /* guards the table; taken inside the guard only */
    zm_np_live_entry_t *live;   /* live buffers, unordered */
    size_t live_count;
    size_t live_cap;
    size_t live_bytes;
    size_t total_count;         /* buffers ever served */
    zm_report_t error;          /* the first prefix overwrite found (code 0: none) */
    size_t errors;              /* how many were found */
} zm_np_state_t;

void zm_np_state_init(zm_np_state_t *s, zm_guard_t *guard);
/* Release the live table (the allocator is gone; no array is left). */
void zm_np_state_deinit(zm_np_state_t *s);
/* Copy up to max live buffers (address, size, site in alloc_site) into out; returns how
 * many are live. */
size_t zm_np_live(zm_np_state_t *s, zm_report_t *out, size_t max);
/* The first prefix overwrite found since the last call into *out and its count (then
 * forgotten), or 0. */
size_t zm_np_take_error(zm_np_state_t *s, zm_report_t *out);

#endif
