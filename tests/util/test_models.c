#include "tests/util/test_models.h"

#include <criterion/criterion.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

const char *tu_models_dir(void)
{
    static char buf[PATH_MAX];
    const char *e = getenv("GORGON_TEST_MODELS");
    if (e && *e)
        return e;
    if (access("../shared/models/stories260K", R_OK) == 0)
        return "../shared/models";
    ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
    if (n > 0) {
        buf[n] = 0;
        for (int up = 0; up < 4; up++) {
            char *s = strrchr(buf, '/');
            if (s)
                *s = 0;
        }
        strncat(buf, "/../shared/models", sizeof(buf) - strlen(buf) - 1);
        if (access(buf, R_OK) == 0)
            return buf;
    }
    return "../shared/models";
}

const char *tu_model_path(const char *rel)
{
    static char p[PATH_MAX];
    snprintf(p, sizeof(p), "%s/%s", tu_models_dir(), rel);
    cr_assert_eq(access(p, R_OK), 0, "test model %s not found (set GORGON_TEST_MODELS)", p);
    return p;
}
