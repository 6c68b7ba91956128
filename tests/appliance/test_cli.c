/* The `gorgon` CLI refuses a bad option value with exit status 2 and a
 * message naming the option (and the limit), before it sends anything:
 * never a silent 0 for "--seed abc", never an empty prompt for "-f DIR".
 * The bad command lines run against a live gorgond with a model, so that a
 * value the CLI let through would generate and exit 0 instead. */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/appliance/util/wait.h"
#include "tests/clients/util/gd_proc.h"
#include "tests/util/test_models.h"
#include "tests/util/test_tree.h"

static gd_proc gd;
static char model_buf[PATH_MAX];

static void teardown(void)
{
    gd_stop(&gd);
}

static void start_gorgond(void)
{
    snprintf(model_buf, sizeof(model_buf), "%s", tu_model_path("stories260K/stories260K.gguf"));
    AT_START(&gd, "--model", model_buf, NULL);
}

/* build/<mode>/bin/gorgon of this test's build tree; a test whose program
 * is missing fails, it is not skipped. */
static const char *gorgon_bin(void)
{
    return tu_bin("gorgon");
}

/* Run `gorgon SUBCOMMAND --socket <gd> ARGS...` (NULL-terminated), stdout to
 * /dev/null; its stderr goes to err. Returns the exit status (-1: no exit). */
static int run_cli(char *err, size_t cap, const char *sub, ...)
{
    const char *argv[32];
    int argc = 0;
    argv[argc++] = gorgon_bin();
    argv[argc++] = sub;
    argv[argc++] = "--socket";
    argv[argc++] = gd.sock;
    va_list ap;
    va_start(ap, sub);
    const char *a;
    while ((a = va_arg(ap, const char *)) && argc < 31)
        argv[argc++] = a;
    va_end(ap);
    argv[argc] = NULL;
    int p[2];
    cr_assert_eq(pipe(p), 0);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        int null = open("/dev/null", O_WRONLY);
        dup2(null, 1);
        dup2(p[1], 2);
        close(p[0]);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(p[1]);
    size_t n = 0;
    ssize_t k;
    while (n < cap - 1 && (k = read(p[0], err + n, cap - 1 - n)) > 0)
        n += (size_t)k;
    err[n] = '\0';
    close(p[0]);
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* The command line is refused with status 2 and a message holding each of
 * the (up to two) words given. */
#define EXPECT_REFUSED(word1, word2, sub, ...)                                                 \
    do {                                                                                       \
        char err_[2048];                                                                       \
        int rc_ = run_cli(err_, sizeof(err_), sub, __VA_ARGS__, NULL);                         \
        cr_expect_eq(rc_, 2, "%s %s: exit %d (want 2), stderr: %s", sub, #__VA_ARGS__, rc_,     \
                     err_);                                                                    \
        cr_expect(strstr(err_, word1) && strstr(err_, word2),                                  \
                  "%s %s: message lacks '%s' or '%s': %s", sub, #__VA_ARGS__, word1, word2,    \
                  err_);                                                                       \
    } while (0)

Test(appliance_cli, good_command_line_generates, .fini = teardown, .timeout = 60)
{
    start_gorgond();
    char err[2048];
    int rc = run_cli(err, sizeof(err), "generate", "-p", "Lily and Tom", "-n", "8", "--temp",
                     "0.8", "--seed", "18446744073709551615", "--stop", "park", NULL);
    cr_assert_eq(rc, 0, "stderr: %s", err);
    cr_assert(strstr(err, "[finish "), "no usage line: %s", err);
    /* Integers are decimal: 010 is ten tokens, not an octal eight. */
    rc = run_cli(err, sizeof(err), "generate", "-n", "010", "--no-medusa", NULL);
    cr_assert_eq(rc, 0, "stderr: %s", err);
    cr_assert(strstr(err, "completion 10 tokens"), "-n 010: %s", err);
    GD_END(&gd);
}

Test(appliance_cli, seed_must_be_a_whole_u64, .fini = teardown, .timeout = 60)
{
    start_gorgond();
    EXPECT_REFUSED("--seed", "'abc'", "generate", "-n", "2", "--seed", "abc");
    EXPECT_REFUSED("--seed", "'-1'", "generate", "-n", "2", "--seed", "-1");
    EXPECT_REFUSED("--seed", "'1e3'", "generate", "-n", "2", "--seed", "1e3");
    EXPECT_REFUSED("--seed", "''", "generate", "-n", "2", "--seed", "");
    EXPECT_REFUSED("--seed", "18446744073709551615]", "generate", "-n", "2", "--seed",
                   "18446744073709551616");
    EXPECT_REFUSED("--seed", "' 5'", "generate", "-n", "2", "--seed", " 5");
    GD_END(&gd);
}

Test(appliance_cli, prompt_file_must_be_readable, .fini = teardown, .timeout = 60)
{
    start_gorgond();
    EXPECT_REFUSED("-f /tmp", "directory", "generate", "-n", "2", "-f", "/tmp");
    EXPECT_REFUSED("-f /nonexistent/gorgon-prompt", "No such file", "generate", "-n", "2", "-f",
                   "/nonexistent/gorgon-prompt");
    /* A prompt given twice, or a word that looks like a forgotten -p. */
    EXPECT_REFUSED("-p and -f", "generate", "generate", "-p", "x", "-f", "/dev/null");
    EXPECT_REFUSED("unexpected argument", "'Once upon a time'", "generate", "-n", "2",
                   "Once upon a time");
    GD_END(&gd);
}

Test(appliance_cli, stop_strings_empty_or_too_long_refused_with_limit, .fini = teardown,
     .timeout = 60)
{
    start_gorgond();
    char s63[64], s64[65];
    memset(s63, 'x', 63), s63[63] = '\0';
    memset(s64, 'x', 64), s64[64] = '\0';
    EXPECT_REFUSED("--stop", "1 to 63 bytes", "generate", "-n", "2", "--stop", "");
    EXPECT_REFUSED("--stop", "1 to 63 bytes", "generate", "-n", "2", "--stop", s64);
    EXPECT_REFUSED("--stop", "at most 8", "generate", "-n", "2", "--stop", "a", "--stop", "b",
                   "--stop", "c", "--stop", "d", "--stop", "e", "--stop", "f", "--stop", "g",
                   "--stop", "h", "--stop", "i");
    /* the limit itself is fine */
    char err[2048];
    int rc = run_cli(err, sizeof(err), "generate", "-n", "2", "--stop", s63, NULL);
    cr_assert_eq(rc, 0, "a 63-byte stop string: %s", err);
    GD_END(&gd);
}

Test(appliance_cli, numeric_options_whole_number_in_range, .fini = teardown, .timeout = 60)
{
    start_gorgond();
    /* generate */
    EXPECT_REFUSED("-n", "'0'", "generate", "-n", "0");
    EXPECT_REFUSED("-n", "'4x'", "generate", "-n", "4x");
    EXPECT_REFUSED("-n", "'1e3'", "generate", "-n", "1e3");
    EXPECT_REFUSED("-n", "'+4'", "generate", "-n", "+4");
    EXPECT_REFUSED("--temp", "'nan'", "generate", "-n", "2", "--temp", "nan");
    EXPECT_REFUSED("--temp", "'-0.5'", "generate", "-n", "2", "--temp", "-0.5");
    EXPECT_REFUSED("--temp", "'0.5x'", "generate", "-n", "2", "--temp", "0.5x");
    EXPECT_REFUSED("--top-p", "'1.5'", "generate", "-n", "2", "--top-p", "1.5");
    EXPECT_REFUSED("--top-k", "'-1'", "generate", "-n", "2", "--top-k", "-1");
    EXPECT_REFUSED("--top-k", "'2.5'", "generate", "-n", "2", "--top-k", "2.5");
    EXPECT_REFUSED("--min-p", "'1'", "generate", "-n", "2", "--min-p", "1");
    EXPECT_REFUSED("--repeat-penalty", "'inf'", "generate", "-n", "2", "--repeat-penalty", "inf");
    /* ping */
    EXPECT_REFUSED("-c", "'0'", "ping", "-c", "0");
    EXPECT_REFUSED("-c", "'1e3'", "ping", "-c", "1e3");
    EXPECT_REFUSED("-s", "'-1'", "ping", "-s", "-1");
    EXPECT_REFUSED("-i", "'5ms'", "ping", "-i", "5ms");
    EXPECT_REFUSED("unexpected argument", "'now'", "stats", "now");
    GD_END(&gd);
}
