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
 * Parsing runs in phases, each a function below, so that the caller's memory never depends
 * on what a hostile file claims:
 *
 *   1. zm_gguf_header: the magic, the version, and the counts against the file size, with
 *      the smallest size each record can have (a key-value 14 bytes, a tensor info 24);
 *      then it walks the key-value table and the tensor infos, validating every record
 *      without storing any. When it succeeds every counted record exists in the file.
 *   2. The caller allocates two index arrays of one u64 per record (at most 0.6x the file).
 *   3. zm_gguf_parse: checks the tensors' data (inside the data section, then no two
 *      overlapping), and the names (no two keys or tensor names alike), leaving each index
 *      sorted by name for zm_gguf_find.
 *
 * Records are decoded on demand from their file position (zm_gguf_kv_at, zm_gguf_tensor_at),
 * so the only tables are the two indexes. Every read goes through a cursor that checks the
 * bytes remain; every size product is checked for overflow; nesting is bounded. Errors are
 * described in the caller's buffer, naming the key or tensor. Nothing is allocated here. */
#define _GNU_SOURCE /* qsort_r */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define MAX_DIMS 4
#define MAX_NESTING 8
#define DEFAULT_ALIGNMENT 32
#define HEADER_SIZE 24
/* Smallest records: a key-value is a non-empty key (8 + 1), a type (4) and a one-byte value;
 * a tensor info is a name (8), n_dims (4), a type (4) and an offset (8). */
#define MIN_KV_SIZE 14
#define MIN_TENSOR_INFO_SIZE 24

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
    bool revisit; /* bytes phase 1 validated: bounds still checked, UTF-8 and bools not */
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

/* What an error names: "key-value #3" until a key is read, then the key; "tensor NAME".
 * Formatted only when an error is reported: walking millions of records formats nothing. */
typedef struct label {
    const char *kind;
    uint64_t index;
    const uint8_t *name; /* NULL: name the record by its index */
    uint64_t name_len;
} label_t;

static bool fail_named(cursor_t *c, const label_t *what, const char *fmt, ...) {
    if (!c->failed && c->err_len) {
        int n = what->name ? snprintf(c->err, c->err_len, "%s%.*s: ", what->kind,
                                      what->name_len > 80 ? 80 : (int)what->name_len,
                                      (const char *)what->name)
                           : snprintf(c->err, c->err_len, "%s#%llu: ", what->kind,
                                      (unsigned long long)what->index);
        if (n >= 0 && (size_t)n < c->err_len) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(c->err + n, c->err_len - (size_t)n, fmt, ap);
            va_end(ap);
        }
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
static bool string(cursor_t *c, uint64_t *off, uint64_t *len, const label_t *what) {
    const uint8_t *p = NULL;
    if (!u64(c, len)) return false;
    if (*len > c->size - c->pos)
        return fail_named(c, what, "string of %llu bytes runs past the end of the file",
                          (unsigned long long)*len);
    *off = c->pos;
    if (!take(c, (size_t)*len, &p)) return false;
    if (!c->revisit && !utf8_valid(p, (size_t)*len))
        return fail_named(c, what, "string is not valid UTF-8");
    return true;
}

/* The first 80 bytes of a name, for error messages. */
static int shown(uint64_t len) { return len > 80 ? 80 : (int)len; }

/* ---------------------------------------------------------------- values */

static bool value(cursor_t *c, uint32_t type, int depth, const label_t *key, zm_gguf_kv_t *kv);

/* Past count strings already validated (a revisit): lengths only, bounds still checked.
 * Tokenizer vocabularies are hundreds of thousands of strings: this loop is the walk. */
static bool skip_strings(cursor_t *c, uint64_t count) {
    size_t pos = c->pos;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t len;
        if (c->size - pos < 8) return fail(c, "truncated: a string at offset %zu", pos);
        memcpy(&len, c->data + pos, 8);
        pos += 8;
        if (len > c->size - pos) return fail(c, "truncated: a string at offset %zu", pos - 8);
        pos += (size_t)len;
    }
    c->pos = pos;
    return true;
}

static bool array(cursor_t *c, int depth, const label_t *key, zm_gguf_kv_t *kv) {
    uint32_t item;
    uint64_t count;
    if (depth >= MAX_NESTING) return fail_named(c, key, "arrays nested deeper than %d", MAX_NESTING);
    if (!u32(c, &item) || !u64(c, &count)) return false;
    if (item >= T_COUNT) return fail_named(c, key, "unknown array item type %u", item);
    /* Each item takes at least one byte (a string at least 8, an array 12): a count the
     * rest of the file cannot hold is refused before anything is read. */
    uint64_t min = item == T_STRING ? 8 : item == T_ARRAY ? 12 : scalar_size[item];
    if (count > (c->size - c->pos) / min)
        return fail_named(c, key, "array of %llu items cannot fit in the %zu bytes left",
                          (unsigned long long)count, c->size - c->pos);
    if (kv) {
        kv->item_type = item;
        kv->count = count;
        kv->value = c->pos;
    }
    if (item != T_STRING && item != T_ARRAY) {
        const uint8_t *p = NULL;
        if (!take(c, (size_t)count * scalar_size[item], &p)) return false;
        if (item == T_BOOL && !c->revisit)
            for (uint64_t i = 0; i < count; i++)
                if (p[i] > 1) return fail_named(c, key, "bool value %u is neither 0 nor 1", p[i]);
        return true;
    }
    if (item == T_STRING && c->revisit) return skip_strings(c, count);
    for (uint64_t i = 0; i < count; i++)
        if (!value(c, item, depth + 1, key, NULL)) return false;
    return true;
}

static bool value(cursor_t *c, uint32_t type, int depth, const label_t *key, zm_gguf_kv_t *kv) {
    const uint8_t *p = NULL;
    uint64_t off, len;
    if (type >= T_COUNT) return fail_named(c, key, "unknown value type %u", type);
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
    if (type == T_BOOL && *p > 1) return fail_named(c, key, "bool value %u is neither 0 nor 1", *p);
    return true;
}

/* ---------------------------------------------------------------- records */

/* One key-value at the cursor: key, type and value, all validated. index names it in
 * errors until its key is known. */
static bool read_kv(cursor_t *c, uint64_t index, zm_gguf_kv_t *kv) {
    label_t what = {"key-value ", index, NULL, 0};
    memset(kv, 0, sizeof *kv);
    kv->pos = c->pos;
    if (!string(c, &kv->key, &kv->key_len, &what)) return false;
    if (kv->key_len == 0) return fail_named(c, &what, "the key is empty");
    what = (label_t){"", 0, c->data + kv->key, kv->key_len};
    if (!u32(c, &kv->type) || !value(c, kv->type, 0, &what, kv)) return false;
    kv->end = c->pos;
    return true;
}

/* One tensor info at the cursor; its offset stays relative to the data section. Beyond
 * the bytes, the shape must be one numpy can view: every product of the non-zero dims,
 * in elements and in bytes, fits in an int64 (numpy checks them even when a dim is 0). */
static bool read_tensor_info(cursor_t *c, uint64_t index, zm_gguf_tensor_t *t) {
    label_t named = {"tensor ", index, NULL, 0}, *what = &named;
    memset(t, 0, sizeof *t);
    t->pos = c->pos;
    if (!string(c, &t->name, &t->name_len, what)) return false;
    named = (label_t){"tensor ", 0, c->data + t->name, t->name_len};
    if (!u32(c, &t->n_dims)) return false;
    if (t->n_dims > MAX_DIMS) return fail_named(c, what, "%u dimensions, at most %d", t->n_dims, MAX_DIMS);
    uint64_t nonzero = 1;
    bool empty = false;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        if (!u64(c, &t->dims[d])) return false;
        if (t->dims[d] == 0) {
            empty = true;
            continue;
        }
        if (t->dims[d] > INT64_MAX || __builtin_mul_overflow(nonzero, t->dims[d], &nonzero)
            || nonzero > INT64_MAX)
            return fail_named(c, what, "its shape overflows");
    }
    uint32_t block, bytes;
    if (!u32(c, &t->type) || !u64(c, &t->offset)) return false;
    if (!zm_ggml_type_size(t->type, &block, &bytes))
        return fail_named(c, what, "unknown ggml type %u", t->type);
    uint64_t row = t->n_dims ? t->dims[0] : 1;
    if (row % block)
        return fail_named(c, what, "%llu elements per row is not a multiple of the %u-element "
                          "block of its type", (unsigned long long)row, block);
    uint64_t nonzero_bytes;
    if (__builtin_mul_overflow(nonzero / block + (nonzero % block != 0), (uint64_t)bytes,
                               &nonzero_bytes) || nonzero_bytes > INT64_MAX)
        return fail_named(c, what, "its size overflows");
    t->nbytes = empty ? 0 : nonzero_bytes;
    t->end = c->pos;
    return true;
}

/* ---------------------------------------------------------------- phase 1: the header */

static bool read_header(cursor_t *c, zm_gguf_info_t *info) {
    const uint8_t *magic = NULL;
    if (!take(c, 4, &magic)) return false;
    if (memcmp(magic, "GGUF", 4) != 0) return fail(c, "not a GGUF file (no GGUF magic)");
    if (!u32(c, &info->version) || !u64(c, &info->n_tensors) || !u64(c, &info->n_kv)) return false;
    if (info->version != 2 && info->version != 3)
        return fail(c, "GGUF version %u is not supported (2 and 3 are)", info->version);
    /* Counts beyond what the file can hold are refused before anything is walked or
     * allocated: together the records need at least n_kv * 14 + n_tensors * 24 bytes. */
    uint64_t left = c->size - c->pos, kv_bytes, tensor_bytes, need;
    if (__builtin_mul_overflow(info->n_kv, (uint64_t)MIN_KV_SIZE, &kv_bytes)
        || __builtin_mul_overflow(info->n_tensors, (uint64_t)MIN_TENSOR_INFO_SIZE, &tensor_bytes)
        || __builtin_add_overflow(kv_bytes, tensor_bytes, &need) || need > left)
        return fail(c, "%llu key-values and %llu tensors cannot fit in a %zu-byte file",
                    (unsigned long long)info->n_kv, (unsigned long long)info->n_tensors, c->size);
    return true;
}

/* ---------------------------------------------------------------- phase 1: the kv table */

static bool read_kv_table(cursor_t *c, zm_gguf_info_t *info) {
    zm_gguf_kv_t kv;
    info->alignment = DEFAULT_ALIGNMENT;
    for (uint64_t i = 0; i < info->n_kv; i++) {
        if (!read_kv(c, i, &kv)) return false;
        if (kv.key_len == 17 && memcmp(c->data + kv.key, "general.alignment", 17) == 0) {
            uint32_t a;
            if (kv.type != T_U32) return fail(c, "general.alignment must be a u32");
            memcpy(&a, c->data + kv.value, 4);
            if (!zm_is_pow2(a)) return fail(c, "general.alignment %u is not a power of two", a);
            info->alignment = a;
        }
    }
    return true;
}

/* ---------------------------------------------------------------- phase 1: tensor infos */

static bool read_tensor_infos(cursor_t *c, zm_gguf_info_t *info) {
    zm_gguf_tensor_t t;
    info->tensors_offset = c->pos;
    for (uint64_t i = 0; i < info->n_tensors; i++) {
        if (!read_tensor_info(c, i, &t)) return false;
        if (t.offset % info->alignment)
            return fail(c, "tensor %.*s: offset %llu is not a multiple of the alignment %llu",
                        shown(t.name_len), (const char *)c->data + t.name,
                        (unsigned long long)t.offset, (unsigned long long)info->alignment);
    }
    size_t start;
    if (!zm_align_up(c->pos, info->alignment, &start))
        return fail(c, "the data section's offset overflows");
    info->data_offset = start;
    return true;
}

int zm_gguf_header(const uint8_t *data, size_t size, zm_gguf_info_t *info, char *err,
                   size_t err_len) {
    cursor_t c = {data, size, 0, err, err_len, false, false};
    memset(info, 0, sizeof *info);
    if (!read_header(&c, info) || !read_kv_table(&c, info) || !read_tensor_infos(&c, info))
        return ZM_ERR_INVALID_ARG;
    return ZM_OK;
}

/* ---------------------------------------------------------------- decoding records */

int zm_gguf_kv_at(const uint8_t *data, size_t size, uint64_t pos, zm_gguf_kv_t *kv) {
    cursor_t c = {data, size, 0, NULL, 0, false, true};
    if (pos < HEADER_SIZE || pos >= size) return ZM_ERR_INVALID_ARG;
    c.pos = pos;
    return read_kv(&c, 0, kv) ? ZM_OK : ZM_ERR_INVALID_ARG;
}

int zm_gguf_tensor_at(const uint8_t *data, size_t size, const zm_gguf_info_t *info, uint64_t pos,
                      zm_gguf_tensor_t *t) {
    cursor_t c = {data, size, 0, NULL, 0, false, true};
    if (pos < info->tensors_offset || pos >= size) return ZM_ERR_INVALID_ARG;
    c.pos = pos;
    if (!read_tensor_info(&c, 0, t)) return ZM_ERR_INVALID_ARG;
    /* Phase 3 checked it fits: from here on, an absolute file offset. */
    t->offset += info->data_offset;
    return ZM_OK;
}

int zm_gguf_item_offsets(const uint8_t *data, size_t size, uint64_t first, uint32_t item_type,
                         uint64_t count, uint64_t *offsets) {
    cursor_t c = {data, size, 0, NULL, 0, false, true};
    const label_t item = {"item ", 0, NULL, 0}; /* no message: err_len is 0 */
    if (first > size) return ZM_ERR_INVALID_ARG;
    c.pos = first;
    for (uint64_t i = 0; i < count; i++) {
        offsets[i] = c.pos;
        if (!value(&c, item_type, 0, &item, NULL)) return ZM_ERR_INVALID_ARG;
    }
    return ZM_OK;
}

/* ---------------------------------------------------------------- phase 3: data and names */

/* Index entries are record positions; both kinds of record start with their name. */
static int by_name(const void *a, const void *b, void *data) {
    const uint8_t *x = (const uint8_t *)data + *(const uint64_t *)a;
    const uint8_t *y = (const uint8_t *)data + *(const uint64_t *)b;
    uint64_t xlen, ylen;
    memcpy(&xlen, x, 8);
    memcpy(&ylen, y, 8);
    int r = memcmp(x + 8, y + 8, (size_t)(xlen < ylen ? xlen : ylen));
    return r ? r : (xlen > ylen) - (xlen < ylen);
}

/* The relative data offset of the tensor info at pos (validated in phase 1). */
static uint64_t tensor_offset_at(const uint8_t *data, uint64_t pos) {
    uint64_t name_len, offset;
    uint32_t n_dims;
    memcpy(&name_len, data + pos, 8);
    pos += 8 + name_len;
    memcpy(&n_dims, data + pos, 4);
    memcpy(&offset, data + pos + 4 + 8 * (uint64_t)n_dims + 4, 8);
    return offset;
}

static int by_offset(const void *a, const void *b, void *data) {
    uint64_t x = tensor_offset_at(data, *(const uint64_t *)a);
    uint64_t y = tensor_offset_at(data, *(const uint64_t *)b);
    return (x > y) - (x < y);
}

/* Every tensor's bytes inside the data section; fills the index in file order. A linear
 * pass first, so that a table of tensors pointing past the end fails before any sort. */
static bool check_tensor_bounds(cursor_t *c, const zm_gguf_info_t *info, uint64_t *index) {
    zm_gguf_tensor_t t;
    uint64_t data_size = info->data_offset <= c->size ? c->size - info->data_offset : 0;
    c->pos = info->tensors_offset;
    for (uint64_t i = 0; i < info->n_tensors; i++) {
        index[i] = c->pos;
        if (!read_tensor_info(c, i, &t)) return false;
        if (t.offset > data_size || t.nbytes > data_size - t.offset)
            return fail(c, "tensor %.*s: bytes %llu..%llu of the data section lie past the end "
                        "of the file (%llu bytes of data)", shown(t.name_len),
                        (const char *)c->data + t.name, (unsigned long long)t.offset,
                        (unsigned long long)(t.offset + t.nbytes), (unsigned long long)data_size);
    }
    return true;
}

/* No two tensors share a byte: sorted by offset, each ends before the next begins. */
static bool check_tensor_overlaps(cursor_t *c, const zm_gguf_info_t *info, uint64_t *index) {
    zm_gguf_tensor_t a, b;
    qsort_r(index, (size_t)info->n_tensors, sizeof *index, by_offset, (void *)c->data);
    for (uint64_t i = 1; i < info->n_tensors; i++) {
        c->pos = index[i - 1];
        if (!read_tensor_info(c, i - 1, &a)) return false;
        c->pos = index[i];
        if (!read_tensor_info(c, i, &b)) return false;
        if (a.nbytes && b.nbytes && a.offset + a.nbytes > b.offset)
            return fail(c, "tensors %.*s and %.*s overlap", shown(a.name_len),
                        (const char *)c->data + a.name, shown(b.name_len),
                        (const char *)c->data + b.name);
    }
    return true;
}

/* Sorted by name, no two alike: the index zm_gguf_find searches. */
static bool check_unique_names(cursor_t *c, uint64_t *index, uint64_t n, const char *what) {
    qsort_r(index, (size_t)n, sizeof *index, by_name, (void *)c->data);
    for (uint64_t i = 1; i < n; i++)
        if (by_name(&index[i - 1], &index[i], (void *)c->data) == 0) {
            uint64_t len;
            memcpy(&len, c->data + index[i], 8);
            return fail(c, "duplicate %s %.*s", what, shown(len),
                        (const char *)c->data + index[i] + 8);
        }
    return true;
}

static bool index_kv_table(cursor_t *c, const zm_gguf_info_t *info, uint64_t *index) {
    zm_gguf_kv_t kv;
    c->pos = HEADER_SIZE;
    for (uint64_t i = 0; i < info->n_kv; i++) {
        index[i] = c->pos;
        if (!read_kv(c, i, &kv)) return false;
    }
    return true;
}

int zm_gguf_parse(const uint8_t *data, size_t size, const zm_gguf_info_t *info,
                  uint64_t *kv_index, uint64_t *tensor_index, char *err, size_t err_len) {
    cursor_t c = {data, size, 0, err, err_len, false, true};
    if (!check_tensor_bounds(&c, info, tensor_index) || !check_tensor_overlaps(&c, info, tensor_index)
        || !check_unique_names(&c, tensor_index, info->n_tensors, "tensor name")
        || !index_kv_table(&c, info, kv_index)
        || !check_unique_names(&c, kv_index, info->n_kv, "key"))
        return ZM_ERR_INVALID_ARG;
    return ZM_OK;
}

/* ---------------------------------------------------------------- lookup */

int64_t zm_gguf_find(const uint8_t *data, const uint64_t *index, uint64_t n, const char *name,
                     size_t name_len) {
    uint64_t lo = 0, hi = n;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2, len;
        memcpy(&len, data + index[mid], 8);
        int r = memcmp(data + index[mid] + 8, name, (size_t)(len < name_len ? len : name_len));
        if (!r) r = (len > name_len) - (len < name_len);
        if (r == 0) return (int64_t)mid;
        if (r < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return -1;
}
