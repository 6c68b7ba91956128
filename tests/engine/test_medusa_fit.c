/* Fitted Medusa trees: shapes the greedy must produce on synthetic
 * accuracies, E(n) against a brute force over every prefix-closed tree, the
 * result accepted by the tree builder, and bad input refused. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/medusa/medusa_fit.h"
#include "engine/medusa/medusa_tree.h"

static eng_medusa_fit *fit_new(void)
{
    eng_medusa_fit *f = calloc(1, sizeof(*f));
    cr_assert_not_null(f);
    return f;
}

static const int32_t *path(const eng_medusa_fit *f, int64_t i)
{
    return f->ranks + i * ENG_MEDUSA_MAX_DEPTH;
}

Test(engine_medusa_fit, chain_when_only_rank0_is_right)
{
    double acc[4 * 10] = {0}, cost[64];
    for (int h = 0; h < 4; h++)
        acc[h * 10] = 1.0;
    for (int i = 0; i < 64; i++)
        cost[i] = 1.0;
    eng_medusa_fit *f = fit_new();
    cr_assert_eq(eng_medusa_fit_tree(acc, 4, 10, cost, 64, f), 0);
    cr_assert_eq(f->n_paths, 4, "a free tree stops once nothing adds: got %ld paths",
                 (long)f->n_paths);
    for (int64_t i = 0; i < 4; i++) {
        cr_assert_eq(f->lens[i], i + 1);
        for (int d = 0; d <= i; d++)
            cr_assert_eq(path(f, i)[d], 0);
    }
    cr_assert_float_eq(f->expected_tokens, 5.0, 1e-12);
    char text[ENG_MEDUSA_FIT_TEXT_MAX];
    cr_assert_gt(eng_medusa_fit_format(f, text, sizeof(text)), 0);
    cr_assert_str_eq(text, "[[0],[0,0],[0,0,0],[0,0,0,0]]");
    free(f);
}

static void decaying_acc(double *acc, int heads, int topk)
{
    for (int h = 0; h < heads; h++)
        for (int r = 0; r < topk; r++)
            acc[h * topk + r] = (0.6 - 0.1 * h) / (double)(1 << r);
}

Test(engine_medusa_fit, steeper_cost_gives_smaller_tree)
{
    double acc[4 * 10], cheap[128], dear[128];
    decaying_acc(acc, 4, 10);
    for (int n = 1; n <= 128; n++) {
        cheap[n - 1] = 1.0 + 0.005 * (n - 1);
        dear[n - 1] = 1.0 + 0.1 * (n - 1);
    }
    eng_medusa_fit *a = fit_new(), *b = fit_new();
    cr_assert_eq(eng_medusa_fit_tree(acc, 4, 10, cheap, 128, a), 0);
    cr_assert_eq(eng_medusa_fit_tree(acc, 4, 10, dear, 128, b), 0);
    cr_assert_lt(b->n_paths, a->n_paths, "dear %ld paths, cheap %ld", (long)b->n_paths,
                 (long)a->n_paths);
    cr_assert_geq(b->n_paths, 1);
    cr_assert_float_eq(b->cost, dear[b->n_paths], 1e-12);
    free(a);
    free(b);
}

/* Tiny case: 2 heads x 2 ranks = 6 possible nodes (a0, a1, and a child of
 * each for both ranks). Best E over every prefix-closed set of k nodes. */
static double brute_best(const double *acc, int k)
{
    /* nodes: 0 = [0], 1 = [1], 2 = [0,0], 3 = [0,1], 4 = [1,0], 5 = [1,1] */
    const int par[6] = {-1, -1, 0, 0, 1, 1};
    double p[6];
    p[0] = acc[0], p[1] = acc[1];
    p[2] = acc[0] * acc[2], p[3] = acc[0] * acc[3];
    p[4] = acc[1] * acc[2], p[5] = acc[1] * acc[3];
    double best = -1;
    for (int s = 0; s < 64; s++) {
        if (__builtin_popcount((unsigned)s) != k)
            continue;
        bool ok = true;
        double e = 1;
        for (int i = 0; i < 6; i++)
            if (s & (1 << i)) {
                ok &= par[i] < 0 || (s & (1 << par[i]));
                e += p[i];
            }
        if (ok && e > best)
            best = e;
    }
    return best;
}

Test(engine_medusa_fit, expected_matches_brute_force_on_tiny_trees)
{
    const double accs[3][4] = {
        {0.5, 0.3, 0.9, 0.05}, /* deep beats wide */
        {0.4, 0.35, 0.1, 0.1}, /* wide beats deep */
        {0.7, 0.2, 0.6, 0.3},
    };
    for (int c = 0; c < 3; c++)
        for (int k = 1; k <= 6; k++) {
            double cost[7];
            for (int n = 1; n <= 7; n++)
                cost[n - 1] = n == k + 1 ? 1.0 : 1e9; /* forces n = k + 1 */
            eng_medusa_fit *f = fit_new();
            cr_assert_eq(eng_medusa_fit_tree(accs[c], 2, 2, cost, 7, f), 0);
            cr_assert_eq(f->n_paths, k);
            const double want = brute_best(accs[c], k);
            cr_assert_float_eq(f->expected_tokens, want, 1e-12, "case %d, %d nodes: %g vs %g", c,
                               k, f->expected_tokens, want);
            int32_t flat[6 * 2];
            int64_t at = 0;
            for (int64_t i = 0; i < f->n_paths; i++)
                for (int d = 0; d < f->lens[i]; d++)
                    flat[at++] = path(f, i)[d];
            double e;
            cr_assert_eq(eng_medusa_fit_expected(accs[c], 2, 2, flat, f->lens, f->n_paths, &e), 0);
            cr_assert_float_eq(e, want, 1e-12);
            free(f);
        }
}

Test(engine_medusa_fit, result_is_a_valid_medusa_choices_list)
{
    double acc[5 * 10], cost[200];
    uint64_t x = 12345;
    for (int i = 0; i < 50; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        acc[i] = (double)(x >> 40) / (double)(1ull << 24) * 0.5;
    }
    for (int n = 1; n <= 200; n++)
        cost[n - 1] = 1.0 + 0.001 * n;
    eng_medusa_fit *f = fit_new();
    cr_assert_eq(eng_medusa_fit_tree(acc, 5, 10, cost, 200, f), 0);
    cr_assert_gt(f->n_paths, 20);
    /* every proper prefix appears earlier */
    for (int64_t i = 0; i < f->n_paths; i++) {
        if (f->lens[i] == 1)
            continue;
        bool found = false;
        for (int64_t j = 0; j < i && !found; j++)
            found = f->lens[j] == f->lens[i] - 1 &&
                    !memcmp(path(f, j), path(f, i), (size_t)f->lens[j] * sizeof(int32_t));
        cr_assert(found, "path %ld's prefix missing", (long)i);
    }
    char text[ENG_MEDUSA_FIT_TEXT_MAX];
    cr_assert_gt(eng_medusa_fit_format(f, text, sizeof(text)), 0);
    eng_medusa_tree *t = NULL;
    cr_assert_eq(eng_medusa_tree_parse(&t, text), 0, "%s", text);
    cr_assert_eq(t->n_nodes, f->n_paths + 1);
    eng_medusa_tree_destroy(t);
    cr_assert_eq(eng_medusa_fit_format(f, text, 5), -ENOSPC);
    free(f);
}

Test(engine_medusa_fit, bad_input_is_rejected_and_output_untouched)
{
    double acc[2 * 10] = {0.5}, cost[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    eng_medusa_fit *f = fit_new();
    f->n_paths = 77;
    cr_assert_eq(eng_medusa_fit_tree(acc, 0, 10, cost, 8, f), -EINVAL);
    cr_assert_eq(eng_medusa_fit_tree(acc, 2, 11, cost, 8, f), -EINVAL);
    cr_assert_eq(eng_medusa_fit_tree(acc, 2, 10, cost, 1, f), -EINVAL);
    acc[3] = 1.5;
    cr_assert_eq(eng_medusa_fit_tree(acc, 2, 10, cost, 8, f), -EINVAL);
    acc[3] = NAN;
    cr_assert_eq(eng_medusa_fit_tree(acc, 2, 10, cost, 8, f), -EINVAL);
    acc[3] = 0.1;
    cost[5] = 0;
    cr_assert_eq(eng_medusa_fit_tree(acc, 2, 10, cost, 8, f), -EINVAL);
    cr_assert_eq(f->n_paths, 77);
    const int32_t ranks[3] = {0, 0, 10}, lens[2] = {1, 2};
    double e;
    cr_assert_eq(eng_medusa_fit_expected(acc, 2, 10, ranks, lens, 2, &e), -EINVAL);
    const int32_t lens3[1] = {3};
    cr_assert_eq(eng_medusa_fit_expected(acc, 2, 10, ranks, lens3, 1, &e), -EINVAL);
    free(f);
}

Test(engine_medusa_fit, cost_interpolation_is_piecewise_linear)
{
    const int64_t ns[3] = {1, 4, 8};
    const double cs[3] = {1.0, 2.0, 4.0};
    double out[10];
    cr_assert_eq(eng_medusa_fit_interp_cost(ns, cs, 3, 10, out), 0);
    cr_assert_float_eq(out[0], 1.0, 1e-12);
    cr_assert_float_eq(out[1], 1.0 + 1.0 / 3.0, 1e-12);
    cr_assert_float_eq(out[5], 3.0, 1e-12);
    cr_assert_float_eq(out[7], 4.0, 1e-12);
    cr_assert_float_eq(out[9], 5.0, 1e-12); /* extrapolated */
    const int64_t bad[2] = {4, 4};
    cr_assert_eq(eng_medusa_fit_interp_cost(bad, cs, 2, 10, out), -EINVAL);
}

static void put_file(const char *dir, const char *text)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", dir, ENG_MEDUSA_CHOICES_FILE);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs(text, f);
    fclose(f);
}

Test(engine_medusa_fit, load_reads_the_choices_file_and_rejects_bad_ones)
{
    char dir[] = "/tmp/test-medusa-fit-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    eng_medusa_tree *t = NULL;
    cr_assert_eq(eng_medusa_fit_load(&t, dir), -ENOENT);
    cr_assert_null(t);
    put_file(dir, "[[0],[0,0],[1]]\n");
    cr_assert_eq(eng_medusa_fit_load(&t, dir), 0);
    cr_assert_eq(t->n_nodes, 4);
    cr_assert_eq(t->max_depth, 2);
    eng_medusa_tree_destroy(t);
    t = NULL;
    put_file(dir, "[[1,0]]");
    cr_assert_eq(eng_medusa_fit_load(&t, dir), -EINVAL);
    cr_assert_null(t);
    put_file(dir, "");
    cr_assert_lt(eng_medusa_fit_load(&t, dir), 0);
    cr_assert_null(t);
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", dir, ENG_MEDUSA_CHOICES_FILE);
    unlink(path);
    rmdir(dir);
}

/* spec beats the fitted file, which beats the 17-node default. */
Test(engine_medusa_fit, choose_prefers_spec_then_fitted_file_then_default)
{
    char dir[] = "/tmp/test-medusa-fit-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    eng_medusa_tree *t = NULL;
    const char *from = NULL;
    cr_assert_eq(eng_medusa_tree_choose(&t, NULL, dir, &from), 0);
    cr_assert_str_eq(from, "default");
    cr_assert_eq(t->n_nodes, 17);
    eng_medusa_tree_destroy(t);
    put_file(dir, "[[0],[0,0],[1]]\n");
    cr_assert_eq(eng_medusa_tree_choose(&t, NULL, dir, &from), 0);
    cr_assert_str_eq(from, ENG_MEDUSA_CHOICES_FILE);
    cr_assert_eq(t->n_nodes, 4);
    eng_medusa_tree_destroy(t);
    cr_assert_eq(eng_medusa_tree_choose(&t, "chain2", dir, &from), 0);
    cr_assert_str_eq(from, "spec");
    cr_assert_eq(t->n_nodes, 3);
    eng_medusa_tree_destroy(t);
    t = NULL;
    cr_assert_eq(eng_medusa_tree_choose(&t, "[[7,-1]]", dir, &from), -EINVAL);
    cr_assert_null(t);
    put_file(dir, "[[1,0]]");
    cr_assert_eq(eng_medusa_tree_choose(&t, NULL, dir, &from), -EINVAL, "a bad fitted file "
                 "must not fall back silently");
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", dir, ENG_MEDUSA_CHOICES_FILE);
    unlink(path);
    rmdir(dir);
}
