/* kernels/cuda/kn_cuda_mm.cu — matmul for the CUDA backend:
 * y[M][N] = x[M][K] · Wᵀ (kn.h), W in GGUF layout (N rows of K contiguous
 * elements). Two engines, chosen by M alone, never by which rows share a
 * call:
 *
 * 1. M < T: mm_kernel, our own, for every dtype (the decode path).
 *    T = $GORGON_CUDA_GEMM_MIN_M (read once), default 512; 0 means every M
 *    runs here (fully batch-invariant). A warp owns RT weight rows and MT
 *    rows of x ((MT, RT) in (1,1), (1,2), (2,2), (4,4), (8,4); (4,2) and
 *    (8,2) for Q types, whose block partials double the accumulators),
 *    picked from M and N; M > 8 runs as groups of 8 in one launch, the
 *    group index varying fastest across blocks so that the groups sharing
 *    a weight tile run together and re-read it from L2, not HBM. Weights are dequantised in
 *    registers to float32, activations stay float32, products are fused
 *    (__fmaf_rn). The reduction order of one output element is
 *
 *      chunk := 16 bytes of weights (F32: 4 elements, F16/BF16: 8) or one
 *               ggml block (Q8_0/Q4_0: 32 elements);
 *      chunk j belongs to lane j % 32, which walks its chunks in ascending
 *      order, elements ascending inside a chunk:
 *        F32/F16/BF16: acc = fma(w_c, x_c, acc) per element;
 *        Q8_0/Q4_0:    p = 0; p = fma(q_c, x_c, p) over the block's 32
 *                      elements; acc = fma(d, p, acc);
 *      a row length that is not a whole number of chunks (F types only)
 *      ends with a partial chunk, processed the same way by its lane;
 *      the 32 lane sums are then added by a fixed xor butterfly
 *      (v += shfl_xor(v, o) for o = 16, 8, 4, 2, 1; IEEE addition is
 *      commutative, so all lanes hold the same bits).
 *
 *    That order is a function of K and the dtype only. MT, RT, the
 *    unrolling, the grid, fused matmul_multi launches, the weight layout
 *    (packed copy or ggml blocks), and the alignment of x (16-byte vector
 *    loads or scalar ones) change how operands reach the registers, never
 *    the sequence of roundings; every float operation is an explicit
 *    _rn intrinsic, so --fmad and the host compiler cannot change it.
 *    The lane arithmetic is written as __host__ __device__ functions so a
 *    CPU test can replay a warp bit for bit.
 *
 *    Weight layout: F32/F16/BF16 rows are read in place (16-byte
 *    ld.global.nc.L1::no_allocate when rows and base are 16-byte aligned,
 *    else element by element: the "generic" instances, same bits). ggml
 *    Q8_0 (34-byte blocks) and Q4_0 (18-byte) blocks are only 2-byte
 *    aligned, so kn_cuda_weight_prepare repacks them into w->packed:
 *      [N][K/32] blocks of quants (Q8_0: 32 int8, Q4_0: the 16 ggml nibble
 *      bytes unchanged: byte i holds element i in its low nibble and
 *      element i + 16 in its high one), 256-byte aligned, then at the next
 *      256-byte boundary the f16 scales [N][K/32];
 *    the same size as the ggml data, so a Q weight costs twice its size on
 *    the device while w->data is kept for get_rows. Without a packed copy
 *    matmul reads the ggml blocks with 2-byte loads (slow, same bits).
 *    int8 -> float uses the exact 2^23 trick (byte_perm into 0x4B0000xx,
 *    then subtract 2^23 + bias) instead of the low-throughput I2F.
 *
 *    Throughput intent (H100/H200): M = 1 is a pure weight stream: 4
 *    warps per block, 64 bytes of weights in flight per lane (U chunks
 *    per row issued before any is used), x read through L1 (it is a few
 *    KiB and shared by every warp of the SM), weights bypassing L1, one
 *    FMA (+ a PRMT and FADD for Q types) per weight element: HBM-bound
 *    for F16/BF16/F32/Q8_0, close to the ALU limit for Q4_0 (~26-37
 *    elements/clk/SM needed). At MT = 4..8 each x load feeds RT FMAs per
 *    element (RT = 4: roughly balanced between L1 and FMA; Q types, RT 2:
 *    L1-bound at about half the FMA rate), so M = 8 should cost about 1-2x
 *    M = 1. Beyond that the kernel is compute-bound on fp32 CUDA cores (at
 *    best ~1/15 of the tensor-core rate): the price of invariance, and
 *    what T trades against.
 *
 * 2. M >= T: cuBLASLt (prefill), loaded with dlopen ($GORGON_CUBLASLT_LIB,
 *    then libcublasLt.so.13, then libcublasLt.so) and resolved symbol by
 *    symbol into lt_api; when that fails (or cublasLtCreate fails) large M
 *    silently uses mm_kernel, and mm_lt_why() says why (kn_cuda_gemm_peak
 *    reports it as its -EOPNOTSUPP message).
 *      F16/BF16 weights: x is rounded to the weight's type into scratch,
 *        GEMM with CUBLAS_COMPUTE_32F, F32 output;
 *      F32 weights: SGEMM, CUBLAS_COMPUTE_32F (no TF32) unless
 *        $GORGON_ALLOW_TF32=1 (read once): CUBLAS_COMPUTE_32F_FAST_TF32;
 *      Q8_0/Q4_0: each row tile of W (at most 64 MiB of f16, a multiple of
 *        256 rows, fixed by N and K) is dequantised to f16 into scratch
 *        (q*d is exact in f32, then rounded to f16), then the F16 GEMM.
 *    Layouts: cuBLASLt is column-major. W (N x K row-major, ld K) is the
 *    column-major K x N matrix Wᵀ; x (M x K row-major) is the column-major
 *    K x M matrix xᵀ; y (M x N row-major) is the column-major N x M matrix
 *    yᵀ. yᵀ = (x·Wᵀ)ᵀ = W·xᵀ, so D(N x M, ld N) = op(A)·B with A = the
 *    K x N view of W (ld K) under CUBLAS_OP_T and B = the K x M view of x
 *    (ld K) under CUBLAS_OP_N: the "TN" GEMM, both operands K-contiguous.
 *    A row tile n0.. of W is A + n0*K with D = y + n0 (ld still N).
 *    Algorithm: cublasLtMatmulAlgoGetHeuristic once per (gemm type, tile
 *    rows, K, ld) at a fixed M bucket (max(T, 2048)), with no workspace
 *    allowed and the results filtered to SPLITK_NUM <= 1 and reduction
 *    scheme NONE ("dot product performed in one sequence"); the algorithm
 *    is cached and used for every M >= T. Without workspace no split-K /
 *    stream-K fix-up across CTAs is possible, so each output element is
 *    one CTA's K loop, whose order depends on the algorithm and K, not on
 *    M or on the tile's position. Consequences:
 *      - for M >= T a row's bits are the same whatever M >= T (and
 *        whichever rows share the call), as long as the cached algorithm
 *        accepts that M; if cublasLtMatmul ever rejects it
 *        (NOT_SUPPORTED / INVALID_VALUE / ARCH_MISMATCH / ALLOC_FAILED),
 *        that shape is switched to mm_kernel for good (that call
 *        included), and when the scratch cannot be had the call runs
 *        mm_kernel: both keep every row correct but end the M >= T
 *        bit-invariance for that shape/call;
 *      - rows computed at M < T and at M >= T differ (different
 *        engines, and F16/BF16 rounding of x on the cuBLASLt side):
 *        continuous batching that crosses T changes the bits of a row;
 *      - the guarantee rests on cuBLASLt's kernels (same algorithm, no
 *        split-K => same per-element order); a test should check it
 *        (same row at M = T and M = 2T + 3).
 *    Pointer alignment never changes the algorithm: B and D are moved
 *    through 16-byte aligned scratch when x or y are not (the heuristic is
 *    asked for 16-byte alignment); weights whose rows or base are not
 *    16-byte aligned, and N % 4 != 0, stay on mm_kernel for every M.
 *
 * matmul_multi: n weights of one dtype and width at M < T run as one fused
 * launch of mm_kernel (same bits as separate calls, by the order above);
 * otherwise as n matmul calls.
 *
 * Per-ctx state (KN_CUDA_MOD_MM): the cuBLASLt handle, two matmul
 * descriptors and the shape cache. Device scratch (KN_CUDA_SCRATCH_MM):
 * the converted x, the dequantised weight tile and the temporary D.
 * Assumes weight data is at least element-aligned (2 bytes for
 * F16/BF16/Q8_0/Q4_0, 4 for F32), as GGUF and kn_cuda_alloc give. */
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmath>

/* kn.h has no extern "C" of its own and kn_cuda.h includes it outside its
 * block: declare its functions (kn_dtype_name) with C linkage first. */
extern "C" {
#include "kernels/kn.h"
}
#include "kernels/cuda/kn_cuda.h"

#define MM_WARPS 4 /* warps per block of mm_kernel */
#define MM_THREADS (MM_WARPS * 32)
#define MM_MULTI 4 /* largest n of matmul_multi (kn.h) */
#define MM_QK 32   /* elements per ggml block */

#define MM_HD __host__ __device__ __forceinline__
#ifdef __CUDA_ARCH__ /* the host compiler does not know the pragma */
#define MM_UNROLL _Pragma("unroll")
#else
#define MM_UNROLL
#endif

/* ---- arithmetic and loads (host versions let tests replay a warp) --------- */

MM_HD float mm_fma(float a, float b, float c)
{
#ifdef __CUDA_ARCH__
    return __fmaf_rn(a, b, c);
#else
    return std::fma(a, b, c);
#endif
}

MM_HD float mm_add(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

MM_HD float mm_sub(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

MM_HD float mm_mul(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

MM_HD float mm_u2f(uint32_t u)
{
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

/* Byte n of the result = byte (s >> 4n) & 7 of {y:x} (x = bytes 0-3). */
MM_HD uint32_t mm_perm(uint32_t x, uint32_t y, uint32_t s)
{
#ifdef __CUDA_ARCH__
    return __byte_perm(x, y, s);
#else
    const uint64_t v = ((uint64_t)y << 32) | x;
    uint32_t r = 0;
    for (int n = 0; n < 4; n++)
        r |= (uint32_t)((v >> (8 * ((s >> (4 * n)) & 7))) & 0xff) << (8 * n);
    return r;
#endif
}

MM_HD float mm_h2f(uint32_t h) /* f16 bits (low 16) -> float, exact */
{
#ifdef __CUDA_ARCH__
    return __half2float(__ushort_as_half((unsigned short)h));
#else
    const uint32_t sign = (h & 0x8000u) << 16, ex = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (ex == 0x1f)
        return mm_u2f(sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0));
    if (ex == 0) {
        const float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    return mm_u2f(sign | ((ex + 112) << 23) | (man << 13));
#endif
}

MM_HD float mm_bf2f(uint32_t h) /* bf16 bits (low 16) -> float, exact */
{
    return mm_u2f((h & 0xffffu) << 16);
}

/* 16 bytes of weights, read once: keep them out of L1 (x lives there). */
MM_HD uint4 mm_ldw(const uint8_t *p)
{
    uint4 v;
#ifdef __CUDA_ARCH__
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
#else
    memcpy(&v, p, 16);
#endif
    return v;
}

MM_HD float4 mm_ldx4(const float *p) /* 16-byte aligned */
{
#ifdef __CUDA_ARCH__
    return __ldg((const float4 *)p);
#else
    float4 v;
    memcpy(&v, p, 16);
    return v;
#endif
}

MM_HD float mm_ldf(const float *p)
{
#ifdef __CUDA_ARCH__
    return __ldg(p);
#else
    return *p;
#endif
}

MM_HD uint32_t mm_ldh(const uint16_t *p)
{
#ifdef __CUDA_ARCH__
    return __ldg((const unsigned short *)p);
#else
    return *p;
#endif
}

MM_HD uint32_t mm_ldu(const uint32_t *p)
{
#ifdef __CUDA_ARCH__
    return __ldg((const unsigned int *)p);
#else
    return *p;
#endif
}

MM_HD int64_t mm_min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

/* ---- kernel arguments ------------------------------------------------------ */

/* One weight as mm_kernel reads it. */
struct mm_src {
    const uint8_t *w;   /* F types: data; Q packed: quants; Q ggml: data */
    const uint16_t *d;  /* Q packed: f16 scales [N][K/32]; else NULL */
    float *y;           /* [M][n] */
    int64_t n;          /* rows */
    int64_t blk0;       /* first grid block of this weight */
};

/* One launch: up to MM_MULTI weights sharing x and K. Blocks of weight i
 * are [w[i].blk0, w[i+1].blk0); inside them the group of MT rows of x
 * varies fastest. */
struct mm_launch {
    mm_src w[MM_MULTI];
    int nw;
    const float *x; /* [M][K] */
    int64_t M, K;
    int64_t groups; /* ceil(M / MT) */
};

/* A chunk of one weight row in registers: the same words whichever layout
 * it came from, so the arithmetic below is shared. */
template <int NW> struct mm_raw {
    uint32_t v[NW];
    uint32_t d; /* Q: f16 scale bits */
};

/* ---- dtypes: how a chunk is loaded and turned into 4-element floats ------ *
 * V: elements per chunk; NW: raw words; CB: weight bytes per chunk (for the
 * in-flight budget); SCALED: block partial + scale; TAIL: K need not be a
 * multiple of V. load<true> reads the aligned layout (data rows for F
 * types, the packed copy for Q types) with 16-byte loads; load<false>
 * reads data (ggml blocks for Q types) element by element. sub(r, s, w):
 * elements 4s..4s+3 of the chunk. */

struct mm_l_f32 {
    static constexpr int V = 4, NW = 4, CB = 16;
    static constexpr bool SCALED = false, TAIL = true;
    template <bool FAST>
    MM_HD static mm_raw<NW> load(const mm_src &s, int64_t K, int64_t row, int64_t j)
    {
        mm_raw<NW> r = {};
        const int64_t c = row * K + j * V;
        if (FAST) {
            const uint4 u = mm_ldw(s.w + c * 4);
            r.v[0] = u.x, r.v[1] = u.y, r.v[2] = u.z, r.v[3] = u.w;
        } else {
            MM_UNROLL
            for (int e = 0; e < V; e++)
                r.v[e] = mm_ldu((const uint32_t *)s.w + c + e);
        }
        return r;
    }
    MM_HD static void sub(const mm_raw<NW> &r, int, float (&w)[4])
    {
        MM_UNROLL
        for (int e = 0; e < 4; e++)
            w[e] = mm_u2f(r.v[e]);
    }
    MM_HD static float elem(const mm_src &s, int64_t K, int64_t row, int64_t c)
    {
        return mm_u2f(mm_ldu((const uint32_t *)s.w + row * K + c));
    }
    MM_HD static float scale(const mm_raw<NW> &)
    {
        return 1.0f;
    }
};

template <bool BF> struct mm_l_16 { /* F16 (BF false) and BF16 (BF true) */
    static constexpr int V = 8, NW = 4, CB = 16;
    static constexpr bool SCALED = false, TAIL = true;
    MM_HD static float cvt(uint32_t h)
    {
        return BF ? mm_bf2f(h) : mm_h2f(h);
    }
    template <bool FAST>
    MM_HD static mm_raw<NW> load(const mm_src &s, int64_t K, int64_t row, int64_t j)
    {
        mm_raw<NW> r = {};
        const int64_t c = row * K + j * V;
        if (FAST) {
            const uint4 u = mm_ldw(s.w + c * 2);
            r.v[0] = u.x, r.v[1] = u.y, r.v[2] = u.z, r.v[3] = u.w;
        } else {
            const uint16_t *h = (const uint16_t *)s.w + c;
            MM_UNROLL
            for (int e = 0; e < NW; e++)
                r.v[e] = mm_ldh(h + 2 * e) | mm_ldh(h + 2 * e + 1) << 16;
        }
        return r;
    }
    MM_HD static void sub(const mm_raw<NW> &r, int s, float (&w)[4])
    {
        /* little-endian: element 2i is the low half of word i */
        w[0] = cvt(r.v[2 * s] & 0xffffu);
        w[1] = cvt(r.v[2 * s] >> 16);
        w[2] = cvt(r.v[2 * s + 1] & 0xffffu);
        w[3] = cvt(r.v[2 * s + 1] >> 16);
    }
    MM_HD static float elem(const mm_src &s, int64_t K, int64_t row, int64_t c)
    {
        return cvt(mm_ldh((const uint16_t *)s.w + row * K + c));
    }
    MM_HD static float scale(const mm_raw<NW> &)
    {
        return 1.0f;
    }
};

/* 4 bytes of x -> 4 floats (byte e + 0x4B000000 is 2^23 + byte, exact). */
MM_HD void mm_bytes_f(uint32_t x, float bias, float (&w)[4])
{
    MM_UNROLL
    for (int e = 0; e < 4; e++)
        w[e] = mm_sub(mm_u2f(mm_perm(x, 0x4B000000u, 0x7440u + (uint32_t)e)), bias);
}

struct mm_l_q8 {
    static constexpr int V = MM_QK, NW = 8, CB = 32;
    static constexpr bool SCALED = true, TAIL = false;
    template <bool FAST>
    MM_HD static mm_raw<NW> load(const mm_src &s, int64_t K, int64_t row, int64_t j)
    {
        mm_raw<NW> r = {};
        const int64_t b = row * (K / MM_QK) + j; /* block index in the matrix */
        if (FAST) {
            const uint4 u0 = mm_ldw(s.w + b * 32), u1 = mm_ldw(s.w + b * 32 + 16);
            r.v[0] = u0.x, r.v[1] = u0.y, r.v[2] = u0.z, r.v[3] = u0.w;
            r.v[4] = u1.x, r.v[5] = u1.y, r.v[6] = u1.z, r.v[7] = u1.w;
            r.d = mm_ldh(s.d + b);
        } else { /* ggml: f16 d, then 32 int8, 34 bytes, 2-byte aligned */
            const uint16_t *h = (const uint16_t *)(s.w + b * 34);
            r.d = mm_ldh(h);
            MM_UNROLL
            for (int e = 0; e < NW; e++)
                r.v[e] = mm_ldh(h + 1 + 2 * e) | mm_ldh(h + 2 + 2 * e) << 16;
        }
        return r;
    }
    MM_HD static void sub(const mm_raw<NW> &r, int s, float (&w)[4])
    {
        /* int8 -> offset binary (q + 128), then 2^23 + q + 128 - (2^23 + 128) */
        mm_bytes_f(r.v[s] ^ 0x80808080u, 8388736.0f, w);
    }
    MM_HD static float elem(const mm_src &, int64_t, int64_t, int64_t)
    {
        return 0.0f; /* K % 32 == 0: never called */
    }
    MM_HD static float scale(const mm_raw<NW> &r)
    {
        return mm_h2f(r.d);
    }
};

struct mm_l_q4 {
    static constexpr int V = MM_QK, NW = 4, CB = 16;
    static constexpr bool SCALED = true, TAIL = false;
    template <bool FAST>
    MM_HD static mm_raw<NW> load(const mm_src &s, int64_t K, int64_t row, int64_t j)
    {
        mm_raw<NW> r = {};
        const int64_t b = row * (K / MM_QK) + j;
        if (FAST) {
            const uint4 u = mm_ldw(s.w + b * 16);
            r.v[0] = u.x, r.v[1] = u.y, r.v[2] = u.z, r.v[3] = u.w;
            r.d = mm_ldh(s.d + b);
        } else { /* ggml: f16 d, then 16 nibble bytes, 18 bytes */
            const uint16_t *h = (const uint16_t *)(s.w + b * 18);
            r.d = mm_ldh(h);
            MM_UNROLL
            for (int e = 0; e < NW; e++)
                r.v[e] = mm_ldh(h + 1 + 2 * e) | mm_ldh(h + 2 + 2 * e) << 16;
        }
        return r;
    }
    MM_HD static void sub(const mm_raw<NW> &r, int s, float (&w)[4])
    {
        /* elements 0..15: low nibbles of bytes 0..15; 16..31: high nibbles */
        const uint32_t n = s < 4 ? r.v[s] & 0x0F0F0F0Fu : (r.v[s - 4] >> 4) & 0x0F0F0F0Fu;
        mm_bytes_f(n, 8388616.0f, w); /* 2^23 + n - (2^23 + 8) = n - 8 */
    }
    MM_HD static float elem(const mm_src &, int64_t, int64_t, int64_t)
    {
        return 0.0f;
    }
    MM_HD static float scale(const mm_raw<NW> &r)
    {
        return mm_h2f(r.d);
    }
};

/* ---- the invariant kernel ---------------------------------------------- */

template <bool FAST> MM_HD float4 mm_ldx(const float *p)
{
    if (FAST)
        return mm_ldx4(p);
    return make_float4(mm_ldf(p), mm_ldf(p + 1), mm_ldf(p + 2), mm_ldf(p + 3));
}

/* Chunk j of RT weight rows against MT rows of x, in the order of the top
 * comment. */
template <class L, bool FAST, int MT, int RT>
MM_HD void mm_chunk(const mm_raw<L::NW> (&raw)[RT], const float *const (&xr)[MT], int64_t j,
                    float (&acc)[MT][RT])
{
    float p[MT][RT];
    MM_UNROLL
    for (int m = 0; m < MT; m++)
        MM_UNROLL
        for (int r = 0; r < RT; r++)
            p[m][r] = 0.0f;
    MM_UNROLL
    for (int s = 0; s < L::V / 4; s++) {
        float w[RT][4];
        MM_UNROLL
        for (int r = 0; r < RT; r++)
            L::sub(raw[r], s, w[r]);
        MM_UNROLL
        for (int m = 0; m < MT; m++) {
            const float4 xv = mm_ldx<FAST>(xr[m] + j * L::V + 4 * s);
            MM_UNROLL
            for (int r = 0; r < RT; r++) {
                float t = L::SCALED ? p[m][r] : acc[m][r];
                t = mm_fma(w[r][0], xv.x, t);
                t = mm_fma(w[r][1], xv.y, t);
                t = mm_fma(w[r][2], xv.z, t);
                t = mm_fma(w[r][3], xv.w, t);
                if (L::SCALED)
                    p[m][r] = t;
                else
                    acc[m][r] = t;
            }
        }
    }
    if (L::SCALED) {
        MM_UNROLL
        for (int r = 0; r < RT; r++) {
            const float d = L::scale(raw[r]);
            MM_UNROLL
            for (int m = 0; m < MT; m++)
                acc[m][r] = mm_fma(d, p[m][r], acc[m][r]);
        }
    }
}

struct mm_pos {
    int wi;         /* weight of the launch */
    int64_t m0, r0; /* first row of x, first weight row */
};

/* Which weight, rows of x and weight rows warp `warp` of block `bid` owns;
 * false when its rows are past the weight's end. */
template <int MT, int RT>
MM_HD bool mm_locate(const mm_launch &a, int64_t bid, int warp, mm_pos &p)
{
    int wi = 0;
    MM_UNROLL
    for (int i = 1; i < MM_MULTI; i++)
        if (i < a.nw && bid >= a.w[i].blk0)
            wi = i;
    mm_src s = a.w[0];
    MM_UNROLL
    for (int i = 1; i < MM_MULTI; i++)
        if (i == wi)
            s = a.w[i];
    const int64_t local = bid - s.blk0;
    p.wi = wi;
    p.m0 = local % a.groups * MT;
    p.r0 = (local / a.groups * MM_WARPS + warp) * RT;
    return p.r0 < s.n;
}

MM_HD mm_src mm_pick_src(const mm_launch &a, int wi)
{
    mm_src s = a.w[0];
    MM_UNROLL
    for (int i = 1; i < MM_MULTI; i++)
        if (i == wi)
            s = a.w[i];
    return s;
}

/* One lane's partial sums acc[m][r] for rows m0+m of x and r0+r of W
 * (rows past the end are clamped: computed, never stored). */
template <class L, bool FAST, int MT, int RT>
MM_HD void mm_lane(const mm_launch &a, const mm_src &s, const mm_pos &p, int lane,
                   float (&acc)[MT][RT])
{
    /* chunks in flight per row and lane: about 64 bytes of weights */
    constexpr int U = L::CB * RT >= 64 ? 1 : 64 / (L::CB * RT);
    const int64_t K = a.K;
    int64_t rows[RT];
    MM_UNROLL
    for (int r = 0; r < RT; r++)
        rows[r] = mm_min64(p.r0 + r, s.n - 1);
    const float *xr[MT];
    MM_UNROLL
    for (int m = 0; m < MT; m++) {
        xr[m] = a.x + mm_min64(p.m0 + m, a.M - 1) * K;
        MM_UNROLL
        for (int r = 0; r < RT; r++)
            acc[m][r] = 0.0f;
    }
    const int64_t nch = K / L::V; /* whole chunks */
    for (int64_t j0 = lane; j0 < nch; j0 += 32 * U) {
        mm_raw<L::NW> raw[U][RT];
        MM_UNROLL
        for (int u = 0; u < U; u++) /* issue every load first */
            MM_UNROLL
            for (int r = 0; r < RT; r++)
                raw[u][r] = j0 + 32 * u < nch ? L::template load<FAST>(s, K, rows[r], j0 + 32 * u)
                                              : mm_raw<L::NW>{};
        MM_UNROLL
        for (int u = 0; u < U; u++)
            if (j0 + 32 * u < nch)
                mm_chunk<L, FAST, MT, RT>(raw[u], xr, j0 + 32 * u, acc);
    }
    if (L::TAIL && !FAST) { /* the partial last chunk, owned by lane nch % 32 */
        const int64_t c0 = nch * L::V;
        if (c0 < K && lane == (int)(nch % 32)) {
            for (int64_t c = c0; c < K; c++) {
                float w[RT];
                MM_UNROLL
                for (int r = 0; r < RT; r++)
                    w[r] = L::elem(s, K, rows[r], c);
                MM_UNROLL
                for (int m = 0; m < MT; m++) {
                    const float xv = mm_ldf(xr[m] + c);
                    MM_UNROLL
                    for (int r = 0; r < RT; r++)
                        acc[m][r] = mm_fma(w[r], xv, acc[m][r]);
                }
            }
        }
    }
}

/* After the butterfly every lane holds every sum; lane m*RT + r stores
 * element (m, r). */
template <int MT, int RT>
MM_HD void mm_store(const mm_launch &a, const mm_src &s, const mm_pos &p, int lane,
                    const float (&acc)[MT][RT])
{
    MM_UNROLL
    for (int m = 0; m < MT; m++)
        MM_UNROLL
        for (int r = 0; r < RT; r++)
            if (lane == m * RT + r && p.m0 + m < a.M && p.r0 + r < s.n)
                s.y[(p.m0 + m) * s.n + p.r0 + r] = acc[m][r];
}

template <class L, bool FAST, int MT, int RT>
__global__ void __launch_bounds__(MM_THREADS) mm_kernel(const __grid_constant__ mm_launch a)
{
    static_assert(MT * RT <= 32, "one lane stores each element");
    const int warp = (int)(threadIdx.x >> 5), lane = (int)(threadIdx.x & 31);
    mm_pos p;
    if (!mm_locate<MT, RT>(a, blockIdx.x, warp, p))
        return; /* warp-uniform */
    const mm_src s = mm_pick_src(a, p.wi);
    float acc[MT][RT];
    mm_lane<L, FAST, MT, RT>(a, s, p, lane, acc);
    MM_UNROLL
    for (int m = 0; m < MT; m++)
        MM_UNROLL
        for (int r = 0; r < RT; r++) {
            float v = acc[m][r];
            MM_UNROLL
            for (int o = 16; o > 0; o >>= 1)
                v = mm_add(v, __shfl_xor_sync(0xffffffffu, v, o));
            acc[m][r] = v;
        }
    mm_store<MT, RT>(a, s, p, lane, acc);
}

/* (MT, RT) per configuration, for F types [0] and Q types [1] (whose
 * block partials double the accumulators); generic (unaligned) launches
 * use configurations 0 and 4 only. */
static const struct {
    int mt, rt;
} MM_CFG[2][5] = {{{1, 1}, {1, 2}, {2, 2}, {4, 4}, {8, 4}},
                  {{1, 1}, {1, 2}, {2, 2}, {4, 2}, {8, 2}}};

typedef void (*mm_kfn)(mm_launch);

template <class L> static mm_kfn mm_kernel_for(bool fast, int cfg)
{
    constexpr int R = L::SCALED ? 2 : 4; /* RT of configurations 3 and 4 */
    if (!fast)
        return cfg == 0 ? mm_kernel<L, false, 1, 1> : mm_kernel<L, false, 8, R>;
    switch (cfg) {
    case 0:
        return mm_kernel<L, true, 1, 1>;
    case 1:
        return mm_kernel<L, true, 1, 2>;
    case 2:
        return mm_kernel<L, true, 2, 2>;
    case 3:
        return mm_kernel<L, true, 4, R>;
    default:
        return mm_kernel<L, true, 8, R>;
    }
}

static mm_kfn mm_kernel_pick(enum kn_dtype t, bool fast, int cfg)
{
    switch (t) {
    case KN_F32:
        return mm_kernel_for<mm_l_f32>(fast, cfg);
    case KN_F16:
        return mm_kernel_for<mm_l_16<false>>(fast, cfg);
    case KN_BF16:
        return mm_kernel_for<mm_l_16<true>>(fast, cfg);
    case KN_Q8_0:
        return mm_kernel_for<mm_l_q8>(fast, cfg);
    case KN_Q4_0:
        return mm_kernel_for<mm_l_q4>(fast, cfg);
    }
    return NULL;
}

/* ---- packed Q layout ----------------------------------------------------- */

static bool mm_is_q(enum kn_dtype t)
{
    return t == KN_Q8_0 || t == KN_Q4_0;
}

static size_t mm_align256(size_t n)
{
    return (n + 255) & ~(size_t)255;
}

/* Bytes of the packed quants (rounded to 256; the scales follow) and of the
 * whole packed copy. */
static void mm_packed_size(const kn_tensor *w, size_t *quants, size_t *total)
{
    const size_t nb = (size_t)w->rows * (size_t)(w->cols / MM_QK);
    *quants = mm_align256(nb * (w->type == KN_Q8_0 ? 32 : 16));
    *total = *quants + nb * 2;
}

/* ggml blocks -> packed: block i (row i / (K/32), block i % (K/32)) is at
 * src + i*bs and goes to q + i*qb and d[i]. */
template <bool Q8>
MM_HD void mm_repack_block(const uint8_t *src, int64_t i, uint8_t *q, uint16_t *d)
{
    constexpr int bs = Q8 ? 34 : 18, qb = Q8 ? 32 : 16;
    const uint16_t *h = (const uint16_t *)(src + i * bs);
    d[i] = h[0];
    uint4 *o = (uint4 *)(q + i * qb);
    MM_UNROLL
    for (int k = 0; k < qb / 16; k++) {
        uint32_t v[4];
        MM_UNROLL
        for (int e = 0; e < 4; e++)
            v[e] = (uint32_t)h[1 + 8 * k + 2 * e] | (uint32_t)h[2 + 8 * k + 2 * e] << 16;
        o[k] = make_uint4(v[0], v[1], v[2], v[3]);
    }
}

template <bool Q8>
__global__ void mm_repack(const uint8_t *src, int64_t nb, uint8_t *q, uint16_t *d)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < nb;
         i += (int64_t)gridDim.x * blockDim.x)
        mm_repack_block<Q8>(src, i, q, d);
}

/* Block i of rows [n0, n0 + nt) of a Q weight -> f16 in o [nt][K] (q*d is
 * exact in f32, then rounded to nearest even). */
template <class L, bool PACKED>
MM_HD void mm_dequant_block(const mm_src &s, int64_t K, int64_t n0, int64_t i, __half *o)
{
    const int64_t bpr = K / MM_QK, r = i / bpr, b = i % bpr;
    const mm_raw<L::NW> raw = L::template load<PACKED>(s, K, n0 + r, b);
    const float d = L::scale(raw);
    uint2 *dst = (uint2 *)(o + r * K + b * MM_QK);
    MM_UNROLL
    for (int k = 0; k < MM_QK / 4; k++) {
        float w[4];
        L::sub(raw, k, w);
        const __half2 lo = __floats2half2_rn(mm_mul(w[0], d), mm_mul(w[1], d));
        const __half2 hi = __floats2half2_rn(mm_mul(w[2], d), mm_mul(w[3], d));
        uint2 v;
        memcpy(&v.x, &lo, 4);
        memcpy(&v.y, &hi, 4);
        dst[k] = v;
    }
}

template <class L, bool PACKED>
__global__ void mm_dequant_f16(const __grid_constant__ mm_src s, int64_t K, int64_t n0, int64_t nt,
                               __half *o)
{
    const int64_t nb = nt * (K / MM_QK);
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < nb;
         i += (int64_t)gridDim.x * blockDim.x)
        mm_dequant_block<L, PACKED>(s, K, n0, i, o);
}

MM_HD void mm_from_f32(float f, __half *o)
{
    *o = __float2half_rn(f);
}

MM_HD void mm_from_f32(float f, __nv_bfloat16 *o)
{
    *o = __float2bfloat16_rn(f);
}

MM_HD void mm_from_f32(float f, float *o)
{
    *o = f;
}

template <class T> __global__ void mm_convert(const float *x, T *o, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        mm_from_f32(x[i], o + i);
}

/* Finite values in [-0.5, 0.5) for the benchmark operands. */
template <class T> __global__ void mm_fill(T *o, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const uint32_t h = (uint32_t)i * 2654435761u;
        mm_from_f32((float)(int)(h >> 22) * (1.0f / 1024.0f) - 0.5f, o + i);
    }
}

/* Blocks for a grid-stride kernel over n items. */
static unsigned mm_grid(kn_cuda *cu, int64_t n, int threads)
{
    int64_t b = (n + threads - 1) / threads, cap = (int64_t)kn_cuda_sm_count(cu) * 32;
    if (cap < 1)
        cap = 1024;
    return (unsigned)(b < 1 ? 1 : b < cap ? b : cap);
}

/* ---- environment --------------------------------------------------------- */

struct mm_env {
    int64_t min_m; /* T; 0: never cuBLASLt */
    bool tf32;
};

static mm_env mm_env_read(void)
{
    mm_env e = {512, false};
    const char *s = getenv("GORGON_CUDA_GEMM_MIN_M");
    if (s && *s) {
        char *end = NULL;
        long long v = strtoll(s, &end, 10);
        if (end && *end == '\0' && v >= 0)
            e.min_m = v;
    }
    s = getenv("GORGON_ALLOW_TF32");
    e.tf32 = s && strcmp(s, "1") == 0;
    return e;
}

static const mm_env &mm_env_get(void)
{
    static const mm_env e = mm_env_read(); /* once, thread-safe (C++11) */
    return e;
}

static bool mm_wants_lt(int64_t M)
{
    const int64_t t = mm_env_get().min_m;
    return t > 0 && M >= t;
}

/* ---- the invariant path: launch -------------------------------------------- */

/* Whether w can be streamed with 16-byte loads (the packed copy for Q). */
static bool mm_fast_weight(const kn_tensor *w)
{
    const bool a16 = (uintptr_t)w->data % 16 == 0;
    switch (w->type) {
    case KN_F32:
        return a16 && w->cols % 4 == 0;
    case KN_F16:
    case KN_BF16:
        return a16 && w->cols % 8 == 0;
    case KN_Q8_0:
    case KN_Q4_0:
        return w->packed != NULL;
    }
    return false;
}

static mm_src mm_src_of(const kn_tensor *w, bool fast)
{
    mm_src s = {};
    if (fast && mm_is_q(w->type)) {
        size_t quants, total;
        mm_packed_size(w, &quants, &total);
        s.w = (const uint8_t *)w->packed;
        s.d = (const uint16_t *)(s.w + quants);
    } else {
        s.w = (const uint8_t *)w->data;
    }
    s.n = w->rows;
    return s;
}

/* (MT, RT) from M and the rows of the launch: bits do not depend on it. */
static int mm_config(enum kn_dtype t, int64_t M, int64_t rows, int sms)
{
    if (M == 1) /* two rows a warp when that still leaves 32 warps an SM;
                 * Q4_0 always, to halve its x traffic per weight byte */
        return t == KN_Q4_0 || rows >= (int64_t)(sms > 0 ? sms : 132) * 64 ? 1 : 0;
    if (M == 2)
        return 2;
    return M <= 4 ? 3 : 4;
}

/* matmul(w[i], x, M, y[i]) for i < nw with mm_kernel; every w[i] has the
 * type and cols of w[0]. */
static int mm_invariant(kn_cuda *cu, int nw, const kn_tensor *const *w, const float *x,
                        int64_t M, float *const *y, const char *op)
{
    const enum kn_dtype t = w[0]->type;
    const int64_t K = w[0]->cols;
    bool fast = (uintptr_t)x % 16 == 0;
    int64_t rows = 0;
    for (int i = 0; i < nw; i++) {
        fast = fast && mm_fast_weight(w[i]);
        rows += w[i]->rows;
    }
    int cfg = mm_config(t, M, rows, kn_cuda_sm_count(cu));
    if (!fast)
        cfg = M == 1 ? 0 : 4;
    const int qc = mm_is_q(t) ? 1 : 0;
    const int64_t mt = MM_CFG[qc][cfg].mt, rpb = (int64_t)MM_WARPS * MM_CFG[qc][cfg].rt;
    const mm_kfn fn = mm_kernel_pick(t, fast, cfg);
    int64_t rb[MM_MULTI], per_group = 0;
    for (int i = 0; i < nw; i++) {
        rb[i] = (w[i]->rows + rpb - 1) / rpb;
        per_group += rb[i];
    }
    if (!fn || per_group > INT32_MAX)
        return kn_cuda_fail(cu, -EINVAL, "%s: unsupported weight (%s, %lld rows)", op,
                            kn_dtype_name(t), (long long)rows);
    cudaStream_t stream = (cudaStream_t)kn_cuda_stream(cu);
    const int64_t groups = (M + mt - 1) / mt, gmax = INT32_MAX / per_group;
    for (int64_t g0 = 0; g0 < groups; g0 += gmax) { /* one launch unless M is huge */
        const int64_t ng = mm_min64(gmax, groups - g0), m0 = g0 * mt;
        mm_launch a = {};
        a.nw = nw;
        a.x = x + m0 * K;
        a.M = mm_min64(M - m0, ng * mt);
        a.K = K;
        a.groups = ng;
        int64_t blk = 0;
        for (int i = 0; i < nw; i++) {
            a.w[i] = mm_src_of(w[i], fast);
            a.w[i].y = y[i] + m0 * w[i]->rows;
            a.w[i].blk0 = blk;
            blk += ng * rb[i];
        }
        fn<<<(unsigned)blk, MM_THREADS, 0, stream>>>(a);
    }
    return kn_cuda_check(cu, op);
}

/* ---- cuBLASLt: loading ------------------------------------------------------ */

struct lt_api {
    decltype(&cublasLtCreate) Create;
    decltype(&cublasLtDestroy) Destroy;
    decltype(&cublasLtGetStatusString) GetStatusString;
    decltype(&cublasLtMatmulDescCreate) MatmulDescCreate;
    decltype(&cublasLtMatmulDescDestroy) MatmulDescDestroy;
    decltype(&cublasLtMatmulDescSetAttribute) MatmulDescSetAttribute;
    decltype(&cublasLtMatrixLayoutCreate) MatrixLayoutCreate;
    decltype(&cublasLtMatrixLayoutDestroy) MatrixLayoutDestroy;
    decltype(&cublasLtMatrixLayoutSetAttribute) MatrixLayoutSetAttribute;
    decltype(&cublasLtMatmulPreferenceCreate) PreferenceCreate;
    decltype(&cublasLtMatmulPreferenceDestroy) PreferenceDestroy;
    decltype(&cublasLtMatmulPreferenceSetAttribute) PreferenceSetAttribute;
    decltype(&cublasLtMatmulAlgoGetHeuristic) AlgoGetHeuristic;
    decltype(&cublasLtMatmulAlgoConfigGetAttribute) AlgoConfigGetAttribute;
    decltype(&cublasLtMatmul) Matmul;
};

static char lt_load_why[256]; /* why lt_get() is NULL; written once */

static bool lt_open(lt_api *api)
{
    const char *names[3] = {getenv("GORGON_CUBLASLT_LIB"), "libcublasLt.so.13", "libcublasLt.so"};
    void *lib = NULL;
    for (int i = 0; i < 3 && !lib; i++) {
        if (!names[i] || !*names[i])
            continue;
        lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (!lib) {
            const char *e = dlerror();
            snprintf(lt_load_why, sizeof lt_load_why, "dlopen %s: %s", names[i], e ? e : "failed");
        }
    }
    if (!lib)
        return false;
#define LT_SYM(field, name)                                                                      \
    do {                                                                                         \
        void *sym_ = dlsym(lib, #name);                                                          \
        if (!sym_) {                                                                             \
            snprintf(lt_load_why, sizeof lt_load_why, "cuBLASLt has no symbol %s", #name);       \
            dlclose(lib);                                                                        \
            return false;                                                                        \
        }                                                                                        \
        api->field = reinterpret_cast<decltype(api->field)>(sym_);                               \
    } while (0)
    LT_SYM(Create, cublasLtCreate);
    LT_SYM(Destroy, cublasLtDestroy);
    LT_SYM(GetStatusString, cublasLtGetStatusString);
    LT_SYM(MatmulDescCreate, cublasLtMatmulDescCreate);
    LT_SYM(MatmulDescDestroy, cublasLtMatmulDescDestroy);
    LT_SYM(MatmulDescSetAttribute, cublasLtMatmulDescSetAttribute);
    LT_SYM(MatrixLayoutCreate, cublasLtMatrixLayoutCreate);
    LT_SYM(MatrixLayoutDestroy, cublasLtMatrixLayoutDestroy);
    LT_SYM(MatrixLayoutSetAttribute, cublasLtMatrixLayoutSetAttribute);
    LT_SYM(PreferenceCreate, cublasLtMatmulPreferenceCreate);
    LT_SYM(PreferenceDestroy, cublasLtMatmulPreferenceDestroy);
    LT_SYM(PreferenceSetAttribute, cublasLtMatmulPreferenceSetAttribute);
    LT_SYM(AlgoGetHeuristic, cublasLtMatmulAlgoGetHeuristic);
    LT_SYM(AlgoConfigGetAttribute, cublasLtMatmulAlgoConfigGetAttribute);
    LT_SYM(Matmul, cublasLtMatmul);
#undef LT_SYM
    return true; /* the library stays loaded for the process */
}

/* The process-wide table, loaded on first use; NULL when unavailable. */
static const lt_api *lt_get(void)
{
    static lt_api api;
    static const bool ok = lt_open(&api);
    return ok ? &api : NULL;
}

/* ---- cuBLASLt: per-ctx state and the shape cache ---------------------------- */

enum { GT_F16 = 0, GT_BF16, GT_F32, GT_TF32 };

static cudaDataType_t gt_type(int gt)
{
    return gt == GT_F16 ? CUDA_R_16F : gt == GT_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

static size_t gt_size(int gt)
{
    return gt == GT_F16 || gt == GT_BF16 ? 2 : 4;
}

/* The GEMM a weight type runs as; -1 when none. */
static int gt_of(enum kn_dtype t)
{
    switch (t) {
    case KN_F16:
    case KN_Q8_0:
    case KN_Q4_0:
        return GT_F16;
    case KN_BF16:
        return GT_BF16;
    case KN_F32:
        return mm_env_get().tf32 ? GT_TF32 : GT_F32;
    }
    return -1;
}

/* One GEMM shape: D (n x M, ld ldd) = A (k x n)ᵀ · B (k x M). */
struct lt_shape {
    int gt;
    int64_t n, k, ldd;
    bool ok; /* an algorithm with no split-K and no workspace was found */
    cublasLtMatmulAlgo_t algo;
    cublasLtMatrixLayout_t a, b, d; /* b and d: columns set per call */
};

struct mm_state {
    bool lt_tried;
    cublasLtHandle_t lt;           /* NULL: cuBLASLt unusable on this ctx */
    cublasLtMatmulDesc_t desc[2];  /* [0] COMPUTE_32F, [1] COMPUTE_32F_FAST_TF32 */
    lt_shape **shapes;
    size_t n_shapes, cap_shapes;
    char why[192];                 /* why lt is NULL after lt_tried */
};

static void lt_shape_free(const lt_api *api, lt_shape *e)
{
    if (!e)
        return;
    if (api) {
        if (e->a)
            api->MatrixLayoutDestroy(e->a);
        if (e->b)
            api->MatrixLayoutDestroy(e->b);
        if (e->d)
            api->MatrixLayoutDestroy(e->d);
    }
    free(e);
}

static void mm_state_fini(kn_cuda *cu, void *p)
{
    (void)cu;
    mm_state *st = (mm_state *)p;
    if (!st)
        return;
    const lt_api *api = lt_get();
    for (size_t i = 0; i < st->n_shapes; i++)
        lt_shape_free(api, st->shapes[i]);
    free(st->shapes);
    if (api) {
        for (int i = 0; i < 2; i++)
            if (st->desc[i])
                api->MatmulDescDestroy(st->desc[i]);
        if (st->lt)
            api->Destroy(st->lt);
    }
    free(st);
}

static mm_state *mm_state_of(kn_cuda *cu)
{
    mm_state *st = (mm_state *)kn_cuda_module(cu, KN_CUDA_MOD_MM);
    if (st)
        return st;
    st = (mm_state *)calloc(1, sizeof *st);
    if (st)
        kn_cuda_set_module(cu, KN_CUDA_MOD_MM, st, mm_state_fini);
    return st;
}

/* Why cuBLASLt is not used on this ctx ("" when it is). */
static const char *mm_lt_why(const mm_state *st)
{
    if (!lt_get())
        return lt_load_why;
    if (!st)
        return "out of host memory";
    return st->lt_tried && !st->lt ? st->why : "";
}

/* The table and *st with a live handle and descriptors, or NULL. */
static const lt_api *lt_ready(kn_cuda *cu, mm_state **out)
{
    mm_state *st = mm_state_of(cu);
    *out = st;
    const lt_api *api = lt_get();
    if (!st || !api)
        return NULL;
    if (!st->lt_tried) {
        st->lt_tried = true;
        cublasStatus_t s = api->Create(&st->lt);
        if (s != CUBLAS_STATUS_SUCCESS) {
            st->lt = NULL;
            snprintf(st->why, sizeof st->why, "cublasLtCreate: %s", api->GetStatusString(s));
            return NULL;
        }
        const cublasComputeType_t ct[2] = {CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32};
        const cublasOperation_t opa = CUBLAS_OP_T, opb = CUBLAS_OP_N;
        for (int i = 0; i < 2 && s == CUBLAS_STATUS_SUCCESS; i++) {
            s = api->MatmulDescCreate(&st->desc[i], ct[i], CUDA_R_32F);
            if (s == CUBLAS_STATUS_SUCCESS)
                s = api->MatmulDescSetAttribute(st->desc[i], CUBLASLT_MATMUL_DESC_TRANSA, &opa,
                                                sizeof opa);
            if (s == CUBLAS_STATUS_SUCCESS)
                s = api->MatmulDescSetAttribute(st->desc[i], CUBLASLT_MATMUL_DESC_TRANSB, &opb,
                                                sizeof opb);
        }
        if (s != CUBLAS_STATUS_SUCCESS) {
            for (int i = 0; i < 2; i++)
                if (st->desc[i])
                    api->MatmulDescDestroy(st->desc[i]);
            st->desc[0] = st->desc[1] = NULL;
            api->Destroy(st->lt);
            st->lt = NULL;
            snprintf(st->why, sizeof st->why, "cuBLASLt matmul descriptor: %s",
                     api->GetStatusString(s));
            return NULL;
        }
    }
    return st->lt ? api : NULL;
}

/* Largest power of two <= 256 dividing v (0 counts as 256). */
static uint32_t lt_align_of(uint64_t v)
{
    uint32_t a = 256;
    while (a > 1 && v % a)
        a >>= 1;
    return a;
}

/* The best algorithm that needs no workspace and does not split K, for
 * the layouts as they are; false when there is none. */
static bool lt_pick(const lt_api *api, cublasLtHandle_t lt, cublasLtMatmulDesc_t desc,
                    cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t d,
                    const uint32_t align[4], cublasLtMatmulAlgo_t *algo)
{
    cublasLtMatmulPreference_t pref = NULL;
    if (api->PreferenceCreate(&pref) != CUBLAS_STATUS_SUCCESS)
        return false;
    const uint64_t ws = 0;
    const cublasLtMatmulPreferenceAttributes_t attr[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    bool ok = api->PreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                          sizeof ws) == CUBLAS_STATUS_SUCCESS;
    for (int i = 0; i < 4 && ok; i++)
        ok = api->PreferenceSetAttribute(pref, attr[i], &align[i], sizeof align[i]) ==
             CUBLAS_STATUS_SUCCESS;
    cublasLtMatmulHeuristicResult_t res[16];
    int cnt = 0;
    if (ok)
        ok = api->AlgoGetHeuristic(lt, desc, a, b, d, d, pref, 16, res, &cnt) ==
             CUBLAS_STATUS_SUCCESS;
    api->PreferenceDestroy(pref);
    for (int i = 0; ok && i < cnt; i++) { /* best first */
        if (res[i].state != CUBLAS_STATUS_SUCCESS || res[i].workspaceSize != 0)
            continue;
        int32_t splitk = 0;
        uint32_t red = 0;
        size_t wr = 0;
        if (api->AlgoConfigGetAttribute(&res[i].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk,
                                        sizeof splitk, &wr) != CUBLAS_STATUS_SUCCESS ||
            api->AlgoConfigGetAttribute(&res[i].algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red,
                                        sizeof red, &wr) != CUBLAS_STATUS_SUCCESS)
            continue;
        if (splitk > 1 || red != CUBLASLT_REDUCTION_SCHEME_NONE)
            continue;
        *algo = res[i].algo;
        return true;
    }
    return false;
}

static cublasStatus_t lt_set_cols(const lt_api *api, cublasLtMatrixLayout_t l, int64_t cols)
{
    const uint64_t c = (uint64_t)cols;
    return api->MatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_COLS, &c, sizeof c);
}

/* The cached shape (creating it and choosing its algorithm on first use);
 * NULL when out of host memory. Entries are never moved. */
static lt_shape *lt_shape_get(mm_state *st, const lt_api *api, int gt, int64_t n, int64_t k,
                              int64_t ldd)
{
    for (size_t i = 0; i < st->n_shapes; i++) {
        lt_shape *e = st->shapes[i];
        if (e->gt == gt && e->n == n && e->k == k && e->ldd == ldd)
            return e;
    }
    if (st->n_shapes == st->cap_shapes) {
        const size_t cap = st->cap_shapes ? 2 * st->cap_shapes : 16;
        lt_shape **p = (lt_shape **)realloc(st->shapes, cap * sizeof *p);
        if (!p)
            return NULL;
        st->shapes = p;
        st->cap_shapes = cap;
    }
    lt_shape *e = (lt_shape *)calloc(1, sizeof *e);
    if (!e)
        return NULL;
    e->gt = gt, e->n = n, e->k = k, e->ldd = ldd;
    const int64_t t = mm_env_get().min_m, bucket = t > 2048 ? t : 2048;
    const cudaDataType_t ty = gt_type(gt);
    if (n <= INT32_MAX && k <= INT32_MAX &&
        api->MatrixLayoutCreate(&e->a, ty, (uint64_t)k, (uint64_t)n, k) == CUBLAS_STATUS_SUCCESS &&
        api->MatrixLayoutCreate(&e->b, ty, (uint64_t)k, (uint64_t)bucket, k) ==
            CUBLAS_STATUS_SUCCESS &&
        api->MatrixLayoutCreate(&e->d, CUDA_R_32F, (uint64_t)n, (uint64_t)bucket, ldd) ==
            CUBLAS_STATUS_SUCCESS) {
        const uint32_t align[4] = {16, 16, 16, 16}; /* lt_matmul guarantees 16 */
        e->ok = lt_pick(api, st->lt, st->desc[gt == GT_TF32], e->a, e->b, e->d, align, &e->algo);
    }
    st->shapes[st->n_shapes++] = e;
    return e;
}

/* Whether w's shape and storage can feed cuBLASLt with 16-byte aligned
 * operands (a property of the weight: the same for every M). */
static bool lt_weight_ok(const kn_tensor *w)
{
    if (w->rows % 4 || w->rows > INT32_MAX || w->cols > INT32_MAX)
        return false; /* D's leading dimension N * 4 bytes */
    const bool a16 = (uintptr_t)w->data % 16 == 0;
    switch (w->type) {
    case KN_F16:
    case KN_BF16:
        return a16 && w->cols % 8 == 0;
    case KN_F32:
        return a16 && w->cols % 4 == 0;
    case KN_Q8_0:
    case KN_Q4_0:
        return true; /* dequantised into aligned scratch */
    }
    return false;
}

/* Rows of a Q weight dequantised per GEMM: a function of N and K only. */
static int64_t lt_tile_rows(int64_t N, int64_t K)
{
    const int64_t budget = (int64_t)64 << 20; /* bytes of f16 */
    if (N * K * 2 <= budget)
        return N;
    const int64_t t = budget / (K * 2) / 256 * 256;
    return t < 256 ? 256 : t;
}

/* The shapes of w's GEMMs: full tiles, and the last one when shorter;
 * false when some shape has no usable algorithm. */
static bool lt_shapes(mm_state *st, const lt_api *api, const kn_tensor *w, int gt, lt_shape **full,
                      lt_shape **last, int64_t *nt)
{
    const int64_t N = w->rows, K = w->cols;
    *nt = mm_is_q(w->type) ? lt_tile_rows(N, K) : N;
    *full = lt_shape_get(st, api, gt, *nt, K, N);
    if (!*full || !(*full)->ok)
        return false;
    *last = *full;
    if (N % *nt) {
        *last = lt_shape_get(st, api, gt, N % *nt, K, N);
        if (!*last || !(*last)->ok)
            return false;
    }
    return true;
}

static bool lt_soft(cublasStatus_t s) /* the algorithm refused this call */
{
    return s == CUBLAS_STATUS_NOT_SUPPORTED || s == CUBLAS_STATUS_INVALID_VALUE ||
           s == CUBLAS_STATUS_ARCH_MISMATCH || s == CUBLAS_STATUS_ALLOC_FAILED;
}

/* 0: done; 1: not for cuBLASLt (the caller runs mm_kernel); < 0: error. */
static int lt_matmul(kn_cuda *cu, const kn_tensor *w, const float *x, int64_t M, float *y)
{
    mm_state *st;
    const lt_api *api = lt_ready(cu, &st);
    const int gt = gt_of(w->type);
    if (!api || gt < 0 || M > INT32_MAX || !lt_weight_ok(w))
        return 1;
    lt_shape *full, *last;
    int64_t nt;
    if (!lt_shapes(st, api, w, gt, &full, &last, &nt))
        return 1;
    const int64_t N = w->rows, K = w->cols;
    const bool q = mm_is_q(w->type), cvt = gt == GT_F16 || gt == GT_BF16;
    const bool xcopy = !cvt && (uintptr_t)x % 16 != 0, ytmp = (uintptr_t)y % 16 != 0;
    const size_t off_w = mm_align256(cvt || xcopy ? (size_t)M * K * gt_size(gt) : 0);
    const size_t off_d = off_w + mm_align256(q ? (size_t)nt * K * 2 : 0);
    const size_t total = off_d + (ytmp ? (size_t)M * N * 4 : 0);
    uint8_t *scr = NULL;
    if (total) {
        scr = (uint8_t *)kn_cuda_scratch(cu, KN_CUDA_SCRATCH_MM, total);
        if (!scr)
            return 1; /* memory is short: the path that needs none */
    }
    cudaStream_t stream = (cudaStream_t)kn_cuda_stream(cu);
    const void *B = x;
    if (cvt) {
        const unsigned g = mm_grid(cu, M * K, 256);
        if (gt == GT_F16)
            mm_convert<__half><<<g, 256, 0, stream>>>(x, (__half *)scr, M * K);
        else
            mm_convert<__nv_bfloat16><<<g, 256, 0, stream>>>(x, (__nv_bfloat16 *)scr, M * K);
        B = scr;
    } else if (xcopy) {
        cudaMemcpyAsync(scr, x, (size_t)M * K * 4, cudaMemcpyDeviceToDevice, stream);
        B = scr;
    }
    float *D = ytmp ? (float *)(scr + off_d) : y;
    const bool packed = w->packed != NULL;
    for (int64_t n0 = 0; n0 < N; n0 += nt) {
        const int64_t rows = mm_min64(nt, N - n0);
        lt_shape *e = rows == nt ? full : last;
        const void *A = w->data;
        if (q) {
            mm_src s = mm_src_of(w, packed);
            __half *o = (__half *)(scr + off_w);
            const unsigned g = mm_grid(cu, rows * (K / MM_QK), 128);
            if (w->type == KN_Q8_0 && packed)
                mm_dequant_f16<mm_l_q8, true><<<g, 128, 0, stream>>>(s, K, n0, rows, o);
            else if (w->type == KN_Q8_0)
                mm_dequant_f16<mm_l_q8, false><<<g, 128, 0, stream>>>(s, K, n0, rows, o);
            else if (packed)
                mm_dequant_f16<mm_l_q4, true><<<g, 128, 0, stream>>>(s, K, n0, rows, o);
            else
                mm_dequant_f16<mm_l_q4, false><<<g, 128, 0, stream>>>(s, K, n0, rows, o);
            A = o;
        }
        cublasStatus_t s = lt_set_cols(api, e->b, M);
        if (s == CUBLAS_STATUS_SUCCESS)
            s = lt_set_cols(api, e->d, M);
        if (s == CUBLAS_STATUS_SUCCESS) {
            const float alpha = 1.0f, beta = 0.0f;
            s = api->Matmul(st->lt, st->desc[gt == GT_TF32], &alpha, A, e->a, B, e->b, &beta,
                            D + n0, e->d, D + n0, e->d, &e->algo, NULL, 0, stream);
        }
        if (s != CUBLAS_STATUS_SUCCESS) {
            if (lt_soft(s)) { /* from now on this shape stays on mm_kernel */
                e->ok = false;
                return 1;
            }
            return kn_cuda_fail(cu, -EIO, "matmul: cuBLASLt %s (%s, N %lld, K %lld, M %lld)",
                                api->GetStatusString(s), kn_dtype_name(w->type), (long long)N,
                                (long long)K, (long long)M);
        }
    }
    if (ytmp)
        cudaMemcpyAsync(y, D, (size_t)M * N * 4, cudaMemcpyDeviceToDevice, stream);
    return kn_cuda_check(cu, "matmul");
}

/* ---- entry points ------------------------------------------------------------- */

int kn_cuda_matmul(kn_cuda *cu, const kn_tensor *w, const float *x, int64_t M, float *y)
{
    if (mm_wants_lt(M)) {
        const int rc = lt_matmul(cu, w, x, M, y);
        if (rc <= 0)
            return rc;
    }
    return mm_invariant(cu, 1, &w, x, M, &y, "matmul");
}

int kn_cuda_matmul_multi(kn_cuda *cu, int n, const kn_tensor *const *w, const float *x,
                         int64_t M, float *const *y)
{
    bool fuse = !mm_wants_lt(M) && n <= MM_MULTI;
    for (int i = 1; i < n && fuse; i++)
        fuse = w[i]->type == w[0]->type && w[i]->cols == w[0]->cols;
    if (fuse)
        return mm_invariant(cu, n, w, x, M, y, "matmul_multi");
    for (int i = 0; i < n; i++) {
        const int rc = kn_cuda_matmul(cu, w[i], x, M, y[i]);
        if (rc < 0)
            return rc;
    }
    return 0;
}

int kn_cuda_weight_prepare(kn_cuda *cu, kn_tensor *w)
{
    if (mm_is_q(w->type) && !w->packed) {
        size_t quants, total;
        mm_packed_size(w, &quants, &total);
        void *p = NULL;
        int rc = kn_cuda_alloc(cu, total, &p);
        if (rc < 0 || !p)
            return kn_cuda_fail(cu, rc < 0 ? rc : -ENOMEM,
                                "weight_prepare: no device memory for the packed %s weight "
                                "(%lld x %lld, %zu bytes)",
                                kn_dtype_name(w->type), (long long)w->rows, (long long)w->cols,
                                total);
        const int64_t nb = w->rows * (w->cols / MM_QK);
        cudaStream_t stream = (cudaStream_t)kn_cuda_stream(cu);
        uint8_t *q = (uint8_t *)p;
        uint16_t *d = (uint16_t *)(q + quants);
        const unsigned g = mm_grid(cu, nb, 256);
        if (w->type == KN_Q8_0)
            mm_repack<true><<<g, 256, 0, stream>>>((const uint8_t *)w->data, nb, q, d);
        else
            mm_repack<false><<<g, 256, 0, stream>>>((const uint8_t *)w->data, nb, q, d);
        rc = kn_cuda_check(cu, "weight_prepare");
        if (rc < 0) {
            kn_cuda_free(cu, p);
            return rc;
        }
        w->packed = p;
    }
    /* Choose and cache the cuBLASLt algorithms of this shape now, not in
     * the first prefill; failures only mean mm_kernel for every M. */
    mm_state *st;
    const lt_api *api;
    const int gt = gt_of(w->type);
    if (mm_env_get().min_m > 0 && gt >= 0 && lt_weight_ok(w) && (api = lt_ready(cu, &st))) {
        lt_shape *full, *last;
        int64_t nt;
        (void)lt_shapes(st, api, w, gt, &full, &last, &nt);
    }
    return 0;
}

void kn_cuda_weight_release(kn_cuda *cu, kn_tensor *w)
{
    if (w->packed && mm_is_q(w->type))
        kn_cuda_free(cu, (void *)w->packed);
    w->packed = NULL;
}

double kn_cuda_gemm_peak(kn_cuda *cu, enum kn_dtype t, int64_t M, int64_t N, int64_t K, int reps)
{
    mm_state *st;
    const lt_api *api = lt_ready(cu, &st);
    if (!api)
        return kn_cuda_fail(cu, -EOPNOTSUPP, "gemm_peak: cuBLASLt unavailable: %s",
                            mm_lt_why(st));
    const int gt = gt_of(t);
    if (gt < 0 || M <= 0 || N <= 0 || K <= 0 || M > INT32_MAX || N > INT32_MAX || K > INT32_MAX)
        return -EINVAL;
    if (reps < 1)
        reps = 1;
    const size_t es = gt_size(gt);
    void *A = NULL, *B = NULL, *C = NULL;
    cublasLtMatrixLayout_t la = NULL, lb = NULL, ld = NULL;
    cudaEvent_t ev[2] = {NULL, NULL};
    double rc = 0;
    cudaStream_t stream = (cudaStream_t)kn_cuda_stream(cu);
    int r = kn_cuda_alloc(cu, (size_t)N * K * es, &A);
    if (r >= 0)
        r = kn_cuda_alloc(cu, (size_t)M * K * es, &B);
    if (r >= 0)
        r = kn_cuda_alloc(cu, (size_t)M * N * 4, &C);
    if (r < 0) {
        rc = kn_cuda_fail(cu, r, "gemm_peak: no device memory for %lld x %lld x %lld",
                          (long long)M, (long long)N, (long long)K);
        goto out;
    }
    for (int i = 0; i < 2; i++) {
        void *p = i ? B : A;
        const int64_t n = (i ? M : N) * K;
        const unsigned g = mm_grid(cu, n, 256);
        if (gt == GT_F16)
            mm_fill<__half><<<g, 256, 0, stream>>>((__half *)p, n);
        else if (gt == GT_BF16)
            mm_fill<__nv_bfloat16><<<g, 256, 0, stream>>>((__nv_bfloat16 *)p, n);
        else
            mm_fill<float><<<g, 256, 0, stream>>>((float *)p, n);
    }
    r = kn_cuda_check(cu, "gemm_peak");
    if (r < 0) {
        rc = r;
        goto out;
    }
    {
        const cudaDataType_t ty = gt_type(gt);
        cublasLtMatmulAlgo_t algo;
        const uint32_t align[4] = {lt_align_of((uint64_t)K * es), lt_align_of((uint64_t)K * es),
                                   lt_align_of((uint64_t)N * 4), lt_align_of((uint64_t)N * 4)};
        const cublasStatus_t ok = CUBLAS_STATUS_SUCCESS;
        if (api->MatrixLayoutCreate(&la, ty, (uint64_t)K, (uint64_t)N, K) != ok ||
            api->MatrixLayoutCreate(&lb, ty, (uint64_t)K, (uint64_t)M, K) != ok ||
            api->MatrixLayoutCreate(&ld, CUDA_R_32F, (uint64_t)N, (uint64_t)M, N) != ok ||
            !lt_pick(api, st->lt, st->desc[gt == GT_TF32], la, lb, ld, align, &algo)) {
            rc = kn_cuda_fail(cu, -EOPNOTSUPP,
                              "gemm_peak: cuBLASLt has no algorithm for %s %lld x %lld x %lld",
                              kn_dtype_name(t), (long long)M, (long long)N, (long long)K);
            goto out;
        }
        if (cudaEventCreate(&ev[0]) != cudaSuccess || cudaEventCreate(&ev[1]) != cudaSuccess) {
            rc = kn_cuda_check(cu, "gemm_peak");
            rc = rc < 0 ? rc : -ENOMEM;
            goto out;
        }
        const float alpha = 1.0f, beta = 0.0f;
        float best = 0.0f;
        for (int i = 0; i <= reps; i++) { /* i == 0: warm-up */
            cudaEventRecord(ev[0], stream);
            const cublasStatus_t s = api->Matmul(st->lt, st->desc[gt == GT_TF32], &alpha, A, la,
                                                 B, lb, &beta, C, ld, C, ld, &algo, NULL, 0,
                                                 stream);
            cudaEventRecord(ev[1], stream);
            if (s != CUBLAS_STATUS_SUCCESS) {
                rc = kn_cuda_fail(cu, lt_soft(s) ? -EOPNOTSUPP : -EIO,
                                  "gemm_peak: cuBLASLt %s", api->GetStatusString(s));
                goto out;
            }
            float ms = 0.0f;
            if (cudaEventSynchronize(ev[1]) != cudaSuccess ||
                cudaEventElapsedTime(&ms, ev[0], ev[1]) != cudaSuccess) {
                r = kn_cuda_check(cu, "gemm_peak");
                rc = r < 0 ? r : -EIO;
                goto out;
            }
            if (i > 0 && ms > 0.0f && (best == 0.0f || ms < best))
                best = ms;
        }
        r = kn_cuda_check(cu, "gemm_peak");
        if (r < 0)
            rc = r;
        else
            rc = best > 0.0f ? 2.0 * (double)M * (double)N * (double)K / (best * 1e-3) : -EIO;
    }
out:
    for (int i = 0; i < 2; i++)
        if (ev[i])
            cudaEventDestroy(ev[i]);
    if (la)
        api->MatrixLayoutDestroy(la);
    if (lb)
        api->MatrixLayoutDestroy(lb);
    if (ld)
        api->MatrixLayoutDestroy(ld);
    if (A)
        kn_cuda_free(cu, A);
    if (B)
        kn_cuda_free(cu, B);
    if (C)
        kn_cuda_free(cu, C);
    return rc;
}
