/* Region creation and attachment: bad configurations and options, headers
 * corrupted field by field, files that are not regions, rank numbers out of
 * range or taken, argument errors; each refused with a message naming what
 * was wrong. Also the coordinator's abort through the fd. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/comm/comm.h"
#include "tests/comm/util/comm_test_util.h"

static void expect_create_refused(comm_shm_cfg cfg, int want_rc, const char *word)
{
    char why[256] = "";
    int rc = comm_shm_create(&cfg, why, sizeof why);
    if (rc >= 0)
        close(rc);
    cr_expect_eq(rc, want_rc, "n_ranks %d buf %zu p2p %zu: rc %d (%s)", cfg.n_ranks,
                 cfg.buf_bytes, cfg.p2p_bytes, rc, why);
    cr_expect(strstr(why, word), "message '%s' should name '%s'", why, word);
}

Test(comm_attach, create_refuses_bad_config)
{
    expect_create_refused((comm_shm_cfg){.n_ranks = 0}, -EINVAL, "n_ranks 0");
    expect_create_refused((comm_shm_cfg){.n_ranks = COMM_SHM_MAX_RANKS + 1}, -EINVAL,
                          "n_ranks 65");
    expect_create_refused((comm_shm_cfg){.n_ranks = 2, .buf_bytes = 100}, -EINVAL,
                          "buf_bytes 100");
    expect_create_refused((comm_shm_cfg){.n_ranks = 2, .buf_bytes = (size_t)1 << 31}, -EINVAL,
                          "buf_bytes 2147483648");
    expect_create_refused((comm_shm_cfg){.n_ranks = 2, .p2p_bytes = (size_t)1 << 29}, -EINVAL,
                          "p2p_bytes");
    expect_create_refused((comm_shm_cfg){.n_ranks = 64, .buf_bytes = (size_t)1 << 30}, -EINVAL,
                          "larger than");
    char why[64];
    cr_expect_eq(comm_shm_create(NULL, why, sizeof why), -EINVAL);
    cr_expect_str_eq(why, "cfg is NULL");
    cr_expect_eq(comm_shm_bytes(&(comm_shm_cfg){.n_ranks = 0}), 0u);
}

Test(comm_attach, region_size_matches_comm_shm_bytes)
{
    comm_shm_cfg cfg = {.n_ranks = 3, .buf_bytes = 5000, .p2p_bytes = 100};
    char why[256];
    int fd = comm_shm_create(&cfg, why, sizeof why);
    cr_assert_geq(fd, 0, "%s", why);
    struct stat st;
    cr_assert_eq(fstat(fd, &st), 0);
    cr_expect_eq((size_t)st.st_size, comm_shm_bytes(&cfg));
    cr_expect_eq(st.st_size % 4096, 0);
    cr_expect_eq(fcntl(fd, F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
    cr_expect_eq(ftruncate(fd, st.st_size / 2), -1, "sealed against shrinking");
    close(fd);
}

static int make_region(int n)
{
    char why[256];
    comm_shm_cfg cfg = {.n_ranks = n, .buf_bytes = 8192, .p2p_bytes = 256};
    int fd = comm_shm_create(&cfg, why, sizeof why);
    cr_assert_geq(fd, 0, "%s", why);
    return fd;
}

/* Overwrite `len` bytes of the header at `off` (the layout in docs/comm.md:
 * magic 0, version 8, hdr_bytes 12, n_ranks 16, buf_bytes 24, p2p_bytes 32,
 * total_bytes 40) and expect attach to refuse with `word` in the message. */
static void expect_corrupt_refused(size_t off, uint64_t val, size_t len, int want_rc,
                                   const char *word)
{
    int fd = make_region(2);
    cr_assert_eq(pwrite(fd, &val, len, (off_t)off), (ssize_t)len);
    comm *c = (comm *)1;
    char why[256] = "";
    int rc = comm_shm_attach(&c, fd, 0, NULL, why, sizeof why);
    cr_expect_eq(rc, want_rc, "header offset %zu = %llu: rc %d (%s)", off,
                 (unsigned long long)val, rc, why);
    cr_expect_null(c, "nothing attached");
    cr_expect(strstr(why, word), "message '%s' should name '%s'", why, word);
    /* the coordinator's abort refuses it as well */
    char err[256] = "";
    cr_expect_eq(comm_shm_abort_fd(fd, "x", err, sizeof err), want_rc);
    cr_expect(strstr(err, word), "abort_fd message '%s'", err);
    if (rc == 0)
        comm_destroy(c);
    close(fd);
}

Test(comm_attach, corrupted_header_is_refused_by_field)
{
    expect_corrupt_refused(0, 0x1122334455667788ull, 8, -EINVAL, "bad magic");
    expect_corrupt_refused(8, 99, 4, -EPROTO, "version 99");
    expect_corrupt_refused(12, 65, 4, -EPROTO, "header of 65 bytes");
    expect_corrupt_refused(16, 0, 4, -EINVAL, "n_ranks 0");
    expect_corrupt_refused(16, 1000, 4, -EINVAL, "n_ranks 1000");
    expect_corrupt_refused(16, 3, 4, -EINVAL, "total_bytes");
    expect_corrupt_refused(24, 8193, 8, -EINVAL, "buf_bytes 8193");
    expect_corrupt_refused(24, UINT64_MAX, 8, -EINVAL, "buf_bytes");
    expect_corrupt_refused(32, 1ull << 40, 8, -EINVAL, "p2p_bytes");
    expect_corrupt_refused(40, 4096, 8, -EINVAL, "total_bytes 4096");
}

Test(comm_attach, files_that_are_not_regions_are_refused)
{
    comm *c;
    char why[256];
    cr_expect_eq(comm_shm_attach(&c, -1, 0, NULL, why, sizeof why), -EBADF);
    cr_expect(strstr(why, "fd -1"), "%s", why);

    /* a memfd with a valid header but no seals: could shrink under us */
    int good = make_region(2);
    struct stat st;
    cr_assert_eq(fstat(good, &st), 0);
    int fd = memfd_create("not-sealed", MFD_CLOEXEC);
    cr_assert_geq(fd, 0);
    cr_assert_eq(ftruncate(fd, st.st_size), 0);
    char hdr[64];
    cr_assert_eq(pread(good, hdr, sizeof hdr, 0), 64);
    cr_assert_eq(pwrite(fd, hdr, sizeof hdr, 0), 64);
    cr_expect_eq(comm_shm_attach(&c, fd, 0, NULL, why, sizeof why), -EINVAL);
    cr_expect(strstr(why, "not sealed"), "%s", why);
    close(fd);
    close(good);

    /* too small to hold a header */
    fd = memfd_create("tiny", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    cr_assert_eq(ftruncate(fd, 100), 0);
    cr_expect_eq(comm_shm_attach(&c, fd, 0, NULL, why, sizeof why), -EINVAL);
    cr_expect(strstr(why, "smaller than"), "%s", why);
    close(fd);

    int p[2];
    cr_assert_eq(pipe(p), 0);
    cr_expect_eq(comm_shm_attach(&c, p[0], 0, NULL, why, sizeof why), -EINVAL);
    close(p[0]);
    close(p[1]);
}

Test(comm_attach, rank_out_of_range_or_taken_is_refused)
{
    int fd = make_region(2);
    comm *c, *c2;
    char why[256];
    cr_expect_eq(comm_shm_attach(&c, fd, 2, NULL, why, sizeof why), -EINVAL);
    cr_expect(strstr(why, "rank 2: the region has ranks 0..1"), "%s", why);
    cr_expect_eq(comm_shm_attach(&c, fd, -1, NULL, why, sizeof why), -EINVAL);
    cr_assert_eq(comm_shm_attach(&c, fd, 1, NULL, why, sizeof why), 0, "%s", why);
    cr_expect_eq(comm_rank(c), 1);
    cr_expect_eq(comm_size(c), 2);
    cr_expect_eq(comm_shm_attach(&c2, fd, 1, NULL, why, sizeof why), -EBUSY);
    cr_expect(strstr(why, "rank 1 is already attached"), "%s", why);
    comm_destroy(c);
    cr_assert_eq(comm_shm_attach(&c2, fd, 1, NULL, why, sizeof why), 0, "free again: %s", why);
    comm_destroy(c2);
    comm_destroy(NULL);
    close(fd);
}

Test(comm_attach, bad_options_are_refused)
{
    int fd = make_region(2);
    comm *c;
    char why[256];
    comm_shm_opts o = COMM_SHM_OPTS_DEFAULT;
    o.threads_per_rank = 0;
    cr_expect_eq(comm_shm_attach(&c, fd, 0, &o, why, sizeof why), -EINVAL);
    cr_expect(strstr(why, "threads_per_rank 0"), "%s", why);
    o = COMM_SHM_OPTS_DEFAULT;
    o.spin = 2;
    cr_expect_eq(comm_shm_attach(&c, fd, 0, &o, why, sizeof why), -EINVAL);
    cr_expect(strstr(why, "spin 2"), "%s", why);
    o = COMM_SHM_OPTS_DEFAULT;
    o.timeout_ms = 0;
    cr_expect_eq(comm_shm_attach(&c, fd, 0, &o, why, sizeof why), -EINVAL);
    cr_expect(strstr(why, "timeout_ms 0"), "%s", why);
    o.timeout_ms = -2;
    cr_expect_eq(comm_shm_attach(&c, fd, 0, &o, why, sizeof why), -EINVAL);
    o.timeout_ms = -1;
    cr_assert_eq(comm_shm_attach(&c, fd, 0, &o, why, sizeof why), 0, "no limit: %s", why);
    cr_expect_eq(comm_set_timeout_ms(c, 0), -EINVAL);
    cr_expect(strstr(comm_last_error(c), "set_timeout_ms: 0"), "%s", comm_last_error(c));
    cr_expect_eq(comm_set_timeout_ms(c, -5), -EINVAL);
    cr_expect_eq(comm_set_timeout_ms(c, 10), 0);
    cr_expect_eq(comm_set_timeout_ms(c, -1), 0);
    comm_destroy(c);
    cr_expect_eq(comm_shm_attach(NULL, fd, 0, NULL, why, sizeof why), -EINVAL);
    close(fd);
}

/* Arguments are checked before anything is shared: these calls fail alone
 * (rank 1 never attaches) and leave the communicator usable. */
Test(comm_attach, bad_arguments_are_refused_by_name)
{
    int fd = make_region(2);
    comm *c;
    char why[256];
    cr_assert_eq(comm_shm_attach(&c, fd, 0, NULL, why, sizeof why), 0, "%s", why);
    int buf[8];
    struct {
        int rc, want;
        const char *word;
    } cases[] = {
        {comm_send(c, buf, 4, 2), -EINVAL, "send: peer 2 is not a rank"},
        {comm_send(c, buf, 4, 0), -EINVAL, "send: peer 0 is this rank"},
        {comm_recv(c, buf, 4, -1), -EINVAL, "recv: peer -1 is not a rank"},
        {comm_recv(c, NULL, 4, 1), -EINVAL, "recv: buf is NULL"},
        {comm_broadcast(c, buf, 4, 5), -EINVAL, "broadcast: root 5 is not a rank"},
        {comm_broadcast(c, NULL, 4, 0), -EINVAL, "broadcast: buf is NULL"},
        {comm_all_reduce_sum_f32(c, NULL, 3), -EINVAL, "buf is NULL with n = 3"},
        {comm_all_reduce_sum_f32(c, (float *)buf, SIZE_MAX / 2), -EOVERFLOW, "overflows"},
        {comm_all_gather(c, buf, buf + 1, 8), -EINVAL, "in overlaps out"},
        {comm_all_gather(c, buf, NULL, 4), -EINVAL, "out is NULL"},
        {comm_all_gather(c, buf, buf, SIZE_MAX / 2 + 1), -EOVERFLOW, "overflows"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        cr_expect_eq(cases[i].rc, cases[i].want, "case %zu (%s): rc %d", i, cases[i].word,
                     cases[i].rc);
    /* the messages, one call at a time */
    cr_expect_eq(comm_send(c, buf, 4, 2), -EINVAL);
    cr_expect(strstr(comm_last_error(c), "send: peer 2 is not a rank (size 2)"), "%s",
              comm_last_error(c));
    cr_expect_eq(comm_broadcast(c, buf, 4, 5), -EINVAL);
    cr_expect(strstr(comm_last_error(c), "root 5"), "%s", comm_last_error(c));
    cr_expect_eq(comm_all_gather(c, buf, buf + 1, 8), -EINVAL);
    cr_expect(strstr(comm_last_error(c), "in overlaps out"), "%s", comm_last_error(c));
    /* in place (in == out + rank * bytes) is allowed: zero-size calls prove
     * the checks pass without needing rank 1 */
    cr_expect_eq(comm_all_gather(c, buf, buf, 0), 0);
    cr_expect_eq(comm_all_reduce_sum_f32(c, NULL, 0), 0);
    cr_expect_str_eq(comm_last_error(c), "", "a successful call clears the error");
    cr_expect(!comm_aborted(c, why, sizeof why), "argument errors do not abort");
    cr_expect_eq(comm_all_reduce_sum_f32(NULL, NULL, 0), -EINVAL);
    comm_destroy(c);
    close(fd);
}

Test(comm_attach, coordinator_abort_reaches_every_attached_rank)
{
    int fd = make_region(2);
    comm *c;
    char why[300], err[256];
    cr_assert_eq(comm_shm_attach(&c, fd, 0, NULL, why, sizeof why), 0, "%s", why);
    cr_expect(!comm_aborted(c, why, sizeof why));
    cr_expect_str_eq(why, "");
    char longwhy[1000];
    memset(longwhy, 'z', sizeof longwhy - 1);
    longwhy[sizeof longwhy - 1] = '\0';
    memcpy(longwhy, "rank 1 died", 11);
    cr_assert_eq(comm_shm_abort_fd(fd, longwhy, err, sizeof err), 0, "%s", err);
    /* a second abort keeps the first reason */
    cr_assert_eq(comm_shm_abort_fd(fd, "second", err, sizeof err), 0, "%s", err);
    cr_expect(comm_aborted(c, why, sizeof why));
    cr_expect_eq(strncmp(why, "rank 1 died", 11), 0, "%s", why);
    cr_expect_eq(strlen(why), 255u, "reason truncated to the region's 255 bytes");
    char tiny[5];
    cr_expect(comm_aborted(c, tiny, sizeof tiny));
    cr_expect_str_eq(tiny, "rank");
    cr_expect_eq(comm_barrier(c), -ECONNABORTED);
    cr_expect(strstr(comm_last_error(c), "barrier: communicator aborted: rank 1 died"), "%s",
              comm_last_error(c));
    comm_destroy(c);
    close(fd);
    cr_expect_eq(comm_shm_abort_fd(-1, "x", err, sizeof err), -EBADF);
}
