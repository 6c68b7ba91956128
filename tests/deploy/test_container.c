/* deploy/Containerfile, deploy/container-run.sh and deploy/k8s/ against the
 * tree they ship, without network or a container runtime: the checker
 * tests/deploy/check_deploy.py (python3-yaml) accepts the files as they are
 * and names each of a set of breakages; the container's run script refuses
 * a missing model and stops gorgond when the sidecar dies. */
#include <criterion/criterion.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/clients/util/gd_proc.h"
#include "tests/deploy/util/dp.h"
#include "tests/util/test_models.h"

static char out[65536];
static char build[PATH_MAX];
static char tmp[64];

static void cleanup(void)
{
    if (tmp[0]) {
        char cmd[128];
        snprintf(cmd, sizeof(cmd), "rm -rf %s", tmp);
        (void)!system(cmd);
        tmp[0] = '\0';
    }
}

/* The checker over the k8s dir and Containerfile given; its exit status. */
static int check(const char *k8s, const char *containerfile)
{
    dp_build_dir(build, sizeof(build));
    /* Until clients/sidecar/ is in the tree nothing builds gorgon-sidecar;
     * from then on the files are held to it like to every other program. */
    const char *unbuilt = dp_have_sidecar_source() ? "" : "--unbuilt gorgon-sidecar";
    return dp_sh(out, sizeof(out),
                 "/usr/bin/python3 tests/deploy/check_deploy.py --root . --build %s "
                 "--k8s %s --containerfile %s %s",
                 build, k8s, containerfile, unbuilt);
}

Test(deploy_container, files_match_the_tree, .timeout = 60)
{
    int rc = check("deploy/k8s", "deploy/Containerfile");
    cr_assert_eq(rc, 0, "check_deploy.py (%d):\n%s", rc, out);
    cr_assert_not_null(strstr(out, "deploy files ok"), "%s", out);
}

/* Copy deploy/ to a temp dir, apply one sed edit to one file there, and
 * expect the checker to fail naming `want`. */
static void expect_caught(const char *file, const char *sed, const char *want)
{
    snprintf(tmp, sizeof(tmp), "/tmp/gorgon-k8s-XXXXXX");
    cr_assert_not_null(mkdtemp(tmp));
    cr_assert_eq(dp_sh(out, sizeof(out), "cp -r deploy/k8s deploy/Containerfile %s/ && "
                       "sed -i -e '%s' %s/%s && ! cmp -s %s/%s deploy/%s",
                       tmp, sed, tmp, file, tmp, file, file),
                 0, "the edit '%s' changed nothing in %s: %s", sed, file, out);
    char k8s[128], cf[128];
    snprintf(k8s, sizeof(k8s), "%s/k8s", tmp);
    snprintf(cf, sizeof(cf), "%s/Containerfile", tmp);
    int rc = check(k8s, cf);
    cr_assert_eq(rc, 1, "check_deploy.py accepted %s after '%s' (%d):\n%s", file, sed, rc, out);
    cr_assert_not_null(strstr(out, want), "after '%s' in %s, want '%s' in:\n%s", sed, file,
                       want, out);
    cleanup();
}

Test(deploy_container, checker_names_each_breakage, .fini = cleanup, .timeout = 120)
{
    expect_caught("k8s/gorgon.yaml", "s/medium: Memory/medium: \"\"/",
                  "/dev/shm must be an emptyDir with medium: Memory");
    expect_caught("k8s/gorgon.yaml", "0,/mountPath: \\/run\\/gorgon/s//mountPath: \\/run\\/x/",
                  "must share one volume at /run/gorgon");
    expect_caught("k8s/gorgon.yaml", "0,/- name: dshm$/s//- name: shm/",
                  "which the pod does not define");
    expect_caught("k8s/gorgon.yaml", "s/containerPort: 8080/containerPort: 8081/",
                  "the sidecar listens on 8080 but declares ports [8081]");
    expect_caught("k8s/gorgon.yaml", "s/claimName: gorgon-models/claimName: nope/",
                  "claims volume nope");
    expect_caught("k8s/gorgon.yaml", "s/path: \\/health/path: \\/healthz/",
                  "readinessProbe must be GET /health");
    expect_caught("k8s/gorgon.yaml", "s/runAsUser: 999/runAsUser: 1000/",
                  "runAsUser 1000 is not the image's gorgon uid 999");
    expect_caught("k8s/gorgon.yaml", "s|\"/usr/bin/gorgond\"|\"/usr/bin/gorgond-x\"|",
                  "no module.mk builds gorgond-x");
    expect_caught("k8s/gorgon.yaml", "0,/- \\/run\\/gorgon\\/gorgon.sock/s//- \\/tmp\\/g.sock/",
                  "--socket /tmp/g.sock and the sidecar's /run/gorgon/gorgon.sock differ");
    expect_caught("k8s/gorgon.yaml", "s/targetPort: http/targetPort: 9000/",
                  "targetPort 9000 is not the sidecar's port");
    expect_caught("k8s/gorgon.yaml", "s/^  selector:$/  selectorx:/", "selector");
    expect_caught("k8s/gorgon.yaml", "$a\\  - : [", "not YAML");
    expect_caught("k8s/gpu/gpu-patch.yaml", "s/nvidia.com\\/gpu: 1/nvidia.com\\/gpu: 2/",
                  "no overlay requests nvidia.com/gpu: 1");
    expect_caught("k8s/gpu/gpu-patch.yaml", "s/- name: gorgond/- name: gorgon/",
                  "patches container gorgon");
    expect_caught("k8s/gpu/kustomization.yaml", "s|../gorgon.yaml|../gorgon2.yaml|",
                  "resource ../gorgon2.yaml does not exist");
    expect_caught("Containerfile", "s/^EXPOSE 8080/EXPOSE 9090/",
                  "the Containerfile exposes [9090]");
    expect_caught("Containerfile", "s|^COPY deploy/container-run.sh|COPY deploy/run.sh|",
                  "COPY source deploy/run.sh is not in the repository");
    expect_caught("Containerfile", "s/ libcurl4 / /", "link libcurl.so.4 from libcurl4");
    expect_caught("Containerfile", "s/--from=build/--from=builder/",
                  "COPY --from=builder: no such earlier stage");
    expect_caught("Containerfile", "s/debian:12-slim/ubuntu:24.04/", "is not Debian 12");
    expect_caught("Containerfile", "s|^CMD .*|CMD [\"/usr/bin/gorgon-x\"]|",
                  "/usr/bin/gorgon-x is not a file the image gets");
}

Test(deploy_container, run_script_refuses_a_missing_model, .timeout = 30)
{
    int rc = dp_sh(out, sizeof(out),
                   "GORGON_MODEL=/nonexistent/model.gguf deploy/container-run.sh");
    cr_assert_eq(rc, 2, "container-run.sh without a model: exit %d:\n%s", rc, out);
    cr_assert_not_null(strstr(out, "no model at /nonexistent/model.gguf"), "%s", out);
}

/* gorgond starts, answers, and is stopped cleanly (its socket removed) when
 * the sidecar cannot run; the script's status is the sidecar's. */
Test(deploy_container, run_script_stops_gorgond_when_the_sidecar_dies, .fini = cleanup,
     .timeout = 60)
{
    dp_build_dir(build, sizeof(build));
    snprintf(tmp, sizeof(tmp), "/tmp/gorgon-run-XXXXXX");
    cr_assert_not_null(mkdtemp(tmp));
    const char *model = tu_model_path("stories260K/stories260K.gguf");
    /* a bin/ with gorgond and gorgon but a sidecar that is not there */
    cr_assert_eq(dp_sh(out, sizeof(out), "ln -s %s/bin/gorgond %s/bin/gorgon %s/bin/gorgon-worker "
                       "%s/", build, build, build, tmp),
                 0, "%s", out);
    int rc = dp_sh(out, sizeof(out),
                   "GORGON_BINDIR=%s GORGON_CONFIG=deploy/gorgond.ini GORGON_SOCKET=%s/g.sock "
                   "GORGON_MODEL=%s deploy/container-run.sh",
                   tmp, tmp, model);
    cr_assert_eq(rc, 127, "want the missing sidecar's 127, got %d:\n%s", rc, out);
    cr_assert_not_null(strstr(out, "listening on"), "gorgond never listened:\n%s", out);
    cr_assert_not_null(strstr(out, "gorgon-sidecar exited (gorgond: 0, gorgon-sidecar: 127)"),
                       "gorgond did not stop cleanly:\n%s", out);
    cr_assert_not(dp_exists(tmp, "/g.sock"), "gorgond left its socket: it did not stop");
}
