/* paged_kv_types.h — the body of zm_paged_kv_t, shared by paged_kv.c (the pool, sequences
 * and prefix cache) and paged_attention.c (the kernel that reads the blocks).
 *
 * Pool layout. Block b holds block_size positions of K and V for every layer, laid out
 * [layer][K, V][kv head][position][dim], so that one head's keys inside a block are
 * contiguous: the attention kernel streams them without a gather.
 *
 * Block states: free (on the free stack), in use (refcount > 0) or cached-free (refcount 0
 * but registered in the prefix hash table, on the LRU list until reused or evicted). A block
 * in use may be registered too (a prompt block other sequences can share).
 */
#ifndef ZIGMEM_PAGED_KV_TYPES_H
#define ZIGMEM_PAGED_KV_TYPES_H

#include <pthread.h>

#include "internal.h"

#define ZM_PKV_NONE (-1) /* no block: list ends, an empty chain */

/* One sequence slot. Ids are (generation << 32 | slot): a freed slot is reused with the next
 * generation, so an old id never names a new sequence. */
typedef struct zm_pkv_seq {
    uint32_t gen;
    bool live;
    int64_t next_free;    /* while not live: the next free slot, or -1 */
    void *chunk;          /* one allocation: layer flags, prompt tokens, block table */
    size_t chunk_bytes;
    uint8_t *layer_done;  /* [n_layers]: written in the open step */
    int32_t *prompt;      /* the prompt's tokens that fill whole blocks */
    int32_t *table;       /* block ids, one per block_size positions */
    size_t n_prompt;      /* tokens in prompt[] (a multiple of block_size) */
    size_t prompt_len;    /* the whole prompt's length */
    size_t n_blocks, cap_blocks;
    size_t seq_len;       /* positions every layer holds */
    size_t step_end;      /* what the open step brings every layer to */
    size_t written;       /* layers written in the open step */
    size_t cached_tokens; /* positions served by the prefix cache at add_sequence */
    /* prefix registration: blocks of prompt[] already looked at, and the chain so far */
    size_t n_registered;
    int32_t chain_block;
    uint64_t chain_gen, chain_hash;
} zm_pkv_seq_t;

struct zm_paged_kv {
    zm_allocator_t allocator;
    pthread_mutex_t lock;    /* every public call runs under it */
    size_t n_layers, n_kv_heads, head_dim, num_blocks, block_size, itemsize;
    int dtype;               /* ZM_KV_F32 / F16 / BF16 */
    size_t block_bytes, pool_bytes, meta_bytes;
    size_t head_stride;      /* bytes of one head's positions in one block (bs * dim * item) */
    uint8_t *pool;
    void *meta;              /* one allocation for every per-block array below */
    int32_t *refcount;
    int32_t *fill;           /* positions written, for the waste figure */
    uint8_t *registered;
    uint64_t *hash, *gen, *parent_gen;
    int32_t *parent;         /* the registered block before this one, or NONE */
    int32_t *bucket_next;    /* hash chain */
    int32_t *lru_prev, *lru_next;
    int32_t *free_stack;
    int32_t *tokens;         /* [num_blocks][block_size]: a registered block's tokens */
    int32_t *buckets;        /* [n_buckets] */
    size_t n_buckets, n_free, n_cached;
    int32_t lru_head, lru_tail; /* head: least recently used */
    uint64_t next_gen;
    zm_pkv_seq_t *seqs;      /* slots; grows by doubling */
    size_t n_slots, cap_slots, live_seqs;
    int64_t free_slot;       /* first free slot, linked through zm_pkv_seq_t.next_free */
    size_t prefix_hits, evictions;
};

/* ---------------------------------------------------------------- shared by the two files */

/* Fill the report for a failed call (zm_pkv_problem_t detail) and return code. */
int zm_pkv_problem(int code, int detail, size_t given, size_t expected, size_t offset);
/* The live sequence an id names, or a status (unknown id, freed id) with the report filled. */
int zm_pkv_lookup(zm_paged_kv_t *kv, int64_t id, zm_pkv_seq_t **out);

/* Positions `layer` holds: the open step's end once the layer is written in it. */
static inline size_t zm_pkv_layer_len(const zm_pkv_seq_t *s, size_t layer) {
    return s->layer_done[layer] ? s->step_end : s->seq_len;
}

/* Where one head's positions of one layer's K (which 0) or V (which 1) start in block b. */
static inline uint8_t *zm_pkv_block_head(const zm_paged_kv_t *kv, int32_t b, size_t layer,
                                         int which, size_t head) {
    return kv->pool + (size_t)b * kv->block_bytes +
           ((layer * 2 + (size_t)which) * kv->n_kv_heads + head) * kv->head_stride;
}

#endif
