/* Float helpers shared by the kernel files, each the exact float32 operation ggml performs.
 *
 * Bit-exactness rules for every kernel:
 *  - all arithmetic in float32 (float literals carry the f suffix; no double intermediates
 *    unless ggml uses them);
 *  - sums accumulate sequentially in element order, as ggml's loops do;
 *  - no fused multiply-add: the build passes -ffp-contract=off, and nothing uses fmaf;
 *  - fp16 conversions round to nearest even, as ggml's (F16C or scalar) conversions do. */
#ifndef MOETRACE_COMMON_H
#define MOETRACE_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "layouts.h" /* MT_QK_K and the block layouts, generated from kernels/layouts.py */
#define MT_GROUP_MAX_EPS 1e-15f

static inline uint32_t mt_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float mt_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* ggml's nearest_int: round half to even through the float32 magic constant 1.5 * 2**23
 * (valid for |fval| <= 4194303). */
static inline int mt_nearest_int(float fval) {
    float val = fval + 12582912.f;
    int i;
    memcpy(&i, &val, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}

/* IEEE half -> float32, exact (subnormals, infinities and NaN included). */
static inline float mt_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    if (exp == 0x1f) return mt_bits_f32(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {
        /* zero or subnormal: mant * 2**-24, exact in float32 */
        float f = (float)mant * 5.9604644775390625e-08f;
        return sign ? -f : f;
    }
    return mt_bits_f32(sign | ((exp + 112) << 23) | (mant << 13));
}

/* float32 -> IEEE half, round to nearest even, overflow to infinity, NaN kept NaN. */
static inline uint16_t mt_fp32_to_fp16(float f) {
    uint32_t x = mt_f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00 : 0x7c00);
    if (ax >= 0x477ff000u) return sign | 0x7c00; /* rounds to >= 65520: infinity */
    if (ax < 0x38800000u) {
        /* result is subnormal or zero: add 0.5 (as float) so the hardware rounds to a multiple of 2**-24 */
        float r = mt_bits_f32(ax) + 0.5f;
        return sign | (uint16_t)(mt_f32_bits(r) - 0x3f000000u);
    }
    uint32_t odd = (ax >> 13) & 1u;
    ax += 0xc8000fffu + odd; /* rebias exponent (-112 << 23) and round to nearest even */
    return sign | (uint16_t)(ax >> 13);
}

static inline void mt_store_fp16(uint8_t *p, float f) {
    uint16_t h = mt_fp32_to_fp16(f);
    p[0] = (uint8_t)(h & 0xff);
    p[1] = (uint8_t)(h >> 8);
}

static inline float mt_load_fp16(const uint8_t *p) {
    return mt_fp16_to_fp32((uint16_t)(p[0] | (p[1] << 8)));
}

#endif
