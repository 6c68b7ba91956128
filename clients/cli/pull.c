/* `gorgon pull URL|hf://OWNER/REPO/FILE[@REVISION]`: download a model file
 * into the cache and print its path.
 *
 * libcurl does the HTTP (redirects, TLS, ranges); OpenSSL's EVP does the
 * SHA-256. The file is written to DEST.part and renamed to DEST only once
 * it is complete and its checksum (when one is known) matches, so DEST
 * always means "a whole, verified file". A .part left by an interrupted run
 * is resumed with a Range request; from a server that ignores the range
 * (200 instead of 206) the file is fetched again from the start. The expected SHA-256 comes
 * from --sha256, else from the server: Hugging Face reports an LFS file's
 * SHA-256 as its ETag (X-Linked-Etag on the redirect). */
#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <getopt.h>
#include <openssl/evp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "clients/cli/cli.h"
#include "common/cm_version.h"

#define PULL_MAX_URL 2048

typedef struct pull_state {
    FILE *out;
    bool tty;
    bool got_status;       /* the final response's status line seen */
    long status;           /* its HTTP status */
    curl_off_t resume_from;
    char etag_sha[65];     /* a 64-hex-digit ETag / X-Linked-Etag, lower case */
    double last_draw;
} pull_state;

static void pull_usage(FILE *f)
{
    fputs("usage: gorgon pull [--sha256 HEX] [--output FILE] [--cache-dir DIR] [--quiet]\n"
          "                   URL | hf://OWNER/REPO/FILE[@REVISION]\n"
          "Downloads a model file (resuming a partial download) into\n"
          "$XDG_CACHE_HOME/gorgon (else ~/.cache/gorgon), checks its SHA-256 when\n"
          "--sha256 or the server gives one, and prints its path.\n",
          f);
}

/* hf://OWNER/REPO/PATH[@REV] -> https://huggingface.co/OWNER/REPO/resolve/REV/PATH
 * (the host from $HF_ENDPOINT when set) */
static int resolve_url(const char *src, char *url, size_t cap)
{
    if (strncmp(src, "hf://", 5) != 0) {
        if (strncmp(src, "http://", 7) && strncmp(src, "https://", 8)) {
            fprintf(stderr, "gorgon pull: '%s': expected an http(s):// URL or "
                            "hf://OWNER/REPO/FILE\n", src);
            return -EINVAL;
        }
        if (snprintf(url, cap, "%s", src) >= (int)cap)
            return -ENAMETOOLONG;
        return 0;
    }
    const char *p = src + 5;
    const char *s1 = strchr(p, '/');
    const char *s2 = s1 ? strchr(s1 + 1, '/') : NULL;
    if (!s1 || !s2 || s1 == p || s2 == s1 + 1 || !s2[1]) {
        fprintf(stderr, "gorgon pull: '%s': expected hf://OWNER/REPO/FILE[@REVISION]\n", src);
        return -EINVAL;
    }
    const char *at = strrchr(s2 + 1, '@');
    const char *rev = at ? at + 1 : "main";
    int file_len = at ? (int)(at - (s2 + 1)) : (int)strlen(s2 + 1);
    if (at && (!*rev || file_len == 0)) {
        fprintf(stderr, "gorgon pull: '%s': empty file or revision\n", src);
        return -EINVAL;
    }
    /* $HF_ENDPOINT, as Hugging Face's own tools honour it (a mirror, or a
     * local server in our tests) */
    const char *base = getenv("HF_ENDPOINT");
    if (!base || !*base)
        base = "https://huggingface.co";
    size_t bl = strlen(base);
    while (bl && base[bl - 1] == '/')
        bl--;
    if (snprintf(url, cap, "%.*s/%.*s/resolve/%s/%.*s", (int)bl, base, (int)(s2 - p), p, rev,
                 file_len, s2 + 1) >= (int)cap)
        return -ENAMETOOLONG;
    return 0;
}

/* Cache path of url: DIR/HOST/PATH (query dropped), directories made. */
/* mkdir -p: every missing directory of path (a fresh $HOME has no
 * ~/.cache). 0 or -errno. */
static int make_dirs(char *path)
{
    for (char *s = path + 1;; s++) {
        if (*s != '/' && *s != '\0')
            continue;
        char c = *s;
        *s = '\0';
        int rc = mkdir(path, 0755);
        *s = c;
        if (rc < 0 && errno != EEXIST)
            return -errno;
        if (!c)
            return 0;
    }
}

static int cache_path(const char *dir, const char *url, char *out, size_t cap)
{
    const char *host = strstr(url, "://") + 3;
    size_t n = strcspn(host, "?#");
    if (snprintf(out, cap, "%s/%.*s", dir, (int)n, host) >= (int)cap)
        return -ENAMETOOLONG;
    /* no "..": the path stays inside the cache */
    if (strstr(out + strlen(dir), "/../") || strstr(out + strlen(dir), "/./") ||
        out[strlen(out) - 1] == '/') {
        fprintf(stderr, "gorgon pull: '%s': not a file URL\n", url);
        return -EINVAL;
    }
    char *slash = strrchr(out, '/');
    *slash = '\0';
    int rc = make_dirs(out);
    *slash = '/';
    if (rc < 0)
        fprintf(stderr, "gorgon pull: cannot create the cache directory for %s: %s\n", out,
                strerror(-rc));
    return rc;
}

static int default_cache_dir(char *out, size_t cap)
{
    const char *xdg = getenv("XDG_CACHE_HOME");
    const char *home = getenv("HOME");
    int n;
    if (xdg && xdg[0] == '/')
        n = snprintf(out, cap, "%s/gorgon", xdg);
    else if (home && home[0])
        n = snprintf(out, cap, "%s/.cache/gorgon", home);
    else {
        fputs("gorgon pull: neither $XDG_CACHE_HOME nor $HOME is set: give --cache-dir\n",
              stderr);
        return -EINVAL;
    }
    return n < (int)cap ? 0 : -ENAMETOOLONG;
}

static bool is_sha_hex(const char *s, size_t n)
{
    if (n != 64)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!isxdigit((unsigned char)s[i]))
            return false;
    return true;
}

/* Headers of every response (redirects included): the status of the last
 * one, and an ETag that is a SHA-256. */
static size_t on_header(char *buf, size_t size, size_t n, void *arg)
{
    pull_state *st = arg;
    size_t len = size * n;
    if (len >= 5 && !strncmp(buf, "HTTP/", 5)) {
        const char *sp = memchr(buf, ' ', len);
        st->status = sp ? strtol(sp + 1, NULL, 10) : 0;
        st->got_status = true;
        return len;
    }
    const char *names[] = {"x-linked-etag:", "etag:"};
    for (int k = 0; k < 2; k++) {
        size_t nl = strlen(names[k]);
        if (len <= nl || strncasecmp(buf, names[k], nl) != 0)
            continue;
        const char *v = buf + nl, *end = buf + len;
        while (v < end && (*v == ' ' || *v == '"' || *v == 'W' || *v == '/'))
            v++;
        const char *e = v;
        while (e < end && isxdigit((unsigned char)*e))
            e++;
        /* X-Linked-Etag (the LFS object's) wins over the redirect's ETag */
        if (is_sha_hex(v, (size_t)(e - v)) && (k == 0 || !st->etag_sha[0])) {
            for (int i = 0; i < 64; i++)
                st->etag_sha[i] = (char)tolower((unsigned char)v[i]);
            st->etag_sha[64] = '\0';
        }
    }
    return len;
}

static size_t on_body(char *buf, size_t size, size_t n, void *arg)
{
    pull_state *st = arg;
    /* Only a 200 or the 206 answering our range is the file; an error
     * page is not written into it. (A 200 answering a range never gets
     * here: libcurl fails it with CURLE_RANGE_ERROR, and we start over.) */
    if (st->status != 200 && st->status != 206)
        return size * n;
    return fwrite(buf, size, n, st->out);
}

static int on_progress(void *arg, curl_off_t total, curl_off_t now, curl_off_t ut, curl_off_t un)
{
    (void)ut, (void)un;
    pull_state *st = arg;
    if (!st->tty || total <= 0)
        return 0;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double t = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    if (t - st->last_draw < 0.1 && now < total)
        return 0;
    st->last_draw = t;
    double have = (double)(now + st->resume_from), all = (double)(total + st->resume_from);
    int width = 30, fill = (int)(width * have / all);
    fprintf(stderr, "\r  [%.*s%*s] %5.1f%%  %.1f / %.1f MB", fill,
            "##############################", width - fill, "", 100.0 * have / all, have / 1e6,
            all / 1e6);
    return 0;
}

static int sha256_file(const char *path, char hex[65])
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return -errno;
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    int rc = md && EVP_DigestInit_ex(md, EVP_sha256(), NULL) ? 0 : -ENOMEM;
    static unsigned char buf[1 << 16];
    size_t k;
    while (rc == 0 && (k = fread(buf, 1, sizeof(buf), f)) > 0)
        if (!EVP_DigestUpdate(md, buf, k))
            rc = -EIO;
    if (ferror(f))
        rc = -EIO;
    unsigned char d[32];
    unsigned int dl = 0;
    if (rc == 0 && !EVP_DigestFinal_ex(md, d, &dl))
        rc = -EIO;
    EVP_MD_CTX_free(md);
    fclose(f);
    for (unsigned i = 0; rc == 0 && i < dl; i++)
        snprintf(hex + 2 * i, 3, "%02x", d[i]);
    return rc;
}

/* Download url into part (resuming it). 0, or -errno with the reason said. */
static int fetch(const char *url, const char *part, pull_state *st)
{
    struct stat sb;
    st->resume_from = stat(part, &sb) == 0 ? (curl_off_t)sb.st_size : 0;
    st->out = fopen(part, st->resume_from ? "r+b" : "wb");
    if (!st->out) {
        int rc = -errno;
        fprintf(stderr, "gorgon pull: %s: %s\n", part, strerror(-rc));
        return rc;
    }
    if (st->resume_from && fseek(st->out, 0, SEEK_END) != 0) {
        fclose(st->out);
        return -EIO;
    }
    CURL *c = curl_easy_init();
    if (!c) {
        fclose(st->out);
        return -ENOMEM;
    }
    char err[CURL_ERROR_SIZE] = "";
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(c, CURLOPT_MAXREDIRS, 10L);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, st);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, st);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, st);
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, err);
    char ua[96];
    snprintf(ua, sizeof(ua), "gorgon-pull/%s", cm_version());
    curl_easy_setopt(c, CURLOPT_USERAGENT, ua); /* libcurl keeps a copy */
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 30L);
    /* a stalled transfer (under 1 KB/s for 60 s) fails and can be resumed */
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1024L);
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, 60L);
    if (st->resume_from)
        curl_easy_setopt(c, CURLOPT_RESUME_FROM_LARGE, st->resume_from);
    CURLcode cc = curl_easy_perform(c);
    curl_off_t got = 0, expect = -1;
    curl_easy_getinfo(c, CURLINFO_SIZE_DOWNLOAD_T, &got);
    curl_easy_getinfo(c, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &expect);
    curl_easy_cleanup(c);
    bool write_failed = fflush(st->out) != 0 || ferror(st->out);
    fclose(st->out);
    if (st->tty)
        fputc('\n', stderr);
    if (st->status == 416 && st->resume_from) {
        /* the range starts at the end: the .part is already whole */
        return 0;
    }
    if (cc == CURLE_RANGE_ERROR && st->resume_from)
        return -ERANGE; /* a 200 to our Range request: libcurl will not append it */
    if (cc == CURLE_OK && st->status != 200 && st->status != 206) {
        fprintf(stderr, "gorgon pull: %s: HTTP %ld%s\n", url, st->status,
                st->status == 404 ? " (no such file)" : "");
        if (!st->resume_from)
            unlink(part);
        return st->status == 404 ? -ENOENT : -EIO;
    }
    if (cc != CURLE_OK || write_failed) {
        char of[48] = "";
        if (expect > 0)
            snprintf(of, sizeof(of), " of %lld", (long long)(st->resume_from + expect));
        fprintf(stderr,
                "gorgon pull: %s: %s after %lld%s bytes; run the same command again to "
                "resume\n",
                url, write_failed ? "cannot write the file" : (err[0] ? err : curl_easy_strerror(cc)),
                (long long)(st->resume_from + got), of);
        return -EIO;
    }
    return 0;
}

int cli_pull(int argc, char **argv)
{
    static const struct option lo[] = {
        {"sha256", required_argument, 0, 's'}, {"output", required_argument, 0, 'o'},
        {"cache-dir", required_argument, 0, 'C'}, {"quiet", no_argument, 0, 'q'},
        {"help", no_argument, 0, 'h'},         {0, 0, 0, 0},
    };
    const char *want_sha = NULL, *output = NULL, *cache = NULL;
    bool quiet = false;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:qh", lo, NULL)) != -1) {
        switch (c) {
        case 's': want_sha = optarg; break;
        case 'o': output = optarg; break;
        case 'C': cache = optarg; break;
        case 'q': quiet = true; break;
        case 'h': pull_usage(stdout); return 0;
        default: pull_usage(stderr); return 2;
        }
    }
    if (optind != argc - 1) {
        pull_usage(stderr);
        return 2;
    }
    if (want_sha && !is_sha_hex(want_sha, strlen(want_sha))) {
        fprintf(stderr, "gorgon pull: --sha256 '%s': expected 64 hex digits\n", want_sha);
        return 2;
    }
    char url[PULL_MAX_URL], dir[4096], dest[4096 + PULL_MAX_URL], part[sizeof(dest) + 8];
    if (resolve_url(argv[optind], url, sizeof(url)) < 0)
        return 2;
    if (output) {
        if (snprintf(dest, sizeof(dest), "%s", output) >= (int)sizeof(dest))
            return 2;
    } else {
        if (cache) {
            if (snprintf(dir, sizeof(dir), "%s", cache) >= (int)sizeof(dir))
                return 2;
        } else if (default_cache_dir(dir, sizeof(dir)) < 0) {
            return 2;
        }
        int rc = make_dirs(dir);
        if (rc < 0) {
            fprintf(stderr, "gorgon pull: cannot create %s: %s\n", dir, strerror(-rc));
            return 1;
        }
        if (cache_path(dir, url, dest, sizeof(dest)) < 0)
            return 1;
    }
    snprintf(part, sizeof(part), "%s.part", dest);

    struct stat sb;
    if (stat(dest, &sb) == 0 && S_ISREG(sb.st_mode)) {
        /* Complete files only ever get this name; with a checksum given, a
         * cached file is checked again. */
        if (want_sha) {
            char hex[65];
            if (sha256_file(dest, hex) < 0 || strcasecmp(hex, want_sha) != 0) {
                fprintf(stderr, "gorgon pull: cached %s does not match --sha256; remove it to "
                                "download again\n", dest);
                return 1;
            }
        }
        if (!quiet)
            fprintf(stderr, "gorgon pull: %s is already here\n", dest);
        printf("%s\n", dest);
        return 0;
    }

    if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0) {
        fputs("gorgon pull: libcurl initialisation failed\n", stderr);
        return 1;
    }
    pull_state st = {.tty = !quiet && isatty(2)};
    if (!quiet)
        fprintf(stderr, "gorgon pull: %s -> %s\n", url, dest);
    int rc = fetch(url, part, &st);
    if (rc == -ERANGE) {
        /* the server cannot resume: the partial file goes, the whole comes */
        if (!quiet)
            fprintf(stderr, "gorgon pull: the server does not resume downloads: starting over\n");
        unlink(part);
        st = (pull_state){.tty = st.tty};
        rc = fetch(url, part, &st);
    }
    curl_global_cleanup();
    if (rc < 0)
        return 1;
    const char *expect = want_sha ? want_sha : (st.etag_sha[0] ? st.etag_sha : NULL);
    if (expect) {
        char hex[65];
        if ((rc = sha256_file(part, hex)) < 0) {
            fprintf(stderr, "gorgon pull: cannot read %s back: %s\n", part, strerror(-rc));
            return 1;
        }
        if (strcasecmp(hex, expect) != 0) {
            /* a bad download is not resumable: start over next time */
            unlink(part);
            fprintf(stderr, "gorgon pull: SHA-256 mismatch for %s: expected %s (%s), got %s; "
                            "the download was removed\n",
                    url, expect, want_sha ? "--sha256" : "the server's ETag", hex);
            return 1;
        }
    }
    if (rename(part, dest) != 0) {
        fprintf(stderr, "gorgon pull: rename %s: %s\n", part, strerror(errno));
        return 1;
    }
    if (!quiet)
        fprintf(stderr, "gorgon pull: done%s\n", expect ? " (SHA-256 checked)" : " (no checksum to check)");
    printf("%s\n", dest);
    return 0;
}
