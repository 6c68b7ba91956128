/* medusa_tree — the static buffers of a Medusa candidate tree, built once
 * from a `medusa_choices` list (FasterDecoding/Medusa's
 * generate_medusa_buffers, reproduced index for index).
 *
 * Role in the request path: a decode worker builds one tree at start-up
 * (from the config or the CLI: a name such as "mc_sim_7b_63" or a literal
 * list "[[0],[0,0],[1]]"). Every Medusa step then uses it read-only:
 *   - tree_indices picks each node's token out of the flattened candidate
 *     array [base top-1, head0 top-TOPK, head1 top-TOPK, ...];
 *   - depth gives the RoPE position offset of each node (position len + depth);
 *   - mask is the [n_nodes][n_nodes] tree attention mask (kn_attn_args.mask);
 *   - retrieve lists, per leaf, the node indices from root to leaf, the
 *     candidate paths whose tokens are checked against the model's choices.
 *
 * A choice is a path of top-k ranks: [0] is head 0's best token, [0, 1] is
 * head 1's second best token following it, and so on. Node 0 is the root (the
 * token the base model just produced); node i ≥ 1 is the (i-1)-th path after
 * sorting by (depth, ranks lexicographically), as Medusa sorts them.
 *
 * Input rules (anything else is -EINVAL with eng_error() naming the path):
 * at least one path; every path 1..ENG_MEDUSA_MAX_DEPTH long; ranks in
 * [0, ENG_MEDUSA_TOPK); no duplicates; every proper prefix of a path is
 * itself in the list; at most ENG_MEDUSA_MAX_NODES - 1 paths.
 *
 * Threading: a built tree is immutable; share it freely between threads.
 *
 *   eng_medusa_tree *t;
 *   if (eng_medusa_tree_from_spec(&t, cfg_choices) < 0) die(eng_error());
 *   // forward t->n_nodes tokens with positions len + t->depth[i], mask t->mask
 *   eng_medusa_tree_destroy(t);
 */
#ifndef GORGON_ENG_MEDUSA_TREE_H
#define GORGON_ENG_MEDUSA_TREE_H

#include <stddef.h>
#include <stdint.h>

#define ENG_MEDUSA_TOPK 10     /* candidates kept per head, as Medusa's TOPK */
#define ENG_MEDUSA_MAX_DEPTH 8 /* = the most heads a tree can use */
#define ENG_MEDUSA_MAX_NODES 1024

typedef struct eng_medusa_tree {
    int32_t n_paths;   /* choices given */
    int32_t n_nodes;   /* n_paths + 1 (root) */
    int32_t max_depth; /* deepest path */
    int32_t n_heads;   /* heads needed = max_depth */
    int32_t topk[ENG_MEDUSA_MAX_DEPTH];            /* per head h: max rank + 1 at depth h + 1 */
    int32_t nodes_per_depth[ENG_MEDUSA_MAX_DEPTH]; /* [d-1]: nodes at depth d (root excluded) */

    /* Per node, [n_nodes], node 0 = root. */
    int32_t *depth;        /* root 0: RoPE position offset */
    int32_t *parent;       /* root -1 */
    int32_t *rank;         /* last rank of the node's path; root -1 */
    int32_t *tree_indices; /* root 0; else 1 + (depth-1)*ENG_MEDUSA_TOPK + rank */
    int32_t *paths;        /* [n_nodes][max_depth]: the node's path, -1 padded (root all -1) */
    uint8_t *mask;         /* [n_nodes][n_nodes]: 1 where row attends col (root, ancestors, self) */

    /* One row per leaf (a path that is no other path's prefix), in Medusa's
     * order (reverse of the sorted order): node indices root → leaf, padded
     * with -1 to max_depth + 1 columns. */
    int32_t n_leaves;
    int32_t *retrieve; /* [n_leaves][max_depth + 1] */
} eng_medusa_tree;

/* Build from n_paths paths given back to back: path i has lens[i] ranks,
 * starting at ranks[sum of lens before i]. Returns 0, -EINVAL (bad list,
 * eng_error() names the path) or -ENOMEM. On error *out is unchanged. */
int eng_medusa_tree_build(eng_medusa_tree **out, const int32_t *ranks, const int32_t *lens,
                          int64_t n_paths);

/* Build from text: a JSON array of arrays of integers, e.g. "[[0],[0,0],[1]]"
 * (whitespace allowed, as in Medusa's medusa_choices.py). */
int eng_medusa_tree_parse(eng_medusa_tree **out, const char *text);

/* Build a built-in tree: "mc_sim_7b_63" (Medusa's default for 7B models, 63
 * paths, depth 4) or "chain1" .. "chain8" (one path [0], [0,0], ... of that
 * depth). -ENOENT for an unknown name. */
int eng_medusa_tree_named(eng_medusa_tree **out, const char *name);

/* A spec from config or the command line: a literal list when it starts with
 * '[' (after blanks), otherwise a built-in name. */
int eng_medusa_tree_from_spec(eng_medusa_tree **out, const char *spec);

/* The built-in names, NULL-terminated (for help texts). */
const char *const *eng_medusa_tree_names(void);

/* NULL is a no-op. */
void eng_medusa_tree_destroy(eng_medusa_tree *t);

#endif
