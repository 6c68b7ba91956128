/* Model info and gorgond's tokenizer through libgorgon: what gorgon_model_info,
 * gorgon_tokenize and gorgon_detokenize return equals what the engine reads
 * from the same GGUF; a chat template longer than a slot's output arrives
 * whole; bad ids and small buffers are refused with a reason. */
#include <criterion/criterion.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "clients/gorgon.h"
#include "engine/model/gguf.h"
#include "engine/model/tokenizer.h"
#include "tests/clients/util/gd_proc.h"
#include "tests/util/test_models.h"

static gd_proc gd;
static char model[PATH_MAX];
static char tmpdir[64];

static void teardown(void)
{
    gd_stop(&gd);
    if (tmpdir[0]) {
        char p[128];
        snprintf(p, sizeof(p), "%s/m.gguf", tmpdir);
        unlink(p);
        snprintf(p, sizeof(p), "%s/t.jinja", tmpdir);
        unlink(p);
        rmdir(tmpdir);
        tmpdir[0] = '\0';
    }
}

static void start(const char *path, const char *a, const char *b)
{
    int rc = gd_start(&gd, "--model", path, a, b, NULL);
    if (rc == -ENOENT)
        cr_skip_test("gorgond not built: run `make build/bin/gorgond`");
    cr_assert_eq(rc, 0, "gorgond did not start: %s", strerror(-rc));
}

Test(appliance_model_info, info_and_tokens_match_the_engine, .fini = teardown, .timeout = 30)
{
    snprintf(model, sizeof(model), "%s", tu_model_path("stories260K/stories260K.gguf"));
    eng_gguf *g;
    cr_assert_eq(eng_gguf_open(&g, model), 0);
    eng_tok *tok;
    cr_assert_eq(eng_tok_create(&tok, g), 0);
    uint32_t n_ctx = 0;
    cr_assert_eq(eng_gguf_get_u32(g, "llama.context_length", &n_ctx), 0);
    const char *gname = NULL;
    size_t gname_len = 0;
    bool has_name = eng_gguf_get_str(g, "general.name", &gname, &gname_len) == 0 && gname_len;
    char want_name[128];
    snprintf(want_name, sizeof(want_name), "%.*s", has_name ? (int)gname_len : 11,
             has_name ? gname : "stories260K");

    start(model, NULL, NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    gorgon_model mi;
    cr_assert_eq(gorgon_model_info(cli, &mi), 0, "%s", gorgon_last_error(cli));
    cr_assert_str_eq(mi.name, want_name);
    cr_assert_eq(mi.n_ctx, n_ctx);
    cr_assert_eq(mi.n_vocab, (uint32_t)eng_tok_n_vocab(tok));
    cr_assert_eq(mi.bos, eng_tok_bos(tok));
    cr_assert_eq(mi.eos, eng_tok_eos(tok));
    cr_assert_str_eq(mi.chat_template, "", "stories260K has no chat template");

    const char *text = "Once upon a time, Lily and Tom";
    int32_t want[64], got[64];
    int64_t nw = eng_tok_encode(tok, text, strlen(text), true, want, 64);
    cr_assert_gt(nw, 2);
    int n = gorgon_tokenize(cli, text, strlen(text), GORGON_TOK_ADD_BOS, got, 64);
    cr_assert_eq(n, nw, "tokenize: %d (%s)", n, gorgon_last_error(cli));
    cr_assert_eq(memcmp(got, want, (size_t)n * sizeof(int32_t)), 0);
    cr_assert_eq(got[0], mi.bos);
    n = gorgon_tokenize(cli, text, strlen(text), 0, got, 64);
    cr_assert_eq(n, nw - 1, "without BOS: %d ids", n);
    cr_assert_eq(gorgon_tokenize(cli, text, strlen(text), 0, got, 2), -ENOSPC);

    char back[256];
    n = gorgon_detokenize(cli, want, (size_t)nw, back, sizeof(back));
    cr_assert_eq(n, (int)strlen(text), "detokenize: %d (%s)", n, gorgon_last_error(cli));
    cr_assert_str_eq(back, text);
    cr_assert_eq(gorgon_detokenize(cli, want, (size_t)nw, back, 4), -ENOSPC);
    int32_t bad[3] = {want[0], 99999, want[1]};
    cr_assert_eq(gorgon_detokenize(cli, bad, 3, back, sizeof(back)), -EINVAL);
    cr_assert(strstr(gorgon_last_error(cli), "99999"), "reason: '%s'", gorgon_last_error(cli));
    gorgon_close(cli);
    eng_tok_destroy(tok);
    eng_gguf_close(g);
    GD_END(&gd);
}

Test(appliance_model_info, long_chat_template_arrives_whole, .fini = teardown, .timeout = 60)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/gorgon-mi-XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir));
    /* 5,000 bytes of template, read through 256-byte slot outputs: 52
     * round trips, each continuing where the last stopped. */
    static char tmpl[5001];
    for (int i = 0; i < 5000; i++)
        tmpl[i] = (char)('a' + (i * 7 + i / 26) % 26);
    memcpy(tmpl, "{% for m in messages %}", 23);
    tmpl[5000] = '\0';
    char tpath[128], mpath[128];
    snprintf(tpath, sizeof(tpath), "%s/t.jinja", tmpdir);
    snprintf(mpath, sizeof(mpath), "%s/m.gguf", tmpdir);
    FILE *f = fopen(tpath, "w");
    cr_assert_not_null(f);
    cr_assert_eq(fwrite(tmpl, 1, 5000, f), 5000);
    fclose(f);
    char mk[PATH_MAX]; /* gorgon-mkmodel beside gorgond */
    cr_assert_eq(gd_find_binary(mk, sizeof(mk)), 0, "gorgond not built");
    char *slash = strrchr(mk, '/');
    cr_assert_not_null(slash);
    snprintf(slash + 1, sizeof(mk) - (size_t)(slash + 1 - mk), "gorgon-mkmodel");
    const char *argv[] = {mk, "--out", mpath, "--preset", "tiny", "--chat-template", tpath, NULL};
    char errs[512];
    int st = gd_run_stderr(argv, false, errs, sizeof(errs));
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "gorgon-mkmodel: %s", errs);

    start(mpath, "--slot-out-bytes", "256");
    gorgon_client *cli = gd_connect(&gd, 0);
    gorgon_model mi;
    cr_assert_eq(gorgon_model_info(cli, &mi), 0, "%s", gorgon_last_error(cli));
    cr_assert_eq(strlen(mi.chat_template), 5000);
    cr_assert_str_eq(mi.chat_template, tmpl);
    cr_assert_str_eq(mi.name, "gorgon-mkmodel tiny f32");
    gorgon_close(cli);
    GD_END(&gd);
}

Test(appliance_model_info, no_model_is_enotsup, .fini = teardown, .timeout = 30)
{
    int rc = gd_start(&gd, NULL);
    if (rc == -ENOENT)
        cr_skip_test("gorgond not built: run `make build/bin/gorgond`");
    cr_assert_eq(rc, 0);
    gorgon_client *cli = gd_connect(&gd, 0);
    gorgon_model mi;
    cr_assert_eq(gorgon_model_info(cli, &mi), -ENOTSUP);
    cr_assert(strstr(gorgon_last_error(cli), "--model"), "'%s'", gorgon_last_error(cli));
    int32_t ids[4];
    cr_assert_eq(gorgon_tokenize(cli, "x", 1, 0, ids, 4), -ENOTSUP);
    gorgon_close(cli);
    GD_END(&gd);
}
