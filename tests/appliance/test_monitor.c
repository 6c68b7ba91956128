/* Reading streams as the header's example does: gorgon_stats and
 * gorgon_ping on a client that has generations streaming, between their
 * chunks (the round trips get their answers and every stream arrives whole
 * and in order), and the final chunk carrying no text, so that a loop over
 * `gorgon_generate_next(...) == 1` prints everything. */
#include <criterion/criterion.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "clients/gorgon.h"
#include "tests/appliance/util/ap_test.h"
#include "tests/clients/util/gd_proc.h"
#include "tests/util/test_models.h"

static gd_proc gd;

static void teardown(void)
{
    gd_stop(&gd);
}

Test(appliance_monitor, stats_and_ping_between_stream_chunks, .fini = teardown, .timeout = 60)
{
    static char model[PATH_MAX];
    snprintf(model, sizeof(model), "%s", tu_model_path("stories260K/stories260K.gguf"));
    int rc = gd_start(&gd, "--model", model, NULL);
    if (rc == -ENOENT)
        cr_skip_test("gorgond not built: run `make build/bin/gorgond`");
    cr_assert_eq(rc, 0, "gorgond did not start: %s", strerror(-rc));
    gorgon_client *cli = gd_connect(&gd, 0);
    gorgon_gen_params p[2] = {{.prompt = "Once upon a time", .max_tokens = 200},
                              {.prompt = "Lily and Tom", .max_tokens = 200}};
    static char ref[2][8192], got[2][8192];
    char err[256];
    for (int i = 0; i < 2; i++) {
        uint32_t r;
        cr_assert_eq(gorgon_generate_submit(cli, &p[i], 0, &r), 0);
        cr_assert_eq(ap_drain(cli, r, ref[i], sizeof(ref[i]), err, sizeof(err), 30000000000ll),
                     0, "%s", err);
    }

    uint32_t r[2];
    size_t n[2] = {0, 0};
    bool done[2] = {false, false};
    for (int i = 0; i < 2; i++)
        cr_assert_eq(gorgon_generate_submit(cli, &p[i], (uint64_t)i, &r[i]), 0);
    int rounds = 0;
    while (!done[0] || !done[1]) {
        for (int i = 0; i < 2; i++) {
            if (done[i])
                continue;
            gorgon_gen_chunk ch;
            rc = gorgon_generate_next(cli, r[i], &ch, 30000000000ll);
            cr_assert_geq(rc, 0, "stream %d: %s", i, gorgon_strerror(rc));
            cr_assert_lt(n[i] + ch.len, sizeof(got[i]));
            memcpy(got[i] + n[i], ch.text, ch.len);
            n[i] += ch.len;
            done[i] = rc == 0;
        }
        if (done[0] && done[1])
            break;
        gorgon_counters st;
        rc = gorgon_stats(cli, &st);
        cr_assert_eq(rc, 0, "gorgon_stats mid-stream: %s", gorgon_strerror(rc));
        /* (the streams may be over on gorgond's side, their last chunks
         * still unread here: only what cannot change is checked) */
        cr_assert_eq(st.gen_requests_total, 4);
        cr_assert_eq(gorgon_ping(cli, "busy?", 5, 2000000000, NULL), 5, "ping mid-stream");
        rounds++;
    }
    cr_assert_gt(rounds, 2, "too few round trips interleaved (%d)", rounds);
    for (int i = 0; i < 2; i++) {
        got[i][n[i]] = '\0';
        cr_assert_str_eq(got[i], ref[i], "stream %d changed by the round trips", i);
    }
    gorgon_close(cli);
    GD_END(&gd);
}

Test(appliance_monitor, final_chunk_has_no_text, .fini = teardown, .timeout = 60)
{
    static char model[PATH_MAX];
    snprintf(model, sizeof(model), "%s", tu_model_path("stories260K/stories260K.gguf"));
    int rc = gd_start(&gd, "--model", model, NULL);
    if (rc == -ENOENT)
        cr_skip_test("gorgond not built: run `make build/bin/gorgond`");
    cr_assert_eq(rc, 0);
    gorgon_client *cli = gd_connect(&gd, 0);
    /* One token, and a stop string that ends the text early: gorgond puts
     * all of such a short completion into its final completion. */
    const char *stop[] = {"girl"};
    gorgon_gen_params cases[2] = {
        {.prompt = "Once upon a time", .max_tokens = 1},
        {.prompt = "Once upon a time", .max_tokens = 64, .stop = stop, .n_stop = 1},
    };
    for (int i = 0; i < 2; i++) {
        uint32_t r;
        cr_assert_eq(gorgon_generate_submit(cli, &cases[i], 0, &r), 0);
        gorgon_gen_chunk ch;
        char text[4096];
        size_t n = 0;
        while ((rc = gorgon_generate_next(cli, r, &ch, 30000000000ll)) == 1) {
            cr_assert_lt(n + ch.len, sizeof(text));
            memcpy(text + n, ch.text, ch.len);
            n += ch.len;
        }
        cr_assert_eq(rc, 0, "case %d: %.*s", i, (int)ch.len, ch.text);
        cr_assert_eq(ch.len, 0, "case %d: the final chunk carries %zu bytes of text", i, ch.len);
        cr_assert_gt(n, 0, "case %d: the loop printed nothing", i);
        text[n] = '\0';
        if (i == 0)
            cr_assert_eq(ch.usage.completion_tokens, 1);
        else
            cr_assert(ch.finish == GORGON_FINISH_STOP && strstr(text, "there was a little"),
                      "case 1: finish %d, text '%s'", ch.finish, text);
    }
    gorgon_close(cli);
    GD_END(&gd);
}
