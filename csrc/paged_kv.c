/* paged_kv.c — many sequences' keys and values in one pool of fixed-size blocks.
 *
 * vLLM's paging, in C: a sequence is a block table (block ids, one per block_size positions);
 * blocks carry reference counts, so fork() shares every block and the first append into a
 * shared, partly filled last block copies that one block (copy-on-write).
 *
 * Prefix cache. When a step completes, each newly full block of *prompt* tokens is registered
 * in a hash table keyed by (parent block, tokens): the hash is chained from the parent's, and
 * a lookup confirms both the parent's identity (block id and registration generation) and
 * the tokens themselves, so a hash collision can never serve another prompt's K/V; by
 * induction a match means the whole prefix matches. A freed sequence's registered blocks with
 * no other reference become cached-free: on an LRU list (its last block first, so that
 * eviction takes children before parents), reusable by add_sequence() and evicted — least
 * recently used first — only when the pool has no free block left.
 *
 * All or nothing. append() reserves everything a step needs (new blocks, the copy-on-write
 * block, a larger block table) at the step's first layer, before changing anything; a full
 * pool or a failed allocation leaves the cache as it was. Memory: three allocations from the
 * caller's allocator at create (this struct, the per-block arrays, the pool), then the
 * sequence slots (doubling) and one allocation per sequence (its layer flags, prompt tokens
 * and block table, grown by doubling).
 */
#include <string.h>

#include "paged_kv_types.h"

#define HASH_SEED 0x9E3779B97F4A7C15ull

/* ---------------------------------------------------------------- allocation and reports */

/* The allocator is a guarded one (a zigmem allocator's vtable): it serializes itself. */
static void *pkv_alloc(zm_paged_kv_t *kv, size_t len, size_t align) {
    return zm_alloc(kv->allocator, len, align);
}

static void *pkv_realloc(zm_paged_kv_t *kv, void *p, size_t len, size_t new_len) {
    return zm_realloc(kv->allocator, p, len, 8, new_len);
}

static void pkv_free(zm_paged_kv_t *kv, void *p, size_t len, size_t align) {
    zm_free(kv->allocator, p, len, align);
}

ZM_NOINLINE int zm_pkv_problem(int code, int detail, size_t given, size_t expected,
                               size_t offset) {
    zm_fail(code, 0, 0, 0);
    zm_report_t *r = zm_last_report();
    r->detail = detail;
    r->given = given;
    r->expected = expected;
    r->offset = offset;
    return code;
}

/* The status of the allocation that just failed (its allocator filled the report). */
static int alloc_failure(void) {
    int code = zm_last_report()->code;
    return code ? code : ZM_ERR_OUT_OF_MEMORY;
}

static bool mul3(size_t a, size_t b, size_t c, size_t *out) {
    return !__builtin_mul_overflow(a, b, out) && !__builtin_mul_overflow(*out, c, out);
}

/* ---------------------------------------------------------------- create / destroy */

static size_t dtype_size(int dtype) {
    return dtype == ZM_KV_F32 ? 4 : (dtype == ZM_KV_F16 || dtype == ZM_KV_BF16) ? 2 : 0;
}

/* Lay out the per-block arrays in one allocation; returns its size (0 on overflow). */
static size_t meta_layout(zm_paged_kv_t *kv, uint8_t *base) {
    size_t n = kv->num_blocks, off = 0, bytes;
#define PLACE(field, count)                                                    \
    do {                                                                       \
        if (__builtin_mul_overflow((size_t)(count), sizeof *kv->field, &bytes) || \
            !zm_align_up(off, 8, &off) || __builtin_add_overflow(off, bytes, &bytes)) \
            return 0;                                                          \
        kv->field = (void *)(base + off);                                      \
        off = bytes;                                                           \
    } while (0)
    PLACE(hash, n);
    PLACE(gen, n);
    PLACE(parent_gen, n);
    PLACE(refcount, n);
    PLACE(fill, n);
    PLACE(parent, n);
    PLACE(bucket_next, n);
    PLACE(lru_prev, n);
    PLACE(lru_next, n);
    PLACE(free_stack, n);
    PLACE(buckets, kv->n_buckets);
    PLACE(registered, n);
    size_t tokens;
    if (__builtin_mul_overflow(n, kv->block_size, &tokens)) return 0;
    PLACE(tokens, tokens);
#undef PLACE
    return off;
}

static int check_config(const zm_paged_kv_config_t *c) {
    const size_t fields[] = {c->n_layers, c->n_kv_heads, c->head_dim, c->num_blocks,
                             c->block_size};
    for (size_t i = 0; i < 5; i++)
        if (fields[i] == 0) return zm_pkv_problem(ZM_ERR_INVALID_ARG, ZM_PKV_CONFIG, i, 1, 0);
    if (c->head_dim > ZM_PKV_MAX_HEAD_DIM)
        return zm_pkv_problem(ZM_ERR_INVALID_ARG, ZM_PKV_CONFIG, 2, ZM_PKV_MAX_HEAD_DIM, 0);
    if (c->num_blocks >= INT32_MAX)
        return zm_pkv_problem(ZM_ERR_INVALID_ARG, ZM_PKV_CONFIG, 3, INT32_MAX - 1, 0);
    if (c->block_size >= INT32_MAX)
        return zm_pkv_problem(ZM_ERR_INVALID_ARG, ZM_PKV_CONFIG, 4, INT32_MAX - 1, 0);
    if (!dtype_size(c->dtype)) return zm_pkv_problem(ZM_ERR_INVALID_ARG, ZM_PKV_CONFIG, 5, 2, 0);
    return ZM_OK;
}

int zm_paged_kv_create(zm_allocator_t a, const zm_paged_kv_config_t *cfg,
                       zm_paged_kv_t **out) {
    *out = NULL;
    int status = check_config(cfg);
    if (status) return status;
    zm_paged_kv_t tmp = {
        .allocator = a, .n_layers = cfg->n_layers,
        .n_kv_heads = cfg->n_kv_heads, .head_dim = cfg->head_dim,
        .num_blocks = cfg->num_blocks, .block_size = cfg->block_size, .dtype = cfg->dtype,
        .itemsize = dtype_size(cfg->dtype), .lru_head = ZM_PKV_NONE, .lru_tail = ZM_PKV_NONE,
        .next_gen = 1, .free_slot = -1,
    };
    size_t per_layer;
    if (!mul3(tmp.block_size, tmp.head_dim, tmp.itemsize, &tmp.head_stride) ||
        !mul3(tmp.head_stride, tmp.n_kv_heads, 2, &per_layer) ||
        __builtin_mul_overflow(per_layer, tmp.n_layers, &tmp.block_bytes) ||
        __builtin_mul_overflow(tmp.block_bytes, tmp.num_blocks, &tmp.pool_bytes))
        return zm_pkv_problem(ZM_ERR_TOO_LARGE, ZM_PKV_CONFIG, 3, 0, 0);
    tmp.n_buckets = 1;
    while (tmp.n_buckets < tmp.num_blocks) tmp.n_buckets <<= 1;
    tmp.meta_bytes = meta_layout(&tmp, NULL);
    if (!tmp.meta_bytes) return zm_pkv_problem(ZM_ERR_TOO_LARGE, ZM_PKV_CONFIG, 3, 0, 0);

    zm_paged_kv_t *kv = pkv_alloc(&tmp, sizeof *kv, 64);
    if (!kv) return alloc_failure();
    *kv = tmp;
    kv->meta = pkv_alloc(kv, kv->meta_bytes, 64);
    if (!kv->meta) goto fail_struct;
    kv->pool = pkv_alloc(kv, kv->pool_bytes, 64);
    if (!kv->pool) goto fail_meta;
    if (pthread_mutex_init(&kv->lock, NULL)) {
        zm_fail(ZM_ERR_OUT_OF_MEMORY, sizeof kv->lock, 0, 0);
        goto fail_pool;
    }
    meta_layout(kv, kv->meta);
    memset(kv->meta, 0, kv->meta_bytes);
    for (size_t i = 0; i < kv->n_buckets; i++) kv->buckets[i] = ZM_PKV_NONE;
    /* the stack pops block 0 first: low blocks are used first, which keeps tests readable */
    for (size_t i = 0; i < kv->num_blocks; i++) {
        kv->free_stack[i] = (int32_t)(kv->num_blocks - 1 - i);
        kv->parent[i] = kv->bucket_next[i] = kv->lru_prev[i] = kv->lru_next[i] = ZM_PKV_NONE;
    }
    kv->n_free = kv->num_blocks;
    *out = kv;
    return ZM_OK;
fail_pool:
    pkv_free(kv, kv->pool, kv->pool_bytes, 64);
fail_meta:
    pkv_free(kv, kv->meta, kv->meta_bytes, 64);
fail_struct:
    status = alloc_failure();
    pkv_free(&tmp, kv, sizeof *kv, 64);
    return status;
}

void zm_paged_kv_destroy(zm_paged_kv_t *kv) {
    if (!kv) return;
    for (size_t i = 0; i < kv->n_slots; i++)
        if (kv->seqs[i].live) pkv_free(kv, kv->seqs[i].chunk, kv->seqs[i].chunk_bytes, 8);
    pkv_free(kv, kv->seqs, kv->cap_slots * sizeof *kv->seqs, 8);
    pkv_free(kv, kv->pool, kv->pool_bytes, 64);
    pkv_free(kv, kv->meta, kv->meta_bytes, 64);
    pthread_mutex_destroy(&kv->lock);
    zm_paged_kv_t copy = *kv; /* the allocator outlives the struct it frees */
    pkv_free(&copy, kv, sizeof *kv, 64);
}

/* ---------------------------------------------------------------- blocks */

static void lru_remove(zm_paged_kv_t *kv, int32_t b) {
    int32_t p = kv->lru_prev[b], n = kv->lru_next[b];
    if (p != ZM_PKV_NONE) kv->lru_next[p] = n; else kv->lru_head = n;
    if (n != ZM_PKV_NONE) kv->lru_prev[n] = p; else kv->lru_tail = p;
    kv->lru_prev[b] = kv->lru_next[b] = ZM_PKV_NONE;
    kv->n_cached--;
}

static void lru_push(zm_paged_kv_t *kv, int32_t b) { /* most recently used end */
    kv->lru_prev[b] = kv->lru_tail;
    kv->lru_next[b] = ZM_PKV_NONE;
    if (kv->lru_tail != ZM_PKV_NONE) kv->lru_next[kv->lru_tail] = b; else kv->lru_head = b;
    kv->lru_tail = b;
    kv->n_cached++;
}

static void unregister(zm_paged_kv_t *kv, int32_t b) {
    int32_t *link = &kv->buckets[kv->hash[b] & (kv->n_buckets - 1)];
    while (*link != b) link = &kv->bucket_next[*link];
    *link = kv->bucket_next[b];
    kv->bucket_next[b] = ZM_PKV_NONE;
    kv->registered[b] = 0;
    kv->gen[b] = 0; /* registrations start at 1: children keyed to the old one never match */
}

/* A block for the caller (refcount 1). The caller checked that one is available. */
static int32_t take_block(zm_paged_kv_t *kv) {
    int32_t b;
    if (kv->n_free) {
        b = kv->free_stack[--kv->n_free];
    } else {
        b = kv->lru_head;
        lru_remove(kv, b);
        unregister(kv, b);
        kv->evictions++;
    }
    kv->refcount[b] = 1;
    kv->fill[b] = 0;
    return b;
}

static void release_block(zm_paged_kv_t *kv, int32_t b) {
    if (--kv->refcount[b]) return;
    if (kv->registered[b]) lru_push(kv, b);
    else kv->free_stack[kv->n_free++] = b;
}

/* One more reference to a registered block found by the prefix cache. */
static void retain_block(zm_paged_kv_t *kv, int32_t b) {
    if (kv->refcount[b]++ == 0) lru_remove(kv, b);
}

/* ---------------------------------------------------------------- prefix hash table */

static uint64_t chain_hash(uint64_t parent, const int32_t *tokens, size_t n) {
    uint64_t h = parent ^ 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint32_t)tokens[i]) * 0x100000001b3ull;
    h ^= h >> 33; /* splitmix's finaliser: every bit of h reaches the bucket index */
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return h;
}

static int32_t find_block(const zm_paged_kv_t *kv, uint64_t h, int32_t parent,
                          uint64_t parent_gen, const int32_t *tokens) {
    size_t bs = kv->block_size;
    for (int32_t b = kv->buckets[h & (kv->n_buckets - 1)]; b != ZM_PKV_NONE;
         b = kv->bucket_next[b]) {
        if (kv->hash[b] == h && kv->parent[b] == parent && kv->parent_gen[b] == parent_gen &&
            memcmp(kv->tokens + (size_t)b * bs, tokens, bs * sizeof *tokens) == 0)
            return b;
    }
    return ZM_PKV_NONE;
}

static void register_block(zm_paged_kv_t *kv, int32_t b, uint64_t h, int32_t parent,
                           uint64_t parent_gen, const int32_t *tokens) {
    size_t bucket = h & (kv->n_buckets - 1);
    kv->registered[b] = 1;
    kv->hash[b] = h;
    kv->gen[b] = kv->next_gen++;
    kv->parent[b] = parent;
    kv->parent_gen[b] = parent_gen;
    memcpy(kv->tokens + (size_t)b * kv->block_size, tokens, kv->block_size * sizeof *tokens);
    kv->bucket_next[b] = kv->buckets[bucket];
    kv->buckets[bucket] = b;
}

/* Register the prompt blocks a completed step filled. A block whose key is already cached
 * (another sequence computed the same prefix at the same time) stays private; the chain
 * continues from the cached one so later blocks are keyed as a lookup will walk them. */
static void register_prompt_blocks(zm_paged_kv_t *kv, zm_pkv_seq_t *s) {
    size_t bs = kv->block_size;
    size_t full = (s->seq_len < s->n_prompt ? s->seq_len : s->n_prompt) / bs;
    for (size_t i = s->n_registered; i < full; i++) {
        const int32_t *tokens = s->prompt + i * bs;
        uint64_t h = chain_hash(s->chain_hash, tokens, bs);
        int32_t b = find_block(kv, h, s->chain_block, s->chain_gen, tokens);
        if (b == ZM_PKV_NONE) {
            b = s->table[i];
            if (kv->registered[b]) { /* keyed otherwise: stop registering this sequence */
                s->n_prompt = i * bs;
                return;
            }
            register_block(kv, b, h, s->chain_block, s->chain_gen, tokens);
        }
        s->chain_block = b;
        s->chain_gen = kv->gen[b];
        s->chain_hash = h;
        s->n_registered = i + 1;
    }
}

/* ---------------------------------------------------------------- sequences */

int zm_pkv_lookup(zm_paged_kv_t *kv, int64_t id, zm_pkv_seq_t **out) {
    uint64_t slot = (uint64_t)id & 0xffffffffu, gen = (uint64_t)id >> 32;
    if (id >= 0 && slot < kv->n_slots) {
        zm_pkv_seq_t *s = &kv->seqs[slot];
        if (gen == s->gen && s->live) {
            *out = s;
            return ZM_OK;
        }
        if (gen < s->gen)
            return zm_pkv_problem(ZM_ERR_USE_AFTER_FREE, ZM_PKV_FREED_SEQUENCE, (size_t)id, 0, 0);
    }
    return zm_pkv_problem(ZM_ERR_INVALID_ARG, ZM_PKV_UNKNOWN_SEQUENCE, (size_t)id, 0, 0);
}

static int64_t seq_id(const zm_paged_kv_t *kv, const zm_pkv_seq_t *s) {
    return (int64_t)((uint64_t)s->gen << 32 | (uint64_t)(s - kv->seqs));
}

/* A free slot (not yet live), growing the slot array if none is left. */
static int free_slot(zm_paged_kv_t *kv, zm_pkv_seq_t **out) {
    if (kv->free_slot < 0) {
        size_t cap = kv->cap_slots ? 2 * kv->cap_slots : 8;
        if (cap > INT32_MAX)
            return zm_pkv_problem(ZM_ERR_TOO_LARGE, ZM_PKV_TOO_LONG, cap, INT32_MAX, 0);
        zm_pkv_seq_t *seqs = pkv_realloc(kv, kv->seqs, kv->cap_slots * sizeof *seqs,
                                         cap * sizeof *seqs);
        if (!seqs) return alloc_failure();
        memset(seqs + kv->cap_slots, 0, (cap - kv->cap_slots) * sizeof *seqs);
        for (size_t i = cap; i-- > kv->cap_slots;) {
            seqs[i].next_free = kv->free_slot;
            kv->free_slot = (int64_t)i;
        }
        kv->seqs = seqs;
        kv->cap_slots = kv->n_slots = cap;
    }
    *out = &kv->seqs[kv->free_slot];
    return ZM_OK;
}

static size_t flags_bytes(const zm_paged_kv_t *kv) { return (kv->n_layers + 7) & ~(size_t)7; }

static bool chunk_size(const zm_paged_kv_t *kv, size_t n_prompt, size_t cap, size_t *out) {
    size_t tokens;
    return !__builtin_add_overflow(n_prompt, cap, &tokens) &&
           !__builtin_mul_overflow(tokens, sizeof(int32_t), out) &&
           !__builtin_add_overflow(*out, flags_bytes(kv), out);
}

static void chunk_views(const zm_paged_kv_t *kv, zm_pkv_seq_t *s) {
    s->layer_done = s->chunk;
    s->prompt = (int32_t *)((uint8_t *)s->chunk + flags_bytes(kv));
    s->table = s->prompt + s->n_prompt;
}

/* Allocate the chunk of a slot about to go live; the slot stays free on failure. */
static int seq_start(zm_paged_kv_t *kv, zm_pkv_seq_t *s, size_t n_prompt, size_t cap) {
    size_t bytes;
    if (!chunk_size(kv, n_prompt, cap, &bytes))
        return zm_pkv_problem(ZM_ERR_TOO_LARGE, ZM_PKV_TOO_LONG, n_prompt, 0, 0);
    void *chunk = pkv_alloc(kv, bytes, 8);
    if (!chunk) return alloc_failure();
    kv->free_slot = s->next_free;
    uint32_t gen = s->gen;
    memset(s, 0, sizeof *s);
    s->gen = gen;
    s->live = true;
    s->next_free = -1;
    s->chunk = chunk;
    s->chunk_bytes = bytes;
    s->n_prompt = n_prompt;
    s->cap_blocks = cap;
    s->chain_block = ZM_PKV_NONE;
    s->chain_hash = HASH_SEED;
    chunk_views(kv, s);
    memset(s->layer_done, 0, flags_bytes(kv));
    kv->live_seqs++;
    return ZM_OK;
}

int zm_paged_kv_add_sequence(zm_paged_kv_t *kv, const int32_t *tokens, size_t n_tokens,
                             int64_t *out_id) {
    size_t bs = kv->block_size, capacity = kv->num_blocks * bs;
    if (tokens && n_tokens > capacity)
        return zm_pkv_problem(ZM_ERR_OUT_OF_MEMORY, ZM_PKV_TOO_LONG, n_tokens, capacity, 0);
    pthread_mutex_lock(&kv->lock);
    size_t n_prompt = tokens ? n_tokens / bs * bs : 0;
    /* at most len - 1 positions cached: the last prompt token's logits must be computed */
    size_t cacheable = tokens && n_tokens ? (n_tokens - 1) / bs : 0, matched = 0;
    int32_t parent = ZM_PKV_NONE;
    uint64_t parent_gen = 0, h = HASH_SEED;
    for (; matched < cacheable; matched++) {
        uint64_t next = chain_hash(h, tokens + matched * bs, bs);
        int32_t b = find_block(kv, next, parent, parent_gen, tokens + matched * bs);
        if (b == ZM_PKV_NONE) break;
        parent = b;
        parent_gen = kv->gen[b];
        h = next;
    }
    zm_pkv_seq_t *s;
    int status = free_slot(kv, &s);
    if (!status) status = seq_start(kv, s, n_prompt, matched > 4 ? matched : 4);
    if (status) {
        pthread_mutex_unlock(&kv->lock);
        return status;
    }
    if (n_prompt) memcpy(s->prompt, tokens, n_prompt * sizeof *tokens);
    /* walk again to take the blocks: nothing changed, the lock is held */
    parent = ZM_PKV_NONE;
    parent_gen = 0;
    h = HASH_SEED;
    for (size_t i = 0; i < matched; i++) {
        h = chain_hash(h, tokens + i * bs, bs);
        int32_t b = find_block(kv, h, parent, parent_gen, tokens + i * bs);
        retain_block(kv, b);
        s->table[i] = b;
        parent = b;
        parent_gen = kv->gen[b];
    }
    s->n_blocks = s->n_registered = matched;
    s->seq_len = s->step_end = s->cached_tokens = matched * bs;
    s->prompt_len = tokens ? n_tokens : 0;
    s->chain_block = parent;
    s->chain_gen = parent_gen;
    s->chain_hash = h;
    kv->prefix_hits += matched;
    *out_id = seq_id(kv, s);
    pthread_mutex_unlock(&kv->lock);
    return ZM_OK;
}

int zm_paged_kv_fork(zm_paged_kv_t *kv, int64_t id, int64_t *out_id) {
    pthread_mutex_lock(&kv->lock);
    zm_pkv_seq_t *parent, *child;
    int status = zm_pkv_lookup(kv, id, &parent);
    if (!status && parent->written)
        status = zm_pkv_problem(ZM_ERR_INVALID_ARG, ZM_PKV_STEP_OPEN, parent->written,
                                kv->n_layers, 0);
    if (!status) status = free_slot(kv, &child); /* may move kv->seqs */
    if (!status) {
        parent = &kv->seqs[(uint64_t)id & 0xffffffffu];
        status = seq_start(kv, child, parent->n_prompt, parent->cap_blocks);
    }
    if (status) {
        pthread_mutex_unlock(&kv->lock);
        return status;
    }
    memcpy(child->prompt, parent->prompt, parent->n_prompt * sizeof(int32_t));
    memcpy(child->table, parent->table, parent->n_blocks * sizeof(int32_t));
    for (size_t i = 0; i < parent->n_blocks; i++) kv->refcount[parent->table[i]]++;
    child->prompt_len = parent->prompt_len;
    child->n_blocks = parent->n_blocks;
    child->seq_len = child->step_end = parent->seq_len;
    child->cached_tokens = parent->cached_tokens;
    child->n_registered = parent->n_registered;
    child->chain_block = parent->chain_block;
    child->chain_gen = parent->chain_gen;
    child->chain_hash = parent->chain_hash;
    *out_id = seq_id(kv, child);
    pthread_mutex_unlock(&kv->lock);
    return ZM_OK;
}

int zm_paged_kv_free_sequence(zm_paged_kv_t *kv, int64_t id) {
    pthread_mutex_lock(&kv->lock);
    zm_pkv_seq_t *s;
    int status = zm_pkv_lookup(kv, id, &s);
    if (!status) {
        /* last block first onto the LRU list: eviction takes a prefix's tail before its head */
        for (size_t i = s->n_blocks; i-- > 0;) release_block(kv, s->table[i]);
        pkv_free(kv, s->chunk, s->chunk_bytes, 8);
        s->live = false;
        s->chunk = NULL;
        s->gen++;
        s->next_free = kv->free_slot;
        kv->free_slot = s - kv->seqs;
        kv->live_seqs--;
    }
    pthread_mutex_unlock(&kv->lock);
    return status;
}

/* ---------------------------------------------------------------- append */

static size_t blocks_for(const zm_paged_kv_t *kv, size_t positions) {
    return (positions + kv->block_size - 1) / kv->block_size;
}

/* Blocks a step of n_new positions needs: new ones, plus the copy of a shared, partly
 * filled last block. */
static size_t step_blocks(const zm_paged_kv_t *kv, const zm_pkv_seq_t *s, size_t n_new,
                          bool *cow) {
    size_t need = blocks_for(kv, s->seq_len + n_new);
    need = need > s->n_blocks ? need - s->n_blocks : 0;
    *cow = n_new && s->seq_len % kv->block_size && kv->refcount[s->table[s->n_blocks - 1]] > 1;
    return need + *cow;
}

static void copy_on_write(zm_paged_kv_t *kv, zm_pkv_seq_t *s) {
    int32_t old = s->table[s->n_blocks - 1], fresh = take_block(kv);
    size_t used = s->seq_len % kv->block_size, bytes = used * kv->head_dim * kv->itemsize;
    for (size_t layer = 0; layer < kv->n_layers; layer++)
        for (int which = 0; which < 2; which++)
            for (size_t h = 0; h < kv->n_kv_heads; h++)
                memcpy(zm_pkv_block_head(kv, fresh, layer, which, h),
                       zm_pkv_block_head(kv, old, layer, which, h), bytes);
    kv->fill[fresh] = (int32_t)used;
    release_block(kv, old);
    s->table[s->n_blocks - 1] = fresh;
}

/* Everything a step needs, or nothing changed. */
static int begin_step(zm_paged_kv_t *kv, zm_pkv_seq_t *s, size_t n_new) {
    size_t capacity = kv->num_blocks * kv->block_size;
    if (n_new > capacity - s->seq_len)
        return zm_pkv_problem(ZM_ERR_OUT_OF_MEMORY, ZM_PKV_TOO_LONG, n_new,
                              capacity - s->seq_len, 0);
    bool cow;
    size_t needed = step_blocks(kv, s, n_new, &cow), available = kv->n_free + kv->n_cached;
    if (needed > available) {
        int code = zm_pkv_problem(ZM_ERR_OUT_OF_MEMORY, ZM_PKV_POOL_FULL, 0, 0, 0);
        zm_last_report()->size = needed;
        zm_last_report()->limit = available;
        return code;
    }
    size_t new_blocks = needed - cow;
    if (s->n_blocks + new_blocks > s->cap_blocks) {
        size_t cap = 2 * s->cap_blocks, bytes;
        if (cap < s->n_blocks + new_blocks) cap = s->n_blocks + new_blocks;
        if (!chunk_size(kv, s->n_prompt, cap, &bytes))
            return zm_pkv_problem(ZM_ERR_TOO_LARGE, ZM_PKV_TOO_LONG, cap, 0, 0);
        void *chunk = pkv_realloc(kv, s->chunk, s->chunk_bytes, bytes);
        if (!chunk) return alloc_failure();
        s->chunk = chunk;
        s->chunk_bytes = bytes;
        s->cap_blocks = cap;
        chunk_views(kv, s);
    }
    if (cow) copy_on_write(kv, s);
    for (size_t i = 0; i < new_blocks; i++) s->table[s->n_blocks++] = take_block(kv);
    s->step_end = s->seq_len + n_new;
    return ZM_OK;
}

static void end_step(zm_paged_kv_t *kv, zm_pkv_seq_t *s) {
    size_t bs = kv->block_size;
    for (size_t pos = s->seq_len; pos < s->step_end; pos = (pos / bs + 1) * bs) {
        int32_t b = s->table[pos / bs];
        size_t end = (pos / bs + 1) * bs;
        int32_t filled = (int32_t)((s->step_end < end ? s->step_end : end) - (end - bs));
        if (kv->fill[b] < filled) kv->fill[b] = filled;
    }
    s->seq_len = s->step_end;
    s->written = 0;
    memset(s->layer_done, 0, kv->n_layers);
    register_prompt_blocks(kv, s);
}

int zm_paged_kv_append(zm_paged_kv_t *kv, int64_t id, size_t layer, const void *k,
                       const void *v, size_t n_new) {
    pthread_mutex_lock(&kv->lock);
    zm_pkv_seq_t *s;
    int status = zm_pkv_lookup(kv, id, &s);
    if (status) goto out;
    if (layer >= kv->n_layers) {
        status = zm_pkv_problem(ZM_ERR_INVALID_ARG, ZM_PKV_BAD_LAYER, layer, kv->n_layers, 0);
        goto out;
    }
    if (s->layer_done[layer]) {
        status = zm_pkv_problem(ZM_ERR_INVALID_ARG, ZM_PKV_LAYER_WRITTEN, layer, s->seq_len, 0);
        goto out;
    }
    if (s->written == 0) {
        status = begin_step(kv, s, n_new);
        if (status) goto out;
    } else if (n_new != s->step_end - s->seq_len) {
        status = zm_pkv_problem(ZM_ERR_INVALID_ARG, ZM_PKV_STEP_SIZE, n_new,
                                s->step_end - s->seq_len, 0);
        goto out;
    }
    size_t row = kv->head_dim * kv->itemsize, bs = kv->block_size;
    for (size_t i = 0; i < n_new; i++) {
        size_t pos = s->seq_len + i;
        int32_t b = s->table[pos / bs];
        size_t at = (pos % bs) * row;
        for (size_t h = 0; h < kv->n_kv_heads; h++) {
            size_t from = (i * kv->n_kv_heads + h) * row;
            memcpy(zm_pkv_block_head(kv, b, layer, 0, h) + at, (const uint8_t *)k + from, row);
            memcpy(zm_pkv_block_head(kv, b, layer, 1, h) + at, (const uint8_t *)v + from, row);
        }
    }
    s->layer_done[layer] = 1;
    if (++s->written == kv->n_layers) end_step(kv, s);
out:
    pthread_mutex_unlock(&kv->lock);
    return status;
}

int zm_paged_kv_can_append(zm_paged_kv_t *kv, int64_t id, size_t n_new, int *out) {
    pthread_mutex_lock(&kv->lock);
    zm_pkv_seq_t *s;
    int status = zm_pkv_lookup(kv, id, &s);
    if (!status) {
        bool cow;
        if (s->written) /* the open step's blocks are already reserved */
            *out = n_new == s->step_end - s->seq_len;
        else
            *out = n_new <= kv->num_blocks * kv->block_size - s->seq_len &&
                   step_blocks(kv, s, n_new, &cow) <= kv->n_free + kv->n_cached;
    }
    pthread_mutex_unlock(&kv->lock);
    return status;
}

/* ---------------------------------------------------------------- inspection */

int zm_paged_kv_seq_info(zm_paged_kv_t *kv, int64_t id, zm_paged_kv_seq_info_t *out) {
    pthread_mutex_lock(&kv->lock);
    zm_pkv_seq_t *s;
    int status = zm_pkv_lookup(kv, id, &s);
    if (!status)
        *out = (zm_paged_kv_seq_info_t){s->seq_len, s->cached_tokens, s->n_blocks,
                                         s->written ? s->step_end - s->seq_len : 0, s->written};
    pthread_mutex_unlock(&kv->lock);
    return status;
}

/* A sequence and a layer both valid, under the lock. */
static int lookup_layer(zm_paged_kv_t *kv, int64_t id, size_t layer, zm_pkv_seq_t **s) {
    int status = zm_pkv_lookup(kv, id, s);
    if (!status && layer >= kv->n_layers)
        status = zm_pkv_problem(ZM_ERR_INVALID_ARG, ZM_PKV_BAD_LAYER, layer, kv->n_layers, 0);
    return status;
}

int zm_paged_kv_layer_len(zm_paged_kv_t *kv, int64_t id, size_t layer, size_t *out) {
    pthread_mutex_lock(&kv->lock);
    zm_pkv_seq_t *s;
    int status = lookup_layer(kv, id, layer, &s);
    if (!status) *out = zm_pkv_layer_len(s, layer);
    pthread_mutex_unlock(&kv->lock);
    return status;
}

int zm_paged_kv_block_table(zm_paged_kv_t *kv, int64_t id, int32_t *out, size_t cap) {
    pthread_mutex_lock(&kv->lock);
    zm_pkv_seq_t *s;
    int status = zm_pkv_lookup(kv, id, &s);
    if (!status) memcpy(out, s->table, (cap < s->n_blocks ? cap : s->n_blocks) * sizeof *out);
    pthread_mutex_unlock(&kv->lock);
    return status;
}

int zm_paged_kv_gather(zm_paged_kv_t *kv, int64_t id, size_t layer, int which, void *out,
                       size_t n) {
    pthread_mutex_lock(&kv->lock);
    zm_pkv_seq_t *s;
    int status = lookup_layer(kv, id, layer, &s);
    if (!status && n > zm_pkv_layer_len(s, layer))
        status = zm_pkv_problem(ZM_ERR_INVALID_ARG, ZM_PKV_ROWS, n, zm_pkv_layer_len(s, layer), 0);
    if (!status) {
        size_t row = kv->head_dim * kv->itemsize, bs = kv->block_size;
        uint8_t *dst = out;
        for (size_t pos = 0; pos < n; pos++)
            for (size_t h = 0; h < kv->n_kv_heads; h++, dst += row)
                memcpy(dst, zm_pkv_block_head(kv, s->table[pos / bs], layer, which != 0, h) +
                                (pos % bs) * row, row);
    }
    pthread_mutex_unlock(&kv->lock);
    return status;
}

void zm_paged_kv_stats(zm_paged_kv_t *kv, zm_paged_kv_stats_t *out) {
    pthread_mutex_lock(&kv->lock);
    size_t in_use = 0, tokens = 0;
    for (size_t b = 0; b < kv->num_blocks; b++) {
        if (kv->refcount[b] > 0) {
            in_use++;
            tokens += (size_t)kv->fill[b];
        }
    }
    *out = (zm_paged_kv_stats_t){
        .blocks_total = kv->num_blocks, .blocks_in_use = in_use, .blocks_cached = kv->n_cached,
        .blocks_free = kv->n_free, .tokens_held = tokens, .slots_held = in_use * kv->block_size,
        .sequences = kv->live_seqs, .prefix_hits = kv->prefix_hits,
        .evictions = kv->evictions, .block_bytes = kv->block_bytes,
        .pool_bytes = kv->pool_bytes, .meta_bytes = kv->meta_bytes,
    };
    pthread_mutex_unlock(&kv->lock);
}

void zm_paged_kv_pool_span(zm_paged_kv_t *kv, uintptr_t *address, size_t *nbytes) {
    *address = (uintptr_t)kv->pool;
    *nbytes = kv->pool_bytes;
}

int32_t zm_paged_kv_refcount(zm_paged_kv_t *kv, int32_t block) {
    if (block < 0 || (size_t)block >= kv->num_blocks) return -1;
    pthread_mutex_lock(&kv->lock);
    int32_t n = kv->refcount[block];
    pthread_mutex_unlock(&kv->lock);
    return n;
}

/* ---------------------------------------------------------------- consistency check */

static int broken(size_t what, size_t block) {
    return zm_pkv_problem(ZM_ERR_INVALID_ARG, ZM_PKV_CONFIG, what, 0, block);
}

static int check_locked(zm_paged_kv_t *kv, int32_t *refs) {
    size_t n = kv->num_blocks, listed = 0;
    memset(refs, 0, n * sizeof *refs);
    for (size_t i = 0; i < kv->n_slots; i++) {
        const zm_pkv_seq_t *s = &kv->seqs[i];
        if (!s->live) continue;
        if (s->n_blocks != blocks_for(kv, s->written ? s->step_end : s->seq_len))
            return broken(1, i);
        for (size_t j = 0; j < s->n_blocks; j++) refs[s->table[j]]++;
    }
    for (size_t b = 0; b < n; b++)
        if (refs[b] != kv->refcount[b]) return broken(2, b);
    for (size_t i = 0; i < kv->n_free; i++) { /* free: refcount 0, unregistered, listed once */
        int32_t b = kv->free_stack[i];
        if (kv->refcount[b] || kv->registered[b] || refs[b] < 0) return broken(3, (size_t)b);
        refs[b] = -1;
    }
    for (int32_t b = kv->lru_head; b != ZM_PKV_NONE; b = kv->lru_next[b], listed++) {
        if (kv->refcount[b] || !kv->registered[b] || refs[b] < 0 || listed >= n)
            return broken(4, (size_t)b);
        refs[b] = -1;
    }
    if (listed != kv->n_cached) return broken(5, listed);
    for (size_t b = 0; b < n; b++) {
        if (kv->refcount[b] == 0 && refs[b] != -1) return broken(6, b); /* lost */
        if (kv->registered[b] &&
            find_block(kv, kv->hash[b], kv->parent[b], kv->parent_gen[b],
                       kv->tokens + b * kv->block_size) != (int32_t)b)
            return broken(7, b);
    }
    return ZM_OK;
}

int zm_paged_kv_check(zm_paged_kv_t *kv) {
    int32_t *refs = pkv_alloc(kv, kv->num_blocks * sizeof *refs, 8);
    if (!refs) return alloc_failure();
    pthread_mutex_lock(&kv->lock);
    int status = check_locked(kv, refs);
    pthread_mutex_unlock(&kv->lock);
    pkv_free(kv, refs, kv->num_blocks * sizeof *refs, 8);
    return status;
}
