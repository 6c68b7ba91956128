/* Medusa head loader over synthetic checkpoints written with eng_st_write():
 * head count from the keys (not config.json), shapes against H and V, and
 * every malformed layout rejected with a message naming the tensor. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_log.h"
#include "engine/model/eng_err.h"
#include "engine/medusa/medusa_heads.h"
#include "engine/model/safetensors.h"

#define H 8
#define V 16
#define MAXT 32

static char g_dir[64];

static void mk_dir(void)
{
    snprintf(g_dir, sizeof(g_dir), "/tmp/gorgon-mh-XXXXXX");
    cr_assert_not_null(mkdtemp(g_dir));
}

static void rm_dir(void)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", g_dir);
    cr_expect_eq(system(cmd), 0);
}

TestSuite(engine_medusa_heads, .init = mk_dir, .fini = rm_dir, .timeout = 20);

/* A checkpoint under construction: tensors with owned names and data. */
struct ckpt {
    struct eng_st_tensor t[MAXT];
    char names[MAXT][48];
    int n;
};

static void add(struct ckpt *c, const char *name, enum kn_dtype dt, int64_t d0, int64_t d1,
                float base)
{
    cr_assert_lt(c->n, MAXT);
    struct eng_st_tensor *t = &c->t[c->n];
    snprintf(c->names[c->n], sizeof(c->names[0]), "%s", name);
    int64_t ne = d1 ? d0 * d1 : d0;
    size_t es = eng_st_dtype_size(dt);
    void *data = malloc((size_t)ne * es);
    cr_assert_not_null(data);
    for (int64_t i = 0; i < ne; i++) {
        float v = base + (float)i * 0.5f;
        if (dt == KN_F32)
            ((float *)data)[i] = v;
        else if (dt == KN_F16)
            ((uint16_t *)data)[i] = kn_f32_to_f16(v);
        else
            ((uint16_t *)data)[i] = kn_f32_to_bf16(v);
    }
    *t = (struct eng_st_tensor){.name = c->names[c->n], .dtype = dt, .n_dims = d1 ? 2 : 1,
                                .shape = {d0, d1}, .data = data, .nbytes = (size_t)ne * es};
    c->n++;
}

static void add_head(struct ckpt *c, int i, enum kn_dtype w_dt, enum kn_dtype b_dt)
{
    char name[48];
    snprintf(name, sizeof(name), "%d.0.linear.weight", i);
    add(c, name, w_dt, H, H, (float)(100 * i));
    snprintf(name, sizeof(name), "%d.0.linear.bias", i);
    add(c, name, b_dt, H, 0, (float)(100 * i + 50));
    snprintf(name, sizeof(name), "%d.1.weight", i);
    add(c, name, w_dt, V, H, (float)(-100 * i));
}

static void save(struct ckpt *c, const char *config)
{
    char path[128];
    snprintf(path, sizeof(path), "%s/" ENG_MEDUSA_HEADS_FILE, g_dir);
    cr_assert_eq(eng_st_write(path, c->t, c->n, NULL, 0), 0, "%s", eng_error());
    for (int i = 0; i < c->n; i++)
        free((void *)c->t[i].data);
    c->n = 0;
    snprintf(path, sizeof(path), "%s/" ENG_MEDUSA_CONFIG_FILE, g_dir);
    if (config) {
        FILE *f = fopen(path, "w");
        cr_assert_not_null(f);
        fputs(config, f);
        fclose(f);
    } else {
        remove(path);
    }
}

static char g_log[1024];

static void capture(void *ctx, enum cm_log_level lvl, const char *tag, const char *msg)
{
    (void)ctx;
    (void)lvl;
    snprintf(g_log + strlen(g_log), sizeof(g_log) - strlen(g_log), "%s: %s\n", tag, msg);
}

Test(engine_medusa_heads, counts_heads_from_keys_not_config)
{
    struct ckpt c = {0};
    for (int i = 0; i < 3; i++)
        add_head(&c, i, KN_F32, KN_F32);
    save(&c, "{\"medusa_num_heads\": 5, \"medusa_num_layers\": 1, \"base_model_name_or_path\": "
             "\"lmsys/vicuna-7b-v1.3\", \"transformers_version\": \"4.33\"}");
    g_log[0] = '\0';
    cm_log_set_sink(capture, NULL);
    eng_medusa_heads *mh;
    int rc = eng_medusa_heads_open(&mh, g_dir, H, V);
    cm_log_set_sink(NULL, NULL);
    cr_assert_eq(rc, 0, "%s", eng_error());
    cr_expect_eq(eng_medusa_heads_count(mh), 3);
    cr_expect(strstr(g_log, "medusa_num_heads = 5") && strstr(g_log, "3 heads"),
              "the disagreement must be warned about: '%s'", g_log);
    const eng_medusa_config *cfg = eng_medusa_heads_config(mh);
    cr_expect_eq(cfg->present, 1);
    cr_expect_eq(cfg->num_heads, 5);
    cr_expect_eq(cfg->num_layers, 1);
    cr_expect_str_eq(cfg->base_model, "lmsys/vicuna-7b-v1.3");
    cr_expect_eq(eng_medusa_heads_hidden(mh), H);
    cr_expect_eq(eng_medusa_heads_vocab(mh), V);
    for (int i = 0; i < 3; i++) {
        const eng_medusa_head *h = eng_medusa_heads_get(mh, i);
        cr_assert_not_null(h);
        cr_expect_eq(h->w.rows, H);
        cr_expect_eq(h->w.cols, H);
        cr_expect_eq(h->w.type, KN_F32);
        cr_expect_eq(h->lm_head.rows, V);
        cr_expect_eq(h->lm_head.cols, H);
        /* row-major [out, in]: element (r, c) is at r * H + c */
        cr_expect_eq(((const float *)h->w.data)[2 * H + 3], 100.0f * i + (2 * H + 3) * 0.5f);
        cr_expect_eq(((const float *)h->lm_head.data)[V * H - 1], -100.0f * i + (V * H - 1) * 0.5f);
        cr_expect_eq(h->bias[H - 1], 100.0f * i + 50 + (H - 1) * 0.5f);
    }
    cr_expect_null(eng_medusa_heads_get(mh, 3));
    cr_expect_null(eng_medusa_heads_get(mh, -1));
    eng_medusa_heads_close(mh);
}

Test(engine_medusa_heads, converts_half_bias_and_keeps_half_weights)
{
    struct ckpt c = {0};
    add_head(&c, 0, KN_BF16, KN_F16);
    add_head(&c, 1, KN_F16, KN_BF16);
    save(&c, NULL); /* no config.json: allowed */
    eng_medusa_heads *mh;
    cr_assert_eq(eng_medusa_heads_open(&mh, g_dir, 0, 0), 0, "%s", eng_error());
    cr_expect_eq(eng_medusa_heads_count(mh), 2);
    cr_expect_eq(eng_medusa_heads_hidden(mh), H, "taken from head 0 when not given");
    cr_expect_eq(eng_medusa_heads_vocab(mh), V);
    cr_expect_eq(eng_medusa_heads_config(mh)->present, 0);
    cr_expect_eq(eng_medusa_heads_config(mh)->num_heads, -1);
    const eng_medusa_head *h0 = eng_medusa_heads_get(mh, 0), *h1 = eng_medusa_heads_get(mh, 1);
    cr_expect_eq(h0->w.type, KN_BF16);
    cr_expect_eq(h0->lm_head.type, KN_BF16);
    cr_expect_eq(h1->w.type, KN_F16);
    for (int i = 0; i < H; i++) {
        cr_expect_eq(h0->bias[i], 50.0f + i * 0.5f);
        /* BF16 keeps 8 mantissa bits: compare with the rounded value */
        cr_expect_eq(h1->bias[i], kn_bf16_to_f32(kn_f32_to_bf16(150.0f + i * 0.5f)));
    }
    cr_expect_eq(kn_bf16_to_f32(((const uint16_t *)h0->w.data)[1]), 0.5f);
    eng_medusa_heads_close(mh);
}

static void expect_open_fails(int64_t hidden, int64_t vocab, int want, const char *needle)
{
    eng_medusa_heads *mh = (eng_medusa_heads *)0x1;
    eng_error_clear();
    int rc = eng_medusa_heads_open(&mh, g_dir, hidden, vocab);
    cr_expect_eq(rc, want, "rc %d (%s)", rc, eng_error());
    cr_expect_eq(mh, (eng_medusa_heads *)0x1);
    cr_expect(strstr(eng_error(), needle), "message '%s' lacks '%s'", eng_error(), needle);
}

Test(engine_medusa_heads, rejects_shape_mismatches)
{
    struct ckpt c = {0};
    for (int i = 0; i < 3; i++)
        add_head(&c, i, KN_F32, KN_F32);
    save(&c, "{}");
    expect_open_fails(H * 2, V, -EBADMSG, "'0.0.linear.weight' has shape [8, 8], expected [16, 16]");
    expect_open_fails(H, V + 1, -EBADMSG, "'0.1.weight' has shape [16, 8], expected [17, 8]");

    add(&c, "0.0.linear.weight", KN_F32, H, H, 0);
    add(&c, "0.0.linear.bias", KN_F32, H, 0, 0);
    add(&c, "0.1.weight", KN_F32, V, H, 0);
    add(&c, "1.0.linear.weight", KN_F32, H, H - 1, 0);
    add(&c, "1.0.linear.bias", KN_F32, H, 0, 0);
    add(&c, "1.1.weight", KN_F32, V, H, 0);
    save(&c, "{}");
    expect_open_fails(0, 0, -EBADMSG, "'1.0.linear.weight' has shape [8, 7]");

    add(&c, "0.0.linear.weight", KN_F32, H, H, 0);
    add(&c, "0.0.linear.bias", KN_F32, H, H, 0);
    add(&c, "0.1.weight", KN_F32, V, H, 0);
    save(&c, "{}");
    expect_open_fails(H, V, -EBADMSG, "'0.0.linear.bias' has shape [8, 8], expected [8]");
}

Test(engine_medusa_heads, rejects_missing_and_unexpected_tensors)
{
    struct ckpt c = {0};
    add_head(&c, 0, KN_F32, KN_F32);
    add_head(&c, 2, KN_F32, KN_F32);
    save(&c, "{}");
    expect_open_fails(H, V, -EBADMSG, "head 1: tensor '1.0.linear.weight' is missing");

    add_head(&c, 0, KN_F32, KN_F32);
    add(&c, "1.0.linear.weight", KN_F32, H, H, 0);
    add(&c, "1.1.weight", KN_F32, V, H, 0);
    save(&c, "{}");
    expect_open_fails(H, V, -EBADMSG, "'1.0.linear.bias' is missing");

    add_head(&c, 0, KN_F32, KN_F32);
    add(&c, "0.1.linear.weight", KN_F32, H, H, 0);
    save(&c, "{}");
    expect_open_fails(H, V, -EBADMSG, "medusa_num_layers > 1");

    add_head(&c, 0, KN_F32, KN_F32);
    add(&c, "0.1.bias", KN_F32, V, 0, 0);
    save(&c, "{}");
    expect_open_fails(H, V, -EBADMSG, "unexpected tensor '0.1.bias'");

    add_head(&c, 0, KN_F32, KN_F32);
    add(&c, "01.1.weight", KN_F32, V, H, 0);
    save(&c, "{}");
    expect_open_fails(H, V, -EBADMSG, "unexpected tensor '01.1.weight'");

    add(&c, "lm_head.weight", KN_F32, V, H, 0);
    save(&c, "{}");
    expect_open_fails(H, V, -EBADMSG, "unexpected tensor 'lm_head.weight'");

    add(&c, "99.1.weight", KN_F32, V, H, 0);
    save(&c, "{}");
    expect_open_fails(H, V, -EBADMSG, "at most 32 heads");
}

Test(engine_medusa_heads, rejects_bad_config_and_missing_file)
{
    struct ckpt c = {0};
    add_head(&c, 0, KN_F32, KN_F32);
    save(&c, "{\"medusa_num_heads\": \"five\"}");
    expect_open_fails(H, V, -EBADMSG, "config.json: medusa_num_heads is not a non-negative integer");
    save(&c, "{\"medusa_num_heads\": 1, \"medusa_num_heads\": 2}");
    expect_open_fails(H, V, -EBADMSG, "duplicate");
    save(&c, "{\"base_model_name_or_path\": 3}");
    expect_open_fails(H, V, -EBADMSG, "base_model_name_or_path");
    save(&c, "not json");
    expect_open_fails(H, V, -EBADMSG, "config.json: bad JSON");

    /* save() has consumed the tensors: from here on it writes an empty
     * checkpoint. */
    save(&c, "{}");
    expect_open_fails(H, V, -EBADMSG, "no Medusa head tensors");
    char path[128];
    snprintf(path, sizeof(path), "%s/" ENG_MEDUSA_HEADS_FILE, g_dir);
    cr_assert_eq(remove(path), 0);
    expect_open_fails(H, V, -ENOENT, ENG_MEDUSA_HEADS_FILE);
}

Test(engine_medusa_heads, parses_config_text)
{
    eng_medusa_config cfg;
    cr_assert_eq(eng_medusa_config_parse(&cfg, "{\"medusa_num_layers\": 2, "
                                               "\"base_model_name_or_path\": null}",
                                         strlen("{\"medusa_num_layers\": 2, "
                                                "\"base_model_name_or_path\": null}")),
                 0);
    cr_expect_eq(cfg.present, 1);
    cr_expect_eq(cfg.num_heads, -1);
    cr_expect_eq(cfg.num_layers, 2);
    cr_expect_str_eq(cfg.base_model, "");
    cr_expect_eq(eng_medusa_config_parse(&cfg, "[1]", 3), -EBADMSG);
    const char *neg = "{\"medusa_num_heads\": -1}";
    cr_expect_eq(eng_medusa_config_parse(&cfg, neg, strlen(neg)), -EBADMSG);
}

/* What eng_medusa_heads_write writes opens as the same heads, and the base
 * model's name survives JSON quoting. */
Test(engine_medusa_heads, write_round_trips_weights_and_config)
{
    enum { K = 2, HH = 4, VV = 6 };
    static float w[K][HH * HH], b[K][HH], lm[K][VV * HH];
    const float *ws[K], *bs[K], *lms[K];
    for (int k = 0; k < K; k++) {
        for (int i = 0; i < HH * HH; i++)
            w[k][i] = (float)(k * 100 + i) * 0.25f;
        for (int i = 0; i < HH; i++)
            b[k][i] = -(float)(k + i);
        for (int i = 0; i < VV * HH; i++)
            lm[k][i] = (float)(i % 7) - (float)k;
        ws[k] = w[k], bs[k] = b[k], lms[k] = lm[k];
    }
    char dir[96];
    snprintf(dir, sizeof(dir), "%s/written", g_dir);
    const char *name = "odd \"name\"\\x.gguf";
    cr_assert_eq(eng_medusa_heads_write(dir, K, HH, VV, ws, bs, lms, name), 0, "%s",
                 eng_error());
    eng_medusa_heads *mh = NULL;
    cr_assert_eq(eng_medusa_heads_open(&mh, dir, HH, VV), 0, "%s", eng_error());
    cr_assert_eq(eng_medusa_heads_count(mh), K);
    const eng_medusa_config *cfg = eng_medusa_heads_config(mh);
    cr_assert_eq(cfg->num_heads, K);
    cr_assert_eq(cfg->num_layers, 1);
    cr_assert_str_eq(cfg->base_model, name);
    for (int k = 0; k < K; k++) {
        const eng_medusa_head *hd = eng_medusa_heads_get(mh, k);
        cr_assert_eq(hd->w.type, KN_F32);
        cr_assert_eq(memcmp(hd->w.data, w[k], sizeof(w[k])), 0, "head %d weight", k);
        cr_assert_eq(memcmp(hd->bias, b[k], sizeof(b[k])), 0, "head %d bias", k);
        cr_assert_eq(memcmp(hd->lm_head.data, lm[k], sizeof(lm[k])), 0, "head %d projection", k);
    }
    eng_medusa_heads_close(mh);
    cr_assert_eq(eng_medusa_heads_write(dir, 0, HH, VV, ws, bs, lms, NULL), -EINVAL);
}
