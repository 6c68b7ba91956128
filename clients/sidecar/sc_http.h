/* The sidecar's HTTP server (sc_http.c): libmicrohttpd in epoll mode with
 * internal threads and suspend/resume. File-private to clients/sidecar/. */
#ifndef GORGON_SC_HTTP_H
#define GORGON_SC_HTTP_H

#include <stddef.h>
#include <sys/socket.h>

struct MHD_Daemon;

typedef struct sc_http_cfg {
    const struct sockaddr *addr; /* TCP: the address to bind (listen_fd < 0) */
    unsigned short port;
    int listen_fd;               /* >= 0: a listening socket (--unix) */
    unsigned threads;            /* MHD epoll threads (1: one internal thread) */
    const char *api_key;         /* NULL: no key required */
    size_t max_body;             /* bytes; larger bodies get 413 before being read */
    long max_queue;
} sc_http_cfg;

/* Start serving; NULL with why filled on failure. Stop with MHD_stop_daemon. */
struct MHD_Daemon *sc_http_start(const sc_http_cfg *cfg, char *why, size_t cap);

#endif
