/* gorgon-sidecar: options, start-up and shutdown. See sidecar.h for the
 * design and docs/sidecar.md for the endpoints. */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "clients/sidecar/sc_http.h"
#include "clients/sidecar/sidecar.h"
#include "common/cm_log.h"
#include "common/cm_version.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: gorgon-sidecar [--listen HOST:PORT | --unix PATH] [--socket PATH]\n"
            "                      [--threads N] [--api-key KEY] [--max-body BYTES]\n"
            "                      [--max-queue N] [--log-level LEVEL]\n\n"
            "An OpenAI-compatible HTTP server in front of gorgond (libgorgon's shared-memory\n"
            "rings): POST /v1/completions, /v1/chat/completions (streaming or not),\n"
            "/tokenize, /detokenize; GET /v1/models, /health, /metrics.\n\n"
            "  --listen HOST:PORT  TCP address to serve (default 127.0.0.1:8080; port 0 picks\n"
            "                      a free one, printed at start-up; [::1]:PORT for IPv6)\n"
            "  --unix PATH         serve on a Unix stream socket instead (curl --unix-socket)\n"
            "  --socket PATH       gorgond's socket (default $GORGON_SOCKET, else\n"
            "                      /run/gorgon/gorgon.sock)\n"
            "  --threads N         serving threads, 1..256 (default 2): each runs an HTTP\n"
            "                      server (libmicrohttpd) on the listening socket and its\n"
            "                      own gorgond session for the generations it accepts\n"
            "  --api-key KEY       require 'Authorization: Bearer KEY' (401 otherwise) on every\n"
            "                      endpoint but /health and /metrics; also $GORGON_SIDECAR_API_KEY\n"
            "  --max-body BYTES    larger request bodies get 413 unread (default 1048576)\n"
            "  --max-queue N       generations held waiting for a gorgond slot before 503\n"
            "                      (default 1024)\n"
            "  --log-level LEVEL   error|warn|info|debug (default warn)\n"
            "  -h, --help          this text\n"
            "  --version           the version\n");
}

static long parse_num(const char *opt, const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "gorgon-sidecar: %s: '%s' is not an integer in [%ld, %ld]\n", opt, s, lo,
                hi);
        exit(2);
    }
    return v;
}

/* HOST:PORT (HOST may be [v6]) into a sockaddr. */
static int resolve(const char *spec, struct sockaddr_storage *ss, unsigned short *port)
{
    char host[256];
    const char *colon = strrchr(spec, ':');
    if (!colon || colon == spec) {
        fprintf(stderr, "gorgon-sidecar: --listen: '%s' is not HOST:PORT\n", spec);
        return -EINVAL;
    }
    size_t hl = (size_t)(colon - spec);
    if (spec[0] == '[' && hl >= 2 && spec[hl - 1] == ']') {
        spec++;
        hl -= 2;
    }
    if (hl >= sizeof(host)) {
        fprintf(stderr, "gorgon-sidecar: --listen: host name too long\n");
        return -EINVAL;
    }
    memcpy(host, spec, hl);
    host[hl] = '\0';
    *port = (unsigned short)parse_num("--listen port", colon + 1, 0, 65535);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICSERV}, *ai;
    int rc = getaddrinfo(host, colon + 1, &hints, &ai);
    if (rc) {
        fprintf(stderr, "gorgon-sidecar: --listen: %s: %s\n", host, gai_strerror(rc));
        return -EINVAL;
    }
    memcpy(ss, ai->ai_addr, ai->ai_addrlen);
    freeaddrinfo(ai);
    return 0;
}

static int unix_listen(const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(sa.sun_path)) {
        fprintf(stderr, "gorgon-sidecar: --unix: path longer than %zu bytes\n",
                sizeof(sa.sun_path) - 1);
        return -1;
    }
    strcpy(sa.sun_path, path);
    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            fprintf(stderr, "gorgon-sidecar: --unix: %s exists and is not a socket\n", path);
            return -1;
        }
        unlink(path); /* a stale socket of an earlier run */
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 128) < 0) {
        fprintf(stderr, "gorgon-sidecar: --unix %s: %s\n", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

int main(int argc, char **argv)
{
    if (cm_version_requested(argc, argv, "gorgon-sidecar"))
        return 0;
    const char *listen_spec = "127.0.0.1:8080", *unix_path = NULL, *sock = NULL;
    const char *api_key = getenv("GORGON_SIDECAR_API_KEY");
    long threads = 2, max_queue = 1024, max_body = 1 << 20;
    cm_log_set_level(CM_LOG_WARN);
    enum { O_LISTEN = 256, O_UNIX, O_SOCKET, O_THREADS, O_KEY, O_BODY, O_QUEUE, O_LOG };
    static const struct option longopts[] = {
        {"listen", required_argument, NULL, O_LISTEN},
        {"unix", required_argument, NULL, O_UNIX},
        {"socket", required_argument, NULL, O_SOCKET},
        {"threads", required_argument, NULL, O_THREADS},
        {"api-key", required_argument, NULL, O_KEY},
        {"max-body", required_argument, NULL, O_BODY},
        {"max-queue", required_argument, NULL, O_QUEUE},
        {"log-level", required_argument, NULL, O_LOG},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case O_LISTEN: listen_spec = optarg; break;
        case O_UNIX: unix_path = optarg; break;
        case O_SOCKET: sock = optarg; break;
        case O_THREADS: threads = parse_num("--threads", optarg, 1, 256); break;
        case O_KEY: api_key = optarg; break;
        case O_BODY: max_body = parse_num("--max-body", optarg, 1024, 1L << 30); break;
        case O_QUEUE: max_queue = parse_num("--max-queue", optarg, 1, 1L << 20); break;
        case O_LOG: {
            int l = cm_log_parse_level(optarg);
            if (l < 0) {
                fprintf(stderr, "gorgon-sidecar: --log-level: '%s' is not one of "
                                "error|warn|info|debug|trace\n", optarg);
                return 2;
            }
            cm_log_set_level((enum cm_log_level)l);
            break;
        }
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "gorgon-sidecar: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }
    if (api_key && !*api_key) {
        fprintf(stderr, "gorgon-sidecar: --api-key: the key is empty\n");
        return 2;
    }

    struct sockaddr_storage ss = {0};
    sc_http_cfg hc = {.listen_fd = -1, .threads = (unsigned)threads, .api_key = api_key,
                      .max_body = (size_t)max_body, .max_queue = max_queue};
    if (!unix_path) {
        if (resolve(listen_spec, &ss, &hc.port) < 0)
            return 2;
        hc.addr = (struct sockaddr *)&ss;
    }

    /* Signals are taken by sigwait below; every thread inherits the mask. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    sc_ctl_init(sock);
    sc_model m;
    char why[256];
    if (sc_ctl_model(&m, why, sizeof(why)) < 0)
        fprintf(stderr, "gorgon-sidecar: %s; requests get 503 until it is up\n", why);
    else if (!m.ok)
        fprintf(stderr, "gorgon-sidecar: %s; requests get 503 until it serves one\n", why);

    if (unix_path) {
        hc.listen_fd = unix_listen(unix_path);
        if (hc.listen_fd < 0)
            return 1;
    }
    struct MHD_Daemon **d = calloc((size_t)threads, sizeof(*d));
    if (!d) {
        fprintf(stderr, "gorgon-sidecar: out of memory\n");
        return 1;
    }
    if (sc_http_start(&hc, d, why, sizeof(why)) < 0) {
        fprintf(stderr, "gorgon-sidecar: %s: %s\n", unix_path ? unix_path : listen_spec, why);
        return 1;
    }
    sc_engine_cfg ec = {.socket = sock, .max_queue = max_queue, .daemons = d,
                        .n_daemons = (unsigned)threads};
    int rc = sc_engine_start(&ec);
    if (rc < 0) {
        fprintf(stderr, "gorgon-sidecar: cannot start the serving threads: %s\n", strerror(-rc));
        sc_http_stop(d, (unsigned)threads);
        return 1;
    }
    if (unix_path) {
        printf("gorgon-sidecar: listening on unix:%s\n", unix_path);
    } else {
        char host[INET6_ADDRSTRLEN] = "?";
        if (ss.ss_family == AF_INET)
            inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, host, sizeof(host));
        else
            inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, host, sizeof(host));
        unsigned short port = sc_http_port(d[0]);
        printf(ss.ss_family == AF_INET6 ? "gorgon-sidecar: listening on http://[%s]:%u\n"
                                        : "gorgon-sidecar: listening on http://%s:%u\n",
               host, port ? port : hc.port);
    }
    fflush(stdout);
    CM_LOG_INFO("sidecar", "serving threads wait with %s", sc_engine_wait_kind());

    int sig = 0;
    sigwait(&set, &sig);
    fprintf(stderr, "gorgon-sidecar: %s: shutting down\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    /* the serving threads fail and resume what they hold, so that no
     * connection stays suspended while the daemons stop */
    sc_engine_stop();
    sc_http_stop(d, (unsigned)threads);
    free(d);
    if (unix_path)
        unlink(unix_path);
    sc_ctl_fini();
    return 0;
}
