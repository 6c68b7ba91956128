/* gorgond — the gorgon supervisor daemon. See appliance/ap.h. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#ifdef GORGON_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#include "appliance/ap.h"
#include "common/common.h"

/* ---- the service manager (Type=notify, sd_notify(3)) ---------------------- */

/* Send one notification when NOTIFY_SOCKET asks for them; a failure is
 * logged once (systemd then judges the service by its own timeouts). */
static void notify(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void notify(const char *fmt, ...)
{
#ifdef GORGON_HAVE_SYSTEMD
    static bool warned;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    int rc = sd_notify(0, msg);
    if (rc < 0 && !warned) {
        warned = true;
        CM_LOG_WARN("gorgond", "sd_notify: %s", cm_strerror(rc));
    }
#else
    (void)fmt;
#endif
}

void ap_notify_ready(const ap_config *cfg)
{
    if (cfg->model[0])
        notify("READY=1\nSTATUS=serving %s on %s", cfg->model, cfg->socket);
    else
        notify("READY=1\nSTATUS=listening on %s (no model: generation is off)", cfg->socket);
}

void ap_notify_stopping(const ap_config *cfg, uint32_t in_flight)
{
    (void)cfg;
    notify("STOPPING=1\nSTATUS=stopping: %u requests in flight", in_flight);
}

/* Fork into the background; the parent exits only once the child reports
 * that the socket listens (so `gorgond && gorgon ping` works). Returns the
 * write end of the ready pipe in the child, never returns in the parent. */
static int background(void)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) {
        perror("gorgond: pipe");
        exit(1);
    }
    pid_t pid = fork();
    if (pid < 0) {
        perror("gorgond: fork");
        exit(1);
    }
    if (pid > 0) {
        close(p[1]);
        char ok = 0;
        ssize_t n;
        do
            n = read(p[0], &ok, 1);
        while (n < 0 && errno == EINTR);
        _exit(n == 1 && ok == 1 ? 0 : 1);
    }
    close(p[0]);
    setsid();
    int fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (fd >= 0) {
        dup2(fd, STDIN_FILENO);
        dup2(fd, STDOUT_FILENO);
        close(fd);
    }
    /* stderr stays: it is where the log goes (journald under systemd). */
    return p[1];
}

int main(int argc, char **argv)
{
    if (cm_version_requested(argc, argv, "gorgond"))
        return 0;
    ap_config cfg;
    ap_config_defaults(&cfg);
    int rc = ap_config_from_args(&cfg, argc, argv);
    if (rc == 1)
        return 0;
    if (rc < 0)
        return 2;
    /* Under systemd (NOTIFY_SOCKET set) the service manager supervises us:
     * forking would hand it a main pid that exits, and the notifications
     * would come from another one. */
    const char *ns = getenv("NOTIFY_SOCKET");
    if (ns && *ns) {
#ifndef GORGON_HAVE_SYSTEMD
        CM_LOG_WARN("gorgond", "NOTIFY_SOCKET is set but this gorgond was built without "
                    "libsystemd: it cannot send READY=1 (use Type=simple and --foreground, or "
                    "rebuild with libsystemd-dev)");
#endif
        cfg.foreground = true;
    }
    int ready = cfg.foreground ? -1 : background();
    if (cfg.model[0])
        notify("STATUS=loading %s", cfg.model);
    ap_server *srv;
    rc = ap_server_create(&srv, &cfg);
    if (ready >= 0) {
        char ok = rc == 0 ? 1 : 0;
        if (write(ready, &ok, 1) != 1)
            ok = 0;
        close(ready);
    }
    if (rc < 0)
        return 1;
    rc = ap_server_run(srv);
    ap_server_destroy(srv);
    if (rc == -ENODEV && ap_config_on_device(&cfg)) {
        fprintf(stderr, "gorgond: stopped: the worker cannot use device %s (its message above "
                        "says why)\n", cfg.device);
        return 1;
    }
    if (rc < 0) {
        fprintf(stderr, "gorgond: stopped on error: %s\n", cm_strerror(rc));
        return 1;
    }
    return 0;
}
