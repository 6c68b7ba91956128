#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/common.h"

Test(common_config, parses_sections_and_types)
{
    cm_config *cfg;
    cr_assert_eq(cm_config_parse(&cfg, "top = 1\n[gorgond]\npoll_us = 50\nratio = 0.5\n"
                                       "hugepages = yes\nname = abc\n"),
                 0);
    int64_t v = -1;
    cr_assert_eq(cm_config_get_i64(cfg, "gorgond.poll_us", 0, 1000, &v), 1);
    cr_assert_eq(v, 50);
    cr_assert_eq(cm_config_get_i64(cfg, "top", 0, 1000, &v), 1);
    cr_assert_eq(v, 1);
    double d = 0;
    cr_assert_eq(cm_config_get_f64(cfg, "gorgond.ratio", 0, 1, &d), 1);
    cr_assert_float_eq(d, 0.5, 1e-12);
    bool b = false;
    cr_assert_eq(cm_config_get_bool(cfg, "gorgond.hugepages", &b), 1);
    cr_assert(b);
    cr_assert_str_eq(cm_config_get_str(cfg, "gorgond.name"), "abc");
    v = 7;
    cr_assert_eq(cm_config_get_i64(cfg, "gorgond.absent", 0, 10, &v), 0);
    cr_assert_eq(v, 7, "absent key must leave the default");
    cm_config_destroy(cfg);
}

Test(common_config, rejects_bad_values_naming_the_key)
{
    cm_config *cfg;
    cr_assert_eq(cm_config_parse(&cfg, "[a]\nn = 12x\nbig = 5000\nb = maybe\n"), 0);
    int64_t v = 0;
    cr_assert_eq(cm_config_get_i64(cfg, "a.n", 0, 100, &v), -EINVAL);
    cr_assert(strstr(cm_config_error(), "a.n"));
    cr_assert_eq(cm_config_get_i64(cfg, "a.big", 0, 100, &v), -EINVAL);
    cr_assert(strstr(cm_config_error(), "out of range"));
    bool b;
    cr_assert_eq(cm_config_get_bool(cfg, "a.b", &b), -EINVAL);
    cm_config_destroy(cfg);
}

Test(common_config, syntax_error_reports_line)
{
    cm_config *cfg = NULL;
    cr_assert_eq(cm_config_parse(&cfg, "[a]\nok = 1\n[broken\n"), -EINVAL);
    cr_assert(strstr(cm_config_error(), "line 3"), "%s", cm_config_error());
    cr_assert_eq(cm_config_load(&cfg, "/nonexistent/gorgon.ini"), -ENOENT);
}

Test(common_config, set_overrides_file_value)
{
    cm_config *cfg;
    cr_assert_eq(cm_config_parse(&cfg, "[s]\nk = 1\n"), 0);
    cr_assert_eq(cm_config_set(cfg, "s.k", "2"), 0);
    cr_assert_str_eq(cm_config_get_str(cfg, "s.k"), "2");
    cr_assert_eq(cm_config_count(cfg), 1);
    cm_config_destroy(cfg);
}

struct capture {
    int n;
    enum cm_log_level lvl;
    char tag[32];
    char msg[128];
};

static void capture_sink(void *ctx, enum cm_log_level lvl, const char *tag, const char *msg)
{
    struct capture *c = ctx;
    c->n++;
    c->lvl = lvl;
    snprintf(c->tag, sizeof(c->tag), "%s", tag);
    snprintf(c->msg, sizeof(c->msg), "%s", msg);
}

Test(common_log, sink_receives_filtered_messages)
{
    struct capture c = {0};
    cm_log_set_sink(capture_sink, &c);
    cm_log_set_level(CM_LOG_INFO);
    CM_LOG_DEBUG("t", "hidden %d", 1);
    cr_assert_eq(c.n, 0);
    CM_LOG_WARN("ipc", "value %d", 42);
    cr_assert_eq(c.n, 1);
    cr_assert_eq(c.lvl, CM_LOG_WARN);
    cr_assert_str_eq(c.tag, "ipc");
    cr_assert_str_eq(c.msg, "value 42");
    cm_log_set_sink(NULL, NULL);
    cr_assert_eq(cm_log_parse_level("debug"), CM_LOG_DEBUG);
    cr_assert_eq(cm_log_parse_level("bogus"), -EINVAL);
}

Test(common_time, monotonic_advances)
{
    uint64_t a = cm_now_ns();
    usleep(2000);
    uint64_t b = cm_now_ns();
    cr_assert_gt(b, a + 1000000);
}

Test(common_cpu, features_are_consistent)
{
    const struct cm_cpu_features *f = cm_cpu();
    cr_assert_geq(f->n_cpus, 1);
    /* AVX-512 implies AVX2 on every shipped CPU; AVX2 implies AVX. */
    if (f->avx512f)
        cr_assert(f->avx2);
    if (f->avx2)
        cr_assert(f->avx);
    char buf[256];
    cr_assert(strstr(cm_cpu_describe(buf, sizeof(buf)), "cpus"));
}
