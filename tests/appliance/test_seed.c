/* Seeds through libgorgon: a sampled request without a seed draws a random
 * one (two runs differ), reports it in the usage, and passing it back
 * reproduces the text; an explicit seed is used and reported as given. */
#include <criterion/criterion.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "clients/gorgon.h"
#include "tests/clients/util/gd_proc.h"
#include "tests/util/test_models.h"

static gd_proc gd;

static void teardown(void)
{
    gd_stop(&gd);
}

/* Run p to its end: text into buf, the final usage into *u. */
static void run(gorgon_client *cli, const gorgon_gen_params *p, char *buf, size_t cap,
                gorgon_gen_usage *u)
{
    uint32_t r;
    cr_assert_eq(gorgon_generate_submit(cli, p, 0, &r), 0);
    size_t n = 0;
    gorgon_gen_chunk ch;
    int rc;
    while ((rc = gorgon_generate_next(cli, r, &ch, 30000000000ll)) == 1) {
        cr_assert_lt(n + ch.len, cap);
        memcpy(buf + n, ch.text, ch.len);
        n += ch.len;
    }
    cr_assert_eq(rc, 0, "generation failed: %.*s", (int)ch.len, ch.text);
    cr_assert_lt(n + ch.len, cap);
    memcpy(buf + n, ch.text, ch.len);
    buf[n + ch.len] = '\0';
    *u = ch.usage;
}

Test(appliance_seed, unseeded_sampling_is_random_and_reproducible, .fini = teardown,
     .timeout = 60)
{
    static char model[PATH_MAX];
    snprintf(model, sizeof(model), "%s", tu_model_path("stories260K/stories260K.gguf"));
    int rc = gd_start(&gd, "--model", model, NULL);
    if (rc == -ENOENT)
        cr_skip_test("gorgond not built: run `make build/bin/gorgond`");
    cr_assert_eq(rc, 0);
    gorgon_client *cli = gd_connect(&gd, 0);
    static char a[8192], b[8192], c[8192];
    gorgon_gen_usage ua, ub, uc;
    gorgon_gen_params p = {.prompt = "Once upon a time", .max_tokens = 64, .temperature = 1.0f};
    run(cli, &p, a, sizeof(a), &ua);
    run(cli, &p, b, sizeof(b), &ub);
    cr_assert_neq(ua.seed, 0, "a sampled request without a seed reports the seed it drew");
    cr_assert_neq(ua.seed, ub.seed, "two unseeded requests drew the same seed");
    /* 64 tokens at temperature 1: equal texts would mean the seeds did not
     * reach the sampler. */
    cr_assert_str_neq(a, b, "two unseeded sampled runs gave the same text");
    gorgon_gen_params again = p;
    again.seed = ua.seed;
    run(cli, &again, c, sizeof(c), &uc);
    cr_assert_eq(uc.seed, ua.seed);
    cr_assert_str_eq(c, a, "the reported seed does not reproduce the text");

    p.seed = 133742;
    run(cli, &p, c, sizeof(c), &uc);
    cr_assert_eq(uc.seed, 133742);
    gorgon_gen_params greedy = {.prompt = "Once upon a time", .max_tokens = 8};
    run(cli, &greedy, c, sizeof(c), &uc);
    cr_assert_eq(uc.seed, 0, "greedy without a seed reports none");
    gorgon_close(cli);
    GD_END(&gd);
}
