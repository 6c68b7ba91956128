/* libFuzzer target: any byte string given to the GGUF reader must be either
 * refused cleanly or accepted into a state where every accessor is safe; a
 * tokenizer built from accepted metadata must encode and stream-decode
 * anything. Built by `make fuzz` (tests/fuzz/module.mk), run by
 * tests/fuzz/run-fuzz.sh. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/model/eng_err.h"
#include "engine/model/gguf.h"
#include "engine/model/tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static volatile uint64_t g_sink;

static void walk_metadata(const eng_gguf *g)
{
    for (int64_t i = 0; i < eng_gguf_kv_count(g); i++) {
        const char *k = eng_gguf_kv_key(g, i);
        if (!k || eng_gguf_find_kv(g, k) != i)
            abort(); /* keys are unique and found by name */
        uint32_t u32;
        int32_t i32;
        uint64_t u64;
        int64_t i64;
        float f;
        double d;
        bool b;
        const char *s;
        size_t sl;
        g_sink += (uint64_t)eng_gguf_get_u32(g, k, &u32) + (uint64_t)eng_gguf_get_i32(g, k, &i32) +
                  (uint64_t)eng_gguf_get_u64(g, k, &u64) + (uint64_t)eng_gguf_get_i64(g, k, &i64) +
                  (uint64_t)eng_gguf_get_f32(g, k, &f) + (uint64_t)eng_gguf_get_f64(g, k, &d) +
                  (uint64_t)eng_gguf_get_bool(g, k, &b);
        if (eng_gguf_get_str(g, k, &s, &sl) == 0)
            g_sink += (uint64_t)(uint8_t)s[sl] + strlen(s); /* NUL-terminated copy */
        eng_gguf_arr a;
        if (eng_gguf_get_arr(g, k, &a) == 0) {
            for (uint64_t j = 0; j < a.n; j++) {
                if (a.type == ENG_GGUF_STR) {
                    if (eng_gguf_arr_str(g, &a, j, &s, &sl) < 0)
                        abort();
                    if (sl)
                        g_sink += (uint8_t)s[0] + (uint8_t)s[sl - 1];
                } else {
                    g_sink += (uint64_t)eng_gguf_arr_i64(&a, j, &i64) +
                              (uint64_t)eng_gguf_arr_f32(&a, j, &f);
                }
            }
        }
    }
}

static void walk_tensors(const eng_gguf *g)
{
    for (int64_t i = 0; i < eng_gguf_tensor_count(g); i++) {
        const struct eng_gguf_tensor *t = eng_gguf_tensor_at(g, i);
        if (!t || eng_gguf_find_tensor(g, t->name) != t || t->nbytes == 0)
            abort();
        const uint8_t *p = t->data;
        g_sink += p[0] + p[t->nbytes - 1];
    }
}

static void exercise_tokenizer(const eng_gguf *g, const uint8_t *data, size_t size)
{
    eng_tok *t;
    if (eng_tok_create(&t, g) < 0)
        return;
    static const char *const texts[] = {"", " ", "Hello world", "  a\n\tb",
                                        "caf\xc3\xa9 \xf0\x9f\xa6\x99 \xff\xfe"};
    int32_t ids[512];
    for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]) + 1; i++) {
        const char *s = i < sizeof(texts) / sizeof(texts[0]) ? texts[i] : (const char *)data;
        size_t len = i < sizeof(texts) / sizeof(texts[0]) ? strlen(s) : (size > 160 ? 160 : size);
        int64_t n = eng_tok_encode(t, s, len, true, ids, 512);
        if (n == -ENOSPC || n == -EILSEQ)
            continue;
        if (n < 0 || n > (int64_t)(3 * len + 4))
            abort();
        if (eng_tok_encode(t, s, len, true, NULL, 0) != n)
            abort();
        int64_t total = eng_tok_decode(t, ids, (size_t)n, -1, NULL, 0);
        if (total < 0)
            abort();
    }
    /* Stream-decode every token id once, then some ids taken from the input. */
    size_t cap = 3 * eng_tok_max_piece_bytes(t) + ENG_TOK_STREAM_SLACK;
    char *out = malloc(cap);
    eng_tok_stream st;
    eng_tok_stream_init(&st, eng_tok_bos(t));
    int32_t nv = eng_tok_n_vocab(t);
    for (int32_t id = 0; id < nv && id < 4096; id++)
        if (eng_tok_stream_push(t, &st, id, out, cap) < 0)
            abort();
    for (size_t i = 0; i + 2 <= size && i < 256; i += 2) {
        int32_t id = (int32_t)((data[i] | data[i + 1] << 8) % (uint32_t)nv);
        if (eng_tok_stream_push(t, &st, id, out, cap) < 0)
            abort();
    }
    if (eng_tok_stream_flush(t, &st, out, cap) < 0)
        abort();
    free(out);
    eng_tok_destroy(t);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    eng_gguf *g;
    int rc = eng_gguf_open_mem(&g, data, size);
    if (rc < 0) {
        if (rc != -EBADMSG || eng_error()[0] == '\0')
            abort(); /* every refusal is -EBADMSG with a reason */
        return 0;
    }
    walk_metadata(g);
    walk_tensors(g);
    exercise_tokenizer(g, data, size);
    eng_gguf_close(g);
    return 0;
}
