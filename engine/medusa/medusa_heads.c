/* Medusa head loader: names and shapes are validated here, the file format
 * itself by engine/model/safetensors.c. */
#include "engine/medusa/medusa_heads.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/cm_err.h"
#include "common/cm_log.h"
#include "engine/model/eng_err.h"
#include "engine/model/safetensors.h"

#define TAG "medusa"
#define CONFIG_MAX_BYTES (1 << 20) /* a Medusa config.json is a few hundred bytes */

enum { K_W, K_B, K_LM, K_COUNT };
static const char *const KIND_SUFFIX[K_COUNT] = {".0.linear.weight", ".0.linear.bias",
                                                 ".1.weight"};

struct eng_medusa_heads {
    eng_st *st;
    int n;
    int64_t hidden, vocab;
    eng_medusa_head heads[ENG_MEDUSA_MAX_HEADS];
    float *owned_bias[ENG_MEDUSA_MAX_HEADS];
    eng_medusa_config cfg;
};

int eng_medusa_heads_count(const eng_medusa_heads *mh)
{
    return mh ? mh->n : 0;
}

const eng_medusa_head *eng_medusa_heads_get(const eng_medusa_heads *mh, int i)
{
    if (!mh || i < 0 || i >= mh->n)
        return NULL;
    return &mh->heads[i];
}

int64_t eng_medusa_heads_hidden(const eng_medusa_heads *mh)
{
    return mh ? mh->hidden : 0;
}

int64_t eng_medusa_heads_vocab(const eng_medusa_heads *mh)
{
    return mh ? mh->vocab : 0;
}

const eng_medusa_config *eng_medusa_heads_config(const eng_medusa_heads *mh)
{
    return mh ? &mh->cfg : NULL;
}

void eng_medusa_heads_close(eng_medusa_heads *mh)
{
    if (!mh)
        return;
    for (int i = 0; i < ENG_MEDUSA_MAX_HEADS; i++)
        free(mh->owned_bias[i]);
    eng_st_close(mh->st);
    free(mh);
}

/* ---- config.json -------------------------------------------------------- */

static int cfg_int(json_t *root, const char *key, int *out)
{
    json_t *v = json_object_get(root, key);
    if (!v)
        return 0;
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT_MAX)
        return eng_fail(-EBADMSG, "config.json: %s is not a non-negative integer", key);
    *out = (int)json_integer_value(v);
    return 0;
}

int eng_medusa_config_parse(eng_medusa_config *cfg, const char *text, size_t len)
{
    if (!cfg || (!text && len))
        return eng_fail(-EINVAL, "eng_medusa_config_parse: NULL argument");
    memset(cfg, 0, sizeof(*cfg));
    cfg->num_heads = -1;
    cfg->num_layers = -1;
    json_error_t jerr;
    json_t *root = json_loadb(text ? text : "", len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return eng_fail(-EBADMSG, "config.json: bad JSON at byte %d: %s", jerr.position,
                        jerr.text);
    int rc = 0;
    if (!json_is_object(root)) {
        rc = eng_fail(-EBADMSG, "config.json: not a JSON object");
        goto out;
    }
    rc = cfg_int(root, "medusa_num_heads", &cfg->num_heads);
    if (rc == 0)
        rc = cfg_int(root, "medusa_num_layers", &cfg->num_layers);
    if (rc < 0)
        goto out;
    json_t *bm = json_object_get(root, "base_model_name_or_path");
    if (bm && !json_is_string(bm) && !json_is_null(bm)) {
        rc = eng_fail(-EBADMSG, "config.json: base_model_name_or_path is not a string");
        goto out;
    }
    if (json_is_string(bm))
        snprintf(cfg->base_model, sizeof(cfg->base_model), "%s", json_string_value(bm));
    cfg->present = 1;
out:
    json_decref(root);
    return rc;
}

/* Read config.json; a missing file leaves the defaults (present = 0). */
static int load_config(eng_medusa_config *cfg, const char *path)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->num_heads = -1;
    cfg->num_layers = -1;
    FILE *f = fopen(path, "rbe");
    if (!f) {
        int rc = cm_neg_errno();
        if (rc == -ENOENT) {
            CM_LOG_WARN(TAG, "%s: missing; head count and shapes come from the weights", path);
            return 0;
        }
        return eng_fail(rc, "%s: open: %s", path, cm_strerror(rc));
    }
    char *buf = malloc(CONFIG_MAX_BYTES + 1);
    if (!buf) {
        fclose(f);
        return eng_fail(-ENOMEM, "out of memory");
    }
    size_t len = fread(buf, 1, CONFIG_MAX_BYTES + 1, f);
    int rd_err = ferror(f);
    fclose(f);
    int rc;
    if (rd_err)
        rc = eng_fail(-EIO, "%s: read error", path);
    else if (len > CONFIG_MAX_BYTES)
        rc = eng_fail(-EBADMSG, "%s: larger than %d bytes", path, CONFIG_MAX_BYTES);
    else
        rc = eng_medusa_config_parse(cfg, buf, len);
    free(buf);
    if (rc < 0 && !rd_err && len <= CONFIG_MAX_BYTES) {
        char msg[512];
        snprintf(msg, sizeof(msg), "%s", eng_error());
        rc = eng_fail(rc, "%s: %s", path, msg);
    }
    return rc;
}

/* ---- tensors ------------------------------------------------------------ */

/* "{i}<suffix>" with i a decimal without leading zeros. Returns the kind
 * (K_*) and stores i, or -1 when the name is not a head key, or -2 when it
 * is the key of a deeper stack of ResBlocks. */
static int parse_key(const char *name, int *idx)
{
    const char *p = name;
    long v = 0;
    if (*p < '0' || *p > '9' || (p[0] == '0' && p[1] >= '0' && p[1] <= '9'))
        return -1;
    while (*p >= '0' && *p <= '9') {
        v = v * 10 + (*p - '0');
        if (v > 1000000)
            return -1;
        p++;
    }
    *idx = (int)v;
    for (int k = 0; k < K_COUNT; k++)
        if (!strcmp(p, KIND_SUFFIX[k]))
            return k;
    /* With medusa_num_layers = L the keys are {i}.{0..L-1}.linear.* and
     * {i}.{L}.weight. */
    if (p[0] == '.' && p[1] >= '1' && p[1] <= '9' &&
        (!strncmp(p + 2, ".linear.", 8) || (p[1] >= '2' && !strcmp(p + 2, ".weight"))))
        return -2;
    return -1;
}

static int check_shape(const struct eng_st_tensor *t, int64_t d0, int64_t d1, int n_dims)
{
    if (t->n_dims != n_dims || t->shape[0] != d0 || (n_dims == 2 && t->shape[1] != d1)) {
        char got[96] = "[", want[64];
        size_t o = 1;
        for (int i = 0; i < t->n_dims && o < sizeof(got); i++)
            o += (size_t)snprintf(got + o, sizeof(got) - o, "%s%" PRId64, i ? ", " : "",
                                  t->shape[i]);
        if (o < sizeof(got))
            snprintf(got + o, sizeof(got) - o, "]");
        if (n_dims == 2)
            snprintf(want, sizeof(want), "[%" PRId64 ", %" PRId64 "]", d0, d1);
        else
            snprintf(want, sizeof(want), "[%" PRId64 "]", d0);
        return eng_fail(-EBADMSG, "tensor '%s' has shape %s, expected %s", t->name, got, want);
    }
    return 0;
}

static int bind_heads(eng_medusa_heads *mh, int64_t hidden, int64_t vocab)
{
    const struct eng_st_tensor *slot[ENG_MEDUSA_MAX_HEADS][K_COUNT] = {{NULL}};
    int n = 0;
    for (int64_t i = 0; i < eng_st_count(mh->st); i++) {
        const struct eng_st_tensor *t = eng_st_tensor_at(mh->st, i);
        int idx = 0;
        int k = parse_key(t->name, &idx);
        if (k == -2)
            return eng_fail(-EBADMSG,
                            "tensor '%.80s': more than one ResBlock per head "
                            "(medusa_num_layers > 1) is not supported",
                            t->name);
        if (k < 0)
            return eng_fail(-EBADMSG,
                            "unexpected tensor '%.80s' (a Medusa-1 head file holds only "
                            "{i}.0.linear.weight, {i}.0.linear.bias and {i}.1.weight)",
                            t->name);
        if (idx >= ENG_MEDUSA_MAX_HEADS)
            return eng_fail(-EBADMSG, "tensor '%.80s': head index %d (at most %d heads)",
                            t->name, idx, ENG_MEDUSA_MAX_HEADS);
        slot[idx][k] = t;
        if (idx + 1 > n)
            n = idx + 1;
    }
    if (n == 0)
        return eng_fail(-EBADMSG, "no Medusa head tensors");
    for (int h = 0; h < n; h++)
        for (int k = 0; k < K_COUNT; k++)
            if (!slot[h][k])
                return eng_fail(-EBADMSG, "head %d: tensor '%d%s' is missing", h, h,
                                KIND_SUFFIX[k]);

    /* Without a base model, head 0 defines H and V; the checks below then
     * hold every head to the same shapes. */
    if (hidden <= 0)
        hidden = slot[0][K_W]->shape[0];
    if (vocab <= 0)
        vocab = slot[0][K_LM]->shape[0];
    if (hidden <= 0 || vocab <= 0)
        return eng_fail(-EBADMSG, "head 0 has an empty hidden or vocabulary dimension");

    for (int h = 0; h < n; h++) {
        const struct eng_st_tensor *w = slot[h][K_W], *b = slot[h][K_B], *lm = slot[h][K_LM];
        int rc = check_shape(w, hidden, hidden, 2);
        if (rc == 0)
            rc = check_shape(b, hidden, 0, 1);
        if (rc == 0)
            rc = check_shape(lm, vocab, hidden, 2);
        if (rc < 0)
            return rc;
        eng_medusa_head *hd = &mh->heads[h];
        hd->w = (kn_tensor){.data = w->data, .type = w->dtype, .rows = hidden, .cols = hidden};
        hd->lm_head = (kn_tensor){.data = lm->data, .type = lm->dtype, .rows = vocab,
                                  .cols = hidden};
        if (b->dtype == KN_F32) {
            hd->bias = b->data; /* the reader guarantees alignment */
            continue;
        }
        float *fb = malloc((size_t)hidden * sizeof(float));
        if (!fb)
            return eng_fail(-ENOMEM, "out of memory");
        const uint16_t *src = b->data;
        for (int64_t i = 0; i < hidden; i++)
            fb[i] = b->dtype == KN_F16 ? kn_f16_to_f32(src[i]) : kn_bf16_to_f32(src[i]);
        mh->owned_bias[h] = fb;
        hd->bias = fb;
    }
    mh->n = n;
    mh->hidden = hidden;
    mh->vocab = vocab;
    return 0;
}

int eng_medusa_heads_open(eng_medusa_heads **out, const char *dir, int64_t hidden,
                          int64_t vocab)
{
    if (!out || !dir)
        return eng_fail(-EINVAL, "eng_medusa_heads_open: NULL argument");
    char cpath[PATH_MAX], wpath[PATH_MAX];
    if (snprintf(cpath, sizeof(cpath), "%s/%s", dir, ENG_MEDUSA_CONFIG_FILE) >=
            (int)sizeof(cpath) ||
        snprintf(wpath, sizeof(wpath), "%s/%s", dir, ENG_MEDUSA_HEADS_FILE) >=
            (int)sizeof(wpath))
        return eng_fail(-ENAMETOOLONG, "%.200s...: path too long", dir);

    eng_medusa_heads *mh = calloc(1, sizeof(*mh));
    if (!mh)
        return eng_fail(-ENOMEM, "out of memory");
    int rc = load_config(&mh->cfg, cpath);
    if (rc == 0)
        rc = eng_st_open(&mh->st, wpath); /* its message already names the path */
    if (rc == 0) {
        rc = bind_heads(mh, hidden, vocab);
        if (rc < 0) {
            char msg[512];
            snprintf(msg, sizeof(msg), "%s", eng_error());
            rc = eng_fail(rc, "%s: %s", wpath, msg);
        }
    }
    if (rc < 0) {
        eng_medusa_heads_close(mh);
        return rc;
    }
    if (mh->cfg.num_heads >= 0 && mh->cfg.num_heads != mh->n)
        CM_LOG_WARN(TAG,
                    "%s: config.json says medusa_num_heads = %d but the weights hold %d "
                    "heads; using %d",
                    dir, mh->cfg.num_heads, mh->n, mh->n);
    if (mh->cfg.num_layers >= 0 && mh->cfg.num_layers != 1)
        CM_LOG_WARN(TAG,
                    "%s: config.json says medusa_num_layers = %d but the weights hold one "
                    "ResBlock per head",
                    dir, mh->cfg.num_layers);
    *out = mh;
    return 0;
}

int eng_medusa_heads_write(const char *dir, int n_heads, int64_t H, int64_t V,
                           const float *const *w, const float *const *b, const float *const *lm,
                           const char *base_model)
{
    if (!dir || !w || !b || !lm || n_heads < 1 || n_heads > ENG_MEDUSA_MAX_HEADS || H < 1 ||
        V < 1)
        return eng_fail(-EINVAL, "medusa heads: write: bad arguments");
    if (mkdir(dir, 0755) < 0 && errno != EEXIST) {
        int rc = cm_neg_errno();
        return eng_fail(rc, "%s: mkdir: %s", dir, cm_strerror(rc));
    }
    struct eng_st_tensor t[3 * ENG_MEDUSA_MAX_HEADS];
    char names[3 * ENG_MEDUSA_MAX_HEADS][32];
    for (int k = 0; k < n_heads; k++) {
        snprintf(names[3 * k], sizeof(names[0]), "%d.0.linear.weight", k);
        snprintf(names[3 * k + 1], sizeof(names[0]), "%d.0.linear.bias", k);
        snprintf(names[3 * k + 2], sizeof(names[0]), "%d.1.weight", k);
        t[3 * k] = (struct eng_st_tensor){.name = names[3 * k], .dtype = KN_F32, .n_dims = 2,
                                          .shape = {H, H}, .data = w[k],
                                          .nbytes = (size_t)(H * H) * sizeof(float)};
        t[3 * k + 1] = (struct eng_st_tensor){.name = names[3 * k + 1], .dtype = KN_F32,
                                              .n_dims = 1, .shape = {H}, .data = b[k],
                                              .nbytes = (size_t)H * sizeof(float)};
        t[3 * k + 2] = (struct eng_st_tensor){.name = names[3 * k + 2], .dtype = KN_F32,
                                              .n_dims = 2, .shape = {V, H}, .data = lm[k],
                                              .nbytes = (size_t)(V * H) * sizeof(float)};
    }
    char path[PATH_MAX];
    if (snprintf(path, sizeof(path), "%s/%s", dir, ENG_MEDUSA_HEADS_FILE) >= (int)sizeof(path))
        return eng_fail(-ENAMETOOLONG, "%s: path too long", dir);
    int rc = eng_st_write(path, t, 3 * n_heads, NULL, 0);
    if (rc < 0)
        return rc;
    snprintf(path, sizeof(path), "%s/%s", dir, ENG_MEDUSA_CONFIG_FILE);
    json_t *cfg = json_pack("{s:i, s:i}", "medusa_num_heads", n_heads, "medusa_num_layers", 1);
    if (!cfg || (base_model && json_object_set_new(cfg, "base_model_name_or_path",
                                                   json_string(base_model)) < 0)) {
        json_decref(cfg);
        return eng_fail(-ENOMEM, "%s: cannot build the JSON", path);
    }
    rc = json_dump_file(cfg, path, JSON_INDENT(2)) == 0 ? 0 : -EIO;
    json_decref(cfg);
    if (rc < 0)
        return eng_fail(rc, "%s: cannot write", path);
    return 0;
}
