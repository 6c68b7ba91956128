/* Paged attention on the device (kn.h: the `attention` op, kn_attn_args).
 *
 * Design choices (why):
 * - kn.h promises bits, not just values: a query's output must not depend on
 *   the other queries of the call, and a tree-masked query must equal the
 *   same query decoded alone over its visible keys stored contiguously. So
 *   the arithmetic of a (query, head) row is defined as a function of the
 *   SEQUENCE of its visible keys alone, and every kernel here evaluates that
 *   one function, operation for operation:
 *     - the visible keys are indexed in compacted order (cache positions
 *       0 .. n_past-1, then the new tokens the query sees, in slot order) and
 *       cut into chunks of ATT_C = 64 of them: chunk boundaries fall on
 *       visible-key counts, never on raw slots, and depend on nothing else
 *       (not n_q, the batch, the SM count or the launch shape);
 *     - score s = dot(q, k) * scale, the dot as four fmaf chains over d mod 4
 *       (d ascending) summed (c0 + c1) + (c2 + c3);
 *     - per chunk: m = max of its scores, p = expf(s - m), l = sum of p in a
 *       fixed butterfly (lane holds keys lane and lane + 32), acc[d] = fmaf
 *       chain over the chunk's keys in order;
 *     - chunks are folded strictly in order (online softmax):
 *       M' = max(M, m), a = expf(M - M'), b = expf(m - M'),
 *       O = O*a + acc*b, L = L*a + l*b; out = O / L (zero row if no chunk
 *       had a finite max: kn.h's "sees nothing" rule).
 *   Every float operation is an explicit intrinsic (fmaf, __fadd_rn,
 *   __fmul_rn, __fsub_rn, __fdiv_rn) so that nvcc's contraction cannot make
 *   two instantiations round differently (expf's own PTX feeds only these).
 *   Which thread computes what, how many rows share a CTA and how the keys
 *   reach shared memory do not enter the arithmetic; a row that sees fewer
 *   keys of a chunk than its tile adds fmaf(+0, v, acc) for the rest, which
 *   is exact (acc starts at +0 and can never become -0).
 * - Because the fold is sequential, one kernel serves decode, prefill and
 *   tree verification. A CTA owns a tile of rows sharing a KV head: up to
 *   64 / G queries x G heads (GQA: each K/V row staged once for all heads
 *   of the group and all queries of the tile). It runs "steps", each one
 *   64-key chunk staged in shared memory: causal tiles share every chunk
 *   (the visible index is the position; rows differ only in length); masked
 *   tiles share the chunks wholly inside the cache prefix, then run each
 *   query's remaining chunks with that query's rows alone, so a Medusa tree
 *   over a long context reads the prefix once per tile, not once per node.
 *   A CTA either folds all its steps itself ("fold": many tiles, no
 *   partials) or runs one step and writes (m, l, acc) to scratch for
 *   att_combine to fold in chunk order ("split", flash-decoding: fewer tiles
 *   than SMs, e.g. decode). Both give the same bits, so the choice follows
 *   the shape.
 * - ATT_C = 64: a decode over 2k positions already yields 32 CTAs per KV
 *   head; a chunk of K and V for head_dim 128 (2 x 32 KiB) double-buffers
 *   next to a 64-row query tile within the 227 KiB of an H100 SM; a partial
 *   costs head_dim + 2 floats per row per 64 keys.
 * - expf (CUDA's, <= 2 ulp), not __expf: tests compare with the scalar
 *   reference within 2e-5 of max|v| and __expf's error grows with |x|. One
 *   exp per score is negligible beside head_dim FMAs. (Build without
 *   -use_fast_math, which would turn expf into __expf.)
 * - Masked calls first compact each mask row into the list of visible new
 *   tokens (scratch, n_q x n_q int32), so a chunk's slots are found by index.
 * - head_dim 64 and 128 are compile-time (unrolled loops, no guards); any
 *   other head_dim up to 256 takes the generic instantiation; a head_dim
 *   whose tile does not fit shared memory (> 256, or a small-smem device)
 *   takes att_big, which reads K/V from global memory but performs the same
 *   operations in the same order (so it, too, gives the same bits).
 * - K/V are copied with cp.async (16-byte pieces when the pools are 16-byte
 *   aligned and head_dim % 4 == 0, else 4-byte ones) so a CTA has its whole
 *   chunk in flight at once; in fold mode the next step loads while the
 *   current one is computed. */
#include <cuda_runtime.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels/cuda/kn_cuda.h"

#define ATT_C 64         /* visible keys per chunk: fixed, see the top */
#define ATT_ROWS_MAX 64  /* (query, head) rows per CTA */
#define ATT_WARPS_MAX 8  /* ATT_ROWS_MAX / 8: tiles of over 4 rows put 8 on a warp */
#define ATT_BIG_THREADS ATT_C
#define ATT_COMBINE_WARPS 8
/* split mode only while its partials stay below this (else fold) */
#define ATT_SPLIT_BYTES_MAX ((size_t)256 << 20)
#define FULL_MASK 0xffffffffu

/* What every kernel of a call needs. Row (i, h) is q/out row i * n_head + h. */
struct att_p {
    const float *q;
    float *out;
    const float *k_pool, *v_pool;
    const int32_t *block_table;
    const int32_t *vis_cnt;  /* masked: [n_q] visible new tokens of query i */
    const int32_t *vis_list; /* masked: [n_q][n_q] their indices j, ascending */
    float2 *part_ml;         /* split: [n_q * n_head][chunks_max] (m, l) */
    float *part_acc;         /* split: [n_q * n_head][chunks_max][head_dim] */
    int64_t n_q, n_past;
    int64_t n_qblocks;  /* query blocks of qb queries */
    int64_t chunks_max; /* split: chunks of the longest row (partials' stride) */
    int64_t steps_max;  /* split: steps of a tile (grid = tiles x steps_max) */
    int64_t tail;       /* masked: chunks past the shared prefix, per query at most */
    int n_head, n_kv_head, grp, head_dim, block_size;
    int qb;     /* queries per query block */
    int trows;  /* rows per CTA tile (<= ATT_ROWS_MAX) */
    int rtiles; /* tiles per query block (qb * grp rows) */
    int masked, split, vec16, nbuf;
    float scale;
};

/* ---- the shared arithmetic ------------------------------------------------ */

__host__ __device__ static inline int att_d4(int d)
{
    return (d + 3) / 4;
}

/* Row stride of Q and K in shared memory: an odd number of float4s, so that
 * eight lanes reading float4s of eight different rows hit distinct banks. */
__host__ __device__ static inline int att_dp(int d)
{
    return 4 * (att_d4(d) | 1);
}

/* Visible index v of a row (< its visible count) -> its cache position. */
__device__ __forceinline__ int64_t att_pos(const att_p &p, int64_t i, int64_t v)
{
    if (!p.masked || v < p.n_past)
        return v; /* causal: the visible keys are exactly positions 0 .. L-1 */
    return p.n_past + p.vis_list[i * p.n_q + (v - p.n_past)];
}

/* Offset (floats) of KV head g's row of cache position pos in a pool. */
__device__ __forceinline__ int64_t att_row_off(const att_p &p, int64_t pos, int g)
{
    const int64_t blk = p.block_table[pos / p.block_size];
    return ((blk * p.block_size + pos % p.block_size) * p.n_kv_head + g) * (int64_t)p.head_dim;
}

/* Visible keys of query i. */
__device__ __forceinline__ int64_t att_len(const att_p &p, int64_t i)
{
    return p.n_past + (p.masked ? (int64_t)p.vis_cnt[i] : i + 1);
}

__device__ __forceinline__ float att_dot_finish(float c0, float c1, float c2, float c3, float scale)
{
    return __fmul_rn(__fadd_rn(__fadd_rn(c0, c1), __fadd_rn(c2, c3)), scale);
}

/* One row's chunk statistics, called by a whole warp: lane holds the scores
 * of chunk keys lane and lane + 32 (v0/v1: visible). Every lane gets the
 * chunk max m (-inf: nothing finite, the chunk is skipped) and the sum l;
 * p0/p1 are the lane's weights (+0 for invisible keys). */
__device__ __forceinline__ void att_exp_row(float s0, float s1, bool v0, bool v1, float &p0,
                                            float &p1, float &m, float &l)
{
    m = -INFINITY;
    if (v0)
        m = fmaxf(m, s0);
    if (v1)
        m = fmaxf(m, s1);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        m = fmaxf(m, __shfl_xor_sync(FULL_MASK, m, o));
    p0 = 0.0f;
    p1 = 0.0f;
    if (m != -INFINITY) {
        if (v0)
            p0 = expf(__fsub_rn(s0, m));
        if (v1)
            p1 = expf(__fsub_rn(s1, m));
    }
    l = __fadd_rn(p0, p1);
    /* x + y == y + x in IEEE, so every lane ends with the same bits */
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        l = __fadd_rn(l, __shfl_xor_sync(FULL_MASK, l, o));
}

/* The in-order fold of a chunk with max m (finite) into the running max M:
 * the rescale factors of the old state (ca) and of the chunk (cb). */
__device__ __forceinline__ void att_fold_coef(float &M, float m, float &ca, float &cb)
{
    const float mn = fmaxf(M, m);
    ca = expf(__fsub_rn(M, mn)); /* M == -inf (first chunk): 0 */
    cb = expf(__fsub_rn(m, mn));
    M = mn;
}

__device__ __forceinline__ float att_fold(float o, float ca, float x, float cb)
{
    return __fadd_rn(__fmul_rn(o, ca), __fmul_rn(x, cb));
}

/* ---- cp.async ---------------------------------------------------------------- */

__device__ __forceinline__ void att_cp16(void *dst, const void *src)
{
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s),
                 "l"(__cvta_generic_to_global(src))
                 : "memory");
}

__device__ __forceinline__ void att_cp4(void *dst, const void *src)
{
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s),
                 "l"(__cvta_generic_to_global(src))
                 : "memory");
}

__device__ __forceinline__ void att_cp_commit(void)
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N> __device__ __forceinline__ void att_cp_wait(void)
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* ---- shared memory layout of att_main ------------------------------------------ */

struct att_layout {
    size_t offs; /* int64 [nbuf][ATT_C]: pool offset of each slot's row */
    size_t rinfo; /* int64 [2][rows]: each row's visible count (0: padding), query */
    size_t q;    /* float [rows][dp] (zero beyond head_dim and for empty rows) */
    size_t k;    /* float [nbuf][ATT_C][dp] */
    size_t v;    /* float [nbuf][ATT_C][head_dim] */
    size_t p;    /* float [warps][ATT_C][rw]: weights, per warp */
    size_t bytes;
};

/* Every section is a multiple of 16 bytes (ATT_C = 64, dp % 4 == 0). */
__host__ __device__ static inline att_layout att_layout_of(int d, int rw, int nw, int nbuf)
{
    att_layout L;
    const size_t dp = (size_t)att_dp(d), rows = (size_t)rw * (size_t)nw;
    size_t o = 0;
    L.offs = o;
    o += (size_t)nbuf * ATT_C * sizeof(int64_t);
    L.rinfo = o;
    o += 2 * rows * sizeof(int64_t);
    L.q = o;
    o += rows * dp * sizeof(float);
    L.k = o;
    o += (size_t)nbuf * ATT_C * dp * sizeof(float);
    L.v = o;
    o += (size_t)nbuf * ATT_C * (size_t)d * sizeof(float);
    L.p = o;
    o += (size_t)nw * ATT_C * (size_t)rw * sizeof(float);
    L.bytes = o;
    return L;
}

/* ---- the tiled kernel ---------------------------------------------------------- */

/* Which (query, head) is local row r of the CTA of (qblock, rtile, KV head
 * g); false for padding rows. */
__device__ __forceinline__ bool att_row(const att_p &p, int64_t qblock, int rtile, int g, int r,
                                        int64_t &i, int &h)
{
    const int64_t flat = (int64_t)rtile * p.trows + r;
    i = qblock * p.qb + flat / p.grp;
    h = g * p.grp + (int)(flat % p.grp);
    return r < p.trows && flat < (int64_t)p.qb * p.grp && i < p.n_q;
}

/* A step of a tile: one chunk c of visible keys, for every row of the tile
 * (owner -1: a chunk whose slots are the same positions for all of its
 * queries) or for the rows of query `owner` alone (a masked tile's chunks
 * past the shared prefix). lmax: the keys the step's rows see at most. */
struct att_step {
    int64_t c, owner, lmax;
};

/* Steps of the tile of queries i0 ...: causal tiles have only shared steps
 * (the visible index is the position for every query; rows differ only in
 * length); masked tiles share the n_past / ATT_C chunks that lie wholly in
 * the cache prefix, then each query has up to p.tail chunks of its own.
 * Whether step s exists is the same for every thread of the CTA. */
__device__ __forceinline__ bool att_step_of(const att_p &p, int64_t s, int64_t i0, int64_t n_shared,
                                            int64_t lmax_shared, att_step &st)
{
    if (s < n_shared) {
        st.c = s;
        st.owner = -1;
        st.lmax = lmax_shared;
        return true;
    }
    if (p.tail == 0)
        return false;
    s -= n_shared;
    const int64_t qi = s / p.tail, i = i0 + qi;
    st.c = n_shared + s % p.tail;
    if (qi >= p.qb || i >= p.n_q)
        return false;
    st.lmax = att_len(p, i);
    st.owner = i;
    return st.c * ATT_C < st.lmax;
}

/* DT: head_dim (64, 128) or 0 for any head_dim <= 256; RW: rows per warp.
 * blockDim.x = 32 * warps; warp w holds the tile's rows w*RW .. w*RW+RW-1. */
template <int DT, int RW>
__global__ void __launch_bounds__(ATT_WARPS_MAX * 32, 1) att_main(const att_p p)
{
    extern __shared__ float4 att_smem[];
    constexpr int NT = DT ? (DT + 31) / 32 : 8; /* V columns per lane: d = lane + 32 t */
    const int D = DT ? DT : p.head_dim;
    const int D4 = att_d4(D), DP = att_dp(D);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nthr = blockDim.x, nw = nthr >> 5;
    const int nbuf = p.nbuf;

    int64_t bid = blockIdx.x;
    int64_t step0 = 0;
    if (p.split) {
        step0 = bid % p.steps_max;
        bid /= p.steps_max;
    }
    const int g = (int)(bid % p.n_kv_head);
    bid /= p.n_kv_head;
    const int rtile = (int)(bid % p.rtiles);
    bid /= p.rtiles;
    const int64_t qblock = p.n_qblocks - 1 - bid; /* causal: longest rows start first */
    const int64_t i0 = qblock * p.qb;

    /* Causal: rows see positions 0 .. n_past + i, the tile's last query the
     * most. Masked: the shared chunks hold only cached positions. */
    const int64_t n_shared =
        p.masked ? p.n_past / ATT_C
                 : (p.n_past + (i0 + p.qb < p.n_q ? i0 + p.qb : p.n_q) + ATT_C - 1) / ATT_C;
    const int64_t lmax_shared =
        p.masked ? p.n_past : p.n_past + (i0 + p.qb < p.n_q ? i0 + p.qb : p.n_q);
    const int64_t n_steps = n_shared + p.qb * p.tail;

    /* The steps this CTA runs: [s_first, s_end), skipping steps that do not
     * exist (queries with fewer own chunks than p.tail). */
    att_step cur;
    int64_t s_cur, s_end;
    if (p.split) {
        if (!att_step_of(p, step0, i0, n_shared, lmax_shared, cur))
            return; /* whole CTA: no barrier has been reached */
        s_cur = step0;
        s_end = step0 + 1;
    } else {
        s_end = n_steps;
        for (s_cur = 0; s_cur < s_end; s_cur++)
            if (att_step_of(p, s_cur, i0, n_shared, lmax_shared, cur))
                break;
    }

    const att_layout lay = att_layout_of(D, RW, nw, nbuf);
    char *sm = (char *)att_smem;
    int64_t *offs = (int64_t *)(sm + lay.offs);
    float *qs = (float *)(sm + lay.q);
    float *ks = (float *)(sm + lay.k);
    float *vs = (float *)(sm + lay.v);
    float *pw = (float *)(sm + lay.p) + (size_t)warp * ATT_C * RW;

    /* Query rows, zero-padded to DP columns; empty rows are all zero. */
    for (int e = tid; e < RW * nw * DP; e += nthr) {
        const int r = e / DP, d = e % DP;
        int64_t i;
        int h;
        float x = 0.0f;
        if (d < D && att_row(p, qblock, rtile, g, r, i, h))
            x = p.q[(i * p.n_head + h) * (int64_t)D + d];
        qs[e] = x;
    }
    /* K columns D .. 4*D4 are read by the float4 dot: keep them zero (the
     * copies below never write them). */
    if (4 * D4 != D)
        for (int e = tid; e < nbuf * ATT_C * (4 * D4 - D); e += nthr) {
            const int row = e / (4 * D4 - D), d = D + e % (4 * D4 - D);
            ks[(size_t)row * DP + d] = 0.0f;
        }

    /* The rows' visible counts (0 for padding rows) and queries, read after
     * the prologue's barrier (kept out of registers: RW = 8 tiles need them). */
    int64_t *row_len = (int64_t *)(sm + lay.rinfo), *row_q = row_len + RW * nw;
    for (int r = tid; r < RW * nw; r += nthr) {
        int64_t i;
        int h;
        const bool ok = att_row(p, qblock, rtile, g, r, i, h);
        row_len[r] = ok ? att_len(p, i) : 0;
        row_q[r] = i;
    }

    /* Running fold state (fold mode). */
    float M[RW], lsum[RW], O[RW][NT];
#pragma unroll
    for (int rr = 0; rr < RW; rr++) {
        M[rr] = -INFINITY;
        lsum[rr] = 0.0f;
#pragma unroll
        for (int t = 0; t < NT; t++)
            O[rr][t] = 0.0f;
    }

    /* Slot k of a step -> pool offset of its row, -1 past the step's keys. */
    auto slot_offsets = [&](const att_step &st, int buf) {
        for (int k = tid; k < ATT_C; k += nthr) {
            const int64_t v = st.c * ATT_C + k;
            offs[buf * ATT_C + k] =
                v < st.lmax ? att_row_off(p, att_pos(p, st.owner < 0 ? i0 : st.owner, v), g) : -1;
        }
    };
    /* Queue the copies of a step's K and V rows into buffer buf. */
    auto load_chunk = [&](const att_step &st, int buf) {
        const int64_t left = st.lmax - st.c * ATT_C;
        const int nk = left < ATT_C ? (int)left : ATT_C;
        const int64_t *of = offs + buf * ATT_C;
        float *kb = ks + (size_t)buf * ATT_C * DP;
        float *vb = vs + (size_t)buf * ATT_C * D;
        if (p.vec16) {
            const int ppr = D / 4;
            for (int e = tid; e < nk * ppr; e += nthr) {
                const int k = e / ppr, j = 4 * (e % ppr);
                const int64_t o = of[k] + j;
                att_cp16(kb + (size_t)k * DP + j, p.k_pool + o);
                att_cp16(vb + (size_t)k * D + j, p.v_pool + o);
            }
        } else {
            for (int e = tid; e < nk * D; e += nthr) {
                const int k = e / D, j = e % D;
                const int64_t o = of[k] + j;
                att_cp4(kb + (size_t)k * DP + j, p.k_pool + o);
                att_cp4(vb + (size_t)k * D + j, p.v_pool + o);
            }
        }
        att_cp_commit();
    };

    if (s_cur < s_end) {
        slot_offsets(cur, 0);
        __syncthreads(); /* offs[0] */
        load_chunk(cur, 0);
    }
    for (int buf = 0, first = 1; s_cur < s_end; first = 0) {
        /* The step after this one (fold mode). */
        att_step nxt = cur;
        int64_t s_nxt = s_cur + 1;
        while (s_nxt < s_end && !att_step_of(p, s_nxt, i0, n_shared, lmax_shared, nxt))
            s_nxt++;
        /* Two buffers: the next step loads while this one is computed. One
         * buffer (split mode, or a tile too big to double): this step loads
         * now, unless the prologue did. */
        const bool prefetch = nbuf == 2 && s_nxt < s_end;
        const bool reload = nbuf == 1 && !first;
        /* offs[] of the buffer written here was last read by the copies issued
         * before the previous B2 (one buffer) or the one before (two). */
        if (prefetch)
            slot_offsets(nxt, buf ^ 1);
        else if (reload)
            slot_offsets(cur, 0);
        /* B1: those offsets are visible, and every warp is done computing
         * the previous step, whose K/V buffer the copies below overwrite. */
        __syncthreads();
        if (prefetch) {
            load_chunk(nxt, buf ^ 1);
            att_cp_wait<1>(); /* all but the group just issued: this step's */
        } else {
            if (reload)
                load_chunk(cur, 0);
            att_cp_wait<0>();
        }
        /* B2: this step's copies from every thread have landed. */
        __syncthreads();

        const int64_t base = cur.c * ATT_C;
        const int64_t left = cur.lmax - base;
        const int nk = left < ATT_C ? (int)left : ATT_C;
        /* Keys of this chunk each row sees (0: not its step or past its end). */
        int nv[RW];
        bool busy = false;
#pragma unroll
        for (int rr = 0; rr < RW; rr++) {
            const int r = warp * RW + rr;
            const int64_t lim =
                (cur.owner < 0 || row_q[r] == cur.owner ? row_len[r] : 0) - base;
            nv[rr] = lim <= 0 ? 0 : lim < ATT_C ? (int)lim : ATT_C;
            busy |= nv[rr] > 0;
        }
        if (busy) { /* warp-uniform; barriers stay outside */
            const float *kb = ks + (size_t)buf * ATT_C * DP;
            const float *vb = vs + (size_t)buf * ATT_C * D;

            /* Scores of keys lane and lane + 32 for the warp's rows. Slots
             * past nk hold stale data; att_exp_row ignores them. */
            float s0[RW], s1[RW];
            {
                float a0[RW][4], a1[RW][4];
#pragma unroll
                for (int rr = 0; rr < RW; rr++)
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        a0[rr][j] = 0.0f;
                        a1[rr][j] = 0.0f;
                    }
                const float4 *k0 = (const float4 *)(kb + (size_t)lane * DP);
                const float4 *k1 = (const float4 *)(kb + (size_t)(lane + 32) * DP);
                const float4 *qw = (const float4 *)(qs + (size_t)warp * RW * DP);
#pragma unroll 4
                for (int t = 0; t < D4; t++) {
                    const float4 x0 = k0[t], x1 = k1[t];
#pragma unroll
                    for (int rr = 0; rr < RW; rr++) {
                        const float4 y = qw[rr * (DP / 4) + t]; /* broadcast */
                        a0[rr][0] = fmaf(y.x, x0.x, a0[rr][0]);
                        a0[rr][1] = fmaf(y.y, x0.y, a0[rr][1]);
                        a0[rr][2] = fmaf(y.z, x0.z, a0[rr][2]);
                        a0[rr][3] = fmaf(y.w, x0.w, a0[rr][3]);
                        a1[rr][0] = fmaf(y.x, x1.x, a1[rr][0]);
                        a1[rr][1] = fmaf(y.y, x1.y, a1[rr][1]);
                        a1[rr][2] = fmaf(y.z, x1.z, a1[rr][2]);
                        a1[rr][3] = fmaf(y.w, x1.w, a1[rr][3]);
                    }
                }
#pragma unroll
                for (int rr = 0; rr < RW; rr++) {
                    s0[rr] = att_dot_finish(a0[rr][0], a0[rr][1], a0[rr][2], a0[rr][3], p.scale);
                    s1[rr] = att_dot_finish(a1[rr][0], a1[rr][1], a1[rr][2], a1[rr][3], p.scale);
                }
            }

            /* Weights and chunk statistics per row. */
            float mc[RW], lc[RW];
            {
                float p0[RW], p1[RW];
#pragma unroll
                for (int rr = 0; rr < RW; rr++) {
                    const bool v0 = lane < nv[rr], v1 = lane + 32 < nv[rr];
                    att_exp_row(s0[rr], s1[rr], v0, v1, p0[rr], p1[rr], mc[rr], lc[rr]);
                }
                /* The previous step's reads of pw ended at its __syncwarp. */
                if constexpr (RW % 4 == 0) {
#pragma unroll
                    for (int rr = 0; rr < RW; rr += 4) {
                        *(float4 *)(pw + lane * RW + rr) =
                            make_float4(p0[rr], p0[rr + 1], p0[rr + 2], p0[rr + 3]);
                        *(float4 *)(pw + (lane + 32) * RW + rr) =
                            make_float4(p1[rr], p1[rr + 1], p1[rr + 2], p1[rr + 3]);
                    }
                } else {
#pragma unroll
                    for (int rr = 0; rr < RW; rr++) {
                        pw[lane * RW + rr] = p0[rr];
                        pw[(lane + 32) * RW + rr] = p1[rr];
                    }
                }
                __syncwarp();
            }

            /* acc[r][d] = fmaf chain over the chunk's keys in order. Rows
             * that see fewer than nk keys add fmaf(+0, v, acc) for the rest,
             * which is exact: acc starts at +0 and never becomes -0. */
            float acc[RW][NT];
#pragma unroll
            for (int rr = 0; rr < RW; rr++)
#pragma unroll
                for (int t = 0; t < NT; t++)
                    acc[rr][t] = 0.0f;
            for (int k = 0; k < nk; k++) {
                float pv[RW];
                if constexpr (RW % 4 == 0) {
#pragma unroll
                    for (int rr = 0; rr < RW; rr += 4) {
                        const float4 w4 = *(const float4 *)(pw + k * RW + rr);
                        pv[rr] = w4.x;
                        pv[rr + 1] = w4.y;
                        pv[rr + 2] = w4.z;
                        pv[rr + 3] = w4.w;
                    }
                } else {
#pragma unroll
                    for (int rr = 0; rr < RW; rr++)
                        pv[rr] = pw[k * RW + rr];
                }
                const float *vr = vb + (size_t)k * D;
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    const int d = lane + 32 * t;
                    if (DT == 0 && 32 * t >= D)
                        break; /* warp-uniform */
                    const float x = (DT != 0 || d < D) ? vr[d] : 0.0f;
#pragma unroll
                    for (int rr = 0; rr < RW; rr++)
                        acc[rr][t] = fmaf(pv[rr], x, acc[rr][t]);
                }
            }
            __syncwarp(); /* pw is rewritten by the next step */

            if (p.split) {
#pragma unroll
                for (int rr = 0; rr < RW; rr++) {
                    int64_t i;
                    int h;
                    /* only this row's own chunks: another query's step or a
                     * chunk past its keys would overwrite a real partial */
                    if (nv[rr] == 0 || !att_row(p, qblock, rtile, g, warp * RW + rr, i, h))
                        continue;
                    const int64_t slot = (i * p.n_head + h) * p.chunks_max + cur.c;
                    if (lane == 0)
                        p.part_ml[slot] = make_float2(mc[rr], lc[rr]);
                    float *pa = p.part_acc + slot * D;
#pragma unroll
                    for (int t = 0; t < NT; t++) {
                        const int d = lane + 32 * t;
                        if (d < D)
                            pa[d] = acc[rr][t];
                    }
                }
            } else {
#pragma unroll
                for (int rr = 0; rr < RW; rr++) {
                    if (mc[rr] == -INFINITY)
                        continue; /* not its chunk, or nothing finite in it */
                    float ca, cb;
                    att_fold_coef(M[rr], mc[rr], ca, cb);
                    lsum[rr] = att_fold(lsum[rr], ca, lc[rr], cb);
#pragma unroll
                    for (int t = 0; t < NT; t++)
                        O[rr][t] = att_fold(O[rr][t], ca, acc[rr][t], cb);
                }
            }
        }
        if (prefetch)
            buf ^= 1;
        s_cur = s_nxt;
        cur = nxt;
    }

    if (p.split)
        return;
#pragma unroll
    for (int rr = 0; rr < RW; rr++) {
        int64_t i;
        int h;
        if (!att_row(p, qblock, rtile, g, warp * RW + rr, i, h))
            continue;
        float *o = p.out + (i * p.n_head + h) * (int64_t)D;
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const int d = lane + 32 * t;
            if (d < D)
                o[d] = M[rr] == -INFINITY ? 0.0f : __fdiv_rn(O[rr][t], lsum[rr]);
        }
    }
}

/* ---- split mode: fold the partials of each row in chunk order ------------------------ */

/* One warp per row; NT: head_dim <= 32 * NT. */
template <int NT>
__global__ void __launch_bounds__(ATT_COMBINE_WARPS * 32) att_combine(const att_p p)
{
    const int lane = threadIdx.x & 31;
    const int64_t row = (int64_t)blockIdx.x * ATT_COMBINE_WARPS + (threadIdx.x >> 5);
    if (row >= p.n_q * p.n_head)
        return;
    const int D = p.head_dim;
    const int64_t i = row / p.n_head;
    const int64_t nch = (att_len(p, i) + ATT_C - 1) / ATT_C;
    float M = -INFINITY, lsum = 0.0f, O[NT];
#pragma unroll
    for (int t = 0; t < NT; t++)
        O[t] = 0.0f;
    const float2 *ml = p.part_ml + row * p.chunks_max;
    const float *pa = p.part_acc + row * p.chunks_max * D;
#pragma unroll 2
    for (int64_t c = 0; c < nch; c++) {
        const float2 s = ml[c];
        if (s.x == -INFINITY)
            continue;
        float ca, cb;
        att_fold_coef(M, s.x, ca, cb);
        lsum = att_fold(lsum, ca, s.y, cb);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const int d = lane + 32 * t;
            if (d < D)
                O[t] = att_fold(O[t], ca, pa[c * D + d], cb);
        }
    }
    float *o = p.out + row * D;
#pragma unroll
    for (int t = 0; t < NT; t++) {
        const int d = lane + 32 * t;
        if (d < D)
            o[d] = M == -INFINITY ? 0.0f : __fdiv_rn(O[t], lsum);
    }
}

/* ---- any head_dim: the same operations straight from global memory ----------------- */

/* One CTA of ATT_C threads per row; the running output lives in `out`
 * (each thread owns columns tid, tid + ATT_C, ...), so head_dim is
 * unbounded. Thread k computes key k's score exactly as att_main's float4
 * dot does (a skipped column d >= head_dim is att_main's exact fmaf of
 * zeros). */
__global__ void __launch_bounds__(ATT_BIG_THREADS) att_big(const att_p p)
{
    __shared__ int64_t offs[ATT_C];
    __shared__ float sc[ATT_C], pk[ATT_C];
    __shared__ float sh_m, sh_l;
    const int tid = threadIdx.x, lane = tid & 31;
    const int64_t row = (int64_t)gridDim.x * blockIdx.y + blockIdx.x;
    if (row >= p.n_q * p.n_head)
        return;
    const int D = p.head_dim;
    const int64_t i = row / p.n_head;
    const int g = (int)(row % p.n_head) / p.grp;
    const int64_t L = att_len(p, i);
    const float *q = p.q + row * D;
    float *o = p.out + row * D;
    float M = -INFINITY, lsum = 0.0f;
    for (int64_t c = 0; c * ATT_C < L; c++) {
        const int64_t v = c * ATT_C + tid;
        const int64_t left = L - c * ATT_C;
        const int nk = left < ATT_C ? (int)left : ATT_C;
        float s = 0.0f;
        if (v < L) {
            const int64_t off = att_row_off(p, att_pos(p, i, v), g);
            offs[tid] = off;
            const float *kr = p.k_pool + off;
            float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int d0 = 0; d0 < D; d0 += 4)
#pragma unroll
                for (int j = 0; j < 4; j++)
                    if (d0 + j < D)
                        a[j] = fmaf(q[d0 + j], kr[d0 + j], a[j]);
            s = att_dot_finish(a[0], a[1], a[2], a[3], p.scale);
        }
        sc[tid] = s;
        __syncthreads(); /* sc, offs */
        if (tid < 32) {
            float p0, p1, m, l;
            att_exp_row(sc[lane], sc[lane + 32], c * ATT_C + lane < L, c * ATT_C + lane + 32 < L,
                        p0, p1, m, l);
            pk[lane] = p0;
            pk[lane + 32] = p1;
            if (lane == 0) {
                sh_m = m;
                sh_l = l;
            }
        }
        __syncthreads(); /* pk, sh_m, sh_l */
        const float m = sh_m, l = sh_l;
        if (m != -INFINITY) {
            float Mn = M, ca, cb;
            att_fold_coef(Mn, m, ca, cb);
            for (int d = tid; d < D; d += ATT_BIG_THREADS) {
                float acc = 0.0f;
                for (int k = 0; k < nk; k++)
                    acc = fmaf(pk[k], p.v_pool[offs[k] + d], acc);
                const float old = M == -INFINITY ? 0.0f : o[d]; /* out may hold garbage */
                o[d] = att_fold(old, ca, acc, cb);
            }
            lsum = att_fold(lsum, ca, l, cb);
            M = Mn;
        }
        __syncthreads(); /* offs, sc, pk are rewritten by the next chunk */
    }
    for (int d = tid; d < D; d += ATT_BIG_THREADS)
        o[d] = M == -INFINITY ? 0.0f : __fdiv_rn(o[d], lsum);
}

/* ---- masked calls: the visible new tokens of each query ------------------------------ */

/* One warp per query: vis_list[i][0 .. cnt) = the j with mask[i][j] != 0. */
__global__ void __launch_bounds__(256) att_compact(const uint8_t *mask, int64_t n_q, int32_t *cnt,
                                                   int32_t *list)
{
    const int lane = threadIdx.x & 31;
    const int64_t i = (int64_t)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (i >= n_q)
        return;
    const uint8_t *mr = mask + i * n_q;
    int32_t *lr = list + i * n_q;
    int32_t n = 0;
    for (int64_t j0 = 0; j0 < n_q; j0 += 32) {
        const int64_t j = j0 + lane;
        const bool vis = j < n_q && mr[j] != 0;
        const unsigned b = __ballot_sync(FULL_MASK, vis);
        if (vis)
            lr[n + __popc(b & ((1u << lane) - 1u))] = (int32_t)j;
        n += __popc(b);
    }
    if (lane == 0)
        cnt[i] = n;
}

/* ---- launcher ---------------------------------------------------------------------------- */

enum { ATT_D64, ATT_D128, ATT_DGEN, ATT_NDT };
enum { ATT_RW1, ATT_RW2, ATT_RW4, ATT_RW8, ATT_NRW };

typedef void (*att_kernel)(const att_p);

static att_kernel att_main_of(int dt, int rw)
{
    static const att_kernel tab[ATT_NDT][ATT_NRW] = {
        {att_main<64, 1>, att_main<64, 2>, att_main<64, 4>, att_main<64, 8>},
        {att_main<128, 1>, att_main<128, 2>, att_main<128, 4>, att_main<128, 8>},
        {att_main<0, 1>, att_main<0, 2>, att_main<0, 4>, att_main<0, 8>},
    };
    return tab[dt][rw];
}

/* Per ctx: the device's opt-in shared memory per block, and the limit each
 * att_main instantiation was raised to (cold: set once per instantiation). */
typedef struct att_state {
    int device; /* the stream's: function attributes are set per device */
    int smem_optin;
    int smem_set[ATT_NDT][ATT_NRW];
} att_state;

static void att_state_fini(kn_cuda *cu, void *st)
{
    (void)cu;
    free(st);
}

static att_state *att_state_of(kn_cuda *cu)
{
    att_state *st = (att_state *)kn_cuda_module(cu, KN_CUDA_MOD_ATTN);
    if (st)
        return st;
    st = (att_state *)calloc(1, sizeof *st);
    if (!st)
        return NULL;
    int dev = 0, optin = 0;
    if (cudaStreamGetDevice((cudaStream_t)kn_cuda_stream(cu), &dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) !=
            cudaSuccess) {
        (void)cudaGetLastError();
        optin = 48 << 10; /* what every device allows without opting in */
    }
    st->device = dev;
    st->smem_optin = optin;
    kn_cuda_set_module(cu, KN_CUDA_MOD_ATTN, st, att_state_fini);
    return st;
}

static int att_rw_index(int rw)
{
    return rw == 1 ? ATT_RW1 : rw == 2 ? ATT_RW2 : rw == 4 ? ATT_RW4 : ATT_RW8;
}

static size_t att_align(size_t x)
{
    return (x + 255) / 256 * 256;
}

extern "C" int kn_cuda_attention(kn_cuda *cu, const kn_attn_args *a)
{
    cudaStream_t stream = (cudaStream_t)kn_cuda_stream(cu);
    att_state *st = att_state_of(cu);
    if (!st)
        return kn_cuda_fail(cu, -ENOMEM, "attention: out of host memory");

    const int D = a->head_dim, grp = a->n_head / a->n_kv_head;
    const int64_t n_q = a->n_q, rows_all = n_q * a->n_head;
    att_p p = {};
    p.q = a->q;
    p.out = a->out;
    p.k_pool = a->k_pool;
    p.v_pool = a->v_pool;
    p.block_table = a->block_table;
    p.n_q = n_q;
    p.n_past = a->n_past;
    p.n_head = a->n_head;
    p.n_kv_head = a->n_kv_head;
    p.grp = grp;
    p.head_dim = D;
    p.block_size = a->block_size;
    p.scale = a->scale;
    p.masked = a->mask != NULL;
    p.vec16 = D % 4 == 0 && ((uintptr_t)a->k_pool | (uintptr_t)a->v_pool) % 16 == 0;

    /* Tile shape: the largest row tile (64, 32, ... rows) whose single-buffer
     * shared memory fits; none fits -> att_big. A tile stacks up to 64 / G
     * queries x G heads: causal queries share every chunk's positions (the
     * visible index is the position); masked ones only the n_past / 64
     * chunks of the cache prefix, each then runs its own `tail` chunks
     * alone, so masked queries are stacked only when the prefix outweighs
     * the tail (Medusa trees over a long context), else one per tile. */
    const int64_t chunks_max = (a->n_past + n_q + ATT_C - 1) / ATT_C;
    const int64_t n_shared = a->n_past / ATT_C;
    p.tail = p.masked ? chunks_max - n_shared : 0;
    int rw = 0, nw = 0, dt = D == 64 ? ATT_D64 : D == 128 ? ATT_D128 : ATT_DGEN;
    if (D <= 256)
        for (int cap = ATT_ROWS_MAX; cap >= 1; cap /= 2) {
            int64_t qb = p.masked && n_shared < p.tail ? 1 : cap / grp;
            if (qb < 1)
                qb = 1;
            if (qb > n_q)
                qb = n_q;
            const int64_t rows = qb * grp;
            const int trows = (int)(rows < cap ? rows : cap);
            const int w = trows <= 1 ? 1 : trows <= 2 ? 2 : trows <= 4 ? 4 : 8;
            const int n = (trows + w - 1) / w;
            if (att_layout_of(D, w, n, 1).bytes > (size_t)st->smem_optin)
                continue;
            rw = w;
            nw = n;
            p.qb = (int)qb;
            p.trows = trows;
            p.rtiles = (int)((rows + trows - 1) / trows);
            break;
        }

    /* Bounds that keep the sizes below in range: n_q^2 list bytes, 32-bit
     * grids (a mask of n_q^2 bytes runs out of memory long before). */
    if ((p.masked && n_q > ((int64_t)1 << 28)) || rows_all > INT32_MAX * (int64_t)ATT_COMBINE_WARPS)
        return kn_cuda_fail(cu, -EINVAL, "attention: n_q %lld too large", (long long)n_q);

    /* Scratch: the masked calls' visible lists, then split partials. */
    const size_t vis_bytes =
        p.masked ? att_align((size_t)n_q * 4) + att_align((size_t)n_q * (size_t)n_q * 4) : 0;
    int64_t groups = 0;
    size_t part_bytes = 0;
    if (rw) {
        p.n_qblocks = (n_q + p.qb - 1) / p.qb;
        groups = p.n_qblocks * p.rtiles * a->n_kv_head;
        p.steps_max = p.masked ? n_shared + p.qb * p.tail : chunks_max;
        const double pb = (double)rows_all * (double)chunks_max * (8.0 + 4.0 * D);
        /* fewer tiles than SMs and more than one step: one CTA per step */
        if (p.steps_max >= 2 && groups < (int64_t)kn_cuda_sm_count(cu) &&
            pb <= (double)ATT_SPLIT_BYTES_MAX && (double)groups * (double)p.steps_max < 2e9) {
            p.split = 1;
            part_bytes = att_align((size_t)rows_all * (size_t)chunks_max * 8) +
                         (size_t)rows_all * (size_t)chunks_max * (size_t)D * 4;
        }
    }
    char *scr = NULL;
    if (vis_bytes + part_bytes > 0) {
        scr = (char *)kn_cuda_scratch(cu, KN_CUDA_SCRATCH_ATTN, vis_bytes + part_bytes);
        if (!scr && p.split) { /* fold needs no partials: same bits, fewer CTAs */
            p.split = 0;
            part_bytes = 0;
            scr = vis_bytes ? (char *)kn_cuda_scratch(cu, KN_CUDA_SCRATCH_ATTN, vis_bytes) : NULL;
        }
        if (!scr && kn_cuda_failed(cu))
            return -EIO; /* the scratch call met a CUDA error (recorded) */
        if (!scr && vis_bytes + part_bytes > 0)
            return kn_cuda_fail(cu, -ENOMEM, "attention: no device memory for %zu bytes of scratch",
                                vis_bytes + part_bytes);
    }
    if (p.masked) {
        int32_t *cnt = (int32_t *)scr;
        int32_t *list = (int32_t *)(scr + att_align((size_t)n_q * 4));
        p.vis_cnt = cnt;
        p.vis_list = list;
        att_compact<<<(unsigned)((n_q + 7) / 8), 256, 0, stream>>>(a->mask, n_q, cnt, list);
    }

    if (!rw) {
        /* grid: rows as x by y */
        const int64_t gx = rows_all < ((int64_t)1 << 30) ? rows_all : ((int64_t)1 << 30);
        const int64_t gy = (rows_all + gx - 1) / gx;
        att_big<<<dim3((unsigned)gx, (unsigned)gy), ATT_BIG_THREADS, 0, stream>>>(p);
        return kn_cuda_check(cu, "attention");
    }

    p.chunks_max = chunks_max;
    if (p.split) {
        const size_t ml_bytes = att_align((size_t)rows_all * (size_t)chunks_max * 8);
        p.part_ml = (float2 *)(scr + vis_bytes);
        p.part_acc = (float *)(scr + vis_bytes + ml_bytes);
    }
    /* Fold mode streams steps: double-buffer them when it fits. */
    p.nbuf = !p.split && p.steps_max > 1 &&
                     att_layout_of(D, rw, nw, 2).bytes <= (size_t)st->smem_optin
                 ? 2
                 : 1;
    const int64_t ctas = groups * (p.split ? p.steps_max : 1);
    if (ctas > INT32_MAX)
        return kn_cuda_fail(cu, -EINVAL, "attention: %lld blocks", (long long)ctas);
    const size_t smem = att_layout_of(D, rw, nw, p.nbuf).bytes;
    const att_kernel kern = att_main_of(dt, att_rw_index(rw));
    int *set = &st->smem_set[dt][att_rw_index(rw)];
    if (smem > (size_t)*set && smem > (48u << 10)) {
        /* raise the instantiation's limit once to the device maximum; the
         * attribute belongs to the current device (cold path: once) */
        int cur_dev = -1;
        if (cudaGetDevice(&cur_dev) != cudaSuccess || cur_dev != st->device) {
            (void)cudaGetLastError();
            (void)cudaSetDevice(st->device);
        }
        const cudaError_t e = cudaFuncSetAttribute((const void *)kern,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   st->smem_optin);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            return kn_cuda_fail(cu, -EIO, "attention: cudaFuncSetAttribute: %s",
                                cudaGetErrorString(e));
        }
        *set = st->smem_optin;
    }
    kern<<<(unsigned)ctas, (unsigned)(nw * 32), smem, stream>>>(p);
    if (p.split) {
        const unsigned blocks = (unsigned)((rows_all + ATT_COMBINE_WARPS - 1) / ATT_COMBINE_WARPS);
        const int nt = (D + 31) / 32;
        if (nt <= 1)
            att_combine<1><<<blocks, ATT_COMBINE_WARPS * 32, 0, stream>>>(p);
        else if (nt <= 2)
            att_combine<2><<<blocks, ATT_COMBINE_WARPS * 32, 0, stream>>>(p);
        else if (nt <= 4)
            att_combine<4><<<blocks, ATT_COMBINE_WARPS * 32, 0, stream>>>(p);
        else
            att_combine<8><<<blocks, ATT_COMBINE_WARPS * 32, 0, stream>>>(p);
    }
    return kn_cuda_check(cu, "attention");
}
