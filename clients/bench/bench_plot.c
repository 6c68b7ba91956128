/* gorgon-bench serve --plot FILE.png|FILE.svg: CDFs of TTFT and ITL (one
 * curve per run, i.e. per --request-rate x --concurrency pair) and, with
 * several runs, output throughput per run, labelled by what differs between
 * the runs (concurrency, rate or both), drawn by gnuplot (run as a child,
 * the script on its stdin, the data inline as datablocks).
 *
 * The raw data goes to FILE.csv (FILE's extension replaced), long format,
 * one sample per row:
 *
 *   concurrency,metric,value                  (every run at one rate)
 *   request_rate,concurrency,metric,value     (runs at several rates)
 *
 * request_rate is the run's rate in requests/s (inf: all at once);
 * concurrency is the run's cap on requests in flight (0: none); metric is
 * ttft_ms, tpot_ms, itl_ms or e2el_ms (one row per completed request, per
 * gap between chunks for itl_ms; ascending) or request_throughput
 * (requests/s) and output_throughput (tokens/s), one row per run. The
 * first form is the one of the runs before --request-rate took a list. */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clients/bench/bench.h"

#define CURVE_POINTS 2000 /* a CDF curve is drawn through at most this many quantiles */

extern char **environ;

static const char *ext_of(const char *file)
{
    const char *slash = strrchr(file, '/'), *dot = strrchr(file, '.');
    return dot && (!slash || dot > slash) ? dot : NULL;
}

/* Is `prog` an executable in $PATH? */
static bool on_path(const char *prog)
{
    const char *path = getenv("PATH");
    if (!path || !*path)
        path = "/usr/local/bin:/usr/bin:/bin";
    char dir[4096];
    while (*path) {
        size_t n = strcspn(path, ":");
        if (n && n + strlen(prog) + 2 <= sizeof(dir)) {
            memcpy(dir, path, n);
            snprintf(dir + n, sizeof(dir) - n, "/%s", prog);
            if (access(dir, X_OK) == 0)
                return true;
        }
        path += n + (path[n] == ':');
    }
    return false;
}

int bench_plot_check(const char *file)
{
    const char *ext = ext_of(file);
    if (!ext || (strcasecmp(ext, ".png") && strcasecmp(ext, ".svg")) || ext == file ||
        ext[-1] == '/') {
        fprintf(stderr, "gorgon-bench serve: --plot \"%s\": expected a FILE.png or FILE.svg name\n",
                file);
        return -EINVAL;
    }
    const char *slash = strrchr(file, '/');
    char dir[4096];
    snprintf(dir, sizeof(dir), "%.*s", slash ? (int)(slash - file) + 1 : 1, slash ? file : ".");
    if (access(dir, W_OK) != 0) {
        fprintf(stderr, "gorgon-bench serve: --plot \"%s\": cannot write in %s: %s\n", file, dir,
                strerror(errno));
        return -EINVAL;
    }
    if (!on_path("gnuplot")) {
        fprintf(stderr, "gorgon-bench serve: --plot needs gnuplot on PATH (Debian package "
                        "gnuplot-nox)\n");
        return -ENOENT;
    }
    return 0;
}

/* Do the runs differ in rate / in concurrency? (rates compare equal as
 * inf == inf) */
static bool rates_differ(const bench_result *runs, size_t n_runs)
{
    for (size_t i = 1; i < n_runs; i++)
        if (runs[i].rate != runs[0].rate)
            return true;
    return false;
}

static bool concs_differ(const bench_result *runs, size_t n_runs)
{
    for (size_t i = 1; i < n_runs; i++)
        if (runs[i].concurrency != runs[0].concurrency)
            return true;
    return false;
}

static void rate_str(char *out, size_t cap, double rate)
{
    if (isfinite(rate))
        snprintf(out, cap, "%g", rate);
    else
        snprintf(out, cap, "inf");
}

static int write_csv(const char *path, const bench_result *runs, size_t n_runs)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "gorgon-bench serve: cannot write %s: %s\n", path, strerror(errno));
        return -errno;
    }
    bool by_rate = rates_differ(runs, n_runs);
    fprintf(f, "%sconcurrency,metric,value\n", by_rate ? "request_rate," : "");
    for (size_t i = 0; i < n_runs; i++) {
        const bench_result *r = &runs[i];
        /* the key columns of the run's rows: [rate,]concurrency */
        char key[64], rate[32];
        rate_str(rate, sizeof(rate), r->rate);
        snprintf(key, sizeof(key), "%s%s%lld", by_rate ? rate : "", by_rate ? "," : "",
                 (long long)r->concurrency);
        const char *names[4] = {"ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"};
        const double *v[4] = {r->ttft, r->tpot, r->itl, r->e2el};
        size_t n[4] = {r->n_ttft, r->n_tpot, r->n_itl, r->n_e2el};
        for (int m = 0; m < 4; m++)
            for (size_t k = 0; k < n[m]; k++)
                fprintf(f, "%s,%s,%.6f\n", key, names[m], v[m][k]);
        fprintf(f, "%s,request_throughput,%.6f\n", key, r->req_tp);
        fprintf(f, "%s,output_throughput,%.6f\n", key, r->out_tp);
    }
    int rc = ferror(f) ? -EIO : 0;
    if (fclose(f) != 0 || rc < 0) {
        fprintf(stderr, "gorgon-bench serve: writing %s failed\n", path);
        return -EIO;
    }
    return 0;
}

/* How run r is told from the others: by concurrency (the default: one
 * run, or runs at one rate), by rate, or by both. `words` spells out what
 * the values are (a curve's title); without, the bare values (an x tick). */
static void run_label(char *out, size_t cap, const bench_result *r, bool by_rate, bool by_conc,
                      bool words)
{
    char c[32], rate[32];
    if (r->concurrency > 0)
        snprintf(c, sizeof(c), "%lld", (long long)r->concurrency);
    else
        snprintf(c, sizeof(c), "no cap");
    rate_str(rate, sizeof(rate), r->rate);
    if (by_rate && by_conc)
        snprintf(out, cap, words ? "rate %s, concurrency %s" : "%s / %s", rate, c);
    else if (by_rate)
        snprintf(out, cap, words ? "rate %s req/s" : "%s", rate);
    else
        snprintf(out, cap, words ? "concurrency %s" : "%s", c);
}

/* A datablock $NAME of (value, cumulative fraction) through v (sorted). */
static void cdf_block(FILE *g, const char *name, const double *v, size_t n)
{
    fprintf(g, "$%s << EOD\n", name);
    size_t pts = n < CURVE_POINTS ? n : CURVE_POINTS;
    for (size_t k = 0; k < pts; k++) {
        size_t i = pts == n ? k : (size_t)((double)k * (double)(n - 1) / (double)(pts - 1) + 0.5);
        fprintf(g, "%.6f %.6f\n", v[i], (double)(i + 1) / (double)n);
    }
    fprintf(g, "EOD\n");
}

/* One CDF panel: a curve per run that has samples. */
static void cdf_panel(FILE *g, const char *title, const char *xlabel, bool itl,
                      const bench_result *runs, size_t n_runs)
{
    const char *block = itl ? "itl" : "ttft";
    fprintf(g, "set title '%s'\nset xlabel '%s'\nset ylabel 'fraction'\nset yrange [0:1.02]\n"
               "set key bottom right\nset grid\nset autoscale x\n",
            title, xlabel);
    int curves = 0;
    for (size_t i = 0; i < n_runs; i++)
        curves += (itl ? runs[i].n_itl : runs[i].n_ttft) > 0;
    if (!curves) {
        fprintf(g, "set xrange [0:1]\nset label 1 'no samples' at graph 0.5,0.5 center\n"
                   "plot 2 notitle\nunset label 1\n");
        return;
    }
    bool by_rate = rates_differ(runs, n_runs), by_conc = concs_differ(runs, n_runs);
    fprintf(g, "plot ");
    int k = 0;
    for (size_t i = 0; i < n_runs; i++) {
        if (!(itl ? runs[i].n_itl : runs[i].n_ttft))
            continue;
        char lab[96];
        run_label(lab, sizeof(lab), &runs[i], by_rate, by_conc, true);
        fprintf(g, "%s$%s%zu using 1:2 with steps linewidth 2 title '%s'", k++ ? ", " : "",
                block, i, lab);
    }
    fprintf(g, "\n");
}

static int write_script(FILE *g, const char *file, const bench_result *runs, size_t n_runs)
{
    bool svg = !strcasecmp(ext_of(file), ".svg");
    int panels = n_runs > 1 ? 3 : 2;
    int w = 520 * panels, hgt = 440;
    if (svg)
        fprintf(g, "set terminal svg size %d,%d noenhanced font 'sans,11' background '#ffffff'\n", w,
                hgt);
    else
        fprintf(g, "set terminal pngcairo size %d,%d noenhanced font 'sans,10'\n", w, hgt);
    fprintf(g, "set output '");
    for (const char *p = file; *p; p++) /* a quote in a gnuplot '...' string is '' */
        fputs(*p == '\'' ? "''" : (char[2]){*p, 0}, g);
    fprintf(g, "'\n");
    for (size_t i = 0; i < n_runs; i++) {
        char name[32];
        snprintf(name, sizeof(name), "ttft%zu", i);
        cdf_block(g, name, runs[i].ttft, runs[i].n_ttft);
        snprintf(name, sizeof(name), "itl%zu", i);
        cdf_block(g, name, runs[i].itl, runs[i].n_itl);
    }
    fprintf(g, "set multiplot layout 1,%d\n", panels);
    cdf_panel(g, "TTFT (CDF)", "time to first token (ms)", false, runs, n_runs);
    cdf_panel(g, "ITL (CDF)", "inter-token latency (ms)", true, runs, n_runs);
    if (panels == 3) {
        bool by_rate = rates_differ(runs, n_runs), by_conc = concs_differ(runs, n_runs);
        fprintf(g, "$tp << EOD\n");
        for (size_t i = 0; i < n_runs; i++) {
            char lab[96];
            run_label(lab, sizeof(lab), &runs[i], by_rate, by_conc, false);
            fprintf(g, "\"%s\" %.6f %.6f\n", lab, runs[i].out_tp, runs[i].req_tp);
        }
        fprintf(g, "EOD\n");
        const char *xlabel = by_rate && by_conc ? "request rate (req/s) / max concurrency"
                             : by_rate          ? "request rate (req/s)"
                                                : "max concurrency";
        fprintf(g, "set title 'Throughput'\nset xlabel '%s'\n"
                   "set ylabel 'output tokens/s'\nset y2label 'requests/s'\nset ytics nomirror\n"
                   "set y2tics\nset autoscale y\nset yrange [0:*]\nset y2range [0:*]\n"
                   "set xrange [-0.5:%zu.5]\nset key top left\n"
                   "plot $tp using 0:2:xtic(1) with linespoints linewidth 2 pointtype 7 "
                   "title 'output tokens/s', "
                   "$tp using 0:3 axes x1y2 with linespoints linewidth 2 pointtype 5 "
                   "title 'requests/s'\n",
                xlabel, n_runs - 1);
    }
    fprintf(g, "unset multiplot\nset output\n");
    return ferror(g) ? -EIO : 0;
}

int bench_plot(const char *file, const bench_result *runs, size_t n_runs)
{
    const char *ext = ext_of(file);
    size_t stem = (size_t)(ext - file);
    char *csv = malloc(stem + 5);
    if (!csv) {
        fprintf(stderr, "gorgon-bench serve: out of memory\n");
        return -ENOMEM;
    }
    memcpy(csv, file, stem);
    memcpy(csv + stem, ".csv", 5);
    int rc = write_csv(csv, runs, n_runs);
    free(csv);
    if (rc < 0)
        return rc;

    int p[2];
    if (pipe(p) < 0) {
        fprintf(stderr, "gorgon-bench serve: pipe: %s\n", strerror(errno));
        return -errno;
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, p[0], 0);
    posix_spawn_file_actions_addclose(&fa, p[1]);
    posix_spawn_file_actions_addclose(&fa, p[0]);
    pid_t pid;
    char *argv[] = {"gnuplot", NULL};
    int e = posix_spawnp(&pid, "gnuplot", &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(p[0]);
    if (e) {
        close(p[1]);
        fprintf(stderr, "gorgon-bench serve: cannot run gnuplot: %s (Debian package gnuplot-nox)\n",
                strerror(e));
        return -e;
    }
    /* gnuplot dying early must not kill us with SIGPIPE: its status says why */
    struct sigaction ign = {.sa_handler = SIG_IGN}, old;
    sigaction(SIGPIPE, &ign, &old);
    FILE *g = fdopen(p[1], "w");
    if (!g) {
        close(p[1]);
        rc = -errno;
    } else {
        rc = write_script(g, file, runs, n_runs);
        if (fclose(g) != 0 && rc == 0)
            rc = -EPIPE;
    }
    sigaction(SIGPIPE, &old, NULL);
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR) {
            st = -1;
            break;
        }
    if (st == -1 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        fprintf(stderr, "gorgon-bench serve: gnuplot failed (wait status %d) drawing %s\n", st,
                file);
        return -EIO;
    }
    if (rc < 0) {
        fprintf(stderr, "gorgon-bench serve: writing the gnuplot script failed: %s\n",
                strerror(-rc));
        return rc;
    }
    return 0;
}
