/* `gorgon-bench serve --base-url` against a fake OpenAI server
 * (tests/clients/util/fake_openai.py) that streams known chunks with known
 * delays: token counts are exact, timings are bounded by the fake's delays,
 * HTTP errors are counted as failed requests with their message, and
 * --plot writes a picture and a CSV with the samples; --plot and a
 * --concurrency list work on the shared-memory path too. */
#include <criterion/criterion.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/clients/util/gd_proc.h"
#include "tests/clients/util/run_proc.h"
#include "tests/util/test_models.h"

static pid_t server = -1;
static int port;
static char dir[64];
static char bench_bin[PATH_MAX];
static char out[1 << 16], err[1 << 16];

static void cleanup(void)
{
    rp_server_stop(&server);
    rp_rmdir(dir);
}

static void setup(void)
{
    snprintf(bench_bin, sizeof(bench_bin), "%s", tu_bin("gorgon-bench"));
    rp_tmpdir(dir, sizeof(dir), "/tmp/gorgon-bench-http-XXXXXX");
}

/* Start the fake server with its options (NULL-terminated); port set. */
static void start_fake(const char *first, ...)
{
    const char *args[22];
    int n = 0;
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a && n < 21; a = va_arg(ap, const char *))
        args[n++] = a;
    va_end(ap);
    args[n] = NULL;
    server = rp_server_start("tests/clients/util/fake_openai.py", args, &port);
}

static char url_buf[64];
static const char *base_url(void)
{
    snprintf(url_buf, sizeof(url_buf), "http://127.0.0.1:%d", port);
    return url_buf;
}

/* Run `gorgon-bench serve ARGS...` (NULL-terminated): exit status; stdout
 * in out, stderr in err. */
static int bench(const char *first, ...)
{
    const char *argv[48] = {bench_bin, "serve"};
    int argc = 2;
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a && argc < 47; a = va_arg(ap, const char *))
        argv[argc++] = a;
    va_end(ap);
    argv[argc] = NULL;
    return rp_run(argv, dir, out, sizeof(out), err, sizeof(err));
}

/* The number after "key": in json; "a.b" looks up b inside a's object.
 * The test fails when it is missing. */
static double jnum(const char *json, const char *path)
{
    char key[64];
    const char *p = json, *dot = strchr(path, '.');
    if (dot) {
        snprintf(key, sizeof(key), "\"%.*s\": {", (int)(dot - path), path);
        p = strstr(p, key);
        cr_assert_not_null(p, "no %s in %s", key, json);
        path = dot + 1;
    }
    snprintf(key, sizeof(key), "\"%s\": ", path);
    p = strstr(p, key);
    cr_assert_not_null(p, "no %s in %s", key, json);
    char *end;
    double v = strtod(p + strlen(key), &end);
    cr_assert_neq(end, p + strlen(key), "%s is not a number in %s", path, json);
    return v;
}

/* What the fake server saw: one JSON line per POST. */
static char log_buf[1 << 16];
static const char *fake_log(void)
{
    char cmd[256];
    snprintf(cmd, sizeof(cmd),
             "python3 -c \"import urllib.request as u; "
             "print(u.urlopen('http://127.0.0.1:%d/log').read().decode(), end='')\"",
             port);
    FILE *p = popen(cmd, "r");
    cr_assert_not_null(p);
    log_buf[fread(log_buf, 1, sizeof(log_buf) - 1, p)] = '\0';
    cr_assert_eq(pclose(p), 0, "reading the fake server's log failed");
    return log_buf;
}

static int count_of(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle))
        n++;
    return n;
}

Test(clients_bench_http, streams_are_counted_exactly_and_timed_within_the_fakes_delays,
     .init = setup, .fini = cleanup, .timeout = 60)
{
    start_fake("--chunks", "5", "--first-delay-ms", "30", "--gap-ms", "10", NULL);
    cr_assert_eq(bench("--base-url", base_url(), "--num-prompts", "6", "--concurrency", "2",
                       "--max-tokens", "5", "--json", NULL),
                 0, "%s", err);
    cr_assert_eq(count_of(out, "\n"), 1, "one JSON line per concurrency value: %s", out);
    cr_assert_eq(jnum(out, "completed"), 6);
    cr_assert_eq(jnum(out, "failed"), 0);
    cr_assert_eq(jnum(out, "max_concurrency"), 2);
    cr_assert_eq(jnum(out, "total_output_tokens"), 30, "5 chunks of one token each, 6 requests");
    cr_assert_eq(jnum(out, "total_input_tokens"), 6 * 32, "the fake counts the prompt's ids");
    /* no chunk leaves the fake before its delay after the request arrived */
    cr_assert_geq(jnum(out, "ttft_ms.median"), 30.0, "%s", out);
    cr_assert_geq(jnum(out, "ttft_ms.mean"), 30.0, "%s", out);
    cr_assert_geq(jnum(out, "e2el_ms.median"), 30.0 + 4 * 10.0, "%s", out);
    cr_assert_lt(jnum(out, "ttft_ms.median"), 30.0 + 5000.0, "%s", out);
    /* one token per chunk: TPOT is the mean gap between chunks */
    cr_assert_float_eq(jnum(out, "tpot_ms.mean"), jnum(out, "itl_ms.mean"), 2e-4, "%s", out);
    cr_assert_gt(jnum(out, "itl_ms.p99"), 0.0);
    cr_assert_gt(jnum(out, "request_throughput"), 0.0);
    cr_assert_float_eq(jnum(out, "output_throughput"), 5 * jnum(out, "request_throughput"),
                       1e-2 * jnum(out, "output_throughput"), "%s", out);
    cr_assert(strstr(out, "\"errors\": []"), "%s", out);

    /* what went over the wire: the warm-up and 6 streaming requests */
    const char *log = fake_log();
    cr_assert_eq(count_of(log, "\n"), 7, "%s", log);
    cr_assert_eq(count_of(log, "\"stream\": true"), 7, "%s", log);
    cr_assert_eq(count_of(log, "\"stream_options\": {\"include_usage\": true}"), 7, "%s", log);
    cr_assert_eq(count_of(log, "\"model\": \"fake-model\""), 7, "the model of /v1/models: %s", log);
    cr_assert_eq(count_of(log, "\"max_tokens\": 5"), 6, "%s", log);
    cr_assert_eq(count_of(log, "\"prompt\": [1, "), 7, "token-id prompts after BOS: %s", log);
}

Test(clients_bench_http, output_tokens_come_from_usage_else_from_chunks, .init = setup,
     .fini = cleanup, .timeout = 60)
{
    start_fake("--chunks", "4", "--tokens-per-chunk", "3", NULL);
    cr_assert_eq(bench("--base-url", base_url(), "--requests", "5", "--max-tokens", "12",
                       "--json", NULL),
                 0, "%s", err);
    cr_assert_eq(jnum(out, "total_output_tokens"), 5 * 4 * 3, "usage.completion_tokens: %s", out);
    cleanup();
    setup();
    start_fake("--chunks", "4", "--tokens-per-chunk", "3", "--no-usage", NULL);
    cr_assert_eq(bench("--base-url", base_url(), "--requests", "5", "--max-tokens", "12",
                       "--input-len", "7", "--json", NULL),
                 0, "%s", err);
    cr_assert_eq(jnum(out, "total_output_tokens"), 5 * 4, "one per chunk without usage: %s", out);
    cr_assert_eq(jnum(out, "total_input_tokens"), 5 * 7, "the prompt's length: %s", out);
}

Test(clients_bench_http, chat_endpoint_with_text_prompt_model_and_api_key, .init = setup,
     .fini = cleanup, .timeout = 60)
{
    start_fake("--chunks", "3", "--api-key", "s3cret", NULL);
    cr_assert_eq(bench("--base-url", base_url(), "--endpoint", "/v1/chat/completions",
                       "--prompt", "Once upon a time", "--model", "my-model", "--api-key",
                       "s3cret", "--temperature", "0.5", "--num-prompts", "4", "--json", NULL),
                 0, "%s", err);
    cr_assert_eq(jnum(out, "completed"), 4);
    cr_assert_eq(jnum(out, "total_output_tokens"), 4 * 3, "%s", out);
    cr_assert_eq(jnum(out, "total_input_tokens"), 4 * 4, "the fake counts words: %s", out);
    const char *log = fake_log();
    cr_assert_eq(count_of(log, "\"auth\": \"Bearer s3cret\""), 5, "%s", log);
    cr_assert_eq(count_of(log, "\"model\": \"my-model\""), 5, "%s", log);
    cr_assert_eq(count_of(log, "\"messages\": [{\"role\": \"user\", \"content\": \"Once upon a time\"}]"),
                 5, "%s", log);
    cr_assert_eq(count_of(log, "\"temperature\": 0.5"), 5, "%s", log);

    /* without the key the warm-up request gets a 401: nothing is measured */
    cr_assert_eq(bench("--base-url", base_url(), "--endpoint", "/v1/chat/completions",
                       "--prompt", "Hi", "--num-prompts", "2", "--json", NULL),
                 1);
    cr_assert(strstr(err, "warm-up") && strstr(err, "HTTP 401") && strstr(err, "bad API key"),
              "%s", err);
    cr_assert_str_empty(out);
}

Test(clients_bench_http, http_errors_are_failed_requests_with_their_message, .init = setup,
     .fini = cleanup, .timeout = 60)
{
    /* POST 1 is the warm-up; of the 6 measured (POSTs 2..7) 2, 4, 6 fail */
    start_fake("--chunks", "3", "--fail-every", "2", "--fail-status", "500", NULL);
    cr_assert_eq(bench("--base-url", base_url(), "--num-prompts", "6", "--concurrency", "1",
                       "--json", NULL),
                 1, "a run with failures exits 1: %s", err);
    cr_assert_eq(jnum(out, "completed"), 3, "%s", out);
    cr_assert_eq(jnum(out, "failed"), 3, "%s", out);
    cr_assert_eq(jnum(out, "total_output_tokens"), 3 * 3, "only completed requests count: %s", out);
    cr_assert(strstr(out, "HTTP 500: {\\\"error\\\": {\\\"message\\\": \\\"fake failure of request 2\\\""),
              "the error body is in the message: %s", out);
    cr_assert(strstr(out, "fake failure of request 4") && strstr(out, "fake failure of request 6"),
              "%s", out);
    cr_assert(strstr(err, "failed: HTTP 500"), "%s", err);
    cleanup();
    setup();

    /* errors inside a 200 stream: vLLM's error event, llama-server's line */
    const char *kinds[2][2] = {{"event", "error event in the stream: fake failure of request 2"},
                               {"line", "error in the stream: {\\\"message\\\": \\\"fake failure of request 2"}};
    for (int i = 0; i < 2; i++) {
        start_fake("--chunks", "3", "--fail-every", "2", "--fail-kind", kinds[i][0], NULL);
        cr_assert_eq(bench("--base-url", base_url(), "--num-prompts", "6", "--concurrency", "3",
                           "--json", NULL),
                     1, "%s", err);
        cr_assert_eq(jnum(out, "completed"), 3, "%s: %s", kinds[i][0], out);
        cr_assert_eq(jnum(out, "failed"), 3, "%s: %s", kinds[i][0], out);
        cr_assert_eq(jnum(out, "total_output_tokens"), 3 * 3, "%s: %s", kinds[i][0], out);
        cr_assert(strstr(out, kinds[i][1]), "%s: %s", kinds[i][0], out);
        cleanup();
        setup();
    }

    /* a 400 for everything: the warm-up says why and the run stops */
    start_fake("--fail-every", "1", "--fail-status", "400", NULL);
    cr_assert_eq(bench("--base-url", base_url(), "--num-prompts", "3", "--json", NULL), 1);
    cr_assert(strstr(err, "HTTP 400") && strstr(err, "fake failure of request 1"), "%s", err);
    cr_assert_str_empty(out);
}

Test(clients_bench_http, unreachable_server_and_bad_options_are_named, .init = setup,
     .fini = cleanup, .timeout = 60)
{
    /* a port nothing listens on: bind one, then close it */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sa);
    cr_assert_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    cr_assert_eq(getsockname(fd, (struct sockaddr *)&sa, &sl), 0);
    close(fd);
    char url[64];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d", ntohs(sa.sin_port));
    cr_assert_eq(bench("--base-url", url, "--model", "m", "--num-prompts", "2", NULL), 1);
    cr_assert(strstr(err, url) && strstr(err, "warm-up"), "%s", err);

    cr_assert_eq(bench("--base-url", "ftp://x", NULL), 2);
    cr_assert(strstr(err, "--base-url \"ftp://x\""), "%s", err);
    cr_assert_eq(bench("--base-url", "http://x", "--endpoint", "/v1/chat/completions", NULL), 2);
    cr_assert(strstr(err, "needs --prompt"), "%s", err);
    cr_assert_eq(bench("--base-url", "http://x", "--endpoint", "v1/completions", NULL), 2);
    cr_assert(strstr(err, "--endpoint \"v1/completions\""), "%s", err);
    cr_assert_eq(bench("--concurrency", "1,,4", NULL), 2);
    cr_assert(strstr(err, "--concurrency \"1,,4\""), "%s", err);
    cr_assert_eq(bench("--concurrency", "1,x", NULL), 2);
    cr_assert(strstr(err, "--concurrency") && strstr(err, "\"x\""), "%s", err);
    cr_assert_eq(bench("--plot", "/tmp/out.jpg", NULL), 2);
    cr_assert(strstr(err, "--plot \"/tmp/out.jpg\""), "%s", err);
    cr_assert_eq(bench("--plot", "/nonexistent-dir/out.png", NULL), 2);
    cr_assert(strstr(err, "/nonexistent-dir"), "%s", err);
    cr_assert_eq(bench("--socket", "/x", "--base-url", "http://x", NULL), 2);
    cr_assert(strstr(err, "give one"), "%s", err);
    cr_assert_eq(bench("--base-url", "http://x", "--no-medusa", NULL), 2);
    cr_assert(strstr(err, "--no-medusa"), "%s", err);
    cr_assert_eq(bench("--api-key", "k", NULL), 2);
    cr_assert(strstr(err, "--base-url"), "%s", err);
}

/* Rows of metric (and concurrency c) in the CSV. */
static int csv_rows(const char *csv, long c, const char *metric)
{
    char pat[64];
    snprintf(pat, sizeof(pat), "\n%ld,%s,", c, metric);
    return count_of(csv, pat);
}

static char csv[1 << 20];
static gd_proc gd;

Test(clients_bench_http, plot_draws_a_png_and_writes_the_samples_as_csv, .init = setup,
     .fini = cleanup, .timeout = 90)
{
    start_fake("--chunks", "5", "--gap-ms", "1", NULL);
    char png[128], csvf[128];
    snprintf(png, sizeof(png), "%s/serve.png", dir);
    snprintf(csvf, sizeof(csvf), "%s/serve.csv", dir);
    cr_assert_eq(bench("--base-url", base_url(), "--num-prompts", "8", "--concurrency", "1,4",
                       "--plot", png, "--json", NULL),
                 0, "%s", err);
    cr_assert_eq(count_of(out, "\n"), 2, "one JSON line per concurrency value: %s", out);
    cr_assert(strstr(out, "\"max_concurrency\": 1,") && strstr(out, "\"max_concurrency\": 4,"),
              "%s", out);
    FILE *f = fopen(png, "rb");
    cr_assert_not_null(f, "%s was not written: %s", png, err);
    unsigned char magic[8] = {0};
    cr_assert_eq(fread(magic, 1, 8, f), 8);
    fclose(f);
    cr_assert(!memcmp(magic, "\x89PNG\r\n\x1a\n", 8), "not a PNG");
    struct stat sb;
    cr_assert_eq(stat(png, &sb), 0);
    cr_assert_gt(sb.st_size, 1000, "the PNG is nearly empty");

    rp_slurp(csvf, csv, sizeof(csv));
    cr_assert(!strncmp(csv, "concurrency,metric,value\n", 25), "header: %.80s", csv);
    for (long c = 1; c <= 4; c += 3) {
        cr_assert_eq(csv_rows(csv, c, "ttft_ms"), 8, "c=%ld", c);
        cr_assert_eq(csv_rows(csv, c, "e2el_ms"), 8, "c=%ld", c);
        cr_assert_eq(csv_rows(csv, c, "tpot_ms"), 8, "c=%ld", c);
        cr_assert_eq(csv_rows(csv, c, "itl_ms"), 8 * 4, "a gap between each of 5 chunks, c=%ld", c);
        cr_assert_eq(csv_rows(csv, c, "request_throughput"), 1, "c=%ld", c);
        cr_assert_eq(csv_rows(csv, c, "output_throughput"), 1, "c=%ld", c);
    }
    cr_assert_eq(count_of(csv, "\n"), 1 + 2 * (8 * 3 + 8 * 4 + 2), "no other rows");
}

Test(clients_bench_http, plot_on_the_shm_path_with_a_concurrency_list_draws_svg, .init = setup,
     .fini = cleanup, .timeout = 120)
{
    int rc = gd_start(&gd, "--model", tu_model_path("stories260K/stories260K.gguf"), NULL);
    cr_assert_eq(rc, 0, "gd_start: %d", rc);
    char svg[128], csvf[128];
    snprintf(svg, sizeof(svg), "%s/shm.svg", dir);
    snprintf(csvf, sizeof(csvf), "%s/shm.csv", dir);
    int st = bench("--socket", gd.sock, "--num-prompts", "4", "--concurrency", "1,2",
                   "--output-len", "8", "--plot", svg, "--json", NULL);
    GD_END(&gd);
    cr_assert_eq(st, 0, "%s", err);
    cr_assert_eq(count_of(out, "\n"), 2, "%s", out);
    cr_assert_eq(count_of(out, "\"completed\": 4,"), 2, "%s", out);
    cr_assert_eq(count_of(out, "\"total_input_tokens\": 128,"), 2, "4 prompts of 32 ids: %s", out);
    rp_slurp(svg, csv, sizeof(csv));
    cr_assert(strstr(csv, "<svg") && strstr(csv, "TTFT (CDF)") && strstr(csv, "Throughput"),
              "not the SVG expected: %.200s", csv);
    rp_slurp(csvf, csv, sizeof(csv));
    cr_assert(!strncmp(csv, "concurrency,metric,value\n", 25), "header: %.80s", csv);
    for (long c = 1; c <= 2; c++) {
        cr_assert_eq(csv_rows(csv, c, "ttft_ms"), 4, "c=%ld", c);
        cr_assert_eq(csv_rows(csv, c, "output_throughput"), 1, "c=%ld", c);
    }
}

/* The line after the first of out (the second run's JSON). */
static const char *second_line(const char *s)
{
    const char *nl = strchr(s, '\n');
    cr_assert_not_null(nl, "no second line in %s", s);
    return nl + 1;
}

static int cmp_long(const void *a, const void *b)
{
    long x = *(const long *)a, y = *(const long *)b;
    return x < y ? -1 : x > y;
}

/* The token-id prompt lengths of the fake's POSTs first..last (1-based,
 * as its log numbers them) into len[], sorted: POSTs can arrive out of
 * order when several are in flight. */
static void logged_prompt_lens(const char *log, int first, int last, long *len)
{
    int k = 0;
    for (int n = first; n <= last; n++) {
        char key[32];
        snprintf(key, sizeof(key), "{\"n\": %d, ", n);
        const char *p = strstr(log, key);
        cr_assert_not_null(p, "no POST %d in %s", n, log);
        const char *eol = strchr(p, '\n');
        p = strstr(p, "\"prompt\": [");
        cr_assert(p && (!eol || p < eol), "POST %d has no token-id prompt", n);
        long commas = 0;
        for (p += strlen("\"prompt\": ["); *p && *p != ']'; p++)
            commas += *p == ',';
        len[k++] = commas + 1;
    }
    qsort(len, (size_t)k, sizeof(*len), cmp_long);
}

Test(clients_bench_http, input_len_range_and_rate_list_send_the_same_prompts_in_each_run_and_driver,
     .init = setup, .fini = cleanup, .timeout = 120)
{
    int rc = gd_start(&gd, "--model", tu_model_path("stories260K/stories260K.gguf"), NULL);
    cr_assert_eq(rc, 0, "gd_start: %d", rc);
    /* SLOs of 100 s: every request meets them */
    int st = bench("--socket", gd.sock, "--input-len", "8:64", "--output-len", "4",
                   "--num-prompts", "12", "--request-rate", "200,400", "--seed", "7", "--goodput",
                   "ttft:100000", "tpot:100000", "--json", NULL);
    cr_assert_eq(st, 0, "%s", err);
    char shm_out[sizeof(out)];
    memcpy(shm_out, out, sizeof(out));
    /* 1 ns: the parser's minimum (1e-6 ms), below any real TTFT */
    int st0 = bench("--socket", gd.sock, "--input-len", "8:64", "--output-len", "4",
                    "--num-prompts", "12", "--seed", "7", "--goodput", "ttft:0.000001", "--json",
                    NULL);
    GD_END(&gd);
    cr_assert_eq(st0, 0, "%s", err);
    cr_assert_eq(count_of(out, "\n"), 1, "%s", out);
    cr_assert_eq(jnum(out, "completed"), 12, "%s", out);
    cr_assert_eq(jnum(out, "goodput_fraction"), 0.0, "no TTFT is under 1 ns: %s", out);
    cr_assert_eq(jnum(out, "request_goodput"), 0.0, "%s", out);
    cr_assert(strstr(out, "\"request_rate\": null,"), "rate inf is null: %s", out);

    const char *l1 = shm_out, *l2 = second_line(shm_out);
    cr_assert_eq(count_of(shm_out, "\n"), 2, "one JSON line per rate: %s", shm_out);
    cr_assert_eq(jnum(l1, "request_rate"), 200.0, "rates in the order given: %s", shm_out);
    cr_assert_eq(jnum(l2, "request_rate"), 400.0, "rates in the order given: %s", shm_out);
    double total = jnum(l1, "total_input_tokens");
    double lo = jnum(l1, "input_len_min"), hi = jnum(l1, "input_len_max");
    for (int i = 0; i < 2; i++) {
        const char *l = i ? l2 : l1;
        cr_assert_eq(jnum(l, "completed"), 12, "run %d: %s", i, shm_out);
        cr_assert_eq(jnum(l, "failed"), 0, "run %d: %s", i, shm_out);
        cr_assert_eq(jnum(l, "goodput_fraction"), 1.0, "run %d: %s", i, shm_out);
        cr_assert_float_eq(jnum(l, "input_len_mean"), total / 12, 1e-4, "run %d: %s", i, shm_out);
    }
    /* the same prompts at either rate */
    cr_assert_eq(jnum(l2, "total_input_tokens"), total, "%s", shm_out);
    cr_assert_eq(jnum(l2, "input_len_min"), lo, "%s", shm_out);
    cr_assert_eq(jnum(l2, "input_len_max"), hi, "%s", shm_out);
    cr_assert(lo >= 8 && lo <= hi && hi <= 64, "lengths in [8, 64]: %s", shm_out);
    cr_assert_lt(lo, hi, "12 draws from [8, 64] are not all equal: %s", shm_out);
    cr_assert(total >= 12 * lo && total <= 12 * hi, "%s", shm_out);

    /* over HTTP with the same seed: the same lengths, and the fake saw them */
    start_fake("--chunks", "4", NULL);
    cr_assert_eq(bench("--base-url", base_url(), "--input-len", "8:64", "--output-len", "4",
                       "--num-prompts", "12", "--request-rate", "200,400", "--seed", "7", "--json",
                       NULL),
                 0, "%s", err);
    cr_assert_eq(count_of(out, "\n"), 2, "%s", out);
    for (int i = 0; i < 2; i++) {
        const char *l = i ? second_line(out) : out;
        cr_assert_eq(jnum(l, "total_input_tokens"), total, "run %d: http %s\nshm %s", i, out,
                     shm_out);
        cr_assert_eq(jnum(l, "input_len_min"), lo, "run %d: %s", i, out);
        cr_assert_eq(jnum(l, "input_len_max"), hi, "run %d: %s", i, out);
    }
    /* POST 1 is the warm-up; 2..13 the first run, 14..25 the second */
    const char *log = fake_log();
    cr_assert_eq(count_of(log, "\n"), 25, "%s", log);
    long a[12], b[12], sum = 0;
    logged_prompt_lens(log, 2, 13, a);
    logged_prompt_lens(log, 14, 25, b);
    for (int i = 0; i < 12; i++) {
        cr_assert_eq(a[i], b[i], "prompt length %d differs between the runs", i);
        sum += a[i];
    }
    cr_assert_eq((double)sum, total, "the lengths sent add up to total_input_tokens");
    cr_assert_eq((double)a[0], lo);
    cr_assert_eq((double)a[11], hi);
}

Test(clients_bench_http, bad_input_len_and_request_rate_are_named, .init = setup, .fini = cleanup,
     .timeout = 30)
{
    cr_assert_eq(bench("--input-len", "64:8", NULL), 2);
    cr_assert(strstr(err, "--input-len \"64:8\": expected A:B with A <= B"), "%s", err);
    cr_assert_eq(bench("--input-len", "8:x", NULL), 2);
    cr_assert(strstr(err, "--input-len \"8:x\"") && strstr(err, "got \"x\""), "%s", err);
    cr_assert_eq(bench("--input-len", "0:8", NULL), 2);
    cr_assert(strstr(err, "--input-len \"0:8\"") && strstr(err, "got \"0\""), "%s", err);
    cr_assert_eq(bench("--request-rate", "0", NULL), 2);
    cr_assert(strstr(err, "--request-rate") && strstr(err, "got \"0\""), "%s", err);
    cr_assert_eq(bench("--request-rate", "5,,10", NULL), 2);
    cr_assert(strstr(err, "--request-rate \"5,,10\""), "%s", err);
    cr_assert_eq(bench("--input-len", "8", "--prompt", "hi", NULL), 2);
    cr_assert(strstr(err, "--input-len and --prompt"), "%s", err);
    cr_assert_eq(bench("--goodput", "ttft:0", NULL), 2);
    cr_assert(strstr(err, "--goodput ttft") && strstr(err, "got \"0\""), "%s", err);
    cr_assert_str_empty(out);
}

/* --wait event sleeps on the completion event fds instead of spinning: the
 * same requests complete with the same token counts as the spinning
 * default, and the option is refused where it means nothing. */
Test(clients_bench_http, shm_wait_event_completes_the_same_work_as_spinning, .init = setup,
     .fini = cleanup, .timeout = 120)
{
    int rc = gd_start(&gd, "--model", tu_model_path("stories260K/stories260K.gguf"), NULL);
    cr_assert_eq(rc, 0, "gd_start: %d", rc);
    int st_spin = bench("--socket", gd.sock, "--num-prompts", "6", "--concurrency", "1,3",
                        "--output-len", "16", "--json", NULL);
    static char spin[sizeof(out)];
    memcpy(spin, out, sizeof(out));
    int st_ev = bench("--socket", gd.sock, "--num-prompts", "6", "--concurrency", "1,3",
                      "--output-len", "16", "--wait", "event", "--json", NULL);
    GD_END(&gd);
    cr_assert_eq(st_spin, 0, "%s", err);
    cr_assert_eq(st_ev, 0, "%s", err);
    cr_assert_eq(count_of(spin, "\"completed\": 6, \"failed\": 0,"), 2, "%s", spin);
    cr_assert_eq(count_of(out, "\"completed\": 6, \"failed\": 0,"), 2, "%s", out);
    /* greedy, 16 tokens each (stories260K does not stop that early) */
    cr_assert_eq(count_of(out, "\"total_output_tokens\": 96,"), 2, "%s", out);
    cr_assert_eq(count_of(spin, "\"total_output_tokens\": 96,"), 2, "%s", spin);
    cr_assert_gt(jnum(out, "ttft_ms.median"), 0.0, "%s", out);

    cr_assert_eq(bench("--wait", "nap", NULL), 2);
    cr_assert(strstr(err, "--wait: expected spin or event, got \"nap\""), "%s", err);
    cr_assert_eq(bench("--base-url", "http://127.0.0.1:1", "--wait", "event", NULL), 2);
    cr_assert(strstr(err, "--wait is for the shared-memory path"), "%s", err);
}
