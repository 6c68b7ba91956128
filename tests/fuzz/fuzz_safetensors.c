/* libFuzzer target: the safetensors reader over arbitrary bytes, and the
 * Medusa tree parser over the same bytes read as text. Every input must
 * either open (then every accessor is exercised and every tensor's bytes
 * read, so ASan sees any pointer that leaves the buffer) or fail with
 * -EBADMSG / -EINVAL.
 *
 *   clang -fsanitize=fuzzer,address,undefined -I. tests/fuzz/fuzz_safetensors.c \
 *       engine/model/safetensors.c engine/medusa/medusa_tree.c engine/model/eng_err.c -ljansson
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/medusa/medusa_tree.h"
#include "engine/model/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void fuzz_st(const uint8_t *data, size_t size)
{
    eng_st *st = NULL;
    int rc = eng_st_open_mem(&st, data, size);
    if (rc < 0) {
        if (rc != -EBADMSG && rc != -ENOMEM)
            abort();
        return;
    }
    volatile uint8_t sink = 0;
    for (int64_t i = 0; i < eng_st_count(st); i++) {
        const struct eng_st_tensor *t = eng_st_tensor_at(st, i);
        if (eng_st_find(st, t->name) != t)
            abort();
        size_t es = eng_st_dtype_size(t->dtype);
        if (!es || t->nbytes != (size_t)t->n_elems * es)
            abort();
        if (t->nbytes) {
            if ((uintptr_t)t->data % es)
                abort();
            const uint8_t *p = t->data;
            sink ^= p[0] ^ p[t->nbytes - 1];
        }
    }
    for (int64_t i = 0; i < eng_st_meta_count(st); i++) {
        const struct eng_st_meta *m = eng_st_meta_at(st, i);
        if (eng_st_meta_get(st, m->key) == NULL)
            abort();
    }
    (void)sink;
    eng_st_close(st);
}

static void fuzz_tree(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (!text)
        return;
    memcpy(text, data, size);
    text[size] = '\0';
    eng_medusa_tree *t = NULL;
    int rc = eng_medusa_tree_parse(&t, text);
    free(text);
    if (rc < 0) {
        if (rc != -EINVAL && rc != -ENOMEM)
            abort();
        return;
    }
    /* Structural invariants every accepted tree must satisfy. */
    const int32_t n = t->n_nodes, cols = t->max_depth + 1;
    for (int32_t i = 1; i < n; i++) {
        int32_t p = t->parent[i];
        if (p < 0 || p >= i || t->depth[i] != t->depth[p] + 1 || !t->mask[(size_t)i * n + i])
            abort();
    }
    for (int32_t r = 0; r < t->n_leaves; r++)
        for (int32_t c = 1; c < cols; c++) {
            int32_t v = t->retrieve[(size_t)r * cols + c];
            if (v >= 0 && t->parent[v] != t->retrieve[(size_t)r * cols + c - 1])
                abort();
        }
    eng_medusa_tree_destroy(t);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_st(data, size);
    if (size && data[0] == '[')
        fuzz_tree(data, size);
    return 0;
}
