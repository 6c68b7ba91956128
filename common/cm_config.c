#include "common/cm_config.h"

#include <errno.h>
#include <ini.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct cm_kv {
    char *key;
    char *value;
};

struct cm_config {
    struct cm_kv *kv;
    size_t n, cap;
};

static _Thread_local char g_err[256];

static void set_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void set_err(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_err, sizeof(g_err), fmt, ap);
    va_end(ap);
}

const char *cm_config_error(void)
{
    return g_err;
}

int cm_config_create(cm_config **out)
{
    cm_config *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    *out = c;
    return 0;
}

void cm_config_destroy(cm_config *cfg)
{
    if (!cfg)
        return;
    for (size_t i = 0; i < cfg->n; i++) {
        free(cfg->kv[i].key);
        free(cfg->kv[i].value);
    }
    free(cfg->kv);
    free(cfg);
}

static struct cm_kv *find(const cm_config *cfg, const char *key)
{
    for (size_t i = cfg->n; i-- > 0;)
        if (strcmp(cfg->kv[i].key, key) == 0)
            return &cfg->kv[i];
    return NULL;
}

int cm_config_set(cm_config *cfg, const char *key, const char *value)
{
    struct cm_kv *e = find(cfg, key);
    char *v = strdup(value);
    if (!v)
        return -ENOMEM;
    if (e) {
        free(e->value);
        e->value = v;
        return 0;
    }
    if (cfg->n == cfg->cap) {
        size_t nc = cfg->cap ? cfg->cap * 2 : 16;
        struct cm_kv *nkv = realloc(cfg->kv, nc * sizeof(*nkv));
        if (!nkv) {
            free(v);
            return -ENOMEM;
        }
        cfg->kv = nkv;
        cfg->cap = nc;
    }
    char *k = strdup(key);
    if (!k) {
        free(v);
        return -ENOMEM;
    }
    cfg->kv[cfg->n++] = (struct cm_kv){k, v};
    return 0;
}

static int on_entry(void *user, const char *section, const char *name, const char *value)
{
    cm_config *cfg = user;
    char key[256];
    int n = section && *section ? snprintf(key, sizeof(key), "%s.%s", section, name)
                                : snprintf(key, sizeof(key), "%s", name);
    if (n < 0 || (size_t)n >= sizeof(key))
        return 0;
    return cm_config_set(cfg, key, value ? value : "") == 0;
}

static int finish(cm_config *cfg, int rc, const char *what, cm_config **out)
{
    if (rc != 0) {
        if (rc == -1)
            set_err("%s: cannot open: %s", what, strerror(errno));
        else if (rc == -2)
            set_err("%s: out of memory", what);
        else
            set_err("%s: line %d: syntax error or key too long", what, rc);
        cm_config_destroy(cfg);
        return rc == -1 ? -ENOENT : rc == -2 ? -ENOMEM : -EINVAL;
    }
    *out = cfg;
    return 0;
}

int cm_config_load(cm_config **out, const char *path)
{
    cm_config *cfg;
    int rc = cm_config_create(&cfg);
    if (rc < 0)
        return rc;
    return finish(cfg, ini_parse(path, on_entry, cfg), path, out);
}

int cm_config_parse(cm_config **out, const char *text)
{
    cm_config *cfg;
    int rc = cm_config_create(&cfg);
    if (rc < 0)
        return rc;
    return finish(cfg, ini_parse_string(text, on_entry, cfg), "<string>", out);
}

const char *cm_config_get_str(const cm_config *cfg, const char *key)
{
    if (!cfg)
        return NULL;
    struct cm_kv *e = find(cfg, key);
    return e ? e->value : NULL;
}

int cm_config_get_i64(const cm_config *cfg, const char *key, int64_t min, int64_t max,
                      int64_t *out)
{
    const char *s = cm_config_get_str(cfg, key);
    if (!s)
        return 0;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 0);
    if (errno || end == s || *end != '\0') {
        set_err("config %s = '%s': not an integer", key, s);
        return -EINVAL;
    }
    if (v < min || v > max) {
        set_err("config %s = %lld: out of range [%lld, %lld]", key, v, (long long)min,
                (long long)max);
        return -EINVAL;
    }
    *out = v;
    return 1;
}

int cm_config_get_f64(const cm_config *cfg, const char *key, double min, double max,
                      double *out)
{
    const char *s = cm_config_get_str(cfg, key);
    if (!s)
        return 0;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end != '\0' || !isfinite(v)) {
        set_err("config %s = '%s': not a number", key, s);
        return -EINVAL;
    }
    if (v < min || v > max) {
        set_err("config %s = %g: out of range [%g, %g]", key, v, min, max);
        return -EINVAL;
    }
    *out = v;
    return 1;
}

int cm_config_get_bool(const cm_config *cfg, const char *key, bool *out)
{
    const char *s = cm_config_get_str(cfg, key);
    if (!s)
        return 0;
    if (!strcasecmp(s, "1") || !strcasecmp(s, "true") || !strcasecmp(s, "yes") ||
        !strcasecmp(s, "on")) {
        *out = true;
        return 1;
    }
    if (!strcasecmp(s, "0") || !strcasecmp(s, "false") || !strcasecmp(s, "no") ||
        !strcasecmp(s, "off")) {
        *out = false;
        return 1;
    }
    set_err("config %s = '%s': not a boolean (true/false)", key, s);
    return -EINVAL;
}

size_t cm_config_count(const cm_config *cfg)
{
    return cfg ? cfg->n : 0;
}

int cm_config_entry(const cm_config *cfg, size_t i, const char **key, const char **value)
{
    if (!cfg || i >= cfg->n)
        return -ENOENT;
    *key = cfg->kv[i].key;
    *value = cfg->kv[i].value;
    return 0;
}
