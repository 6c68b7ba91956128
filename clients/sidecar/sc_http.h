/* The sidecar's HTTP server (sc_http.c): libmicrohttpd daemons in external
 * epoll mode, each run by one of sc_engine.c's serving threads, with
 * suspend/resume. File-private to clients/sidecar/. */
#ifndef GORGON_SC_HTTP_H
#define GORGON_SC_HTTP_H

#include <stddef.h>
#include <sys/socket.h>

struct MHD_Daemon;

typedef struct sc_http_cfg {
    const struct sockaddr *addr; /* TCP: the address to bind (listen_fd < 0) */
    unsigned short port;
    int listen_fd;               /* >= 0: a listening socket (--unix) */
    unsigned threads;            /* daemons, one per serving thread (>= 1) */
    const char *api_key;         /* NULL: no key required */
    size_t max_body;             /* bytes; larger bodies get 413 before being read */
    long max_queue;
} sc_http_cfg;

/* Start cfg->threads daemons in d[0 .. threads), in external epoll mode
 * (each run by one serving thread: sc_http_fd, sc_http_run,
 * sc_http_timeout_ms) and sharing one listening socket, bound by d[0]
 * unless cfg->listen_fd is given. 0, or -1 with why filled and nothing
 * left running. */
int sc_http_start(const sc_http_cfg *cfg, struct MHD_Daemon **d, char *why, size_t cap);
/* Stop the n daemons of sc_http_start once no thread runs them any more
 * (the listening socket is closed once). */
void sc_http_stop(struct MHD_Daemon **d, unsigned n);
/* The TCP port d listens on (0 on a Unix socket). */
unsigned short sc_http_port(struct MHD_Daemon *d);

/* For the serving thread of d only: the fd that becomes readable when d has
 * work, running d once without waiting (the callbacks run inside), and the
 * milliseconds until d's next connection timeout (-1: none; 0: run it now). */
int sc_http_fd(struct MHD_Daemon *d);
void sc_http_run(struct MHD_Daemon *d);
int sc_http_timeout_ms(struct MHD_Daemon *d);

#endif
