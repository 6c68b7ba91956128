/* The Python package (clients/python/gorgon) against a real gorgond with
 * stories260K: runs its unittest suite with Debian's /usr/bin/python3 and
 * requires every test to run and pass (no skips, no test lost to an import
 * error). The suite gets, through the environment: the socket
 * (GORGON_SOCKET), the libgorgon.so.0 of this build tree (GORGON_LIBRARY;
 * a sanitizer build's runtimes are preloaded into python for it), gorgond's
 * pid, the `gorgon` CLI, the models directory, and the C layout of every
 * gorgon.h structure (GORGON_TEST_LAYOUT: sizes and field offsets as this
 * compiler lays them out, which tests/test_layout.py compares with the
 * ctypes declarations). */
#include <criterion/criterion.h>
#include <dirent.h>
#include <limits.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clients/gorgon.h"
#include "tests/clients/util/gd_proc.h"
#include "tests/util/test_models.h"
#include "tests/util/test_tree.h"

#define PYTHON "/usr/bin/python3"

static gd_proc gd;
static char tmpdir[64];
static char layout_path[128];

static void teardown(void)
{
    gd_stop(&gd);
    if (layout_path[0])
        unlink(layout_path);
    if (tmpdir[0])
        rmdir(tmpdir);
}

/* Every structure of gorgon.h: its size and alignment, then each field's
 * offset and size, one line each ("S name size align" / "F struct.field
 * offset size"). */
#define S(t) fprintf(f, "S %s %zu %zu\n", #t, sizeof(t), _Alignof(t))
#define F(t, m) fprintf(f, "F %s.%s %zu %zu\n", #t, #m, offsetof(t, m), sizeof(((t *)0)->m))

static void write_layout(FILE *f)
{
    S(gorgon_opts);
    F(gorgon_opts, socket_path); F(gorgon_opts, flags); F(gorgon_opts, spin_ns);

    S(gorgon_request);
    F(gorgon_request, opcode); F(gorgon_request, slot); F(gorgon_request, in_len);
    F(gorgon_request, user_data);

    S(gorgon_completion);
    F(gorgon_completion, user_data); F(gorgon_completion, result); F(gorgon_completion, opcode);
    F(gorgon_completion, slot); F(gorgon_completion, flags); F(gorgon_completion, out);
    F(gorgon_completion, out_len); F(gorgon_completion, arg);

    S(gorgon_counters);
    F(gorgon_counters, clients_now); F(gorgon_counters, clients_total);
    F(gorgon_counters, sessions_reclaimed); F(gorgon_counters, requests_total);
    F(gorgon_counters, protocol_errors); F(gorgon_counters, loop_wakeups);
    F(gorgon_counters, gen_queued); F(gorgon_counters, gen_running);
    F(gorgon_counters, gen_tokens_total); F(gorgon_counters, gen_tokens_per_s);
    F(gorgon_counters, kv_blocks_used); F(gorgon_counters, kv_blocks_total);
    F(gorgon_counters, decode_batch_max); F(gorgon_counters, gen_requests_total);
    F(gorgon_counters, gen_failed); F(gorgon_counters, worker_restarts);
    F(gorgon_counters, medusa_steps); F(gorgon_counters, medusa_accepted);
    F(gorgon_counters, medusa_max_batch); F(gorgon_counters, gen_waiting);
    F(gorgon_counters, handshakes_pending); F(gorgon_counters, handshakes_dropped);
    F(gorgon_counters, watchdog_kills); F(gorgon_counters, step_max_us);
    F(gorgon_counters, gen_cancelled); F(gorgon_counters, gen_handoff_waiting);
    F(gorgon_counters, gen_handoffs_total);

    S(gorgon_group);
    F(gorgon_group, group); F(gorgon_group, n_ranks); F(gorgon_group, state);
    F(gorgon_group, in_worker); F(gorgon_group, waiting); F(gorgon_group, queued);
    F(gorgon_group, running); F(gorgon_group, kv_blocks_used);
    F(gorgon_group, kv_blocks_total); F(gorgon_group, tokens_total);
    F(gorgon_group, requests_total); F(gorgon_group, restarts);
    F(gorgon_group, watchdog_kills); F(gorgon_group, decode_batch_max);
    F(gorgon_group, step_max_us); F(gorgon_group, medusa_max_batch); F(gorgon_group, pid);
    F(gorgon_group, role); F(gorgon_group, handoff_waiting); F(gorgon_group, handoffs_total);

    S(gorgon_model);
    F(gorgon_model, name); F(gorgon_model, n_ctx); F(gorgon_model, n_vocab);
    F(gorgon_model, bos); F(gorgon_model, eos); F(gorgon_model, chat_template);

    S(gorgon_gen_params);
    F(gorgon_gen_params, prompt); F(gorgon_gen_params, prompt_len);
    F(gorgon_gen_params, prompt_ids); F(gorgon_gen_params, n_ids);
    F(gorgon_gen_params, max_tokens); F(gorgon_gen_params, temperature);
    F(gorgon_gen_params, top_k); F(gorgon_gen_params, top_p); F(gorgon_gen_params, min_p);
    F(gorgon_gen_params, repeat_penalty); F(gorgon_gen_params, seed);
    F(gorgon_gen_params, stop); F(gorgon_gen_params, n_stop); F(gorgon_gen_params, flags);

    S(gorgon_gen_usage);
    F(gorgon_gen_usage, prompt_tokens); F(gorgon_gen_usage, completion_tokens);
    F(gorgon_gen_usage, ttft_ns); F(gorgon_gen_usage, total_ns);
    F(gorgon_gen_usage, medusa_steps); F(gorgon_gen_usage, medusa_accepted);
    F(gorgon_gen_usage, seed);

    S(gorgon_gen_chunk);
    F(gorgon_gen_chunk, text); F(gorgon_gen_chunk, len); F(gorgon_gen_chunk, ids);
    F(gorgon_gen_chunk, n_ids); F(gorgon_gen_chunk, done); F(gorgon_gen_chunk, finish);
    F(gorgon_gen_chunk, error); F(gorgon_gen_chunk, usage);

    /* Constants the package copies from the headers. */
    fprintf(f, "C GORGON_GEN_MAX_STOP %d\n", GORGON_GEN_MAX_STOP);
    fprintf(f, "C GORGON_GEN_PROMPT_IDS %u\n", GORGON_GEN_PROMPT_IDS);
    fprintf(f, "C GORGON_GEN_WANT_IDS %u\n", GORGON_GEN_WANT_IDS);
    fprintf(f, "C GORGON_GEN_NO_MEDUSA %u\n", GORGON_GEN_NO_MEDUSA);
    fprintf(f, "C GORGON_TOK_ADD_BOS %u\n", GORGON_TOK_ADD_BOS);
    fprintf(f, "C GORGON_BUSY_POLL %u\n", GORGON_BUSY_POLL);
    fprintf(f, "C GORGON_NO_SPIN %u\n", GORGON_NO_SPIN);
    fprintf(f, "C GORGON_GROUP_MAX_RANKS %d\n", GORGON_GROUP_MAX_RANKS);
    for (int i = GORGON_FINISH_NONE; i <= GORGON_FINISH_ERROR; i++)
        fprintf(f, "C finish.%d %s\n", i, gorgon_finish_name(i));
}

/* The build tree of this binary (build/<mode>), and the repo root above it. */
static void build_tree(char *tree, char *root, size_t cap)
{
    snprintf(tree, cap, "%s", tu_build_dir());
    snprintf(root, cap, "%s", tu_repo_root());
}

/* The sanitizer runtimes this binary runs with (from its own maps), as an
 * LD_PRELOAD list for python: an instrumented libgorgon.so needs them
 * loaded first, ASan's before UBSan's. "" for a plain build. */
static void sanitizer_preload(char *out, size_t cap)
{
    static const char *const runtimes[] = {"libasan.so", "libtsan.so", "libubsan.so"};
    out[0] = '\0';
    for (size_t r = 0; r < sizeof(runtimes) / sizeof(runtimes[0]); r++) {
        FILE *f = fopen("/proc/self/maps", "r");
        cr_assert_not_null(f);
        char line[PATH_MAX + 128];
        while (fgets(line, sizeof(line), f)) {
            char *path = strchr(line, '/');
            if (!path)
                continue;
            path[strcspn(path, "\n")] = '\0';
            if (strncmp(strrchr(path, '/') + 1, runtimes[r], strlen(runtimes[r])) != 0)
                continue;
            size_t len = strlen(out);
            snprintf(out + len, cap - len, "%s%s", len ? ":" : "", path);
            break;
        }
        fclose(f);
    }
}

/* Test methods in clients/python/tests/test_*.py ("def test_" lines): what
 * "Ran N tests" must say. */
static int count_py_tests(const char *dir)
{
    DIR *d = opendir(dir);
    cr_assert_not_null(d, "%s: %s", dir, strerror(errno));
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t len = strlen(e->d_name);
        if (strncmp(e->d_name, "test_", 5) || len < 4 || strcmp(e->d_name + len - 3, ".py"))
            continue;
        char p[PATH_MAX + 256];
        snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
        FILE *f = fopen(p, "r");
        cr_assert_not_null(f);
        char line[1024];
        while (fgets(line, sizeof(line), f)) {
            const char *s = line + strspn(line, " ");
            n += strncmp(s, "def test_", 9) == 0 || strncmp(s, "async def test_", 15) == 0;
        }
        fclose(f);
    }
    closedir(d);
    return n;
}

Test(python, unittest_suite_passes_against_gorgond, .fini = teardown, .timeout = 600)
{
    cr_assert_eq(access(PYTHON, X_OK), 0, PYTHON " missing: apt-get install python3");
    char tree[PATH_MAX], root[PATH_MAX];
    build_tree(tree, root, sizeof(tree));
    char model[PATH_MAX], models[PATH_MAX];
    snprintf(model, sizeof(model), "%s", tu_model_path("stories260K/stories260K.gguf"));
    cr_assert_not_null(realpath(tu_models_dir(), models));

    int rc = gd_start(&gd, "--model", model, NULL);
    if (rc == -ENOENT)
        cr_skip_test("gorgond not built: run `make build/bin/gorgond`");
    cr_assert_eq(rc, 0, "gorgond did not start: %s", strerror(-rc));

    snprintf(tmpdir, sizeof(tmpdir), "/tmp/gorgon-py-XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir));
    snprintf(layout_path, sizeof(layout_path), "%s/layout.txt", tmpdir);
    FILE *lf = fopen(layout_path, "w");
    cr_assert_not_null(lf);
    write_layout(lf);
    cr_assert_eq(fclose(lf), 0);

    char lib[PATH_MAX + 32], cli[PATH_MAX + 32], pkg[PATH_MAX + 32], tests[PATH_MAX + 32];
    snprintf(lib, sizeof(lib), "%s/lib/libgorgon.so.0", tree);
    snprintf(cli, sizeof(cli), "%s/bin/gorgon", tree);
    snprintf(pkg, sizeof(pkg), "%s/clients/python", root);
    snprintf(tests, sizeof(tests), "%s/clients/python/tests", root);
    cr_assert_eq(access(lib, R_OK), 0, "%s not built", lib);
    int expected = count_py_tests(tests);
    cr_assert_geq(expected, 30, "only %d test methods found in %s", expected, tests);

    char pid[32], preload[4 * PATH_MAX];
    snprintf(pid, sizeof(pid), "%d", (int)gd.pid);
    sanitizer_preload(preload, sizeof(preload));

    int p[2];
    cr_assert_eq(pipe(p), 0);
    pid_t child = fork();
    cr_assert_geq(child, 0);
    if (child == 0) {
        dup2(p[1], 1);
        dup2(p[1], 2);
        close(p[0]);
        close(p[1]);
        if (chdir(root) != 0)
            _exit(126);
        /* Python as a shell would start it: no signal blocked or ignored
         * (the Ctrl-C tests send SIGINT to python processes). */
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGINT, SIG_DFL);
        setenv("GORGON_SOCKET", gd.sock, 1);
        setenv("GORGON_LIBRARY", lib, 1);
        setenv("GORGON_TEST_LAYOUT", layout_path, 1);
        setenv("GORGON_TEST_GORGOND_PID", pid, 1);
        setenv("GORGON_TEST_CLI", cli, 1);
        setenv("GORGON_TEST_MODELS", models, 1);
        setenv("PYTHONPATH", pkg, 1);
        setenv("PYTHONDONTWRITEBYTECODE", "1", 1);
        setenv("PYTHONUNBUFFERED", "1", 1);
        if (preload[0]) {
            setenv("LD_PRELOAD", preload, 1);
            /* python itself is not instrumented: its allocations at exit
             * are not ours to report */
            setenv("ASAN_OPTIONS", "detect_leaks=0", 1);
        }
        execl(PYTHON, PYTHON, "-m", "unittest", "discover", "-v", "-s", tests, "-t", tests,
              (char *)NULL);
        _exit(127);
    }
    close(p[1]);
    static char out[1 << 20];
    size_t n = 0;
    ssize_t k;
    while (n < sizeof(out) - 1 && (k = read(p[0], out + n, sizeof(out) - 1 - n)) > 0)
        n += (size_t)k;
    out[n] = '\0';
    close(p[0]);
    int st;
    cr_assert_eq(waitpid(child, &st, 0), child);
    fprintf(stderr, "%s", out);

    /* unittest's summary: "Ran N tests in Xs", then "OK" or "FAILED (...)",
     * either with "skipped=K" in parentheses. */
    const char *ran = strstr(out, "\nRan ");
    cr_assert_not_null(ran, "no 'Ran N tests' line: python exited with status %d", st);
    int ran_n = atoi(ran + 5);
    const char *blank = strstr(ran, "\n\n");
    cr_assert_not_null(blank);
    char verdict[256];
    snprintf(verdict, sizeof(verdict), "%.*s", (int)strcspn(blank + 2, "\n"), blank + 2);
    const char *skipped = strstr(verdict, "skipped=");
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "unittest failed (status %d): %s", st,
              verdict);
    cr_assert(strncmp(verdict, "OK", 2) == 0, "unittest verdict: %s", verdict);
    cr_assert_null(skipped, "python tests were skipped: %s (see the '... skipped' lines)",
                   verdict);
    cr_assert_eq(ran_n, expected, "unittest ran %d tests, the files define %d", ran_n, expected);

    GD_END(&gd);
}
