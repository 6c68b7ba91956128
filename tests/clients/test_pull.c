/* `gorgon pull` against a local HTTP server (tests/clients/util/pull_server.py):
 * a download lands whole and checked, a second run finds it, an interrupted
 * one resumes with a Range request, a bad checksum or a 404 leaves nothing
 * behind, a server that ignores ranges is handled, and hf:// resolves. */
#include <criterion/criterion.h>
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/clients/util/gd_proc.h"
#include "tests/clients/util/run_proc.h"

#define SIZE (1 << 20)

static pid_t server = -1;
static int port;
static char cache[64];
static char gorgon_bin[PATH_MAX];

static void stop_server(void)
{
    rp_server_stop(&server);
    rp_rmdir(cache);
}

static void start_server(void)
{
    snprintf(gorgon_bin, sizeof(gorgon_bin), "%s", tu_bin("gorgon"));
    server = rp_server_start("tests/clients/util/pull_server.py", NULL, &port);
    rp_tmpdir(cache, sizeof(cache), "/tmp/gorgon-pull-XXXXXX");
}

/* Run `gorgon pull ARGS... SOURCE`: exit status; stdout and stderr kept. */
static char out[4096], err[4096];
static int pull(const char *source, const char *extra1, const char *extra2)
{
    const char *argv[8] = {gorgon_bin, "pull", "--cache-dir", cache};
    int k = 4;
    if (extra1)
        argv[k++] = extra1;
    if (extra2)
        argv[k++] = extra2;
    argv[k++] = source;
    argv[k] = NULL;
    return rp_run(argv, cache, out, sizeof(out), err, sizeof(err));
}

static char url_buf[256];
static const char *url(const char *path)
{
    snprintf(url_buf, sizeof(url_buf), "http://127.0.0.1:%d%s", port, path);
    return url_buf;
}

/* The cache path of path on our server, and whether it holds the body. */
static char dest[512];
static const char *cached(const char *path)
{
    snprintf(dest, sizeof(dest), "%s/127.0.0.1:%d%s", cache, port, path);
    return dest;
}

static bool holds_body(const char *file)
{
    FILE *f = fopen(file, "rb");
    if (!f)
        return false;
    static unsigned char b[SIZE + 1];
    size_t n = fread(b, 1, sizeof(b), f);
    fclose(f);
    if (n != SIZE)
        return false;
    for (size_t i = 0; i < SIZE; i++)
        if (b[i] != (unsigned char)((i * 31 + i / 7) & 0xff))
            return false;
    return true;
}

static bool exists(const char *file)
{
    struct stat sb;
    return stat(file, &sb) == 0;
}

static char log_buf[4096];
static const char *server_log(void)
{
    char cmd[256];
    snprintf(cmd, sizeof(cmd), "python3 -c \"import urllib.request as u; "
                               "print(u.urlopen('http://127.0.0.1:%d/log').read().decode(), "
                               "end='')\"", port);
    FILE *p = popen(cmd, "r");
    cr_assert_not_null(p);
    log_buf[fread(log_buf, 1, sizeof(log_buf) - 1, p)] = '\0';
    pclose(p);
    return log_buf;
}

Test(clients_pull, download_check_and_cache_hit, .init = start_server, .fini = stop_server,
     .timeout = 60)
{
    cr_assert_eq(pull(url("/file.bin"), NULL, NULL), 0, "%s", err);
    char want[600];
    snprintf(want, sizeof(want), "%s\n", cached("/file.bin"));
    cr_assert_str_eq(out, want, "stdout must be the path");
    cr_assert(holds_body(dest), "the file is not the body");
    cr_assert(strstr(err, "SHA-256 checked"), "the ETag's SHA-256 was not checked: %s", err);
    cr_assert_eq(pull(url("/file.bin"), NULL, NULL), 0);
    cr_assert(strstr(err, "already here"), "%s", err);
    cr_assert_str_eq(out, want);
    /* an explicit checksum is checked against the cached file too */
    cr_assert_neq(pull(url("/file.bin"), "--sha256", "00000000000000000000000000000000"
                                                     "00000000000000000000000000000000"),
                  0);
    cr_assert(strstr(err, "does not match"), "%s", err);
}

Test(clients_pull, interrupted_download_resumes, .init = start_server, .fini = stop_server,
     .timeout = 60)
{
    cr_assert_neq(pull(url("/truncated.bin"), NULL, NULL), 0, "a truncated body must fail");
    cr_assert(strstr(err, "again to resume"), "%s", err);
    char part[600];
    snprintf(part, sizeof(part), "%s.part", cached("/truncated.bin"));
    struct stat sb;
    cr_assert_eq(stat(part, &sb), 0, "the partial download was not kept");
    cr_assert(sb.st_size > 0 && sb.st_size < SIZE, ".part has %lld bytes", (long long)sb.st_size);
    cr_assert_not(exists(cached("/truncated.bin")), "an incomplete file got the final name");
    long long had = (long long)sb.st_size;

    cr_assert_eq(pull(url("/truncated.bin"), NULL, NULL), 0, "%s", err);
    cr_assert(holds_body(cached("/truncated.bin")));
    cr_assert_not(exists(part));
    char want_range[64];
    snprintf(want_range, sizeof(want_range), "bytes=%lld-", had);
    cr_assert(strstr(server_log(), want_range), "no Range request from %lld: log %s", had,
              log_buf);
}

Test(clients_pull, bad_checksum_and_404_leave_nothing, .init = start_server, .fini = stop_server,
     .timeout = 60)
{
    cr_assert_neq(pull(url("/badsum.bin"), NULL, NULL), 0);
    cr_assert(strstr(err, "SHA-256 mismatch"), "%s", err);
    cr_assert_not(exists(cached("/badsum.bin")));
    char part[600];
    snprintf(part, sizeof(part), "%s.part", cached("/badsum.bin"));
    cr_assert_not(exists(part), "a download that failed its checksum was kept");

    cr_assert_neq(pull(url("/missing.gguf"), NULL, NULL), 0);
    cr_assert(strstr(err, "HTTP 404"), "%s", err);
    cr_assert_not(exists(cached("/missing.gguf")));
    snprintf(part, sizeof(part), "%s.part", cached("/missing.gguf"));
    cr_assert_not(exists(part));
    cr_assert_str_eq(out, "", "nothing on stdout when it fails");

    cr_assert_eq(pull("ftp://example.org/x", NULL, NULL), 2);
    cr_assert(strstr(err, "expected an http(s):// URL"), "%s", err);
    cr_assert_eq(pull("hf://onlyowner", NULL, NULL), 2);
    cr_assert(strstr(err, "hf://OWNER/REPO/FILE"), "%s", err);
}

Test(clients_pull, server_without_ranges_restarts, .init = start_server, .fini = stop_server,
     .timeout = 60)
{
    /* a stale half file, as an interrupted run leaves it */
    char part[600];
    snprintf(part, sizeof(part), "%s.part", cached("/norange.bin"));
    char dir[600];
    snprintf(dir, sizeof(dir), "%s/127.0.0.1:%d", cache, port);
    cr_assert_eq(mkdir(dir, 0755), 0);
    FILE *f = fopen(part, "wb");
    cr_assert_not_null(f);
    for (int i = 0; i < 1000; i++)
        fputc('x', f);
    fclose(f);
    cr_assert_eq(pull(url("/norange.bin"), NULL, NULL), 0, "%s", err);
    cr_assert(holds_body(cached("/norange.bin")), "a 200 answer to a Range request must "
                                                   "restart the file, not append to it");
}

Test(clients_pull, hf_urls_follow_the_redirect_and_its_sha, .init = start_server,
     .fini = stop_server, .timeout = 60)
{
    char ep[64];
    snprintf(ep, sizeof(ep), "http://127.0.0.1:%d/", port);
    setenv("HF_ENDPOINT", ep, 1);
    char o[600];
    snprintf(o, sizeof(o), "%s/model.gguf", cache);
    int rc = pull("hf://ggml-org/models/file.bin@v1", "--output", o);
    unsetenv("HF_ENDPOINT");
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert(holds_body(o));
    cr_assert(strstr(err, "/ggml-org/models/resolve/v1/file.bin"), "%s", err);
    cr_assert(strstr(err, "SHA-256 checked"), "X-Linked-Etag not used: %s", err);
}

/* A cache directory whose parents do not exist yet (a fresh $HOME has no
 * ~/.cache) is created whole. */
Test(clients_pull, missing_cache_parents_are_created, .init = start_server, .fini = stop_server,
     .timeout = 60)
{
    char nested[300];
    snprintf(nested, sizeof(nested), "%s/home/.cache/gorgon", cache);
    cr_assert_eq(pull(url("/file.bin"), "--cache-dir", nested), 0, "%s", err);
    char want[700];
    snprintf(want, sizeof(want), "%s/127.0.0.1:%d/file.bin", nested, port);
    cr_assert(holds_body(want), "%s does not hold the body (stdout %s)", want, out);
}
