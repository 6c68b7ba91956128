/* AVX2 (+FMA+F16C) op table: the shared SIMD bodies of kn_simd_tmpl.h on
 * 8-lane ymm vectors. Built with -mavx2 -mfma -mf16c; reached only through
 * kn_ops_for() / kn_ctx_create() after cm_cpu() confirmed the features. */
#include <immintrin.h>
#include <math.h>

#include "kernels/cpu/kn_int.h"

typedef __m256 vf;
typedef __m256i vi;
#define VL 8
#define KN_MR 6 /* 6 x 2 accumulators + 2 weights + 1 broadcast = 15 of 16 ymm */
#define KN_IMPL kn_impl_avx2
#define KN_OPS_NAME "avx2"

#define vld(p) _mm256_loadu_ps(p)
#define vst(p, v) _mm256_storeu_ps((p), (v))
#define vset1(f) _mm256_set1_ps(f)
#define vzero() _mm256_setzero_ps()
#define vadd(a, b) _mm256_add_ps((a), (b))
#define vsub(a, b) _mm256_sub_ps((a), (b))
#define vmul(a, b) _mm256_mul_ps((a), (b))
#define vdiv(a, b) _mm256_div_ps((a), (b))
#define vmax(a, b) _mm256_max_ps((a), (b))
#define vmin(a, b) _mm256_min_ps((a), (b))
#define vfma(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define vround(v) _mm256_round_ps((v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vswap_pairs(v) _mm256_permute_ps((v), 0xB1)
#define vi_ld(p) _mm256_load_si256((const __m256i *)(p))
#define vi_xor(a, b) _mm256_xor_si256((a), (b))
#define vi_zero() _mm256_setzero_si256()

static inline float vhsum(vf v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int vi_fold(vi v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static inline vf vld_f16(const uint16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

static inline vf vld_bf16(const uint16_t *p)
{
    __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

static inline vf vld_i8(const int8_t *p)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline vf vld_q4(const uint8_t *qs, int c)
{
    __m128i b = _mm_loadl_epi64((const __m128i *)(qs + (c & 1) * 8));
    if (c >= 2)
        b = _mm_srli_epi16(b, 4);
    b = _mm_and_si128(b, _mm_set1_epi8(0x0f));
    __m256i v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(b), _mm256_set1_epi32(8));
    return _mm256_cvtepi32_ps(v);
}

static inline vf vpow2i(vf n)
{
    __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}

static inline vf vmask_ninf(vf s, vf e)
{
    return _mm256_and_ps(e, _mm256_cmp_ps(s, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ));
}

/* x where a < b, else y */
#define vsel_lt(a, b, x, y) _mm256_blendv_ps((y), (x), _mm256_cmp_ps((a), (b), _CMP_LT_OQ))

#define vi_set1(i) _mm256_set1_epi32(i)
#define vi_add(a, b) _mm256_add_epi32((a), (b))
#define vi_iota() _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)
#define vi_st(p, v) _mm256_storeu_si256((__m256i *)(p), (v))

/* lanes where x > *mx (false for a NaN x): *mx = x, *ix = i */
static inline void vtake_gt(vf x, vi i, vf *mx, vi *ix)
{
    const __m256 gt = _mm256_cmp_ps(x, *mx, _CMP_GT_OQ);
    *mx = _mm256_blendv_ps(*mx, x, gt);
    *ix = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(*ix), _mm256_castsi256_ps(i), gt));
}

#include "kernels/cpu/kn_simd_tmpl.h"
