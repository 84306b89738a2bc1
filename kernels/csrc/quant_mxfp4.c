/* MXFP4 (ggml type 39): quantize and dequantize, bit-exact with ggml's quantize_row_mxfp4_ref and
 * dequantize_row_mxfp4 (ggml-quants.c).
 *
 * block_mxfp4: one E8M0 exponent byte e, then 16 bytes of 4-bit codes (element j in the low nibble
 * of qs[j], element j + 16 in the high one). A code indexes kvalues (E2M1 values doubled); the
 * scale is d = 2**(e - 128) (ggml_e8m0_to_fp32_half), so a value is the exact product kvalues[c] * d.
 *
 * Quantizing: e = (uint8_t)(floorf(log2f(amax)) - 2 + 127) (0 for an all-zero block), then each
 * element takes the first code with the smallest fabsf(kvalues[i] * d - x). log2f is the C
 * library's, as in ggml. Where amax < 2**-125 that exponent expression is negative and C leaves the
 * conversion undefined; ggml's x86 builds convert through int32 and keep the low byte, and so do we
 * (explicitly, so the result does not depend on the compiler).
 *
 * Speed: the search runs code by code over the block's 32 elements (a best error and a best code
 * per element), the shape gcc vectorizes: the same float32 subtractions and comparisons as ggml's
 * element-by-element loop, in an order that cannot change which code wins (each element's
 * candidates are still tried in code order with a strict '<'). */
#include "ckernels.h"
#include "common.h"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__GLIBC__) && \
    !defined(MT_NO_CLONES)
/* AVX2 clones (glibc ifunc) perform the same float32 operations (no FMA: -ffp-contract=off). */
#define MT_HOT __attribute__((target_clones("avx2", "default")))
#else
#define MT_HOT
#endif

#define QK MT_MXFP4_ELEMS

static const float kvalues[16] = {0.f, 1.f, 2.f, 3.f, 4.f, 6.f, 8.f, 12.f,
                                  0.f, -1.f, -2.f, -3.f, -4.f, -6.f, -8.f, -12.f};

/* ggml_e8m0_to_fp32_half: 2**(e - 128); e = 0 and 1 are the subnormals 2**-128 and 2**-127. */
static inline float e8m0_half(uint8_t e) {
    return mt_bits_f32(e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23);
}

static inline uint8_t shared_exponent(float amax) {
    if (!(amax > 0.0f)) return 0;
    const float v = floorf(log2f(amax)) - 2.0f + 127.0f; /* an integer in [-24, 252] */
    return (uint8_t)((int)v & 0xFF);
}

MT_HOT
static void quantize_block(const float *restrict x, uint8_t *restrict y) {
    /* The largest |x| in 8 lanes, then across them: for finite values (checked by the caller), all
     * >= +0, the maximum does not depend on the order, so this is ggml's sequential amax. */
    float lane[8] = {0};
    for (int b = 0; b < QK; b += 8)
        for (int l = 0; l < 8; l++) {
            const float ax = fabsf(x[b + l]);
            lane[l] = lane[l] < ax ? ax : lane[l];
        }
    float amax = 0.0f;
    for (int l = 0; l < 8; l++) amax = amax < lane[l] ? lane[l] : amax;
    const uint8_t e = shared_exponent(amax);
    const float d = e8m0_half(e);
    float best[QK];
    int32_t code[QK];
    for (int j = 0; j < QK; j++) {
        best[j] = fabsf(kvalues[0] * d - x[j]);
        code[j] = 0;
    }
    for (int i = 1; i < 16; i++) {
        const float v = kvalues[i] * d;
        for (int j = 0; j < QK; j++) {
            /* Branch-free, so the loop vectorizes: a mask of all ones where code i is strictly better. */
            const float err = fabsf(v - x[j]);
            const int32_t m = -(int32_t)(err < best[j]);
            best[j] = err < best[j] ? err : best[j];
            code[j] = (code[j] & ~m) | (i & m);
        }
    }
    y[MT_MXFP4_E] = e;
    uint8_t *restrict qs = y + MT_MXFP4_QS;
    for (int j = 0; j < QK / 2; j++) qs[j] = (uint8_t)(code[j] | (code[j + QK / 2] << 4));
}

static int quantize_mxfp4(const float *x, uint8_t *y, int64_t n_rows, int64_t n_per_row, const float *imatrix) {
    (void)imatrix; /* quantize_mxfp4 ignores the importance matrix */
    const int64_t nb = n_rows * (n_per_row / QK);
    for (int64_t b = 0; b < nb; b++) quantize_block(x + b * QK, y + b * MT_MXFP4_BYTES);
    return 0;
}

/* kvalues_mxfp4[c] from the code's bits (sign bit 3, exponent bits 2-1, mantissa bit 0 of E2M1, doubled):
 * exponent 0 gives the mantissa (0 or 1), exponent ex > 0 gives (2 + mantissa) << (ex - 1). Integer
 * arithmetic instead of a table lookup, so the dequantizer's loop vectorizes without gathers (slow on
 * some x86 CPUs). The value is the same integer, so the product with d is ggml's. */
static inline int kvalue_of(int c) {
    const int m = c & 7, ex = m >> 1, mant = m & 1;
    const int mag = ex ? ((2 + mant) << ex) >> 1 : mant;
    return (c & 8) ? -mag : mag;
}

/* dequantize_row_mxfp4: kvalues[code] * d, one exact product per element. */
MT_HOT
static void dequantize_mxfp4(const uint8_t *restrict q, float *restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, q += MT_MXFP4_BYTES, y += QK) {
        const float d = e8m0_half(q[MT_MXFP4_E]);
        const uint8_t *restrict qs = q + MT_MXFP4_QS;
        for (int j = 0; j < QK / 2; j++) {
            y[j] = (float)kvalue_of(qs[j] & 0xF) * d;
            y[j + QK / 2] = (float)kvalue_of(qs[j] >> 4) * d;
        }
    }
}

void mt_register_mxfp4(mt_kernel_table *t) {
    t->quantize[MT_MXFP4] = quantize_mxfp4;
    t->dequantize[MT_MXFP4] = dequantize_mxfp4;
}
