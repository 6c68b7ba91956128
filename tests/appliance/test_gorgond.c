/* gorgond end to end: many clients, dying clients, a malicious client,
 * clean shutdown, configuration. Each test starts its own gorgond. */
#include <criterion/criterion.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/wait.h>

#include "clients/gorgon.h"
#include "ipc/ipc.h"
#include "tests/appliance/util/wait.h"
#include "tests/clients/util/gd_proc.h"
#include "tests/util/test_models.h"

static gd_proc gd;

#define START_GORGOND(...) AT_START(&gd, __VA_ARGS__)

/* Cleanup when a test failed half-way; tests that pass end with GD_END. */
static void teardown(void)
{
    gd_stop(&gd);
}

static int connect_to(gorgon_client **cli, uint32_t flags)
{
    gorgon_opts o = {.socket_path = gd.sock, .flags = flags};
    return gorgon_connect(cli, &o);
}

static gorgon_counters stats_of(void)
{
    gorgon_client *cli;
    int rc = connect_to(&cli, 0);
    cr_assert_eq(rc, 0, "stats connect: %s", gorgon_strerror(rc));
    gorgon_counters st;
    rc = gorgon_stats(cli, &st);
    cr_assert_eq(rc, 0, "gorgon_stats: %s", gorgon_strerror(rc));
    /* no model here: no worker groups */
    gorgon_group g;
    cr_assert_eq(gorgon_groups(cli, &g, 1), 0);
    gorgon_close(cli);
    return st;
}

/* ---- 32 clients, some killed mid-flight ------------------------------------- */

#define N_THREADS 24
#define N_PROCS 8
#define PINGS_PER_THREAD 400

struct pinger {
    int id;
    atomic_int ok;
    int bad;
    char err[128];
};

/* Pingers that have had at least one echo back (or gave up). */
static atomic_int pingers_flowing;

static void *pinger_main(void *arg)
{
    struct pinger *p = arg;
    gorgon_client *cli;
    int rc = connect_to(&cli, 0);
    if (rc < 0) {
        snprintf(p->err, sizeof(p->err), "connect: %s", gorgon_strerror(rc));
        atomic_fetch_add(&pingers_flowing, 1);
        return NULL;
    }
    uint8_t buf[512];
    for (int i = 0; i < PINGS_PER_THREAD; i++) {
        size_t len = (size_t)((p->id * 37 + i * 13) % (int)sizeof(buf)) + 1;
        for (size_t b = 0; b < len; b++)
            buf[b] = (uint8_t)(p->id ^ (i * 11) ^ (int)b);
        /* gorgon_ping checks the echo byte for byte (-EIO otherwise). */
        rc = gorgon_ping(cli, buf, len, 5000000000ll, NULL);
        if (rc == (int)len) {
            atomic_fetch_add(&p->ok, 1);
        } else {
            p->bad++;
            snprintf(p->err, sizeof(p->err), "ping %d: %d (%s)", i, rc, gorgon_strerror(rc));
        }
        if (i == 0)
            atomic_fetch_add(&pingers_flowing, 1);
    }
    gorgon_close(cli);
    return NULL;
}

static void doomed_child(int ready_fd)
{
    gorgon_client *cli;
    if (connect_to(&cli, 0) < 0)
        _exit(3);
    /* Ready once requests flow; then keep them flowing until SIGKILL. */
    if (gorgon_ping(cli, "doomed", 6, 5000000000ll, NULL) != 6)
        _exit(5);
    char one = 1;
    if (write(ready_fd, &one, 1) != 1)
        _exit(4);
    for (;;) {
        if (gorgon_ping(cli, "doomed", 6, 5000000000ll, NULL) != 6)
            _exit(5);
    }
}

Test(appliance_gorgond, sessions_reclaimed_when_clients_killed, .fini = teardown, .timeout = 60)
{
    START_GORGOND("--max-clients", "64", NULL);
    int pfd[2];
    cr_assert_eq(pipe(pfd), 0);
    pid_t kids[N_PROCS];
    /* Fork before any thread exists. */
    for (int i = 0; i < N_PROCS; i++) {
        kids[i] = fork();
        cr_assert_geq(kids[i], 0);
        if (kids[i] == 0) {
            close(pfd[0]);
            doomed_child(pfd[1]);
        }
    }
    close(pfd[1]);
    for (int i = 0; i < N_PROCS; i++) {
        char c;
        cr_assert_eq(read(pfd[0], &c, 1), 1, "child %d never connected", i);
    }
    close(pfd[0]);

    static struct pinger ps[N_THREADS];
    pthread_t th[N_THREADS];
    atomic_store(&pingers_flowing, 0);
    for (int i = 0; i < N_THREADS; i++) {
        ps[i] = (struct pinger){.id = i};
        cr_assert_eq(pthread_create(&th[i], NULL, pinger_main, &ps[i]), 0);
    }
    /* Kill the children while the pingers are streaming: each has had an
     * echo back. */
    AT_WAIT_UNTIL(atomic_load(&pingers_flowing) == N_THREADS, AT_WAIT_MS,
                  "only %d of %d pingers got an echo", atomic_load(&pingers_flowing), N_THREADS);
    for (int i = 0; i < N_PROCS; i++) {
        kill(kids[i], SIGKILL);
        int st;
        cr_assert_eq(waitpid(kids[i], &st, 0), kids[i]);
        cr_assert(WIFSIGNALED(st), "child %d exited by itself (status %d)", i, st);
    }
    /* The dead clients' sessions go away while the living keep working. */
    gorgon_counters st = {0};
    AT_WAIT_UNTIL((st = stats_of()).sessions_reclaimed >= N_PROCS, AT_WAIT_MS,
                  "only %llu sessions reclaimed", (unsigned long long)st.sessions_reclaimed);

    for (int i = 0; i < N_THREADS; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < N_THREADS; i++) {
        cr_assert_eq(ps[i].err[0], '\0', "client %d: %s", i, ps[i].err);
        cr_assert_eq(atomic_load(&ps[i].ok), PINGS_PER_THREAD, "client %d: %d ok", i,
                     atomic_load(&ps[i].ok));
    }
    st = stats_of();
    cr_assert_eq(st.clients_now, 1, "clients_now %llu after everyone left (only the stats "
                 "client should remain)", (unsigned long long)st.clients_now);
    cr_assert_geq(st.clients_total, N_PROCS + N_THREADS);
    cr_assert_eq(st.protocol_errors, 0);
    cr_assert_geq(st.requests_total, (uint64_t)N_THREADS * PINGS_PER_THREAD);
    GD_END(&gd);
}

/* ---- a client that scribbles over its region ---------------------------------- */

struct raw {
    int sock;
    ipc_region reg;
    ipc_ring sq, cq;
};

static void raw_connect(struct raw *r)
{
    memset(r, 0, sizeof(*r));
    r->sock = ipc_ctl_connect(gd.sock);
    cr_assert_geq(r->sock, 0, "ipc_ctl_connect: %s", strerror(-r->sock));
    struct ipc_welcome w;
    int fd = ipc_ctl_client_handshake(r->sock, &w);
    cr_assert_geq(fd, 0, "handshake: %s (%s)", strerror(-fd), w.reason);
    cr_assert_eq(ipc_region_map(&r->reg, fd), 0);
    cr_assert_eq(ipc_region_sq(&r->reg, IPC_RING_PRODUCER, &r->sq), 0);
    cr_assert_eq(ipc_region_cq(&r->reg, IPC_RING_CONSUMER, &r->cq), 0);
}

static int raw_reap(struct raw *r, struct ipc_cqe *out, int want, long timeout_ms)
{
    int got = 0;
    uint64_t t0 = gd_now_ms();
    while (got < want && (long)(gd_now_ms() - t0) < timeout_ms) {
        int n = ipc_ring_pop(&r->cq, &out[got]);
        cr_assert_geq(n, 0);
        if (n == 0) {
            ipc_doorbell_wait(&r->cq, 10000000);
            continue;
        }
        got++;
    }
    return got;
}

static bool hung_up_within(int sock, int timeout_ms)
{
    struct pollfd p = {.fd = sock, .events = POLLRDHUP};
    return poll(&p, 1, timeout_ms) == 1 && (p.revents & (POLLHUP | POLLRDHUP));
}

Test(appliance_gorgond, bad_descriptors_get_errors_and_busy_slots_ebusy, .fini = teardown,
     .timeout = 20)
{
    START_GORGOND("--slots", "4", NULL);
    struct raw r;
    raw_connect(&r);
    uint8_t *in = ipc_region_slot_in(&r.reg, 1);
    memcpy(in, "abcd", 4);
    struct ipc_sqe s[7];
    memset(s, 0, sizeof(s));
    s[0] = (struct ipc_sqe){.opcode = IPC_OP_PING, .slot = 1, .user_data = 1, .in_len = 4};
    s[1] = (struct ipc_sqe){.opcode = IPC_OP_PING, .slot = 1, .user_data = 2, .in_len = 4};
    s[2] = (struct ipc_sqe){.opcode = IPC_OP_GENERATE, .slot = 2, .user_data = 3};
    s[3] = (struct ipc_sqe){.opcode = IPC_OP_PING, .slot = 4, .user_data = 4};
    s[4] = (struct ipc_sqe){.opcode = 200, .slot = 0, .user_data = 5};
    s[5] = (struct ipc_sqe){.opcode = IPC_OP_PING, .slot = 0, .user_data = 6,
                            .in_off = 0xfffffff0u, .in_len = 0x20};
    s[6] = (struct ipc_sqe){.opcode = IPC_OP_NOP, .flags = 1, .user_data = 7};
    cr_assert_eq(ipc_ring_push_burst(&r.sq, s, 7), 7);
    ipc_doorbell_notify(&r.sq);
    struct ipc_cqe c[7];
    cr_assert_eq(raw_reap(&r, c, 7, 5000), 7);
    int32_t want[7] = {4, -EBUSY, -EOPNOTSUPP, -EINVAL, -EINVAL, -EINVAL, -EINVAL};
    for (int i = 0; i < 7; i++) {
        cr_assert_eq(c[i].user_data, (uint64_t)i + 1);
        if (i >= 3) /* the validator may call framing errors -EPROTO */
            cr_assert(c[i].result == -EINVAL || c[i].result == -EPROTO,
                      "request %d: result %d", i + 1, c[i].result);
        else
            cr_assert_eq(c[i].result, want[i], "request %d: result %d, want %d", i + 1,
                         c[i].result, want[i]);
    }
    cr_assert_eq(memcmp(ipc_region_slot_out(&r.reg, 1), "abcd", 4), 0);
    /* The completion was consumed: slot 1 is free again. */
    cr_assert_eq(ipc_ring_push(&r.sq, &s[1]), 0);
    ipc_doorbell_notify(&r.sq);
    cr_assert_eq(raw_reap(&r, c, 1, 5000), 1);
    cr_assert_eq(c[0].result, 4);
    ipc_region_unmap(&r.reg);
    close(r.sock);
    GD_END(&gd);
}

Test(appliance_gorgond, scribbling_client_disconnected_others_served, .fini = teardown,
     .timeout = 30)
{
    START_GORGOND(NULL);
    gorgon_client *good;
    cr_assert_eq(connect_to(&good, 0), 0);
    struct raw r;
    raw_connect(&r);
    /* Random descriptors with a well-formed tail: each gets an error (or,
     * rarely, a harmless success), never a crash. */
    unsigned seed = 12345;
    for (int round = 0; round < 20; round++) {
        uint8_t junk[16][IPC_DESC_SIZE];
        for (size_t i = 0; i < sizeof(junk); i++)
            ((uint8_t *)junk)[i] = (uint8_t)rand_r(&seed);
        int n = ipc_ring_push_burst(&r.sq, junk, 16);
        cr_assert_eq(n, 16);
        ipc_doorbell_notify(&r.sq);
        struct ipc_cqe c[16];
        cr_assert_eq(raw_reap(&r, c, 16, 5000), 16, "round %d", round);
        for (int i = 0; i < 16; i++)
            cr_assert_lt(c[i].result, 0, "random descriptor accepted (result %d)", c[i].result);
        cr_assert_eq(gorgon_ping(good, "still", 5, 2000000000, NULL), 5);
    }
    /* Now the indices themselves: a tail far beyond the head is impossible. */
    struct ipc_ring_shared *sh = r.sq.sh;
    for (int i = 0; i < 1000; i++)
        ((volatile uint8_t *)sh)[(unsigned)rand_r(&seed) % IPC_CACHELINE] = (uint8_t)rand_r(&seed);
    __atomic_store_n(&sh->tail, __atomic_load_n(&sh->head, __ATOMIC_RELAXED) + 0x40000000u,
                     __ATOMIC_RELEASE);
    __atomic_store_n(&sh->flags, 0xffffffffu, __ATOMIC_RELAXED);
    ipc_futex_wake(&sh->doorbell, 1);
    cr_assert(hung_up_within(r.sock, 5000), "gorgond kept a client with an impossible SQ tail");
    for (int i = 0; i < 100; i++)
        cr_assert_eq(gorgon_ping(good, "alive", 5, 2000000000, NULL), 5);
    gorgon_counters st;
    cr_assert_eq(gorgon_stats(good, &st), 0);
    cr_assert_geq(st.protocol_errors, 1);
    cr_assert_eq(st.clients_now, 1);
    ipc_region_unmap(&r.reg);
    close(r.sock);

    /* Same for an impossible CQ head (gorgond is the CQ producer). gorgond
     * reads the head only when its last view leaves too little room, so
     * keep requests coming until it has to look. */
    raw_connect(&r);
    __atomic_store_n(&r.cq.sh->head, 0x80000000u, __ATOMIC_RELEASE);
    struct ipc_sqe nops[64];
    memset(nops, 0, sizeof(nops));
    bool dropped = false;
    for (uint64_t t0 = gd_now_ms(); !dropped && gd_now_ms() - t0 < 5000;) {
        int n = ipc_ring_push_burst(&r.sq, nops, 64);
        cr_assert_geq(n, 0);
        ipc_doorbell_notify(&r.sq);
        dropped = hung_up_within(r.sock, 1);
    }
    cr_assert(dropped, "gorgond kept a client with an impossible CQ head");
    cr_assert_eq(gorgon_ping(good, "alive", 5, 2000000000, NULL), 5);
    ipc_region_unmap(&r.reg);
    close(r.sock);
    gorgon_close(good);
    GD_END(&gd);
}

/* ---- lifecycle and configuration ------------------------------------------------ */

Test(appliance_gorgond, sigterm_exits_zero_and_removes_socket, .fini = teardown, .timeout = 20)
{
    START_GORGOND(NULL);
    gorgon_client *cli;
    cr_assert_eq(connect_to(&cli, 0), 0);
    cr_assert_eq(gorgon_ping(cli, "x", 1, 2000000000, NULL), 1);
    cr_assert_eq(kill(gd.pid, SIGTERM), 0);
    int st = gd_wait_exit(&gd, 5000);
    cr_assert_neq(st, -1, "gorgond did not exit within 5 s of SIGTERM");
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status %d", st);
    cr_assert_neq(access(gd.sock, F_OK), 0, "socket file %s still there", gd.sock);
    gorgon_completion c;
    cr_assert_eq(gorgon_submit_nop(cli, 1), 0);
    cr_assert_eq(gorgon_wait(cli, &c, 1, 5000000000ll), -EPIPE);
    gorgon_close(cli);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f, "%s: %s", path, strerror(errno));
    cr_assert_geq(fputs(text, f), 0);
    cr_assert_eq(fclose(f), 0);
}

/* The whole of a (small) log file, NUL-terminated, in static storage. */
static const char *read_log(const char *path)
{
    static char buf[1 << 16];
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "%s: %s", path, strerror(errno));
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    return buf;
}

/* SIGHUP re-reads log_level from the --config file (nothing else changes
 * at run time). gorgond's stderr goes to a file: at level error a new
 * session logs nothing; after the file says debug and SIGHUP, gorgond
 * announces the level (an info line) and a new session logs its debug line
 * "session N: pid P ...". Serving goes on throughout. */
Test(appliance_gorgond, sighup_keeps_serving, .fini = teardown, .timeout = 40)
{
    char dir[] = "/tmp/gorgon-test-hup-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    char ini[128], log[128];
    snprintf(ini, sizeof(ini), "%s/gorgond.ini", dir);
    snprintf(log, sizeof(log), "%s/gorgond.log", dir);
    write_file(ini, "[gorgond]\nlog_level = error\n");
    /* gorgond inherits the test's stderr: point it at the log file for the
     * start (gd_start passes --log-level error too). */
    int logfd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600);
    cr_assert_geq(logfd, 0);
    int saved = dup(2);
    cr_assert_geq(saved, 0);
    cr_assert_eq(dup2(logfd, 2), 2);
    int rc = gd_start(&gd, "--config", ini, NULL);
    dup2(saved, 2);
    close(saved);
    close(logfd);
    cr_assert_neq(rc, -ENOENT, "gorgond not built: run `make`");
    cr_assert_eq(rc, 0, "gorgond did not start: %s", strerror(-rc));

    /* At level error a session logs nothing: its debug line would be out
     * before the welcome that lets the ping through. */
    gorgon_client *cli;
    cr_assert_eq(connect_to(&cli, 0), 0);
    cr_assert_eq(gorgon_ping(cli, "before", 6, 2000000000, NULL), 6);
    gorgon_close(cli);
    cr_assert_null(strstr(read_log(log), "session"), "a debug line at level error: %s",
                   read_log(log));

    write_file(ini, "[gorgond]\nlog_level = debug\n");
    cr_assert_eq(kill(gd.pid, SIGHUP), 0);
    AT_WAIT_UNTIL(strstr(read_log(log), "SIGHUP: log level now DEBUG"), AT_WAIT_MS,
                  "gorgond did not announce the new level; log: %s", read_log(log));
    cr_assert_eq(connect_to(&cli, 0), 0);
    cr_assert_eq(gorgon_ping(cli, "hup", 3, 2000000000, NULL), 3);
    char want[64];
    snprintf(want, sizeof(want), ": pid %d uid", (int)getpid());
    const char *text = read_log(log);
    cr_assert(strstr(text, "session") && strstr(text, want),
              "no debug line for the session opened after SIGHUP; log: %s", text);
    gorgon_close(cli);
    GD_END(&gd);
    unlink(ini);
    unlink(log);
    rmdir(dir);
}

/* poll_us = auto: gorgond busy-polls only when its loop, the worker's
 * threads and a client each have a CPU ($GORGON_CPUS stands for the
 * affinity mask and cgroup quota); an explicit poll_us is taken as given. */
Test(appliance_gorgond, busy_poll_auto_follows_the_usable_cpus, .fini = teardown, .timeout = 60)
{
    static const struct {
        const char *cpus, *threads, *poll, *want;
    } cases[] = {
        {"8", "1", "auto", "busy-poll: 50 us (8 usable CPUs"},
        {"3", "1", "auto", "busy-poll: 50 us (3 usable CPUs"},
        {"2", "1", "auto", "busy-poll: off (2 usable CPUs"},
        {"8", "7", "auto", "busy-poll: off (8 usable CPUs"},
        {"2", "1", "50", NULL}, /* explicit: no decision to log */
    };
    char model[PATH_MAX];
    snprintf(model, sizeof(model), "%s", tu_model_path("stories260K/stories260K.gguf"));
    char dir[] = "/tmp/gorgon-test-poll-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    char log[128];
    snprintf(log, sizeof(log), "%s/gorgond.log", dir);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int logfd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600);
        cr_assert_geq(logfd, 0);
        int saved = dup(2);
        cr_assert_eq(dup2(logfd, 2), 2);
        setenv("GORGON_CPUS", cases[i].cpus, 1);
        int rc = gd_start(&gd, "--log-level", "info", "--model", model, "--threads",
                          cases[i].threads, "--poll-us", cases[i].poll, NULL);
        unsetenv("GORGON_CPUS");
        dup2(saved, 2);
        close(saved);
        close(logfd);
        cr_assert_eq(rc, 0, "case %zu: gorgond did not start: %s", i, strerror(-rc));
        /* The socket accepts before the loop logs its start: wait for it. */
        AT_WAIT_UNTIL(strstr(read_log(log), "listening on"), AT_WAIT_MS,
                      "case %zu: gorgond never said it listens:\n%s", i, read_log(log));
        const char *text = read_log(log);
        if (cases[i].want)
            cr_assert(strstr(text, cases[i].want), "case %zu: no '%s' in the log:\n%s", i,
                      cases[i].want, text);
        else
            cr_assert_null(strstr(text, "busy-poll"), "case %zu: %s", i, text);
        gorgon_client *cli = gd_connect(&gd, 0);
        cr_assert_eq(gorgon_ping(cli, "x", 1, 2000000000, NULL), 1);
        gorgon_close(cli);
        GD_END(&gd);
    }
    unlink(log);
    rmdir(dir);
}

Test(appliance_gorgond, flags_override_config_file, .fini = teardown, .timeout = 20)
{
    char path[] = "/tmp/gorgon-test-cfg-XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    const char *ini = "[gorgond]\nmax_clients = 1\nslots = 2\npoll_us = 0\n"
                      "[other]\nignored = yes\n";
    cr_assert_eq(write(fd, ini, strlen(ini)), (ssize_t)strlen(ini));
    close(fd);
    START_GORGOND("--config", path, "--max-clients", "2", NULL);
    unlink(path);
    gorgon_client *a, *b, *c;
    cr_assert_eq(connect_to(&a, 0), 0);
    cr_assert_eq(connect_to(&b, 0), 0, "--max-clients 2 must override max_clients = 1");
    cr_assert_eq(connect_to(&c, 0), -EUSERS);
    /* slots = 2 from the file: two auto-slot pings in flight, the third has none. */
    cr_assert_eq(gorgon_submit_ping(a, "1", 1, 1), 0);
    cr_assert_eq(gorgon_submit_ping(a, "2", 1, 2), 0);
    cr_assert_eq(gorgon_submit_ping(a, "3", 1, 3), -EAGAIN);
    gorgon_close(a);
    gorgon_close(b);
    GD_END(&gd);
}

Test(appliance_gorgond, bad_config_exits_2_naming_key, .timeout = 20)
{
    char bin[PATH_MAX];
    cr_assert_eq(gd_find_binary(bin, sizeof(bin)), 0, "gorgond not built: run `make`");
    char out[1024];
    const char *argv[] = {bin, "--foreground", "--socket", "/tmp/gorgon-test-never.sock",
                          "--sq-entries", "100", NULL};
    int st = gd_run_stderr(argv, false, out, sizeof(out));
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 2, "status %d, output: %s", st, out);
    cr_assert(strstr(out, "sq_entries"), "message does not name the key: %s", out);
}

/* A --socket whose directory's parent does not exist is refused with a
 * message, and gorgond (often root) creates no directories for it. */
Test(appliance_gorgond, socket_in_missing_directories_refused_without_mkdir, .timeout = 20)
{
    char bin[PATH_MAX];
    cr_assert_eq(gd_find_binary(bin, sizeof(bin)), 0, "gorgond not built: run `make`");
    char top[64], sock[128];
    snprintf(top, sizeof(top), "/tmp/gorgon-test-nodir-%d", (int)getpid());
    snprintf(sock, sizeof(sock), "%s/a/gorgond.sock", top);
    char out[1024];
    const char *argv[] = {bin, "--foreground", "--socket", sock, NULL};
    int st = gd_run_stderr(argv, false, out, sizeof(out));
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) != 0 && WEXITSTATUS(st) != 127,
              "status %d, output: %s", st, out);
    cr_assert(strstr(out, sock) && strstr(out, "directory"), "message: %s", out);
    struct stat sb;
    cr_assert_neq(stat(top, &sb), 0, "%s was created", top);
    /* One level missing is refused the same way: only /run/gorgon is made. */
    snprintf(sock, sizeof(sock), "%s/gorgond.sock", top);
    st = gd_run_stderr(argv, false, out, sizeof(out));
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) != 0 && WEXITSTATUS(st) != 127,
              "status %d, output: %s", st, out);
    cr_assert(strstr(out, "/run/gorgon"), "message: %s", out);
    cr_assert_neq(stat(top, &sb), 0, "%s was created", top);
}

Test(appliance_gorgond, silent_connection_dropped_without_blocking_others, .fini = teardown,
     .timeout = 20)
{
    START_GORGOND(NULL);
    /* Connected but never says hello: must not hold up anyone else, and
     * loses its place after the handshake timeout (2 s). */
    int silent = ipc_ctl_connect(gd.sock);
    cr_assert_geq(silent, 0);
    gorgon_client *cli;
    cr_assert_eq(connect_to(&cli, 0), 0);
    cr_assert_eq(gorgon_ping(cli, "next", 4, 2000000000, NULL), 4);
    /* Served while the silent one still holds its place: the next client
     * did not wait for the silent one's timeout. */
    cr_assert(!hung_up_within(silent, 0),
              "the next client was served only after the silent connection was dropped");
    cr_assert(hung_up_within(silent, 10000), "silent connection never dropped");
    close(silent);
    gorgon_close(cli);
    GD_END(&gd);
}
