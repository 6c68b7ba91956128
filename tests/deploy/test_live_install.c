/* `make install` as root into the live system (no DESTDIR) creates the user
 * gorgon and gorgond's directories, and the installed unit's ExecStart=,
 * run as the unit runs it, serves a generation with the installed config
 * and the model where docs/deploy.md says to put it. It happens in a
 * private mount and network namespace (tests/deploy/live_install.sh under
 * unshare), so the machine's own /etc, /usr/local, /run, /var/lib and ports
 * are untouched. When the sidecar is built its unit's command answers HTTP
 * there too. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/deploy/util/dp.h"
#include "tests/util/test_models.h"

static char work[64];
static char out[65536];

static void cleanup(void)
{
    if (work[0]) {
        char cmd[128];
        snprintf(cmd, sizeof(cmd), "rm -rf %s", work);
        (void)!system(cmd);
        work[0] = '\0';
    }
}

Test(deploy_live_install, install_as_root_then_the_unit_command_serves, .fini = cleanup,
     .timeout = 180)
{
    if (geteuid() != 0)
        cr_skip_test("installing into the live system takes root");
    char build[PATH_MAX];
    dp_build_dir(build, sizeof(build));
    const char *model = tu_model_path("stories260K/stories260K.gguf");
    char model_abs[PATH_MAX];
    cr_assert_not_null(realpath(model, model_abs));
    snprintf(work, sizeof(work), "/tmp/gorgon-live-XXXXXX");
    cr_assert_not_null(mkdtemp(work));
    int rc = dp_sh(out, sizeof(out),
                   "unshare --mount --net --propagation private tests/deploy/live_install.sh %s %s %s",
                   build, model_abs, work);
    cr_assert_eq(rc, 0, "live install (%d):\n%s", rc, out);
    cr_assert_not_null(strstr(out, "live install ok"), "%s", out);
}
