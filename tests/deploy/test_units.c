/* The systemd side of `make install` (deploy/install.sh into a temporary
 * DESTDIR, PREFIX=/usr/local): the units, the sysusers.d and tmpfiles.d
 * entries and the example config are installed; systemd's own tools accept
 * them (systemd-sysusers and systemd-tmpfiles applied to the DESTDIR as a
 * root, systemd-analyze verify on the units with their paths inside the
 * DESTDIR); `systemd-analyze security --offline` rates both units under 3.0;
 * uninstall removes all of it. */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "tests/deploy/util/dp.h"

static char dest[64];
static char build[PATH_MAX];
static char out[65536];

static void install(void)
{
    dp_build_dir(build, sizeof(build));
    snprintf(dest, sizeof(dest), "/tmp/gorgon-deploy-XXXXXX");
    cr_assert_not_null(mkdtemp(dest));
    cr_assert_eq(dp_sh(out, sizeof(out), "PREFIX=/usr/local DESTDIR=%s deploy/install.sh %s",
                       dest, build),
                 0, "install: %s", out);
}

static void cleanup(void)
{
    if (dest[0]) {
        char cmd[128];
        snprintf(cmd, sizeof(cmd), "rm -rf %s", dest);
        (void)!system(cmd);
        dest[0] = '\0';
    }
}

/* The uid field of NAME in a passwd file; -1 when absent. */
static long passwd_uid(const char *file, const char *name)
{
    FILE *f = fopen(file, "r");
    if (!f)
        return -1;
    long uid = -1;
    struct passwd *pw;
    while ((pw = fgetpwent(f)))
        if (!strcmp(pw->pw_name, name))
            uid = (long)pw->pw_uid;
    fclose(f);
    return uid;
}

/* A copy of the installed unit NAME in DEST/verify/ whose paths point into
 * DESTDIR (systemd-analyze verify checks that ExecStart= is there). */
static void relocated(const char *name)
{
    cr_assert_eq(dp_sh(out, sizeof(out),
                       "mkdir -p %s/verify && sed 's|/usr/local/|%s/usr/local/|g' "
                       "%s/usr/local/lib/systemd/system/%s > %s/verify/%s",
                       dest, dest, dest, name, dest, name),
                 0, "%s", out);
}

/* systemd-analyze verify: exit 0 and not a word (it warns on exit 0 too,
 * e.g. about an unknown key). */
static void verify(const char *units)
{
    int rc = dp_sh(out, sizeof(out), "cd %s/verify && systemd-analyze verify %s", dest, units);
    cr_assert_eq(rc, 0, "systemd-analyze verify %s failed (%d):\n%s", units, rc, out);
    cr_assert_str_empty(out, "systemd-analyze verify %s complained:\n%s", units, out);
}

/* The overall exposure `systemd-analyze security --offline=true` gives. */
static double security_score(const char *unit_path, const char *name)
{
    int rc = dp_sh(out, sizeof(out), "systemd-analyze security --offline=true %s", unit_path);
    cr_assert_eq(rc, 0, "systemd-analyze security %s: %s", unit_path, out);
    char key[128];
    snprintf(key, sizeof(key), "Overall exposure level for %s: ", name);
    const char *at = strstr(out, key);
    cr_assert_not_null(at, "no overall exposure in:\n%s", out);
    double score = strtod(at + strlen(key), NULL);
    cr_log_info("systemd-analyze security --offline=true: %s %.1f", name, score);
    return score;
}

Test(deploy_units, install_puts_units_users_dirs_and_config, .fini = cleanup, .timeout = 120)
{
    install();
    const char *must[] = {"/usr/local/lib/systemd/system/gorgond.service",
                          "/usr/local/lib/sysusers.d/gorgon.conf",
                          "/usr/local/lib/tmpfiles.d/gorgon.conf",
                          "/usr/local/share/doc/gorgon/deploy.md",
                          "/usr/local/etc/gorgon/gorgond.ini",
                          "/usr/local/libexec/gorgon/gorgon-worker",
                          "/usr/local/bin/gorgond"};
    for (size_t i = 0; i < sizeof(must) / sizeof(must[0]); i++)
        cr_assert(dp_exists(dest, must[i]), "not installed: %s", must[i]);

    /* The unit names the installed gorgond and config. */
    char p[PATH_MAX];
    snprintf(p, sizeof(p), "%s/usr/local/lib/systemd/system/gorgond.service", dest);
    char *unit = dp_slurp(p);
    cr_assert_not_null(strstr(unit, "\nExecStart=/usr/local/bin/gorgond --foreground --config "
                                    "/usr/local/etc/gorgon/gorgond.ini\n"),
                       "ExecStart does not name the installed paths:\n%s", unit);
    cr_assert_not_null(strstr(unit, "\nType=notify\n"));
    cr_assert_not_null(strstr(unit, "\nUser=gorgon\n"));
    free(unit);

    /* The config serves the model where docs/deploy.md says to put it, and
     * tmpfiles.d makes that directory. */
    snprintf(p, sizeof(p), "%s/usr/local/etc/gorgon/gorgond.ini", dest);
    char *ini = dp_slurp(p);
    cr_assert_not_null(strstr(ini, "\nmodel = /var/lib/gorgon/model.gguf\n"),
                       "the example config has no model= line");
    free(ini);
    char *doc = dp_slurp("docs/deploy.md");
    cr_assert_not_null(strstr(doc, "/var/lib/gorgon/model.gguf"),
                       "docs/deploy.md does not say where the model goes");
    free(doc);

    /* sysusers.d: the user and group gorgon, applied to DESTDIR as a root. */
    cr_assert_eq(dp_sh(out, sizeof(out), "install -d %s/etc && systemd-sysusers --root=%s "
                       "%s/usr/local/lib/sysusers.d/gorgon.conf", dest, dest, dest),
                 0, "systemd-sysusers: %s", out);
    /* it says what it creates, and nothing else unless something is wrong */
    for (const char *l = out; *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : l + strlen(l))
        cr_assert(!strncmp(l, "Creating ", 9), "systemd-sysusers complained:\n%s", out);
    snprintf(p, sizeof(p), "%s/etc/passwd", dest);
    long uid = passwd_uid(p, "gorgon");
    cr_assert_gt(uid, 0, "sysusers.d made no user gorgon in %s", p);
    cr_assert_lt(uid, 1000, "gorgon must be a system user (uid %ld)", uid);
    snprintf(p, sizeof(p), "%s/etc/group", dest);
    char *grp = dp_slurp(p);
    cr_assert_not_null(strstr(grp, "gorgon:"), "no group gorgon in %s", p);
    free(grp);

    /* tmpfiles.d: /run/gorgon 0750 gorgon:gorgon (the socket inside is 0660
     * group gorgon: members of the group can reach it), /var/lib/gorgon. */
    cr_assert_eq(dp_sh(out, sizeof(out), "systemd-tmpfiles --root=%s --create "
                       "%s/usr/local/lib/tmpfiles.d/gorgon.conf", dest, dest),
                 0, "systemd-tmpfiles: %s", out);
    struct stat sb;
    snprintf(p, sizeof(p), "%s/run/gorgon", dest);
    cr_assert_eq(stat(p, &sb), 0, "tmpfiles.d made no /run/gorgon");
    cr_assert(S_ISDIR(sb.st_mode));
    cr_assert_eq(sb.st_mode & 07777, 0750, "/run/gorgon mode %o", sb.st_mode & 07777);
    cr_assert_eq((long)sb.st_uid, uid, "/run/gorgon belongs to uid %ld, not gorgon (%ld)",
                 (long)sb.st_uid, uid);
    snprintf(p, sizeof(p), "%s/var/lib/gorgon", dest);
    cr_assert_eq(stat(p, &sb), 0, "tmpfiles.d made no /var/lib/gorgon");
    cr_assert_eq(sb.st_mode & 0002, 0, "/var/lib/gorgon must not be world-writable");

    cr_assert_eq(dp_sh(out, sizeof(out), "PREFIX=/usr/local DESTDIR=%s deploy/install.sh "
                       "--uninstall %s", dest, build),
                 0, "uninstall: %s", out);
    for (size_t i = 0; i < sizeof(must) / sizeof(must[0]); i++)
        if (!strstr(must[i], "gorgond.ini"))
            cr_assert_not(dp_exists(dest, must[i]), "left after uninstall: %s", must[i]);
    cr_assert_not(dp_exists(dest, "/usr/local/lib/systemd/system/gorgon-sidecar.service"));
}

Test(deploy_units, gorgond_unit_verifies_against_installed_paths, .fini = cleanup,
     .timeout = 120)
{
    install();
    relocated("gorgond.service");
    verify("gorgond.service");
}

Test(deploy_units, gorgond_unit_security_exposure_under_3, .fini = cleanup, .timeout = 120)
{
    install();
    char p[PATH_MAX];
    snprintf(p, sizeof(p), "%s/usr/local/lib/systemd/system/gorgond.service", dest);
    double score = security_score(p, "gorgond.service");
    cr_assert_lt(score, 3.0, "gorgond.service exposure %.1f (want < 3.0):\n%s", score, out);
}

Test(deploy_units, sidecar_unit_security_exposure_under_3, .timeout = 60)
{
    double score = security_score("deploy/gorgon-sidecar.service", "gorgon-sidecar.service");
    cr_assert_lt(score, 3.0, "gorgon-sidecar.service exposure %.1f (want < 3.0):\n%s", score,
                 out);
}

Test(deploy_units, sidecar_unit_verifies_against_installed_paths, .fini = cleanup,
     .timeout = 120)
{
    if (!dp_have_sidecar_source())
        cr_skip_test("clients/sidecar is not in this source tree: no gorgon-sidecar to install");
    install();
    cr_assert(dp_exists(dest, "/usr/local/bin/gorgon-sidecar"),
              "gorgon-sidecar is in the tree but make install did not install it");
    cr_assert(dp_exists(dest, "/usr/local/lib/systemd/system/gorgon-sidecar.service"),
              "gorgon-sidecar is installed but its unit is not");
    char p[PATH_MAX];
    snprintf(p, sizeof(p), "%s/usr/local/lib/systemd/system/gorgon-sidecar.service", dest);
    char *unit = dp_slurp(p);
    cr_assert_not_null(strstr(unit, "\nRequires=gorgond.service\n"));
    cr_assert_not_null(strstr(unit, "--socket /run/gorgon/gorgon.sock"),
                       "the sidecar must use gorgond's socket");
    free(unit);
    relocated("gorgond.service");
    relocated("gorgon-sidecar.service");
    verify("gorgon-sidecar.service gorgond.service");
}
