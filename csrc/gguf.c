/* gguf.c — a parser of GGUF files (versions 2 and 3) that trusts nothing in them.
 *
 * Layout, all little-endian:
 *
 *     "GGUF"  u32 version  u64 n_tensors  u64 n_kv
 *     n_kv    x { string key, u32 type, value }         value: scalar | string | array
 *     n_tensors x { string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset }
 *     padding to general.alignment (default 32), then the tensor data section
 *
 *     string = u64 length + bytes (UTF-8);  array = u32 item type + u64 count + items
 *
 * zm_gguf_header reads the counts and checks them against the file size, so that the
 * caller can allocate the tables before zm_gguf_parse fills them: no count in a hostile
 * file can cause a large allocation. Every read goes through a cursor that checks the bytes
 * remain; every size product is checked for overflow; nesting is bounded; tensors must be
 * aligned, in the file, and must not overlap. Errors are described in the caller's buffer,
 * naming the key or tensor. Nothing is allocated here. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define MAX_DIMS 4
#define MAX_NESTING 8
#define DEFAULT_ALIGNMENT 32

enum { T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STRING, T_ARRAY, T_U64, T_I64,
       T_F64, T_COUNT };

static const uint8_t scalar_size[T_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

/* Block size (elements) and bytes per block of every ggml type gguf 0.8 knows; 0: unknown. */
static const struct { uint16_t block, bytes; } ggml_types[] = {
    [0] = {1, 4},      [1] = {1, 2},       [2] = {32, 18},     [3] = {32, 20},
    [6] = {32, 22},    [7] = {32, 24},     [8] = {32, 34},     [9] = {32, 40},
    [10] = {256, 84},  [11] = {256, 110},  [12] = {256, 144},  [13] = {256, 176},
    [14] = {256, 210}, [15] = {256, 292},  [16] = {256, 66},   [17] = {256, 74},
    [18] = {256, 98},  [19] = {256, 50},   [20] = {32, 18},    [21] = {256, 110},
    [22] = {256, 82},  [23] = {256, 136},  [24] = {1, 1},      [25] = {1, 2},
    [26] = {1, 4},     [27] = {1, 8},      [28] = {1, 8},      [29] = {256, 56},
    [30] = {1, 2},     [34] = {256, 54},   [35] = {256, 66},   [39] = {32, 17},
    [40] = {64, 36},   [41] = {128, 18},
};
#define N_GGML_TYPES (sizeof ggml_types / sizeof *ggml_types)

bool zm_ggml_type_size(uint32_t type, uint32_t *block, uint32_t *bytes) {
    if (type >= N_GGML_TYPES || ggml_types[type].block == 0) return false;
    *block = ggml_types[type].block;
    *bytes = ggml_types[type].bytes;
    return true;
}

/* ---------------------------------------------------------------- the cursor */

typedef struct cursor {
    const uint8_t *data;
    size_t size, pos;
    char *err;
    size_t err_len;
    bool failed;
} cursor_t;

static bool fail(cursor_t *c, const char *fmt, ...) {
    if (!c->failed && c->err_len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->err, c->err_len, fmt, ap);
        va_end(ap);
    }
    c->failed = true;
    return false;
}

static bool take(cursor_t *c, size_t n, const uint8_t **out) {
    if (c->failed) return false;
    if (n > c->size - c->pos)
        return fail(c, "truncated: %zu bytes needed at offset %zu, the file has %zu", n, c->pos,
                    c->size);
    *out = c->data + c->pos;
    c->pos += n;
    return true;
}

static bool u32(cursor_t *c, uint32_t *v) {
    const uint8_t *p = NULL;
    if (!take(c, 4, &p)) return false;
    *v = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    return true;
}

static bool u64(cursor_t *c, uint64_t *v) {
    uint32_t lo, hi;
    if (!u32(c, &lo) || !u32(c, &hi)) return false;
    *v = (uint64_t)hi << 32 | lo;
    return true;
}

/* Strict UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF. */
static bool utf8_valid(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t b = s[i];
        if (b < 0x80) {
            i++;
            continue;
        }
        size_t len = b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : b >= 0xc2 ? 2 : 0;
        if (!len || len > 4 || b > 0xf4 || n - i < len) return false;
        for (size_t k = 1; k < len; k++)
            if ((s[i + k] & 0xc0) != 0x80) return false;
        if (len == 3 && ((b == 0xe0 && s[i + 1] < 0xa0) || (b == 0xed && s[i + 1] > 0x9f)))
            return false;
        if (len == 4 && ((b == 0xf0 && s[i + 1] < 0x90) || (b == 0xf4 && s[i + 1] > 0x8f)))
            return false;
        i += len;
    }
    return true;
}

/* A string: its offset and length; what names it in an error. */
static bool string(cursor_t *c, uint64_t *off, uint64_t *len, const char *what) {
    const uint8_t *p = NULL;
    if (!u64(c, len)) return false;
    if (*len > c->size - c->pos)
        return fail(c, "%s: string of %llu bytes runs past the end of the file", what,
                    (unsigned long long)*len);
    *off = c->pos;
    if (!take(c, (size_t)*len, &p)) return false;
    if (!utf8_valid(p, (size_t)*len)) return fail(c, "%s: string is not valid UTF-8", what);
    return true;
}

/* ---------------------------------------------------------------- values */

static bool value(cursor_t *c, uint32_t type, int depth, const char *key, zm_gguf_kv_t *kv);

static bool array(cursor_t *c, int depth, const char *key, zm_gguf_kv_t *kv) {
    uint32_t item;
    uint64_t count;
    if (depth >= MAX_NESTING) return fail(c, "%s: arrays nested deeper than %d", key, MAX_NESTING);
    if (!u32(c, &item) || !u64(c, &count)) return false;
    if (item >= T_COUNT) return fail(c, "%s: unknown array item type %u", key, item);
    /* Each item takes at least one byte (a string at least 8, an array 12): a count the
     * rest of the file cannot hold is refused before anything is read. */
    uint64_t min = item == T_STRING ? 8 : item == T_ARRAY ? 12 : scalar_size[item];
    if (count > (c->size - c->pos) / min)
        return fail(c, "%s: array of %llu items cannot fit in the %zu bytes left", key,
                    (unsigned long long)count, c->size - c->pos);
    if (kv) {
        kv->item_type = item;
        kv->count = count;
        kv->value = c->pos;
    }
    if (item != T_STRING && item != T_ARRAY) {
        const uint8_t *p = NULL;
        return take(c, (size_t)count * scalar_size[item], &p);
    }
    for (uint64_t i = 0; i < count; i++)
        if (!value(c, item, depth + 1, key, NULL)) return false;
    return true;
}

static bool value(cursor_t *c, uint32_t type, int depth, const char *key, zm_gguf_kv_t *kv) {
    const uint8_t *p = NULL;
    uint64_t off, len;
    if (type >= T_COUNT) return fail(c, "%s: unknown value type %u", key, type);
    if (type == T_ARRAY) return array(c, depth, key, kv);
    if (type == T_STRING) {
        if (!string(c, &off, &len, key)) return false;
        if (kv) {
            kv->value = off;
            kv->count = len;
        }
        return true;
    }
    if (kv) kv->value = c->pos;
    if (!take(c, scalar_size[type], &p)) return false;
    if (type == T_BOOL && *p > 1) return fail(c, "%s: bool value %u is neither 0 nor 1", key, *p);
    return true;
}

/* ---------------------------------------------------------------- header and tables */

int zm_gguf_header(const uint8_t *data, size_t size, zm_gguf_info_t *info, char *err,
                   size_t err_len) {
    cursor_t c = {data, size, 0, err, err_len, false};
    const uint8_t *magic = NULL;
    memset(info, 0, sizeof *info);
    if (!take(&c, 4, &magic) || memcmp(magic, "GGUF", 4) != 0) {
        if (!c.failed) fail(&c, "not a GGUF file (no GGUF magic)");
        return ZM_ERR_INVALID_ARG;
    }
    if (!u32(&c, &info->version) || !u64(&c, &info->n_tensors) || !u64(&c, &info->n_kv))
        return ZM_ERR_INVALID_ARG;
    if (info->version != 2 && info->version != 3) {
        fail(&c, "GGUF version %u is not supported (2 and 3 are)", info->version);
        return ZM_ERR_INVALID_ARG;
    }
    /* A key-value takes at least 13 bytes, a tensor info 24: counts beyond what the file
     * can hold are refused before the caller allocates tables for them. */
    size_t left = size - c.pos;
    if (info->n_kv > left / 13 || info->n_tensors > left / 24) {
        fail(&c, "%llu key-values and %llu tensors cannot fit in a %zu-byte file",
             (unsigned long long)info->n_kv, (unsigned long long)info->n_tensors, size);
        return ZM_ERR_INVALID_ARG;
    }
    return ZM_OK;
}

static int by_offset(const void *a, const void *b) {
    const zm_gguf_tensor_t *x = *(zm_gguf_tensor_t *const *)a, *y = *(zm_gguf_tensor_t *const *)b;
    return (x->offset > y->offset) - (x->offset < y->offset);
}

static bool same_string(const uint8_t *data, uint64_t a, uint64_t alen, uint64_t b, uint64_t blen) {
    return alen == blen && memcmp(data + a, data + b, (size_t)alen) == 0;
}

/* Duplicate names among n (offset, length) strings: sort indexes by content. */
typedef struct { const uint8_t *data; uint64_t off, len; } name_ref_t;

static int by_name(const void *a, const void *b) {
    const name_ref_t *x = a, *y = b;
    size_t n = x->len < y->len ? (size_t)x->len : (size_t)y->len;
    int r = memcmp(x->data + x->off, y->data + y->off, n);
    return r ? r : (x->len > y->len) - (x->len < y->len);
}

int zm_gguf_parse(const uint8_t *data, size_t size, zm_gguf_info_t *info, zm_gguf_kv_t *kvs,
                  zm_gguf_tensor_t *tensors, void *scratch, char *err, size_t err_len) {
    cursor_t c = {data, size, 24, err, err_len, false};
    char what[96];
    info->alignment = DEFAULT_ALIGNMENT;
    for (uint64_t i = 0; i < info->n_kv; i++) {
        zm_gguf_kv_t *kv = &kvs[i];
        memset(kv, 0, sizeof *kv);
        snprintf(what, sizeof what, "key-value #%llu", (unsigned long long)i);
        if (!string(&c, &kv->key, &kv->key_len, what)) return ZM_ERR_INVALID_ARG;
        snprintf(what, sizeof what, "%.*s", kv->key_len > 80 ? 80 : (int)kv->key_len,
                 (const char *)data + kv->key);
        if (!u32(&c, &kv->type) || !value(&c, kv->type, 0, what, kv)) return ZM_ERR_INVALID_ARG;
        kv->end = c.pos;
        if (kv->key_len == 17 && memcmp(data + kv->key, "general.alignment", 17) == 0) {
            uint32_t a;
            if (kv->type != T_U32) return fail(&c, "general.alignment must be a u32"), ZM_ERR_INVALID_ARG;
            memcpy(&a, data + kv->value, 4);
            if (!zm_is_pow2(a))
                return fail(&c, "general.alignment %u is not a power of two", a), ZM_ERR_INVALID_ARG;
            info->alignment = a;
        }
    }
    for (uint64_t i = 0; i < info->n_tensors; i++) {
        zm_gguf_tensor_t *t = &tensors[i];
        memset(t, 0, sizeof *t);
        snprintf(what, sizeof what, "tensor #%llu", (unsigned long long)i);
        if (!string(&c, &t->name, &t->name_len, what)) return ZM_ERR_INVALID_ARG;
        snprintf(what, sizeof what, "tensor %.*s", t->name_len > 80 ? 80 : (int)t->name_len,
                 (const char *)data + t->name);
        if (!u32(&c, &t->n_dims)) return ZM_ERR_INVALID_ARG;
        if (t->n_dims > MAX_DIMS)
            return fail(&c, "%s: %u dimensions, at most %d", what, t->n_dims, MAX_DIMS), ZM_ERR_INVALID_ARG;
        uint64_t elements = 1;
        for (uint32_t d = 0; d < t->n_dims; d++) {
            if (!u64(&c, &t->dims[d])) return ZM_ERR_INVALID_ARG;
            if (t->dims[d] > INT64_MAX || __builtin_mul_overflow(elements, t->dims[d], &elements))
                return fail(&c, "%s: its shape overflows", what), ZM_ERR_INVALID_ARG;
        }
        uint32_t block, bytes;
        if (!u32(&c, &t->type) || !u64(&c, &t->offset)) return ZM_ERR_INVALID_ARG;
        if (!zm_ggml_type_size(t->type, &block, &bytes))
            return fail(&c, "%s: unknown ggml type %u", what, t->type), ZM_ERR_INVALID_ARG;
        uint64_t row = t->n_dims ? t->dims[0] : 1;
        if (row % block)
            return fail(&c, "%s: %llu elements per row is not a multiple of the %u-element block "
                        "of its type", what, (unsigned long long)row, block), ZM_ERR_INVALID_ARG;
        if (__builtin_mul_overflow(elements / block, (uint64_t)bytes, &t->nbytes))
            return fail(&c, "%s: its size overflows", what), ZM_ERR_INVALID_ARG;
        if (t->offset % info->alignment)
            return fail(&c, "%s: offset %llu is not a multiple of the alignment %llu", what,
                        (unsigned long long)t->offset, (unsigned long long)info->alignment),
                   ZM_ERR_INVALID_ARG;
    }
    uint64_t start;
    if (!zm_align_up(c.pos, info->alignment, &start)) return ZM_ERR_INVALID_ARG;
    info->data_offset = start;
    uint64_t data_size = start <= size ? size - start : 0;
    for (uint64_t i = 0; i < info->n_tensors; i++) {
        zm_gguf_tensor_t *t = &tensors[i];
        if (t->offset > data_size || t->nbytes > data_size - t->offset)
            return fail(&c, "tensor %.*s: bytes %llu..%llu of the data section lie past the end "
                        "of the file (%llu bytes of data)", t->name_len > 80 ? 80 : (int)t->name_len,
                        (const char *)data + t->name, (unsigned long long)t->offset,
                        (unsigned long long)(t->offset + t->nbytes), (unsigned long long)data_size),
                   ZM_ERR_INVALID_ARG;
        t->offset += start; /* from here on, an absolute file offset */
    }
    /* No two tensors overlap, no two names or keys repeat: sort pointers in the caller's
     * scratch, which holds max(n_tensors, n_kv) name_ref_t. */
    zm_gguf_tensor_t **order = scratch;
    for (uint64_t i = 0; i < info->n_tensors; i++) order[i] = &tensors[i];
    qsort(order, (size_t)info->n_tensors, sizeof *order, by_offset);
    for (uint64_t i = 1; i < info->n_tensors; i++) {
        const zm_gguf_tensor_t *a = order[i - 1], *b = order[i];
        if (a->nbytes && b->nbytes && a->offset + a->nbytes > b->offset)
            return fail(&c, "tensors %.*s and %.*s overlap", (int)(a->name_len > 80 ? 80 : a->name_len),
                        (const char *)data + a->name, (int)(b->name_len > 80 ? 80 : b->name_len),
                        (const char *)data + b->name), ZM_ERR_INVALID_ARG;
    }
    name_ref_t *names = scratch;
    for (int pass = 0; pass < 2; pass++) {
        uint64_t n = pass ? info->n_kv : info->n_tensors;
        for (uint64_t i = 0; i < n; i++)
            names[i] = pass ? (name_ref_t){data, kvs[i].key, kvs[i].key_len}
                            : (name_ref_t){data, tensors[i].name, tensors[i].name_len};
        qsort(names, (size_t)n, sizeof *names, by_name);
        for (uint64_t i = 1; i < n; i++)
            if (same_string(data, names[i - 1].off, names[i - 1].len, names[i].off, names[i].len))
                return fail(&c, "duplicate %s %.*s", pass ? "key" : "tensor name",
                            (int)(names[i].len > 80 ? 80 : names[i].len),
                            (const char *)data + names[i].off), ZM_ERR_INVALID_ARG;
    }
    return ZM_OK;
}
