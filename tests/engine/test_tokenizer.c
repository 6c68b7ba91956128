/* Tokenizer: the llama.cpp vocab cases, agreement with a naive reference
 * encoder, the shared models' vocabularies, streaming decode of split UTF-8
 * characters, and refusal of malformed tokenizer metadata. */
#include <criterion/criterion.h>

#include "tests/util/test_models.h"
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/model/eng_err.h"
#include "engine/model/gguf.h"
#include "engine/model/gguf_write.h"
#include "engine/model/tokenizer.h"

struct loaded {
    eng_gguf *g;
    eng_tok *t;
};

/* Load a shared model's tokenizer; skips the test when models are absent. */
static struct loaded load_model(const char *rel)
{
    char path[1024];
    snprintf(path, sizeof(path), "%s/%s", tu_models_dir(), rel);
    if (access(path, R_OK) != 0)
        cr_skip_test("model %s not present", path);
    struct loaded l = {0};
    cr_assert_eq(eng_gguf_open(&l.g, path), 0, "%s", eng_error());
    cr_assert_eq(eng_tok_create(&l.t, l.g), 0, "%s", eng_error());
    return l;
}

static void unload(struct loaded *l)
{
    eng_tok_destroy(l->t);
    eng_gguf_close(l->g);
}

static char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    rewind(f);
    char *b = malloc((size_t)sz + 1);
    cr_assert_eq(fread(b, 1, (size_t)sz, f), (size_t)sz);
    b[sz] = '\0';
    fclose(f);
    *n = (size_t)sz;
    return b;
}

/* ---- naive reference encoder ------------------------------------------- */

/* The same specification done the slow, obvious way (llama2.c style): rescan
 * all adjacent pairs for the best score (strictly greater wins, so ties go
 * to the leftmost) until no pair is a piece. */
static int64_t naive_encode(const eng_tok *t, const char *text, size_t len, int32_t *out,
                            size_t cap)
{
    if (len == 0)
        return 0;
    size_t wcap = 3 * len + 3, wl = 0;
    char *w = malloc(wcap);
    if (eng_tok_add_space_prefix(t)) {
        memcpy(w, "\xe2\x96\x81", 3);
        wl = 3;
    }
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(w + wl, "\xe2\x96\x81", 3);
            wl += 3;
        } else {
            w[wl++] = text[i];
        }
    }
    size_t *st = malloc(wl * sizeof(*st)), *sn = malloc(wl * sizeof(*sn)), n = 0;
    for (size_t o = 0; o < wl;) {
        uint8_t c = (uint8_t)w[o];
        size_t l = c < 0xC0 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
        if (l > wl - o)
            l = wl - o;
        st[n] = o;
        sn[n++] = l;
        o += l;
    }
    for (;;) {
        float best = 0;
        size_t bi = SIZE_MAX;
        for (size_t i = 0; i + 1 < n; i++) {
            int32_t id = eng_tok_find(t, w + st[i], sn[i] + sn[i + 1]);
            if (id >= 0 && (bi == SIZE_MAX || eng_tok_score(t, id) > best)) {
                best = eng_tok_score(t, id);
                bi = i;
            }
        }
        if (bi == SIZE_MAX)
            break;
        sn[bi] += sn[bi + 1];
        memmove(st + bi + 1, st + bi + 2, (n - bi - 2) * sizeof(*st));
        memmove(sn + bi + 1, sn + bi + 2, (n - bi - 2) * sizeof(*sn));
        n--;
    }
    int64_t k = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = eng_tok_find(t, w + st[i], sn[i]);
        if (id >= 0) {
            cr_assert((size_t)k < cap);
            out[k++] = id;
            continue;
        }
        bool ok = true;
        int32_t bt[4];
        for (size_t j = 0; j < sn[i]; j++) {
            char hex[7];
            snprintf(hex, sizeof(hex), "<0x%02X>", (uint8_t)w[st[i] + j]);
            bt[j] = eng_tok_find(t, hex, 6);
            ok = ok && bt[j] >= 0;
        }
        if (!ok) {
            out[k++] = eng_tok_unk(t);
            continue;
        }
        for (size_t j = 0; j < sn[i]; j++)
            out[k++] = bt[j];
    }
    free(w);
    free(st);
    free(sn);
    return k;
}

static void expect_same_as_naive(const eng_tok *t, const char *s, size_t len)
{
    int32_t a[4096], b[4096];
    int64_t na = eng_tok_encode(t, s, len, false, a, 4096);
    int64_t nb = naive_encode(t, s, len, b, 4096);
    cr_assert_geq(na, 0, "%s", eng_error());
    cr_assert_eq(na, nb, "token counts differ for [%.*s]: %lld vs %lld", (int)len, s,
                 (long long)na, (long long)nb);
    for (int64_t i = 0; i < na; i++)
        cr_assert_eq(a[i], b[i], "token %lld differs for [%.*s]", (long long)i, (int)len, s);
}

static void expect_roundtrip(const eng_tok *t, const char *s)
{
    size_t len = strlen(s);
    int32_t ids[4096];
    int64_t n = eng_tok_encode(t, s, len, true, ids, 4096);
    cr_assert_gt(n, 0, "%s", eng_error());
    cr_assert_eq(ids[0], eng_tok_bos(t));
    char out[16384];
    int64_t m = eng_tok_decode(t, ids, (size_t)n, -1, out, sizeof(out));
    cr_assert_eq(m, (int64_t)len, "decode of [%s] gave %lld bytes [%.*s]", s, (long long)m,
                 (int)(m > 0 ? m : 0), out);
    cr_expect_eq(memcmp(out, s, len), 0, "[%s] came back as [%.*s]", s, (int)m, out);
    cr_expect_eq(eng_tok_decode(t, ids, (size_t)n, -1, NULL, 0), m, "size query");
}

/* ---- llama.cpp vocab test cases ---------------------------------------- */

Test(engine_tokenizer, llama_spm_vocab_46_cases, .timeout = 60)
{
    struct loaded l = load_model("llama2-vocab/ggml-vocab-llama-spm.gguf");
    char p_in[1024], p_out[1024];
    snprintf(p_in, sizeof(p_in), "%s/llama2-vocab/ggml-vocab-llama-spm.gguf.inp", tu_models_dir());
    snprintf(p_out, sizeof(p_out), "%s/llama2-vocab/ggml-vocab-llama-spm.gguf.out", tu_models_dir());
    size_t ni, no;
    char *inp = slurp(p_in, &ni), *outp = slurp(p_out, &no);
    /* As llama.cpp's test-tokenizer-0: cases separated by this line, no BOS
     * (add_special = false), space prefix applied to non-empty text. */
    static const char sep[] = "\n__ggml_vocab_test__\n";
    char *p = inp, *o = outp;
    int cases = 0;
    for (;;) {
        char *e = strstr(p, sep);
        char *oe = strchr(o, '\n');
        if (!e || !oe)
            break;
        *oe = '\0';
        size_t len = (size_t)(e - p);
        int32_t want[1024], got[1024];
        int64_t nw = 0;
        for (char *q = o; *q;) {
            char *end;
            long v = strtol(q, &end, 10);
            if (end == q)
                break;
            want[nw++] = (int32_t)v;
            q = end;
        }
        int64_t ng = eng_tok_encode(l.t, p, len, false, got, 1024);
        cr_expect_eq(ng, nw, "case %d [%.*s]: %lld tokens, want %lld", cases, (int)len, p,
                     (long long)ng, (long long)nw);
        for (int64_t i = 0; i < nw && i < ng; i++)
            cr_expect_eq(got[i], want[i], "case %d [%.*s] token %lld: %d, want %d", cases,
                         (int)len, p, (long long)i, got[i], want[i]);
        /* And back: decoding after BOS restores the exact input. */
        char dec[8192];
        int64_t nd = eng_tok_decode(l.t, got, (size_t)ng, eng_tok_bos(l.t), dec, sizeof(dec));
        cr_expect(nd == (int64_t)len && memcmp(dec, p, len) == 0, "case %d does not round-trip",
                  cases);
        cases++;
        p = e + strlen(sep);
        o = oe + 1;
    }
    cr_expect_eq(cases, 46);
    free(inp);
    free(outp);
    unload(&l);
}

Test(engine_tokenizer, llama_vocab_roundtrips_utf8_and_emoji)
{
    struct loaded l = load_model("llama2-vocab/ggml-vocab-llama-spm.gguf");
    static const char *const s[] = {
        "Hello world",
        "  two leading spaces and trailing  ",
        "F\xc3\xbchrer \xc3\xa9t\xc3\xa9 na\xc3\xafve",
        "\xe6\x88\x91\xe6\x83\xb3\xe5\x9c\xa8" "apple\xe5\xb7\xa5\xe4\xbd\x9c",
        "emoji \xf0\x9f\xa6\x99 and \xf0\x9f\x98\xb6\xe2\x80\x8d\xf0\x9f\x8c\xab\xef\xb8\x8f!",
        "line one\nline two\n\ttabbed",
        "<s> is not parsed as a special token",
    };
    for (size_t i = 0; i < sizeof(s) / sizeof(s[0]); i++) {
        expect_roundtrip(l.t, s[i]);
        expect_same_as_naive(l.t, s[i], strlen(s[i]));
    }
    /* "<s>" in the text stays text: it must not encode to BOS. */
    int32_t ids[64];
    int64_t n = eng_tok_encode(l.t, "<s>", 3, false, ids, 64);
    cr_assert_gt(n, 0);
    for (int64_t i = 0; i < n; i++)
        cr_expect_neq(ids[i], eng_tok_bos(l.t));
    unload(&l);
}

Test(engine_tokenizer, heap_encoder_matches_naive_on_random_text, .timeout = 60)
{
    static const char *const models[] = {"stories260K/stories260K.gguf",
                                         "llama2-vocab/ggml-vocab-llama-spm.gguf",
                                         "babyllama-tok105/babyllama-tok105.gguf"};
    static const char *const extra[] = {" ", " ", "e", "th", "\xc3\xa9", "\xe2\x82\xac",
                                        "\xf0\x9f\xa6\x99", "\n", "#", "\xff"};
    for (size_t m = 0; m < 3; m++) {
        struct loaded l = load_model(models[m]);
        uint64_t s = 0x9e3779b97f4a7c15ULL + m;
        for (int it = 0; it < 300; it++) {
            char buf[512];
            size_t len = 0;
            int parts = 1 + it % 12;
            for (int k = 0; k < parts; k++) {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                const char *p;
                size_t pl;
                if (s % 3) {
                    /* a vocabulary piece, ▁ turned back into a space */
                    p = eng_tok_piece(l.t, (int32_t)((s >> 8) % (uint64_t)eng_tok_n_vocab(l.t)),
                                      &pl);
                } else {
                    p = extra[(s >> 8) % (sizeof(extra) / sizeof(extra[0]))];
                    pl = strlen(p);
                }
                for (size_t j = 0; j < pl && len < sizeof(buf) - 4; j++) {
                    if (j + 2 < pl && memcmp(p + j, "\xe2\x96\x81", 3) == 0) {
                        buf[len++] = ' ';
                        j += 2;
                    } else {
                        buf[len++] = p[j];
                    }
                }
            }
            expect_same_as_naive(l.t, buf, len);
        }
        unload(&l);
    }
}

/* ---- the shared models' own vocabularies ------------------------------- */

Test(engine_tokenizer, stories260k_lily_and_tom)
{
    struct loaded l = load_model("stories260K/stories260K.gguf");
    cr_expect_eq(eng_tok_n_vocab(l.t), 512);
    cr_expect_eq(eng_tok_bos(l.t), 1);
    cr_expect_eq(eng_tok_eos(l.t), 2);
    cr_expect_eq(eng_tok_unk(l.t), 0);
    cr_expect(eng_tok_add_space_prefix(l.t), "absent key defaults to true");
    int32_t ids[16];
    int64_t n = eng_tok_encode(l.t, "Lily and Tom", 12, true, ids, 16);
    /* What llama2.c's encoder gives for this prompt with tok512. */
    static const int32_t want[] = {1, 317, 269, 274, 287}; /* <s> ▁Lily ▁and ▁T om */
    cr_assert_eq(n, 5, "%lld tokens", (long long)n);
    for (int i = 0; i < 5; i++)
        cr_expect_eq(ids[i], want[i], "token %d: %d", i, ids[i]);
    size_t pl;
    const char *p = eng_tok_piece(l.t, 317, &pl);
    cr_expect(pl == 7 && memcmp(p, "\xe2\x96\x81Lily", 7) == 0);
    /* Prompt decode is the start of the golden text. */
    char out[64];
    int64_t m = eng_tok_decode(l.t, ids, 5, -1, out, sizeof(out));
    cr_assert_eq(m, 12);
    cr_expect_eq(memcmp(out, "Lily and Tom", 12), 0);
    char gp[1024];
    snprintf(gp, sizeof(gp), "%s/stories260K/golden_greedy_prompt_LilyAndTom_n64.txt",
             tu_models_dir());
    if (access(gp, R_OK) == 0) {
        size_t gl;
        char *golden = slurp(gp, &gl);
        cr_expect_eq(memcmp(golden, "Lily and Tom", 12), 0);
        /* The golden text re-encodes and decodes to itself. */
        int32_t *gi = malloc((3 * gl + 4) * sizeof(*gi));
        int64_t gn = eng_tok_encode(l.t, golden, gl, true, gi, 3 * gl + 4);
        cr_assert_gt(gn, 1);
        cr_expect_eq(gi[1], 317);
        char *back = malloc(gl + 16);
        cr_expect_eq(eng_tok_decode(l.t, gi, (size_t)gn, -1, back, gl + 16), (int64_t)gl);
        cr_expect_eq(memcmp(back, golden, gl), 0);
        free(back);
        free(gi);
        free(golden);
    }
    unload(&l);
}

Test(engine_tokenizer, babyllama_out_of_vocab_is_unk)
{
    struct loaded l = load_model("babyllama-tok105/babyllama-tok105.gguf");
    cr_expect_eq(eng_tok_n_vocab(l.t), 105);
    int32_t ids[32];
    /* '#' and the emoji are not in the 105-token vocabulary, which has no
     * byte tokens: each becomes one UNK (0). */
    const char *s = "a#b \xf0\x9f\xa6\x99";
    int64_t n = eng_tok_encode(l.t, s, strlen(s), false, ids, 32);
    static const int32_t want[] = {3, 5, 0, 23, 3, 0}; /* ▁ a <unk> b ▁ <unk> */
    cr_assert_eq(n, 6, "%lld tokens", (long long)n);
    for (int i = 0; i < 6; i++)
        cr_expect_eq(ids[i], want[i], "token %d: %d", i, ids[i]);
    /* UNK decodes to U+2585, like llama.cpp. */
    char out[64];
    int64_t m = eng_tok_decode(l.t, ids, (size_t)n, eng_tok_bos(l.t), out, sizeof(out));
    const char *back = "a\xe2\x96\x85" "b \xe2\x96\x85";
    cr_assert_eq(m, (int64_t)strlen(back));
    cr_expect_eq(memcmp(out, back, (size_t)m), 0);
    expect_roundtrip(l.t, "Once upon a time, there was a little girl named Lily.");
    unload(&l);
}

/* ---- streaming decode -------------------------------------------------- */

Test(engine_tokenizer, stream_emits_split_utf8_only_when_complete)
{
    struct loaded l = load_model("llama2-vocab/ggml-vocab-llama-spm.gguf");
    eng_tok_stream st;
    eng_tok_stream_init(&st, -1);
    char out[64];
    /* 🦙 = F0 9F A6 99 = byte tokens 243 162 169 156 (from case " this is 🦙.cpp"). */
    cr_expect_eq(eng_tok_stream_push(l.t, &st, 243, out, sizeof(out)), 0);
    cr_expect_eq(eng_tok_stream_push(l.t, &st, 162, out, sizeof(out)), 0);
    cr_expect_eq(eng_tok_stream_push(l.t, &st, 169, out, sizeof(out)), 0);
    /* No room for the completed character: refused, state untouched. */
    cr_expect_eq(eng_tok_stream_push(l.t, &st, 156, out, 3), -ENOSPC);
    cr_expect_eq(st.n_pend, 3);
    cr_expect_eq(eng_tok_stream_push(l.t, &st, 156, out, sizeof(out)), 4);
    cr_expect_eq(memcmp(out, "\xf0\x9f\xa6\x99", 4), 0);
    cr_expect_eq(eng_tok_stream_flush(l.t, &st, out, sizeof(out)), 0);

    /* A normal piece interrupting a character: U+FFFD, then the piece. */
    int32_t a = eng_tok_find(l.t, "a", 1);
    cr_assert_geq(a, 0);
    cr_expect_eq(eng_tok_stream_push(l.t, &st, 243, out, sizeof(out)), 0);
    cr_expect_eq(eng_tok_stream_push(l.t, &st, a, out, sizeof(out)), 4);
    cr_expect_eq(memcmp(out, "\xef\xbf\xbd" "a", 4), 0);
    /* E0 80: 80 is not a valid second byte after E0 → two replacements. */
    cr_expect_eq(eng_tok_stream_push(l.t, &st, 0xE0 + 3, out, sizeof(out)), 0);
    cr_expect_eq(eng_tok_stream_push(l.t, &st, 0x80 + 3, out, sizeof(out)), 6);
    cr_expect_eq(memcmp(out, "\xef\xbf\xbd\xef\xbf\xbd", 6), 0);
    /* FF is never valid. */
    cr_expect_eq(eng_tok_stream_push(l.t, &st, 0xFF + 3, out, sizeof(out)), 3);
    /* Incomplete at the end: flush gives U+FFFD once. */
    cr_expect_eq(eng_tok_stream_push(l.t, &st, 0xC3 + 3, out, sizeof(out)), 0);
    cr_expect_eq(eng_tok_stream_flush(l.t, &st, out, 2), -ENOSPC);
    cr_expect_eq(eng_tok_stream_flush(l.t, &st, out, sizeof(out)), 3);
    cr_expect_eq(memcmp(out, "\xef\xbf\xbd", 3), 0);
    cr_expect_eq(eng_tok_stream_flush(l.t, &st, out, sizeof(out)), 0);

    /* Control tokens print nothing; ids out of range are refused. */
    cr_expect_eq(eng_tok_stream_push(l.t, &st, eng_tok_eos(l.t), out, sizeof(out)), 0);
    cr_expect_eq(eng_tok_stream_push(l.t, &st, 32000, out, sizeof(out)), -EINVAL);
    cr_expect_eq(eng_tok_stream_push(l.t, &st, -1, out, sizeof(out)), -EINVAL);
    cr_expect(eng_tok_is_eog(l.t, eng_tok_eos(l.t)));
    cr_expect(!eng_tok_is_eog(l.t, eng_tok_bos(l.t)));
    cr_expect(!eng_tok_is_eog(l.t, a));
    unload(&l);
}

Test(engine_tokenizer, stream_drops_prefix_space_only_after_bos)
{
    struct loaded l = load_model("llama2-vocab/ggml-vocab-llama-spm.gguf");
    int32_t hello = eng_tok_find(l.t, "\xe2\x96\x81Hello", 8);
    cr_assert_geq(hello, 0);
    char out[64];
    eng_tok_stream st;
    eng_tok_stream_init(&st, eng_tok_bos(l.t));
    cr_expect_eq(eng_tok_stream_push(l.t, &st, hello, out, sizeof(out)), 5);
    cr_expect_eq(memcmp(out, "Hello", 5), 0);
    cr_expect_eq(eng_tok_stream_push(l.t, &st, hello, out, sizeof(out)), 6);
    cr_expect_eq(memcmp(out, " Hello", 6), 0);
    eng_tok_stream_init(&st, -1);
    cr_expect_eq(eng_tok_stream_push(l.t, &st, hello, out, sizeof(out)), 6);
    /* BOS pushed through the stream has the same effect as init with BOS. */
    cr_expect_eq(eng_tok_stream_push(l.t, &st, eng_tok_bos(l.t), out, sizeof(out)), 0);
    cr_expect_eq(eng_tok_stream_push(l.t, &st, hello, out, sizeof(out)), 5);
    /* The bound in the header holds for every token of this vocabulary. */
    size_t cap = 3 * eng_tok_max_piece_bytes(l.t) + ENG_TOK_STREAM_SLACK;
    char *big = malloc(cap);
    for (int32_t id = 0; id < eng_tok_n_vocab(l.t); id++) {
        eng_tok_stream s2;
        eng_tok_stream_init(&s2, -1);
        s2.n_pend = 1;
        s2.pend[0] = 0xF0; /* worst case: a pending prefix that the token breaks */
        cr_assert_geq(eng_tok_stream_push(l.t, &s2, id, big, cap), 0, "token %d", id);
    }
    free(big);
    unload(&l);
}

/* ---- encode API edges -------------------------------------------------- */

Test(engine_tokenizer, encode_buffer_and_empty_text)
{
    struct loaded l = load_model("stories260K/stories260K.gguf");
    int32_t ids[8];
    cr_expect_eq(eng_tok_encode(l.t, "", 0, true, ids, 8), 1);
    cr_expect_eq(ids[0], 1);
    cr_expect_eq(eng_tok_encode(l.t, "", 0, false, ids, 8), 0);
    cr_expect_eq(eng_tok_encode(l.t, NULL, 0, false, ids, 8), 0);
    cr_expect_eq(eng_tok_encode(l.t, NULL, 3, false, ids, 8), -EINVAL);
    cr_expect_eq(eng_tok_encode(l.t, "Lily and Tom", 12, true, NULL, 0), 5, "size query");
    cr_expect_eq(eng_tok_encode(l.t, "Lily and Tom", 12, true, ids, 4), -ENOSPC);
    cr_expect_eq(eng_tok_encode(l.t, "Lily and Tom", 12, true, ids, 0), -ENOSPC);
    cr_expect_eq(eng_tok_encode(l.t, "Lily and Tom", 12, true, ids, 5), 5);
    /* Worst case for the documented bound: only spaces, no ▁ piece... here
     * ▁ exists, so spaces stay one token each at most. */
    char sp[40];
    memset(sp, ' ', sizeof(sp));
    int64_t n = eng_tok_encode(l.t, sp, sizeof(sp), true, NULL, 0);
    cr_expect(n > 0 && n <= 3 * (int64_t)sizeof(sp) + 4);
    unload(&l);
}

Test(engine_tokenizer, encode_long_text_is_not_quadratic, .timeout = 30)
{
    struct loaded l = load_model("llama2-vocab/ggml-vocab-llama-spm.gguf");
    /* 512 KiB of text with no spaces in long runs: a rescanning O(n^2)
     * encoder takes hours here; the heap version well under a second. */
    size_t len = 512 * 1024;
    char *s = malloc(len);
    static const char pat[] = "abcdefghij0123456789xyz\xc3\xa9";
    for (size_t i = 0; i < len; i++)
        s[i] = pat[i % (sizeof(pat) - 1)];
    int64_t n = eng_tok_encode(l.t, s, len, false, NULL, 0);
    cr_assert_gt(n, 0, "%s", eng_error());
    cr_expect_lt(n, (int64_t)len);
    free(s);
    unload(&l);
}

/* ---- tokenizers built with the writer ---------------------------------- */

struct vocab_spec {
    const char *model;
    const char *const *tokens;
    size_t n;
    const float *scores;
    size_t n_scores;
    const int32_t *types;
    size_t n_types;
    int64_t bos; /* < -1: key absent */
    bool space_prefix_key, space_prefix;
};

static int make_tok(const struct vocab_spec *v, eng_tok **t)
{
    eng_gguf_writer *w;
    cr_assert_eq(eng_gguf_writer_create(&w, 3, 0), 0);
    if (v->model)
        cr_assert_eq(eng_gguf_writer_add_str(w, "tokenizer.ggml.model", v->model), 0);
    if (v->tokens)
        cr_assert_eq(eng_gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", v->tokens, NULL, v->n),
                     0);
    if (v->scores)
        cr_assert_eq(eng_gguf_writer_add_arr(w, "tokenizer.ggml.scores", ENG_GGUF_F32, v->scores,
                                             v->n_scores),
                     0);
    if (v->types)
        cr_assert_eq(eng_gguf_writer_add_arr(w, "tokenizer.ggml.token_type", ENG_GGUF_I32,
                                             v->types, v->n_types),
                     0);
    if (v->bos >= -1)
        cr_assert_eq(eng_gguf_writer_add_i64(w, "tokenizer.ggml.bos_token_id", v->bos), 0);
    if (v->space_prefix_key)
        cr_assert_eq(eng_gguf_writer_add_bool(w, "tokenizer.ggml.add_space_prefix", v->space_prefix),
                     0);
    void *buf;
    size_t len;
    cr_assert_eq(eng_gguf_writer_write_mem(w, &buf, &len, NULL, NULL), 0);
    eng_gguf_writer_destroy(w);
    eng_gguf *g;
    cr_assert_eq(eng_gguf_open_mem(&g, buf, len), 0, "%s", eng_error());
    int rc = eng_tok_create(t, g);
    eng_gguf_close(g); /* the tokenizer must not keep pointers into the file */
    memset(buf, 0xAB, len);
    free(buf);
    return rc;
}

static const char *const k_small[] = {"<unk>", "<s>", "</s>", "\xe2\x96\x81", "a", "b", "ab",
                                      "\xe2\x96\x81" "ab", "ba"};
static const float k_small_scores[] = {0, 0, 0, -1, -2, -3, -4, -5, -4};

Test(engine_tokenizer, writer_vocab_space_prefix_and_ties)
{
    eng_tok *t;
    struct vocab_spec v = {.model = "llama", .tokens = k_small, .n = 9, .scores = k_small_scores,
                           .n_scores = 9, .bos = -2};
    cr_assert_eq(make_tok(&v, &t), 0, "%s", eng_error());
    int32_t ids[16];
    /* "▁aba": pairs "ab" and "ba" both score -4 → leftmost ("ab") wins,
     * then "▁ab" forms; picking "ba" would have left ▁ a ba. */
    int64_t n = eng_tok_encode(t, "aba", 3, false, ids, 16);
    cr_assert_eq(n, 2);
    cr_expect_eq(ids[0], 7);
    cr_expect_eq(ids[1], 4);
    /* " ab" → ▁ + "▁ab"? No: "▁▁" is not a piece; ▁ then ▁ab. */
    n = eng_tok_encode(t, " ab", 3, false, ids, 16);
    cr_assert_eq(n, 2);
    cr_expect_eq(ids[0], 3);
    cr_expect_eq(ids[1], 7);
    /* No byte tokens: 'z' is UNK. Inferred types: 0 unknown, 1/2 control. */
    n = eng_tok_encode(t, "z", 1, true, ids, 16);
    cr_assert_eq(n, 3);
    cr_expect_eq(ids[0], 1);
    cr_expect_eq(ids[2], 0);
    cr_expect_eq(eng_tok_type(t, 0), ENG_TOK_UNKNOWN);
    cr_expect_eq(eng_tok_type(t, 1), ENG_TOK_CONTROL);
    cr_expect_eq(eng_tok_type(t, 4), ENG_TOK_NORMAL);
    eng_tok_destroy(t);

    v.space_prefix_key = true;
    v.space_prefix = false;
    cr_assert_eq(make_tok(&v, &t), 0, "%s", eng_error());
    cr_expect(!eng_tok_add_space_prefix(t));
    n = eng_tok_encode(t, "ab", 2, false, ids, 16);
    cr_assert_eq(n, 1);
    cr_expect_eq(ids[0], 6);
    eng_tok_destroy(t);
}

Test(engine_tokenizer, vocab_with_inner_space_merges_across_words)
{
    /* "a▁" has ▁ after text, so merges may cross word boundaries and the
     * encoder must not treat words independently. */
    static const char *const toks[] = {"<unk>", "<s>", "</s>", "\xe2\x96\x81", "a", "b",
                                       "a\xe2\x96\x81", "a\xe2\x96\x81" "b"};
    static const float scores[] = {0, 0, 0, -1, -2, -3, -6, -7};
    struct vocab_spec v = {.model = "llama", .tokens = toks, .n = 8, .scores = scores,
                           .n_scores = 8, .bos = -2};
    eng_tok *t;
    cr_assert_eq(make_tok(&v, &t), 0, "%s", eng_error());
    int32_t ids[16];
    int64_t n = eng_tok_encode(t, "a b", 3, false, ids, 16);
    cr_assert_eq(n, 2, "%lld tokens", (long long)n);
    cr_expect_eq(ids[0], 3);
    cr_expect_eq(ids[1], 7);
    expect_same_as_naive(t, "a b a  b ab", 11);
    eng_tok_destroy(t);
}

Test(engine_tokenizer, reject_malformed_metadata)
{
    eng_tok *t = NULL;
    struct vocab_spec v = {.model = "gpt2", .tokens = k_small, .n = 9, .bos = -2};
    cr_expect_eq(make_tok(&v, &t), -EBADMSG);
    cr_expect(strstr(eng_error(), "gpt2") != NULL, "%s", eng_error());
    v.model = NULL;
    cr_expect_eq(make_tok(&v, &t), -ENOENT);
    cr_expect(strstr(eng_error(), "no tokenizer") != NULL, "%s", eng_error());
    v.model = "llama";
    v.tokens = NULL;
    cr_expect_eq(make_tok(&v, &t), -EBADMSG);
    cr_expect(strstr(eng_error(), "tokens") != NULL, "%s", eng_error());
    v.tokens = k_small;
    v.scores = k_small_scores;
    v.n_scores = 3;
    cr_expect_eq(make_tok(&v, &t), -EBADMSG);
    cr_expect(strstr(eng_error(), "scores") != NULL, "%s", eng_error());
    v.scores = NULL;
    static const int32_t bad_types[] = {2, 3, 3, 1, 1, 1, 1, 1, 9};
    v.types = bad_types;
    v.n_types = 9;
    cr_expect_eq(make_tok(&v, &t), -EBADMSG);
    cr_expect(strstr(eng_error(), "token_type") != NULL, "%s", eng_error());
    static const int32_t byte_types[] = {2, 3, 3, 1, 6, 1, 1, 1, 1}; /* "a" is not <0xXX> */
    v.types = byte_types;
    cr_expect_eq(make_tok(&v, &t), -EBADMSG);
    cr_expect(strstr(eng_error(), "byte token 4") != NULL, "%s", eng_error());
    v.types = NULL;
    v.bos = 9;
    cr_expect_eq(make_tok(&v, &t), -EBADMSG);
    cr_expect(strstr(eng_error(), "bos_token_id") != NULL, "%s", eng_error());
    v.bos = -1; /* conventional "none" */
    cr_assert_eq(make_tok(&v, &t), 0, "%s", eng_error());
    cr_expect_eq(eng_tok_bos(t), -1);
    int32_t ids[4];
    cr_expect_eq(eng_tok_encode(t, "a", 1, true, ids, 4), 2, "no BOS to add");
    eng_tok_destroy(t);
    eng_tok_destroy(NULL);
}
