/* medusa_fit — greedy tree construction from head accuracies and a cost
 * model (see medusa_fit.h). */
#include "engine/medusa/medusa_fit.h"

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/model/eng_err.h"

static int check_acc(const double *acc, int n_heads, int topk)
{
    if (!acc)
        return eng_fail(-EINVAL, "medusa fit: no accuracy table");
    if (n_heads < 1 || n_heads > ENG_MEDUSA_MAX_DEPTH)
        return eng_fail(-EINVAL, "medusa fit: %d heads (expected 1..%d)", n_heads,
                        ENG_MEDUSA_MAX_DEPTH);
    if (topk < 1 || topk > ENG_MEDUSA_TOPK)
        return eng_fail(-EINVAL, "medusa fit: top-k %d (expected 1..%d)", topk, ENG_MEDUSA_TOPK);
    for (int h = 0; h < n_heads; h++)
        for (int r = 0; r < topk; r++) {
            const double a = acc[h * topk + r];
            if (!(a >= 0.0 && a <= 1.0))
                return eng_fail(-EINVAL, "medusa fit: accuracy of head %d rank %d is %g "
                                         "(expected 0..1)",
                                h, r, a);
        }
    return 0;
}

int eng_medusa_fit_expected(const double *acc, int n_heads, int topk, const int32_t *ranks,
                            const int32_t *lens, int64_t n_paths, double *expected)
{
    int rc = check_acc(acc, n_heads, topk);
    if (rc < 0)
        return rc;
    if (n_paths < 0 || (n_paths > 0 && (!ranks || !lens)) || !expected)
        return eng_fail(-EINVAL, "medusa fit: bad path list");
    double e = 1.0;
    int64_t at = 0;
    for (int64_t i = 0; i < n_paths; i++) {
        if (lens[i] < 1 || lens[i] > n_heads)
            return eng_fail(-EINVAL, "medusa fit: path %" PRId64 " has %d ranks (expected 1..%d)",
                            i, lens[i], n_heads);
        double p = 1.0;
        for (int32_t d = 0; d < lens[i]; d++) {
            const int32_t r = ranks[at + d];
            if (r < 0 || r >= topk)
                return eng_fail(-EINVAL, "medusa fit: path %" PRId64 " rank %d outside 0..%d", i,
                                r, topk - 1);
            p *= acc[d * topk + r];
        }
        e += p;
        at += lens[i];
    }
    *expected = e;
    return 0;
}

int eng_medusa_fit_tree(const double *acc, int n_heads, int topk, const double *cost,
                        int64_t max_nodes, eng_medusa_fit *out)
{
    int rc = check_acc(acc, n_heads, topk);
    if (rc < 0)
        return rc;
    if (!out)
        return eng_fail(-EINVAL, "medusa fit: no output");
    if (!cost || max_nodes < 2 || max_nodes > ENG_MEDUSA_MAX_NODES)
        return eng_fail(-EINVAL, "medusa fit: max_nodes %" PRId64 " (expected 2..%d)", max_nodes,
                        ENG_MEDUSA_MAX_NODES);
    for (int64_t n = 1; n <= max_nodes; n++)
        if (!(cost[n - 1] > 0.0) || !isfinite(cost[n - 1]))
            return eng_fail(-EINVAL, "medusa fit: cost of a %" PRId64 "-node tree is %g "
                                     "(expected finite and > 0)",
                            n, cost[n - 1]);

    /* Node i >= 1 is path i - 1 of the fit, added in greedy order. */
    static_assert(ENG_MEDUSA_TOPK <= 16, "child masks are 16 bits");
    int32_t depth[ENG_MEDUSA_MAX_NODES], parent[ENG_MEDUSA_MAX_NODES];
    int32_t rank[ENG_MEDUSA_MAX_NODES];
    uint16_t used[ENG_MEDUSA_MAX_NODES]; /* child ranks already added */
    double prob[ENG_MEDUSA_MAX_NODES];
    depth[0] = 0, parent[0] = -1, rank[0] = -1, used[0] = 0, prob[0] = 1.0;
    int64_t n = 1, best_n = 0;
    double e = 1.0, best_score = -1.0, best_e = 1.0;
    while (n < max_nodes) {
        int64_t bp = -1;
        int32_t br = -1;
        double bprob = -1.0;
        for (int64_t i = 0; i < n; i++) {
            if (depth[i] >= n_heads)
                continue;
            const double *row = acc + (size_t)depth[i] * (size_t)topk;
            for (int32_t r = 0; r < topk; r++) {
                if (used[i] & (1u << r))
                    continue;
                const double p = prob[i] * row[r];
                if (p > bprob)
                    bprob = p, bp = i, br = r;
            }
        }
        if (bp < 0)
            break; /* every possible node is in */
        used[bp] |= (uint16_t)(1u << br);
        depth[n] = depth[bp] + 1, parent[n] = (int32_t)bp, rank[n] = br, used[n] = 0;
        prob[n] = bprob;
        n++;
        e += bprob;
        const double score = e / cost[n - 1];
        if (score > best_score)
            best_score = score, best_n = n, best_e = e;
    }
    /* max_nodes >= 2 and depth 1 always has topk >= 1 slots: one path at least. */
    out->n_paths = best_n - 1;
    out->expected_tokens = best_e;
    out->cost = cost[best_n - 1];
    for (int64_t i = 1; i < best_n; i++) {
        int32_t *pr = out->ranks + (size_t)(i - 1) * ENG_MEDUSA_MAX_DEPTH;
        out->lens[i - 1] = depth[i];
        for (int64_t j = i; j > 0; j = parent[j])
            pr[depth[j] - 1] = rank[j];
    }
    return 0;
}

int eng_medusa_fit_interp_cost(const int64_t *ns, const double *costs, int n_pts,
                               int64_t max_nodes, double *out)
{
    if (!ns || !costs || !out || n_pts < 1 || max_nodes < 1)
        return eng_fail(-EINVAL, "medusa fit: cost interpolation needs points and an output");
    double lo = costs[0];
    for (int i = 0; i < n_pts; i++) {
        if (ns[i] < 1 || (i > 0 && ns[i] <= ns[i - 1]))
            return eng_fail(-EINVAL, "medusa fit: cost point %d: node counts must increase from 1",
                            i);
        if (!(costs[i] > 0.0) || !isfinite(costs[i]))
            return eng_fail(-EINVAL, "medusa fit: cost point %d is %g (expected > 0)", i,
                            costs[i]);
        lo = costs[i] < lo ? costs[i] : lo;
    }
    for (int64_t n = 1; n <= max_nodes; n++) {
        double c;
        if (n <= ns[0]) {
            c = costs[0];
        } else {
            int i = 1;
            while (i < n_pts - 1 && ns[i] < n)
                i++;
            if (n_pts == 1) {
                c = costs[0];
            } else {
                /* segment (i-1, i); past the last point this extrapolates it */
                const double t = (double)(n - ns[i - 1]) / (double)(ns[i] - ns[i - 1]);
                c = costs[i - 1] + t * (costs[i] - costs[i - 1]);
            }
        }
        out[n - 1] = c < lo ? lo : c;
    }
    return 0;
}

int64_t eng_medusa_fit_format(const eng_medusa_fit *f, char *buf, size_t cap)
{
    size_t at = 0;
#define PUT(...)                                                                      \
    do {                                                                              \
        int w_ = snprintf(buf + at, at < cap ? cap - at : 0, __VA_ARGS__);            \
        if (w_ < 0 || (size_t)w_ >= (at < cap ? cap - at : 0))                        \
            return -ENOSPC;                                                           \
        at += (size_t)w_;                                                             \
    } while (0)
    if (!f || !buf)
        return -EINVAL;
    PUT("[");
    for (int64_t i = 0; i < f->n_paths; i++) {
        PUT(i ? ",[" : "[");
        for (int32_t d = 0; d < f->lens[i]; d++)
            PUT(d ? ",%d" : "%d", f->ranks[(size_t)i * ENG_MEDUSA_MAX_DEPTH + (size_t)d]);
        PUT("]");
    }
    PUT("]");
#undef PUT
    return (int64_t)at;
}

int eng_medusa_fit_load(eng_medusa_tree **out, const char *dir)
{
    char path[PATH_MAX];
    if (!out || !dir)
        return -EINVAL;
    if (snprintf(path, sizeof(path), "%s/%s", dir, ENG_MEDUSA_CHOICES_FILE) >= (int)sizeof(path))
        return eng_fail(-ENAMETOOLONG, "%s: path too long", dir);
    FILE *f = fopen(path, "re");
    if (!f) {
        const int rc = -errno;
        return rc == -ENOENT ? rc : eng_fail(rc, "%s: %s", path, strerror(-rc));
    }
    enum { CAP = 1 << 20 };
    char *text = malloc(CAP + 1);
    if (!text) {
        fclose(f);
        return eng_fail(-ENOMEM, "%s: out of memory", path);
    }
    const size_t n = fread(text, 1, CAP + 1, f);
    const bool err = ferror(f);
    fclose(f);
    int rc;
    if (err)
        rc = eng_fail(-EIO, "%s: read error", path);
    else if (n > CAP)
        rc = eng_fail(-EINVAL, "%s: larger than %d bytes", path, CAP);
    else if (memchr(text, 0, n))
        rc = eng_fail(-EINVAL, "%s: contains a NUL byte", path);
    else {
        text[n] = 0;
        rc = eng_medusa_tree_parse(out, text);
        if (rc < 0) {
            char why[256];
            snprintf(why, sizeof(why), "%s", eng_error());
            rc = eng_fail(rc, "%s: %s", path, why);
        }
    }
    free(text);
    return rc;
}

int eng_medusa_tree_choose(eng_medusa_tree **out, const char *spec, const char *dir,
                           const char **from)
{
    const char *f = "spec";
    int rc;
    if (spec) {
        rc = eng_medusa_tree_from_spec(out, spec);
    } else if (dir && (rc = eng_medusa_fit_load(out, dir)) != -ENOENT) {
        f = ENG_MEDUSA_CHOICES_FILE;
    } else {
        f = "default";
        rc = eng_medusa_tree_from_spec(out, ENG_MEDUSA_TREE_DEFAULT);
    }
    if (rc == 0 && from)
        *from = f;
    return rc;
}
