/* Medusa tree buffers, checked three ways: the published figures of
 * mc_sim_7b_63, a brute force over the path lists written here
 * independently of the library, and goldens produced by running
 * FasterDecoding/Medusa's generate_medusa_buffers() algorithm on that list. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/model/eng_err.h"
#include "engine/medusa/medusa_tree.h"

/* mc_sim_7b_63 as in medusa/model/medusa_choices.py, one path per row,
 * padded with -1. */
static const int32_t MC63[63][4] = {
    {0, -1, -1, -1}, {0, 0, -1, -1}, {1, -1, -1, -1}, {0, 1, -1, -1}, {2, -1, -1, -1},
    {0, 0, 0, -1},   {1, 0, -1, -1}, {0, 2, -1, -1},  {3, -1, -1, -1}, {0, 3, -1, -1},
    {4, -1, -1, -1}, {0, 4, -1, -1}, {2, 0, -1, -1},  {0, 5, -1, -1}, {0, 0, 1, -1},
    {5, -1, -1, -1}, {0, 6, -1, -1}, {6, -1, -1, -1}, {0, 7, -1, -1}, {0, 1, 0, -1},
    {1, 1, -1, -1},  {7, -1, -1, -1}, {0, 8, -1, -1}, {0, 0, 2, -1},  {3, 0, -1, -1},
    {0, 9, -1, -1},  {8, -1, -1, -1}, {9, -1, -1, -1}, {1, 0, 0, -1}, {0, 2, 0, -1},
    {1, 2, -1, -1},  {0, 0, 3, -1},  {4, 0, -1, -1},  {2, 1, -1, -1}, {0, 0, 4, -1},
    {0, 0, 5, -1},   {0, 0, 0, 0},   {0, 1, 1, -1},   {0, 0, 6, -1},  {0, 3, 0, -1},
    {5, 0, -1, -1},  {1, 3, -1, -1}, {0, 0, 7, -1},   {0, 0, 8, -1},  {0, 0, 9, -1},
    {6, 0, -1, -1},  {0, 4, 0, -1},  {1, 4, -1, -1},  {7, 0, -1, -1}, {0, 1, 2, -1},
    {2, 0, 0, -1},   {3, 1, -1, -1}, {2, 2, -1, -1},  {8, 0, -1, -1}, {0, 5, 0, -1},
    {1, 5, -1, -1},  {1, 0, 1, -1},  {0, 2, 1, -1},   {9, 0, -1, -1}, {0, 6, 0, -1},
    {0, 0, 0, 1},    {1, 6, -1, -1}, {0, 7, 0, -1},
};

/* generate_medusa_buffers(mc_sim_7b_63)["tree_indices"] */
static const int32_t GOLD_TREE_INDICES[64] = {
    0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 11,
    12, 13, 14, 15, 16, 17, 11, 12, 13, 11, 12, 11, 11, 11, 11, 11, 11, 21, 22, 23, 24, 25,
    26, 27, 28, 29, 30, 21, 22, 23, 21, 22, 21, 21, 21, 21, 21, 21, 22, 21, 31, 32,
};
/* generate_medusa_buffers(mc_sim_7b_63)["retrieve_indices"], first 5 and last 3 rows */
static const int32_t GOLD_RETRIEVE_HEAD[5][5] = {
    {0, 1, 11, 39, 63}, {0, 1, 11, 39, 62}, {0, 3, 28, 61, -1},
    {0, 2, 21, 60, -1}, {0, 2, 21, 59, -1},
};
static const int32_t GOLD_RETRIEVE_TAIL[3][5] = {
    {0, 2, 22, -1, -1}, {0, 1, 20, -1, -1}, {0, 1, 19, -1, -1}};

static int plen(const int32_t *p)
{
    int n = 0;
    while (n < 4 && p[n] >= 0)
        n++;
    return n;
}

/* Is a a prefix of b (or equal)? */
static bool is_prefix(const int32_t *a, const int32_t *b)
{
    int la = plen(a), lb = plen(b);
    if (la > lb)
        return false;
    for (int i = 0; i < la; i++)
        if (a[i] != b[i])
            return false;
    return true;
}

/* Medusa's key (len, lexicographic), written out separately from the
 * library's comparator. */
static bool sorts_before(const int32_t *a, const int32_t *b)
{
    int la = plen(a), lb = plen(b);
    if (la != lb)
        return la < lb;
    for (int i = 0; i < la; i++)
        if (a[i] != b[i])
            return a[i] < b[i];
    return false;
}

/* Node order: sorted copy of MC63 (insertion sort). */
static void sorted_mc63(int32_t out[63][4])
{
    memcpy(out, MC63, sizeof(MC63));
    for (int i = 1; i < 63; i++)
        for (int j = i; j > 0 && sorts_before(out[j], out[j - 1]); j--) {
            int32_t tmp[4];
            memcpy(tmp, out[j], sizeof(tmp));
            memcpy(out[j], out[j - 1], sizeof(tmp));
            memcpy(out[j - 1], tmp, sizeof(tmp));
        }
}

static eng_medusa_tree *named(const char *name)
{
    eng_medusa_tree *t = NULL;
    cr_assert_eq(eng_medusa_tree_named(&t, name), 0, "%s: %s", name, eng_error());
    return t;
}

Test(engine_medusa_tree, mc_sim_7b_63_has_the_published_shape)
{
    eng_medusa_tree *t = named("mc_sim_7b_63");
    cr_expect_eq(t->n_paths, 63);
    cr_expect_eq(t->n_nodes, 64);
    cr_expect_eq(t->max_depth, 4);
    cr_expect_eq(t->n_heads, 4);
    const int32_t per_depth[4] = {10, 28, 23, 2};
    const int32_t topk[4] = {10, 10, 10, 2};
    for (int d = 0; d < 4; d++) {
        cr_expect_eq(t->nodes_per_depth[d], per_depth[d], "depth %d", d + 1);
        cr_expect_eq(t->topk[d], topk[d], "head %d", d);
    }
    for (int d = 4; d < ENG_MEDUSA_MAX_DEPTH; d++)
        cr_expect_eq(t->nodes_per_depth[d], 0);
    cr_expect_eq(t->n_leaves, 42);
    eng_medusa_tree_destroy(t);
}

Test(engine_medusa_tree, mc_sim_7b_63_matches_reference_buffers)
{
    eng_medusa_tree *t = named("mc_sim_7b_63");
    for (int i = 0; i < 64; i++)
        cr_expect_eq(t->tree_indices[i], GOLD_TREE_INDICES[i], "tree_indices[%d]", i);
    for (int r = 0; r < 5; r++)
        for (int c = 0; c < 5; c++)
            cr_expect_eq(t->retrieve[r * 5 + c], GOLD_RETRIEVE_HEAD[r][c], "retrieve[%d][%d]", r,
                         c);
    for (int r = 0; r < 3; r++)
        for (int c = 0; c < 5; c++)
            cr_expect_eq(t->retrieve[(39 + r) * 5 + c], GOLD_RETRIEVE_TAIL[r][c],
                         "retrieve[%d][%d]", 39 + r, c);
    int ones = 0;
    for (int i = 0; i < 64 * 64; i++)
        ones += t->mask[i];
    cr_expect_eq(ones, 207, "sum over nodes of (depth + 1)");
    eng_medusa_tree_destroy(t);
}

Test(engine_medusa_tree, mask_depth_and_indices_match_brute_force)
{
    eng_medusa_tree *t = named("mc_sim_7b_63");
    int32_t s[63][4];
    sorted_mc63(s);
    const int n = 64;
    for (int i = 1; i < n; i++) {
        const int32_t *pi = s[i - 1];
        int d = plen(pi);
        for (int c = 0; c < 4; c++)
            cr_assert_eq(t->paths[i * 4 + c], pi[c], "node %d path[%d]", i, c);
        cr_expect_eq(t->depth[i], d);
        cr_expect_eq(t->rank[i], pi[d - 1]);
        cr_expect_eq(t->tree_indices[i], 1 + (d - 1) * 10 + pi[d - 1]);
        cr_expect_eq(t->mask[i * n + 0], 1, "node %d must see the root", i);
        for (int j = 1; j < n; j++) {
            /* attends exactly to itself and its ancestors */
            uint8_t want = is_prefix(s[j - 1], pi);
            cr_expect_eq(t->mask[i * n + j], want, "mask[%d][%d]", i, j);
        }
        int32_t par = t->parent[i];
        cr_expect(par == 0 ? d == 1 : is_prefix(s[par - 1], pi) && plen(s[par - 1]) == d - 1,
                  "parent of %d", i);
    }
    cr_expect_eq(t->depth[0], 0);
    cr_expect_eq(t->parent[0], -1);
    cr_expect_eq(t->tree_indices[0], 0);
    cr_expect_eq(t->mask[0], 1);
    for (int j = 1; j < n; j++)
        cr_expect_eq(t->mask[j], 0, "the root attends only to itself");
    eng_medusa_tree_destroy(t);
}

Test(engine_medusa_tree, retrieve_rows_are_root_to_leaf_chains)
{
    eng_medusa_tree *t = named("mc_sim_7b_63");
    int32_t s[63][4];
    sorted_mc63(s);
    const int cols = t->max_depth + 1;
    bool seen_leaf[64] = {false};
    int prev_leaf = 64;
    for (int r = 0; r < t->n_leaves; r++) {
        const int32_t *row = &t->retrieve[r * cols];
        cr_expect_eq(row[0], 0);
        int len = 1;
        while (len < cols && row[len] >= 0) {
            int child = row[len], par = row[len - 1];
            cr_assert(child >= 1 && child < 64);
            cr_expect_eq(plen(s[child - 1]), len, "row %d col %d depth", r, len);
            cr_expect(par == 0 || is_prefix(s[par - 1], s[child - 1]), "row %d breaks at %d", r,
                      len);
            len++;
        }
        for (int c = len; c < cols; c++)
            cr_expect_eq(row[c], -1, "row %d pads with -1", r);
        int leaf = row[len - 1];
        cr_expect(leaf < prev_leaf, "rows come in reverse node order (Medusa's)");
        prev_leaf = leaf;
        for (int k = 0; k < 63; k++)
            cr_expect(k == leaf - 1 || !is_prefix(s[leaf - 1], s[k]),
                      "row %d ends at %d, which has a child", r, leaf);
        seen_leaf[leaf] = true;
    }
    int leaves = 0;
    for (int i = 0; i < 63; i++) {
        bool has_child = false;
        for (int k = 0; k < 63; k++)
            has_child |= k != i && is_prefix(s[i], s[k]);
        if (!has_child) {
            leaves++;
            cr_expect(seen_leaf[i + 1], "leaf node %d has no row", i + 1);
        }
    }
    cr_expect_eq(leaves, t->n_leaves);
    eng_medusa_tree_destroy(t);
}

Test(engine_medusa_tree, build_from_arrays_equals_named)
{
    int32_t ranks[63 * 4], lens[63];
    int o = 0;
    for (int i = 0; i < 63; i++) {
        lens[i] = plen(MC63[i]);
        for (int j = 0; j < lens[i]; j++)
            ranks[o++] = MC63[i][j];
    }
    eng_medusa_tree *a, *b = named("mc_sim_7b_63");
    cr_assert_eq(eng_medusa_tree_build(&a, ranks, lens, 63), 0, "%s", eng_error());
    cr_expect_eq(a->n_nodes, b->n_nodes);
    cr_expect_eq(memcmp(a->mask, b->mask, 64 * 64), 0);
    cr_expect_eq(memcmp(a->tree_indices, b->tree_indices, 64 * sizeof(int32_t)), 0);
    cr_expect_eq(memcmp(a->retrieve, b->retrieve, (size_t)b->n_leaves * 5 * sizeof(int32_t)), 0);
    eng_medusa_tree_destroy(a);
    eng_medusa_tree_destroy(b);
}

Test(engine_medusa_tree, chains_are_one_path)
{
    for (int d = 1; d <= ENG_MEDUSA_MAX_DEPTH; d++) {
        char name[16];
        snprintf(name, sizeof(name), "chain%d", d);
        eng_medusa_tree *t = named(name);
        cr_expect_eq(t->n_nodes, d + 1);
        cr_expect_eq(t->n_heads, d);
        cr_expect_eq(t->n_leaves, 1);
        for (int i = 0; i <= d; i++) {
            cr_expect_eq(t->depth[i], i);
            cr_expect_eq(t->retrieve[i], i);
            cr_expect_eq(t->tree_indices[i], i == 0 ? 0 : 1 + (i - 1) * 10);
            for (int j = 0; j <= d; j++)
                cr_expect_eq(t->mask[i * (d + 1) + j], j <= i, "%s mask[%d][%d]", name, i, j);
        }
        for (int h = 0; h < d; h++) {
            cr_expect_eq(t->topk[h], 1);
            cr_expect_eq(t->nodes_per_depth[h], 1);
        }
        eng_medusa_tree_destroy(t);
    }
    eng_medusa_tree *t = (eng_medusa_tree *)0x1;
    cr_expect_eq(eng_medusa_tree_named(&t, "chain9"), -ENOENT);
    cr_expect_eq(eng_medusa_tree_named(&t, "chain0"), -ENOENT);
    cr_expect_eq(eng_medusa_tree_named(&t, "chain12"), -ENOENT);
    cr_expect_eq(eng_medusa_tree_named(&t, "mc_sim_7b_6"), -ENOENT);
    cr_expect(strstr(eng_error(), "mc_sim_7b_6"), "%s", eng_error());
    cr_expect_eq(t, (eng_medusa_tree *)0x1);
    const char *const *names = eng_medusa_tree_names();
    int n = 0;
    for (; names[n]; n++) {
        eng_medusa_tree *u = named(names[n]);
        eng_medusa_tree_destroy(u);
    }
    cr_expect_eq(n, 9);
}

Test(engine_medusa_tree, spec_accepts_names_and_literal_lists)
{
    eng_medusa_tree *t;
    cr_assert_eq(eng_medusa_tree_from_spec(&t, " [[1], [0],\n [0, 0], [1, 3]] "), 0, "%s",
                 eng_error());
    /* sorted: [0], [1], [0,0], [1,3] */
    cr_expect_eq(t->n_nodes, 5);
    cr_expect_eq(t->parent[3], 1);
    cr_expect_eq(t->parent[4], 2);
    cr_expect_eq(t->tree_indices[4], 1 + 10 + 3);
    cr_expect_eq(t->topk[0], 2);
    cr_expect_eq(t->topk[1], 4);
    cr_expect_eq(t->n_leaves, 2);
    cr_expect_eq(t->retrieve[0 * 3 + 2], 4, "first row ends at the last sorted leaf");
    cr_expect_eq(t->retrieve[1 * 3 + 2], 3);
    eng_medusa_tree_destroy(t);
    cr_assert_eq(eng_medusa_tree_from_spec(&t, "chain3"), 0);
    cr_expect_eq(t->n_nodes, 4);
    eng_medusa_tree_destroy(t);
}

static void expect_rejected(const char *text, const char *needle)
{
    eng_medusa_tree *t = (eng_medusa_tree *)0x1;
    eng_error_clear();
    int rc = eng_medusa_tree_parse(&t, text);
    cr_expect_eq(rc, -EINVAL, "%s: rc %d", text, rc);
    cr_expect_eq(t, (eng_medusa_tree *)0x1, "%s: *out touched", text);
    cr_expect(strstr(eng_error(), needle), "%s: message '%s' lacks '%s'", text, eng_error(),
              needle);
}

Test(engine_medusa_tree, rejects_bad_lists_naming_the_path)
{
    expect_rejected("[[0],[0,1,2]]", "[0,1,2] lacks its prefix [0,1]");
    expect_rejected("[[1,0]]", "prefix [1]");
    expect_rejected("[[0],[-1]]", "rank -1");
    expect_rejected("[[0],[10]]", "rank 10");
    expect_rejected("[[0],[0,99999999999]]", "rank 99999999999");
    expect_rejected("[[0],[1],[0]]", "[0] appears twice");
    expect_rejected("[[0],[0,0],[0,0,0],[0,0,0,0],[0,0,0,0,0],[0,0,0,0,0,0],[0,0,0,0,0,0,0],"
                    "[0,0,0,0,0,0,0,0],[0,0,0,0,0,0,0,0,0]]",
                    "element 8");
    expect_rejected("[]", "empty");
    expect_rejected("[[]]", "element 0");
    expect_rejected("[[0],[0.5]]", "non-integer");
    expect_rejected("[[0],[\"1\"]]", "non-integer");
    expect_rejected("[[0],", "not a JSON list");
    expect_rejected("hello", "not a JSON list");
    expect_rejected("{\"a\":1}", "not a list of paths");
    expect_rejected("[0,1]", "element 0");

    eng_medusa_tree *t = (eng_medusa_tree *)0x1;
    int32_t ranks[2] = {0, 0}, lens[2] = {1, 0};
    cr_expect_eq(eng_medusa_tree_build(&t, ranks, lens, 2), -EINVAL);
    cr_expect(strstr(eng_error(), "depth 0"), "%s", eng_error());
    cr_expect_eq(eng_medusa_tree_build(&t, ranks, lens, 0), -EINVAL);
    cr_expect_eq(t, (eng_medusa_tree *)0x1);
}

Test(engine_medusa_tree, accepts_the_largest_tree)
{
    /* All 10 ranks at depth 1, and 10 children under each: 110 paths,
     * plus enough depth-3 nodes to reach the cap exactly. */
    const int n = ENG_MEDUSA_MAX_NODES - 1;
    int32_t *ranks = calloc((size_t)n * 3, sizeof(int32_t));
    int32_t *lens = calloc((size_t)n, sizeof(int32_t));
    int k = 0, o = 0;
    for (int a = 0; a < 10 && k < n; a++, k++) {
        lens[k] = 1;
        ranks[o++] = a;
    }
    for (int a = 0; a < 10 && k < n; a++)
        for (int b = 0; b < 10 && k < n; b++, k++) {
            lens[k] = 2;
            ranks[o++] = a;
            ranks[o++] = b;
        }
    for (int a = 0; a < 10 && k < n; a++)
        for (int b = 0; b < 10 && k < n; b++)
            for (int c = 0; c < 10 && k < n; c++, k++) {
                lens[k] = 3;
                ranks[o++] = a;
                ranks[o++] = b;
                ranks[o++] = c;
            }
    eng_medusa_tree *t;
    cr_assert_eq(eng_medusa_tree_build(&t, ranks, lens, n), 0, "%s", eng_error());
    cr_expect_eq(t->n_nodes, ENG_MEDUSA_MAX_NODES);
    cr_expect_eq(t->nodes_per_depth[2], n - 110);
    eng_medusa_tree_destroy(t);
    /* one path more than the cap */
    int32_t *r2 = realloc(ranks, ((size_t)n * 3 + 1) * sizeof(int32_t));
    int32_t *l2 = realloc(lens, ((size_t)n + 1) * sizeof(int32_t));
    cr_assert(r2 && l2);
    l2[n] = 1;
    cr_expect_eq(eng_medusa_tree_build(&t, r2, l2, n + 1), -EINVAL);
    cr_expect(strstr(eng_error(), "at most"), "%s", eng_error());
    free(r2);
    free(l2);
}
