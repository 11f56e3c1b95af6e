/* test_gguf.c — the GGUF parser and the dequantize kernels under ASan + UBSan: a valid file
 * built here byte by byte, every truncation of it, and random mutations, which must each
 * parse or be refused, never read out of bounds. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "zigmem.h"

static uint8_t file[4096];
static size_t len;

static void put(const void *p, size_t n) { memcpy(file + len, p, n), len += n; }
static void u32(uint32_t v) { put(&v, 4); }
static void u64(uint64_t v) { put(&v, 8); }
static void str(const char *s) { u64(strlen(s)), put(s, strlen(s)); }

static void build(void) {
    len = 0;
    put("GGUF", 4), u32(3), u64(2), u64(4);
    str("general.alignment"), u32(4), u32(32);
    str("name"), u32(8), str("tiny");
    str("tokens"), u32(9), u32(8), u64(3), str("a"), str("bb"), str("ccc");
    str("nested"), u32(9), u32(9), u64(2), u32(4), u64(1), u32(7), u32(4), u64(0);
    str("w"), u32(2), u64(32), u64(2), u32(0), u64(0);   /* F32 32x2: 256 bytes */
    str("q"), u32(1), u64(32), u32(8), u64(256);         /* Q8_0, one block: 34 bytes */
    while (len % 32) file[len++] = 0;
    for (int i = 0; i < 64; i++) {
        float f = (float)i;
        put(&f, 4);
    }
    uint16_t half_two = 0x4000; /* 2.0 */
    put(&half_two, 2);
    for (int i = 0; i < 32; i++) file[len++] = (uint8_t)(i - 16);
}

/* Parse in the library's phases; on success read every tensor's bytes (they must lie
 * inside the file) and decode every record through its index. A refusal must be
 * ZM_ERR_INVALID_ARG with a message; anything else is a failed check. */
static int parse(const uint8_t *data, size_t size, zm_gguf_tensor_t *tensors) {
    zm_gguf_info_t info;
    char err[256] = "";
    int status = zm_gguf_header(data, size, &info, err, sizeof err);
    if (status != ZM_OK) {
        CHECK(status == ZM_ERR_INVALID_ARG && err[0] != 0);
        return status;
    }
    uint64_t *kv_index = calloc(info.n_kv + 1, sizeof *kv_index);
    uint64_t *tensor_index = calloc(info.n_tensors + 1, sizeof *tensor_index);
    status = zm_gguf_parse(data, size, &info, kv_index, tensor_index, err, sizeof err);
    CHECK(status == ZM_OK || (status == ZM_ERR_INVALID_ARG && err[0] != 0));
    if (status == ZM_OK) {
        for (uint64_t i = 0; i < info.n_tensors; i++) {
            zm_gguf_tensor_t t;
            CHECK(zm_gguf_tensor_at(data, size, &info, tensor_index[i], &t) == ZM_OK);
            CHECK(zm_gguf_find(data, tensor_index, info.n_tensors, (const char *)data + t.name,
                               t.name_len) == (int64_t)i);
            for (uint64_t b = 0; b < t.nbytes; b++) status |= data[t.offset + b] & 0;
            if (tensors && i < 2) tensors[i] = t;
        }
        for (uint64_t i = 0; i < info.n_kv; i++) {
            zm_gguf_kv_t kv;
            CHECK(zm_gguf_kv_at(data, size, kv_index[i], &kv) == ZM_OK && kv.end <= size);
        }
    }
    free(kv_index), free(tensor_index);
    return status;
}

int main(void) {
    build();
    zm_gguf_tensor_t tensors[2]; /* sorted by name: "q", then "w" */
    CHECK(parse(file, len, tensors) == ZM_OK);
    CHECK(tensors[1].nbytes == 256 && tensors[0].nbytes == 34 && tensors[0].type == 8);
    zm_gguf_tensor_t q = tensors[0], w = tensors[1];
    tensors[0] = w, tensors[1] = q;

    /* A key by name, and the items of its nested array: [[7], []] of u32. */
    zm_gguf_info_t info;
    char err[256];
    uint64_t kv_index[4], tensor_index[2], offsets[2];
    zm_gguf_kv_t kv;
    CHECK(zm_gguf_header(file, len, &info, err, sizeof err) == ZM_OK);
    CHECK(zm_gguf_parse(file, len, &info, kv_index, tensor_index, err, sizeof err) == ZM_OK);
    int64_t at = zm_gguf_find(file, kv_index, info.n_kv, "nested", 6);
    CHECK(at >= 0 && zm_gguf_find(file, kv_index, info.n_kv, "nest", 4) == -1);
    CHECK(zm_gguf_kv_at(file, len, kv_index[at], &kv) == ZM_OK && kv.count == 2 && kv.item_type == 9);
    CHECK(zm_gguf_item_offsets(file, len, kv.value, kv.item_type, kv.count, offsets) == ZM_OK);
    CHECK(offsets[0] == kv.value && offsets[1] == kv.value + 12 + 4);
    CHECK(zm_gguf_item_offsets(file, len, len - 4, 9, 1, offsets) == ZM_ERR_INVALID_ARG);
    CHECK(zm_gguf_kv_at(file, len, len + 100, &kv) == ZM_ERR_INVALID_ARG);

    float out[64];
    CHECK(zm_dequantize(ZM_GGML_F32, file + tensors[0].offset, 64, out) == ZM_OK && out[63] == 63);
    CHECK(zm_dequantize(ZM_GGML_Q8_0, file + tensors[1].offset, 32, out) == ZM_OK);
    CHECK(out[0] == -32.0f && out[31] == 30.0f);
    uint16_t halves[4] = {0x3c00, 0x0001, 0x7c00, 0xc000}; /* 1, smallest subnormal, inf, -2 */
    CHECK(zm_dequantize(ZM_GGML_F16, halves, 4, out) == ZM_OK);
    CHECK(out[0] == 1.0f && out[1] == 5.9604644775390625e-8f && out[2] > 1e38f && out[3] == -2.0f);
    CHECK(zm_dequantize(ZM_GGML_Q4_0, file, 31, out) == ZM_ERR_INVALID_ARG);
    CHECK(zm_dequantize(9 /* Q8_1: no kernel */, file, 32, out) == ZM_ERR_INVALID_ARG);

    /* Hostile tables: counts the file cannot hold, a zero-filled table, shapes numpy
     * cannot view (a zero dim does not excuse the others' product), an empty key. */
    uint8_t *zeros = calloc(1, 1 << 20);
    memcpy(zeros, "GGUF\3\0\0\0", 8);
    uint64_t counts[][2] = {{0, (1 << 20) / 14}, {(1 << 20) / 24, 0}, {UINT64_MAX, 1},
                            {(1 << 20) / 48, (1 << 20) / 28}};
    for (size_t i = 0; i < sizeof counts / sizeof *counts; i++) {
        memcpy(zeros + 8, counts[i], 16);
        CHECK(parse(zeros, 1 << 20, NULL) == ZM_ERR_INVALID_ARG);
    }
    free(zeros);
    static const uint64_t shapes[][3] = {{0, 1ull << 62, 1ull << 62}, {1ull << 62, 0, 4},
                                         {1ull << 61, 0, 4}};
    for (size_t i = 0; i < 3; i++) {
        len = 0;
        put("GGUF", 4), u32(3), u64(1), u64(0);
        str("t"), u32(3), u64(shapes[i][0]), u64(shapes[i][1]), u64(shapes[i][2]), u32(0), u64(0);
        while (len % 32) file[len++] = 0;
        CHECK(parse(file, len, NULL) == ZM_ERR_INVALID_ARG);
    }
    len = 0;
    put("GGUF", 4), u32(3), u64(0), u64(1), str(""), u32(0), file[len++] = 1;
    CHECK(parse(file, len, NULL) == ZM_ERR_INVALID_ARG);
    build();

    /* Every truncation is refused. Each copy is exactly as long as the cut, so ASan sees
     * any read past it. */
    int refused = 0;
    for (size_t cut = 0; cut < len; cut++) {
        uint8_t *copy = malloc(cut ? cut : 1);
        memcpy(copy, file, cut);
        refused += parse(copy, cut, NULL) != ZM_OK;
        free(copy);
    }
    CHECK(refused == (int)len);

    /* Random mutations, mostly in the header and tables. */
    unsigned rng = 7;
    int parsed = 0;
    for (int round = 0; round < 30000; round++) {
        uint8_t *copy = malloc(len);
        memcpy(copy, file, len);
        int n = 1 + (int)((rng = rng * 1103515245u + 12345u) >> 16) % 6;
        for (int k = 0; k < n; k++) {
            rng = rng * 1103515245u + 12345u;
            size_t pos = (rng >> 8) % (len < 300 ? len : 300);
            rng = rng * 1103515245u + 12345u;
            copy[pos] = (uint8_t)(rng >> 16);
        }
        parsed += parse(copy, len, NULL) == ZM_OK;
        free(copy);
    }
    CHECK(parsed > 0 && parsed < 30000);
    return check_summary();
}
