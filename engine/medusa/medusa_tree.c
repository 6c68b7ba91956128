/* Medusa tree buffers: the C counterpart of generate_medusa_buffers() in
 * FasterDecoding/Medusa (medusa/model/utils.py). Index conventions match it
 * exactly so that trees, traces and acceptance statistics can be compared
 * with the reference implementation one to one. */
#include "engine/medusa/medusa_tree.h"

#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/model/eng_err.h"

/* From FasterDecoding/Medusa medusa/model/medusa_choices.py (mc_sim_7b_63):
 * chosen by the authors from simulated acceptance on Vicuna-7B. */
static const char MC_SIM_7B_63[] =
    "[[0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], "
    "[2, 0], [0, 5], [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], "
    "[0, 0, 2], [3, 0], [0, 9], [8], [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], "
    "[2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], "
    "[1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2], "
    "[2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], "
    "[0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0]]";

static const char *const NAMES[] = {
    "mc_sim_7b_63", "chain1", "chain2", "chain3", "chain4",
    "chain5",       "chain6", "chain7", "chain8", NULL,
};

struct path {
    int32_t len;
    int32_t r[ENG_MEDUSA_MAX_DEPTH];
};

/* Medusa's sort key: (len(x), x). */
static int path_cmp(const void *a, const void *b)
{
    const struct path *x = a, *y = b;
    if (x->len != y->len)
        return x->len < y->len ? -1 : 1;
    for (int32_t i = 0; i < x->len; i++)
        if (x->r[i] != y->r[i])
            return x->r[i] < y->r[i] ? -1 : 1;
    return 0;
}

/* "[0,3,1]" into buf (truncated with "..." when it does not fit). */
static const char *path_str(char *buf, size_t cap, const int32_t *r, int32_t len)
{
    size_t o = 0;
    int w = snprintf(buf, cap, "[");
    o += (size_t)w;
    for (int32_t i = 0; i < len && o < cap; i++) {
        w = snprintf(buf + o, cap - o, "%s%d", i ? "," : "", r[i]);
        o += (size_t)w;
    }
    if (o < cap)
        snprintf(buf + o, cap - o, "]");
    if (o >= cap && cap > 4)
        memcpy(buf + cap - 4, "...", 4);
    return buf;
}

/* Index of p in the sorted array, or -1. */
static int64_t find_path(const struct path *sorted, int64_t n, const struct path *p)
{
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        int c = path_cmp(p, &sorted[mid]);
        if (c == 0)
            return mid;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return -1;
}

void eng_medusa_tree_destroy(eng_medusa_tree *t)
{
    if (!t)
        return;
    free(t->depth);
    free(t->parent);
    free(t->rank);
    free(t->tree_indices);
    free(t->paths);
    free(t->mask);
    free(t->retrieve);
    free(t);
}

static int fill(eng_medusa_tree *t, const struct path *s, int64_t n)
{
    const int32_t nn = (int32_t)n + 1, md = s[n - 1].len;
    t->n_paths = (int32_t)n;
    t->n_nodes = nn;
    t->max_depth = md;
    t->n_heads = md;

    t->depth = calloc((size_t)nn, sizeof(int32_t));
    t->parent = calloc((size_t)nn, sizeof(int32_t));
    t->rank = calloc((size_t)nn, sizeof(int32_t));
    t->tree_indices = calloc((size_t)nn, sizeof(int32_t));
    t->paths = calloc((size_t)nn * (size_t)md, sizeof(int32_t));
    t->mask = calloc((size_t)nn * (size_t)nn, 1);
    if (!t->depth || !t->parent || !t->rank || !t->tree_indices || !t->paths || !t->mask)
        return eng_fail(-ENOMEM, "out of memory for a %d-node Medusa tree", nn);

    t->parent[0] = -1;
    t->rank[0] = -1;
    for (int32_t c = 0; c < md; c++)
        t->paths[c] = -1;
    t->mask[0] = 1;
    for (int32_t i = 1; i < nn; i++) {
        const struct path *p = &s[i - 1];
        const int32_t d = p->len;
        t->depth[i] = d;
        t->rank[i] = p->r[d - 1];
        t->tree_indices[i] = 1 + (d - 1) * ENG_MEDUSA_TOPK + p->r[d - 1];
        for (int32_t c = 0; c < md; c++)
            t->paths[(size_t)i * (size_t)md + (size_t)c] = c < d ? p->r[c] : -1;
        t->nodes_per_depth[d - 1]++;
        if (p->r[d - 1] + 1 > t->topk[d - 1])
            t->topk[d - 1] = p->r[d - 1] + 1;
        if (d == 1) {
            t->parent[i] = 0;
        } else {
            struct path pre = *p;
            pre.len = d - 1;
            int64_t k = find_path(s, n, &pre); /* present: checked by the caller */
            t->parent[i] = (int32_t)k + 1;
        }
        /* Parents sort before children, so the parent's row is complete:
         * this row is the parent's row plus the node itself. */
        uint8_t *row = &t->mask[(size_t)i * (size_t)nn];
        memcpy(row, &t->mask[(size_t)t->parent[i] * (size_t)nn], (size_t)nn);
        row[i] = 1;
    }

    /* A node with no child is a leaf; Medusa walks the sorted list from the
     * end, so the rows come in reverse sorted order. */
    bool *has_child = calloc((size_t)nn, sizeof(bool));
    if (!has_child)
        return eng_fail(-ENOMEM, "out of memory");
    for (int32_t i = 1; i < nn; i++)
        has_child[t->parent[i]] = true;
    int32_t nl = 0;
    for (int32_t i = 1; i < nn; i++)
        nl += !has_child[i];
    const size_t cols = (size_t)md + 1;
    t->retrieve = malloc((size_t)nl * cols * sizeof(int32_t));
    if (!t->retrieve) {
        free(has_child);
        return eng_fail(-ENOMEM, "out of memory");
    }
    t->n_leaves = nl;
    int32_t row = 0;
    for (int32_t i = nn - 1; i >= 1; i--) {
        if (has_child[i])
            continue;
        int32_t *r = &t->retrieve[(size_t)row * cols];
        for (size_t c = 0; c < cols; c++)
            r[c] = -1;
        for (int32_t v = i; v >= 0; v = t->parent[v])
            r[t->depth[v]] = v;
        row++;
    }
    free(has_child);
    return 0;
}

static int build_sorted(eng_medusa_tree **out, struct path *s, int64_t n)
{
    char b1[64], b2[64];
    qsort(s, (size_t)n, sizeof(*s), path_cmp);
    for (int64_t i = 1; i < n; i++)
        if (!path_cmp(&s[i - 1], &s[i]))
            return eng_fail(-EINVAL, "medusa_choices: path %s appears twice",
                            path_str(b1, sizeof(b1), s[i].r, s[i].len));
    for (int64_t i = 0; i < n; i++) {
        /* Checking the immediate prefix of every path covers all prefixes:
         * the prefix's own prefix is checked when the prefix is visited. */
        if (s[i].len < 2)
            continue;
        struct path pre = s[i];
        pre.len--;
        if (find_path(s, n, &pre) < 0)
            return eng_fail(-EINVAL,
                            "medusa_choices: path %s lacks its prefix %s (every prefix of a "
                            "path must be listed too)",
                            path_str(b1, sizeof(b1), s[i].r, s[i].len),
                            path_str(b2, sizeof(b2), pre.r, pre.len));
    }
    eng_medusa_tree *t = calloc(1, sizeof(*t));
    if (!t)
        return eng_fail(-ENOMEM, "out of memory");
    int rc = fill(t, s, n);
    if (rc < 0) {
        eng_medusa_tree_destroy(t);
        return rc;
    }
    *out = t;
    return 0;
}

static int check_count(int64_t n)
{
    if (n < 1)
        return eng_fail(-EINVAL, "medusa_choices: empty list");
    if (n > ENG_MEDUSA_MAX_NODES - 1)
        return eng_fail(-EINVAL, "medusa_choices: %lld paths (at most %d)", (long long)n,
                        ENG_MEDUSA_MAX_NODES - 1);
    return 0;
}

static int check_path(const struct path *p, int64_t idx)
{
    char b[64];
    for (int32_t j = 0; j < p->len; j++)
        if (p->r[j] < 0 || p->r[j] >= ENG_MEDUSA_TOPK)
            return eng_fail(-EINVAL, "medusa_choices: path %lld %s: rank %d outside [0, %d)",
                            (long long)idx, path_str(b, sizeof(b), p->r, p->len), p->r[j],
                            ENG_MEDUSA_TOPK);
    return 0;
}

int eng_medusa_tree_build(eng_medusa_tree **out, const int32_t *ranks, const int32_t *lens,
                          int64_t n_paths)
{
    if (!out || (n_paths > 0 && (!ranks || !lens)))
        return eng_fail(-EINVAL, "eng_medusa_tree_build: NULL argument");
    int rc = check_count(n_paths);
    if (rc < 0)
        return rc;
    struct path *s = calloc((size_t)n_paths, sizeof(*s));
    if (!s)
        return eng_fail(-ENOMEM, "out of memory");
    size_t off = 0;
    for (int64_t i = 0; i < n_paths && rc == 0; i++) {
        if (lens[i] < 1 || lens[i] > ENG_MEDUSA_MAX_DEPTH) {
            rc = eng_fail(-EINVAL, "medusa_choices: path %lld has depth %d (1 to %d)",
                          (long long)i, lens[i], ENG_MEDUSA_MAX_DEPTH);
            break;
        }
        s[i].len = lens[i];
        memcpy(s[i].r, ranks + off, (size_t)lens[i] * sizeof(int32_t));
        off += (size_t)lens[i];
        rc = check_path(&s[i], i);
    }
    if (rc == 0)
        rc = build_sorted(out, s, n_paths);
    free(s);
    return rc;
}

int eng_medusa_tree_parse(eng_medusa_tree **out, const char *text)
{
    if (!out || !text)
        return eng_fail(-EINVAL, "eng_medusa_tree_parse: NULL argument");
    json_error_t jerr;
    json_t *root = json_loads(text, 0, &jerr);
    if (!root)
        return eng_fail(-EINVAL, "medusa_choices: not a JSON list at byte %d: %s", jerr.position,
                        jerr.text);
    int rc = 0;
    struct path *s = NULL;
    if (!json_is_array(root)) {
        rc = eng_fail(-EINVAL, "medusa_choices: not a list of paths");
        goto out;
    }
    int64_t n = (int64_t)json_array_size(root);
    rc = check_count(n);
    if (rc < 0)
        goto out;
    s = calloc((size_t)n, sizeof(*s));
    if (!s) {
        rc = eng_fail(-ENOMEM, "out of memory");
        goto out;
    }
    for (int64_t i = 0; i < n && rc == 0; i++) {
        json_t *p = json_array_get(root, (size_t)i);
        size_t len = json_is_array(p) ? json_array_size(p) : 0;
        if (len < 1 || len > ENG_MEDUSA_MAX_DEPTH) {
            rc = eng_fail(-EINVAL,
                          "medusa_choices: element %lld is not a list of 1 to %d ranks",
                          (long long)i, ENG_MEDUSA_MAX_DEPTH);
            break;
        }
        s[i].len = (int32_t)len;
        for (size_t j = 0; j < len; j++) {
            json_t *v = json_array_get(p, j);
            if (!json_is_integer(v)) {
                rc = eng_fail(-EINVAL, "medusa_choices: element %lld holds a non-integer rank",
                              (long long)i);
                break;
            }
            json_int_t x = json_integer_value(v);
            if (x < 0 || x >= ENG_MEDUSA_TOPK) {
                rc = eng_fail(-EINVAL,
                              "medusa_choices: element %lld: rank %lld outside [0, %d)",
                              (long long)i, (long long)x, ENG_MEDUSA_TOPK);
                break;
            }
            s[i].r[j] = (int32_t)x;
        }
    }
    if (rc == 0)
        rc = build_sorted(out, s, n);
out:
    free(s);
    json_decref(root);
    return rc;
}

int eng_medusa_tree_named(eng_medusa_tree **out, const char *name)
{
    if (!out || !name)
        return eng_fail(-EINVAL, "eng_medusa_tree_named: NULL argument");
    if (!strcmp(name, "mc_sim_7b_63"))
        return eng_medusa_tree_parse(out, MC_SIM_7B_63);
    if (!strncmp(name, "chain", 5) && name[5] >= '1' && name[5] <= '0' + ENG_MEDUSA_MAX_DEPTH &&
        name[6] == '\0') {
        const int32_t d = name[5] - '0';
        int32_t ranks[ENG_MEDUSA_MAX_DEPTH * ENG_MEDUSA_MAX_DEPTH] = {0};
        int32_t lens[ENG_MEDUSA_MAX_DEPTH];
        for (int32_t i = 0; i < d; i++)
            lens[i] = i + 1;
        return eng_medusa_tree_build(out, ranks, lens, d);
    }
    return eng_fail(-ENOENT, "unknown Medusa tree '%.64s' (built in: mc_sim_7b_63, chain1 .. chain%d)",
                    name, ENG_MEDUSA_MAX_DEPTH);
}

int eng_medusa_tree_from_spec(eng_medusa_tree **out, const char *spec)
{
    if (!out || !spec)
        return eng_fail(-EINVAL, "eng_medusa_tree_from_spec: NULL argument");
    const char *p = spec;
    while (isspace((unsigned char)*p))
        p++;
    return *p == '[' ? eng_medusa_tree_parse(out, spec) : eng_medusa_tree_named(out, p);
}

const char *const *eng_medusa_tree_names(void)
{
    return NAMES;
}
