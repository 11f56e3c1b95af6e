/* GGUF parser (csrc/gguf.c) */
typedef struct { uint32_t version; uint64_t n_tensors; uint64_t n_kv; uint64_t alignment;
                 uint64_t tensors_offset; uint64_t data_offset; ...; } zm_gguf_info_t;
typedef struct { uint64_t pos; uint64_t key; uint64_t key_len; uint32_t type; uint32_t item_type;
                 uint64_t value; uint64_t count; uint64_t end; ...; } zm_gguf_kv_t;
typedef struct { uint64_t pos; uint64_t name; uint64_t name_len; uint32_t n_dims; uint32_t type;
                 uint64_t dims[4]; uint64_t offset; uint64_t nbytes; uint64_t end; ...; } zm_gguf_tensor_t;
int zm_gguf_header(const uint8_t *data, size_t size, zm_gguf_info_t *info, char *err,
                   size_t err_len);
int zm_gguf_parse(const uint8_t *data, size_t size, const zm_gguf_info_t *info,
                  uint64_t *kv_index, uint64_t *tensor_index, char *err, size_t err_len);
int zm_gguf_kv_at(const uint8_t *data, size_t size, uint64_t pos, zm_gguf_kv_t *kv);
int zm_gguf_tensor_at(const uint8_t *data, size_t size, const zm_gguf_info_t *info, uint64_t pos,
                      zm_gguf_tensor_t *t);
int zm_gguf_item_offsets(const uint8_t *data, size_t size, uint64_t first, uint32_t item_type,
                         uint64_t count, uint64_t *offsets);
int64_t zm_gguf_find(const uint8_t *data, const uint64_t *index, uint64_t n, const char *name,
                     size_t name_len);
bool zm_ggml_type_size(uint32_t type, uint32_t *block, uint32_t *bytes);
