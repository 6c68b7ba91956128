/* medusa_fit — a Medusa candidate tree fitted to the heads' measured
 * accuracy and to what a tree costs on this backend (the Medusa paper's
 * greedy construction, section 3.3.3 / appendix "optimized tree").
 *
 * Role: an offline step (gorgon-medusa-train writes DIR/medusa_choices.json
 * with it; gorgon-run and the decode workers then load that list). Nothing
 * here runs per token.
 *
 * Model: acc[h][r] is the probability that head h's rank-r candidate is the
 * token the base model will choose at depth h + 1 (rank-wise, not
 * cumulative). Assuming the depths independent, the node with path
 * [r0, r1, ...] is accepted with probability p = acc[0][r0] · acc[1][r1] ...,
 * and a tree of n nodes (root included) emits on average
 *     E(n) = 1 + Σ over its non-root nodes of p(node)
 * tokens per step. cost(n) is the time of one step with an n-node tree over
 * the time of a plain one-token decode step. The greedy construction adds,
 * one at a time, the not-yet-included child of an included node with the
 * largest p (this maximises E(n) for every n, since a child never beats its
 * parent), and the fitted tree is the prefix n >= 2 with the largest
 * E(n) / cost(n) (the smallest n on ties).
 *
 * Threading: pure functions of their arguments; call from any thread.
 *
 *   double acc[4 * 10], cost[64];                 // measured
 *   eng_medusa_fit *f = malloc(sizeof *f);
 *   if (eng_medusa_fit_tree(acc, 4, 10, cost, 64, f) < 0) die(eng_error());
 *   char text[ENG_MEDUSA_FIT_TEXT_MAX];
 *   eng_medusa_fit_format(f, text, sizeof text);   // "[[0],[0,0],[1]]"
 *   // f->expected_tokens, f->cost, then eng_medusa_tree_build(&t, f->ranks, f->lens, f->n_paths)
 */
#ifndef GORGON_ENG_MEDUSA_FIT_H
#define GORGON_ENG_MEDUSA_FIT_H

#include <stddef.h>
#include <stdint.h>

#include "engine/medusa/medusa_tree.h"

/* The fitted list next to the heads (gorgon-medusa-train writes it). */
#define ENG_MEDUSA_CHOICES_FILE "medusa_choices.json"

/* Room for any fitted list as text: "[" + per path "[r,r,...]," + "]". */
#define ENG_MEDUSA_FIT_TEXT_MAX \
    (4 + (ENG_MEDUSA_MAX_NODES - 1) * (3 + 2 * ENG_MEDUSA_MAX_DEPTH))

typedef struct eng_medusa_fit {
    int64_t n_paths; /* paths chosen: the tree has n_paths + 1 nodes */
    /* Path i has lens[i] ranks at ranks[i * ENG_MEDUSA_MAX_DEPTH ...], in
     * the order the greedy added them (most likely first), so every path's
     * proper prefixes come before it. */
    int32_t lens[ENG_MEDUSA_MAX_NODES - 1];
    int32_t ranks[(ENG_MEDUSA_MAX_NODES - 1) * ENG_MEDUSA_MAX_DEPTH];
    double expected_tokens; /* E(n_paths + 1) */
    double cost;            /* cost(n_paths + 1) */
} eng_medusa_fit;

/* Fit a tree. acc: [n_heads][topk] row-major, each in [0, 1];
 * 1 <= n_heads <= ENG_MEDUSA_MAX_DEPTH, 1 <= topk <= ENG_MEDUSA_TOPK.
 * cost: [max_nodes], cost[n - 1] = cost of an n-node tree, each finite and
 * > 0; 2 <= max_nodes <= ENG_MEDUSA_MAX_NODES (trees larger than
 * 1 + n_heads·topk + ... possible nodes are simply not reached).
 * Returns 0 or -EINVAL (eng_error() names the bad input); on error *out is
 * unchanged. */
int eng_medusa_fit_tree(const double *acc, int n_heads, int topk, const double *cost,
                        int64_t max_nodes, eng_medusa_fit *out);

/* E for a given list (paths back to back as for eng_medusa_tree_build:
 * path i has lens[i] ranks). Each path counts once, whether or not its
 * prefixes are listed. Returns 0 and *expected, or -EINVAL for a path longer
 * than n_heads, a rank outside [0, topk) or bad acc. */
int eng_medusa_fit_expected(const double *acc, int n_heads, int topk, const int32_t *ranks,
                            const int32_t *lens, int64_t n_paths, double *expected);

/* Piecewise-linear cost for n = 1..max_nodes from measured points
 * (ns[i], costs[i]), ns strictly increasing and >= 1, n_pts >= 1; before
 * the first point the first value, past the last the last segment's slope
 * (flat with one point), never below the smallest measured cost.
 * out: [max_nodes]. Returns 0 or -EINVAL. */
int eng_medusa_fit_interp_cost(const int64_t *ns, const double *costs, int n_pts,
                               int64_t max_nodes, double *out);

/* The fitted list as medusa_choices JSON, e.g. "[[0],[0,0],[1]]". Returns
 * the length written (NUL excluded) or -ENOSPC when cap is too small
 * (ENG_MEDUSA_FIT_TEXT_MAX always suffices). */
int64_t eng_medusa_fit_format(const eng_medusa_fit *f, char *buf, size_t cap);

/* Build the tree in dir/ENG_MEDUSA_CHOICES_FILE. -ENOENT when there is
 * none (no message: callers fall back to their default), -EINVAL for a bad
 * list or a file over 1 MiB (eng_error() names the file), other -errno from
 * reading it. */
int eng_medusa_fit_load(eng_medusa_tree **out, const char *dir);

/* The 16 most likely paths of mc_sim_7b_63 (17 nodes): the default when no
 * fitted tree is at hand; on a CPU the full 64-node tree rarely pays. */
#define ENG_MEDUSA_TREE_DEFAULT \
    "[[0],[0,0],[1],[0,1],[2],[0,0,0],[1,0],[0,2],[3],[0,3],[4],[0,4],[2,0],[0,5],[0,0,1],[5]]"

/* The tree every tool uses: spec when given (a built-in name or a list, as
 * eng_medusa_tree_from_spec), else the fitted ENG_MEDUSA_CHOICES_FILE in dir
 * when there is one (dir may be NULL), else ENG_MEDUSA_TREE_DEFAULT. *from
 * (may be NULL) gets "spec", ENG_MEDUSA_CHOICES_FILE or "default". Errors as
 * eng_medusa_tree_from_spec / eng_medusa_fit_load (never -ENOENT). */
int eng_medusa_tree_choose(eng_medusa_tree **out, const char *spec, const char *dir,
                           const char **from);

#endif
