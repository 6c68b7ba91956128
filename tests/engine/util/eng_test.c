#include "tests/engine/util/eng_test.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "tests/util/test_models.h"

int et_collect(void *arg, int32_t token, const char *s, size_t n)
{
    (void)token;
    et_text *t = arg;
    cr_assert(t->n + n < sizeof(t->s));
    memcpy(t->s + t->n, s, n);
    t->n += n;
    return 0;
}

void et_expect_golden(const char *golden, const et_text *got)
{
    FILE *f = fopen(tu_model_path(golden), "rb");
    cr_assert_not_null(f, "%s: cannot open", golden);
    static char want[1 << 16];
    size_t n = fread(want, 1, sizeof(want) - 1, f);
    want[n] = 0;
    fclose(f);
    size_t i = 0;
    while (i < n && i < got->n && want[i] == got->s[i])
        i++;
    cr_assert(i == n && n == got->n,
              "%s: first difference at byte %zu (got %zu bytes, want %zu)\n got: %.60s\nwant: "
              "%.60s",
              golden, i, got->n, n, got->s + (i > 20 ? i - 20 : 0), want + (i > 20 ? i - 20 : 0));
}

void et_copy_llama_keys(const eng_gguf *src, eng_gguf_writer *w, const char *drop_key)
{
    for (int64_t i = 0; i < eng_gguf_kv_count(src); i++) {
        const char *k = eng_gguf_kv_key(src, i);
        if ((strncmp(k, "llama.", 6) && strcmp(k, "general.architecture")) ||
            (drop_key && !strcmp(k, drop_key)))
            continue;
        switch (eng_gguf_kv_type(src, i)) {
        case ENG_GGUF_U32: {
            uint32_t v;
            cr_assert_eq(eng_gguf_get_u32(src, k, &v), 0);
            cr_assert_eq(eng_gguf_writer_add_u32(w, k, v), 0);
            break;
        }
        case ENG_GGUF_F32: {
            float v;
            cr_assert_eq(eng_gguf_get_f32(src, k, &v), 0);
            cr_assert_eq(eng_gguf_writer_add_f32(w, k, v), 0);
            break;
        }
        case ENG_GGUF_STR: {
            const char *v;
            cr_assert_eq(eng_gguf_get_str(src, k, &v, NULL), 0);
            cr_assert_eq(eng_gguf_writer_add_str(w, k, v), 0);
            break;
        }
        default:
            cr_assert_fail("unexpected key type of %s", k);
        }
    }
}
