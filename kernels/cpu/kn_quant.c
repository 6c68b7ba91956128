/* dtype metadata, f16/bf16 conversions and the ggml reference quantisers.
 * Everything here is plain C: it is the ground truth the SIMD paths are
 * tested against, and it runs on any x86-64. */
#include <errno.h>
#include <math.h>
#include <string.h>

#include "kernels/cpu/kn_int.h"

size_t kn_row_bytes(enum kn_dtype t, int64_t n)
{
    if (n < 0)
        return 0;
    switch (t) {
    case KN_F32:
        return (size_t)n * 4;
    case KN_F16:
    case KN_BF16:
        return (size_t)n * 2;
    case KN_Q8_0:
        return n % KN_QK ? 0 : (size_t)(n / KN_QK) * sizeof(kn_block_q8_0);
    case KN_Q4_0:
        return n % KN_QK ? 0 : (size_t)(n / KN_QK) * sizeof(kn_block_q4_0);
    }
    return 0;
}

const char *kn_dtype_name(enum kn_dtype t)
{
    switch (t) {
    case KN_F32:
        return "f32";
    case KN_F16:
        return "f16";
    case KN_BF16:
        return "bf16";
    case KN_Q8_0:
        return "q8_0";
    case KN_Q4_0:
        return "q4_0";
    }
    return "unknown";
}

static inline uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float kn_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    if (exp == 0x1f) /* inf / nan: keep the payload, force quiet */
        return bits_f32(sign | 0x7f800000 | (man << 13) | (man ? 0x400000 : 0));
    if (exp == 0) {
        if (man == 0)
            return bits_f32(sign);
        /* subnormal: value = man * 2^-24, exact in f32 */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t kn_f32_to_f16(float f)
{
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffff;
    if (a > 0x7f800000) /* nan: keep it a nan */
        return sign | 0x7e00 | (uint16_t)((a >> 13) & 0x1ff);
    if (a >= 0x477ff000) /* rounds to >= 65520: inf */
        return sign | 0x7c00;
    if (a < 0x38800000) { /* below the smallest normal f16 (2^-14) */
        /* round(|f| * 2^24) to nearest even gives the subnormal mantissa;
         * the multiply is exact and rintf rounds half to even. */
        float v = bits_f32(a) * 0x1p24f;
        return sign | (uint16_t)rintf(v);
    }
    /* normal: rebias, round to nearest even on the 13 dropped bits */
    uint32_t r = a - (112u << 23);
    r += 0xfff + ((r >> 13) & 1);
    return sign | (uint16_t)(r >> 13);
}

float kn_bf16_to_f32(uint16_t h)
{
    return bits_f32((uint32_t)h << 16);
}

uint16_t kn_f32_to_bf16(float f)
{
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffff) > 0x7f800000) /* nan: force quiet, as ggml does */
        return (uint16_t)((u >> 16) | 64);
    return (uint16_t)((u + (0x7fff + ((u >> 16) & 1))) >> 16);
}

static void quantize_q8_0(const float *x, int64_t n, kn_block_q8_0 *y)
{
    for (int64_t b = 0; b < n / KN_QK; b++) {
        const float *xb = x + b * KN_QK;
        float amax = 0.0f;
        for (int j = 0; j < KN_QK; j++)
            amax = fmaxf(amax, fabsf(xb[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = kn_f32_to_f16(d);
        for (int j = 0; j < KN_QK; j++)
            y[b].qs[j] = (int8_t)roundf(xb[j] * id);
    }
}

static void quantize_q4_0(const float *x, int64_t n, kn_block_q4_0 *y)
{
    for (int64_t b = 0; b < n / KN_QK; b++) {
        const float *xb = x + b * KN_QK;
        /* ggml keeps the signed value of largest magnitude and maps it to -8,
         * so the asymmetric int4 range [-8, 7] is used on the heavy side. */
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < KN_QK; j++) {
            if (amax < fabsf(xb[j])) {
                amax = fabsf(xb[j]);
                max = xb[j];
            }
        }
        const float d = max / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = kn_f32_to_f16(d);
        for (int j = 0; j < KN_QK / 2; j++) {
            float x0 = xb[j] * id, x1 = xb[KN_QK / 2 + j] * id;
            int xi0 = (int)(int8_t)(x0 + 8.5f), xi1 = (int)(int8_t)(x1 + 8.5f);
            xi0 = xi0 < 15 ? xi0 : 15;
            xi1 = xi1 < 15 ? xi1 : 15;
            y[b].qs[j] = (uint8_t)(xi0 | (xi1 << 4));
        }
    }
}

int64_t kn_quantize_row(enum kn_dtype t, const float *src, int64_t n, void *dst)
{
    size_t bytes = kn_row_bytes(t, n);
    if (!src || !dst || n <= 0 || bytes == 0)
        return -EINVAL;
    switch (t) {
    case KN_F32:
        memcpy(dst, src, bytes);
        break;
    case KN_F16: {
        uint16_t *o = dst;
        for (int64_t i = 0; i < n; i++)
            o[i] = kn_f32_to_f16(src[i]);
        break;
    }
    case KN_BF16: {
        uint16_t *o = dst;
        for (int64_t i = 0; i < n; i++)
            o[i] = kn_f32_to_bf16(src[i]);
        break;
    }
    case KN_Q8_0:
        quantize_q8_0(src, n, dst);
        break;
    case KN_Q4_0:
        quantize_q4_0(src, n, dst);
        break;
    }
    return (int64_t)bytes;
}

void kn_dequantize_row(enum kn_dtype t, const void *src, int64_t n, float *dst)
{
    if (!src || !dst || n <= 0)
        return;
    switch (t) {
    case KN_F32:
        memcpy(dst, src, (size_t)n * 4);
        return;
    case KN_F16: {
        const uint16_t *s = src;
        for (int64_t i = 0; i < n; i++)
            dst[i] = kn_f16_to_f32(s[i]);
        return;
    }
    case KN_BF16: {
        const uint16_t *s = src;
        for (int64_t i = 0; i < n; i++)
            dst[i] = kn_bf16_to_f32(s[i]);
        return;
    }
    case KN_Q8_0: {
        if (n % KN_QK)
            return;
        const kn_block_q8_0 *b = src;
        for (int64_t i = 0; i < n / KN_QK; i++) {
            float d = kn_f16_to_f32(b[i].d);
            for (int j = 0; j < KN_QK; j++)
                dst[i * KN_QK + j] = (float)b[i].qs[j] * d;
        }
        return;
    }
    case KN_Q4_0: {
        if (n % KN_QK)
            return;
        const kn_block_q4_0 *b = src;
        for (int64_t i = 0; i < n / KN_QK; i++) {
            float d = kn_f16_to_f32(b[i].d);
            for (int j = 0; j < KN_QK / 2; j++) {
                dst[i * KN_QK + j] = (float)((b[i].qs[j] & 0x0f) - 8) * d;
                dst[i * KN_QK + KN_QK / 2 + j] = (float)((b[i].qs[j] >> 4) - 8) * d;
            }
        }
        return;
    }
    }
}

float kn_scalar_dot_f32(const float *a, const float *b, int64_t n)
{
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}
