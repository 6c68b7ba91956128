/* `make install` as an application developer meets it: deploy/install.sh
 * (what `make install` runs) puts the tree into a temporary DESTDIR; the
 * example from the installed gorgon.h is built with pkg-config alone
 * (shared: gorgon.pc, static: gorgon-static.pc) and run against the
 * installed gorgond, which must find its worker in libexec/; its text must
 * equal the same request made here. Uninstall then removes what was put. */
#include <criterion/criterion.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "clients/gorgon.h"
#include "tests/clients/util/gd_proc.h"
#include "tests/util/test_models.h"
#include "tests/util/test_tree.h"

static char dest[64];
static gd_proc gd;

static void cleanup(void)
{
    gd_stop(&gd);
    if (dest[0]) {
        char cmd[128];
        snprintf(cmd, sizeof(cmd), "rm -rf %s", dest);
        (void)!system(cmd);
        dest[0] = '\0';
    }
}

/* Run a shell command; its exit status, with its output (and stderr) in out. */
static int sh(char *out, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int sh(char *out, size_t cap, const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    if (!strstr(cmd, "2>")) /* stderr too, unless the command says where it goes */
        strncat(cmd, " 2>&1", sizeof(cmd) - strlen(cmd) - 1);
    FILE *p = popen(cmd, "r");
    cr_assert_not_null(p);
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = '\0';
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 255;
}

static bool exists(const char *dir, const char *rel)
{
    char p[512];
    snprintf(p, sizeof(p), "%s%s", dir, rel);
    struct stat sb;
    return lstat(p, &sb) == 0;
}

#ifdef GORGON_SAN_LDFLAGS
#define SAN_LDFLAGS GORGON_SAN_LDFLAGS
#else
#define SAN_LDFLAGS ""
#endif

Test(clients_install, header_example_builds_with_pkg_config_and_runs, .fini = cleanup,
     .timeout = 180)
{
    /* the build tree this test binary belongs to: .../build/<mode>/tests/x */
    char self[PATH_MAX];
    snprintf(self, sizeof(self), "%s", tu_build_dir());
    snprintf(dest, sizeof(dest), "/tmp/gorgon-install-XXXXXX");
    cr_assert_not_null(mkdtemp(dest));
    static char out[16384];
    cr_assert_eq(sh(out, sizeof(out), "PREFIX=/usr/local DESTDIR=%s deploy/install.sh %s", dest,
                    self), 0, "install: %s", out);
    const char *must[] = {"/usr/local/bin/gorgond", "/usr/local/bin/gorgon",
                          "/usr/local/libexec/gorgon/gorgon-worker",
                          "/usr/local/include/gorgon.h", "/usr/local/lib/libgorgon.a",
                          "/usr/local/lib/libgorgon.so.0", "/usr/local/lib/libgorgon.so",
                          "/usr/local/lib/pkgconfig/gorgon.pc",
                          "/usr/local/lib/systemd/system/gorgond.service",
                          "/usr/local/etc/gorgon/gorgond.ini"};
    for (size_t i = 0; i < sizeof(must) / sizeof(must[0]); i++)
        cr_assert(exists(dest, must[i]), "not installed: %s", must[i]);
    cr_assert_neq(exists(dest, "/usr/local/bin/gorgon-worker"), true,
                  "gorgon-worker belongs in libexec, not bin");

    /* The example, as the installed header prints it. */
    cr_assert_eq(sh(out, sizeof(out),
                    "sed -n '/\\[example\\]/,/\\[\\/example\\]/p' %s/usr/local/include/gorgon.h"
                    " | sed -e '1d' -e '$d' -e 's/^ \\* \\{0,1\\}//' > %s/app.c",
                    dest, dest),
                 0, "%s", out);
    const char *pc = "PKG_CONFIG_SYSROOT_DIR=%s PKG_CONFIG_PATH=%s/usr/local/lib/pkgconfig";
    char env[256];
    snprintf(env, sizeof(env), pc, dest, dest);
    /* A sanitizer build's libgorgon calls into the sanitizer runtime: the
     * program that links it needs that runtime too (loaded first). */
    cr_assert_eq(sh(out, sizeof(out),
                    "cc -std=c11 -Wall -Wextra -Werror %s -o %s/app_shared %s/app.c "
                    "$(%s pkg-config --cflags --libs gorgon)", SAN_LDFLAGS, dest, dest, env),
                 0, "shared build of the header's example:\n%s", out);
    cr_assert_eq(sh(out, sizeof(out),
                    "cc -std=c11 -Wall -Wextra -Werror %s -o %s/app_static %s/app.c "
                    "$(%s pkg-config --cflags --libs gorgon-static)", SAN_LDFLAGS, dest, dest,
                    env),
                 0, "static build of the header's example:\n%s", out);
    cr_assert_neq(sh(out, sizeof(out), "ldd %s/app_static | grep -q libgorgon", dest), 0,
                  "app_static depends on libgorgon.so");
    /* A client never reads our INI files: the shared library must not
     * drag libinih into every program that links it. */
    cr_assert_eq(sh(out, sizeof(out), "readelf -d %s/usr/local/lib/libgorgon.so.0", dest), 0,
                 "%s", out);
    cr_assert(strstr(out, "(NEEDED)") && strstr(out, "liburing"), "readelf -d: %s", out);
    cr_assert_null(strstr(out, "libinih"), "libgorgon.so needs libinih: %s", out);

    /* The installed gorgond, which finds gorgon-worker in ../libexec/gorgon. */
    char gd_bin[256], model[PATH_MAX];
    snprintf(gd_bin, sizeof(gd_bin), "%s/usr/local/bin/gorgond", dest);
    snprintf(model, sizeof(model), "%s", tu_model_path("stories260K/stories260K.gguf"));
    setenv("GORGON_GORGOND", gd_bin, 1);
    int rc = gd_start(&gd, "--model", model, NULL);
    unsetenv("GORGON_GORGOND");
    cr_assert_eq(rc, 0, "installed gorgond: %s", strerror(-rc));
    gorgon_client *cli = gd_connect(&gd, 0);
    gorgon_gen_params gp = {.prompt = "Once upon a time", .max_tokens = 64};
    uint32_t req;
    cr_assert_eq(gorgon_generate_submit(cli, &gp, 7, &req), 0);
    static char want[8192];
    size_t wn = 0;
    gorgon_gen_chunk ch;
    while ((rc = gorgon_generate_next(cli, req, &ch, 30000000000ll)) == 1) {
        memcpy(want + wn, ch.text, ch.len);
        wn += ch.len;
    }
    cr_assert_eq(rc, 0, "installed gorgond could not generate: %.*s", (int)ch.len, ch.text);
    memcpy(want + wn, ch.text, ch.len); /* the final chunk's text (none), for the reference */
    want[wn + ch.len] = '\0';
    gorgon_close(cli);

    for (int k = 0; k < 2; k++) {
        static char got[16384];
        char ld[128] = ""; /* the shared build finds libgorgon.so.0 in DESTDIR */
        if (k == 1)
            snprintf(ld, sizeof(ld), "%s/usr/local/lib", dest);
        rc = sh(got, sizeof(got), "GORGON_SOCKET=%s LD_LIBRARY_PATH=%s %s/app_%s 2>/dev/null",
                gd.sock, ld, dest, k == 0 ? "static" : "shared");
        cr_assert_eq(rc, 0, "the example (%s) failed: %s", k ? "shared" : "static", got);
        cr_assert_str_eq(got, want, "the example (%s) printed other text:\n%s\nwant:\n%s",
                         k ? "shared" : "static", got, want);
    }
    GD_END(&gd);

    cr_assert_eq(sh(out, sizeof(out), "PREFIX=/usr/local DESTDIR=%s deploy/install.sh "
                    "--uninstall %s", dest, self), 0, "uninstall: %s", out);
    for (size_t i = 0; i + 1 < sizeof(must) / sizeof(must[0]); i++)
        cr_assert_not(exists(dest, must[i]), "left after uninstall: %s", must[i]);
    cr_assert(exists(dest, "/usr/local/etc/gorgon/gorgond.ini"), "the config must be kept");
}
