/* Dequantizers of every type, bit-exact with ggml's dequantize_row_* (and gguf-py's
 * gguf.quants.dequantize, which computes the same products in the same order).
 *
 * Each value is one float32 product of a small integer code (exact as float) and a block or
 * sub-block scale, plus, for the types with a minimum, one float32 addition or subtraction after
 * it: exactly ggml's expression, with the scale products (d * sc, dmin * m) formed first as ggml
 * does. No FMA (the build passes -ffp-contract=off).
 *
 * Speed: the inner loops run over a fixed 16 or 32 codes with restrict-qualified pointers, so gcc
 * -O3 vectorizes them for baseline x86-64 (SSE2): bytes are widened to int32, converted to float
 * and scaled four at a time. The Q8_0 and K-quant loops run over 32 codes (for 16-element
 * sub-blocks, the two scales picked per lane), a shape whose AVX2 clone is 1.6-2.4x faster than
 * SSE2 in cache; the legacy 4/5-bit loops pair element j with j + 16 over 16 codes, where an
 * AVX2 clone gains nothing, so they have none. */
#include "ckernels.h"
#include "common.h"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__GLIBC__) && \
    !defined(MT_NO_CLONES)
/* An AVX2 clone of the function, picked at load time (glibc ifunc) on CPUs that have it. AVX2
 * brings no FMA (FMA is a separate target, and -ffp-contract=off forbids contraction anyway), so
 * both clones perform the same float32 operations and give the same bits. */
#define MT_HOT __attribute__((target_clones("avx2", "default")))
#else
#define MT_HOT
#endif

#define QK MT_QK

/* Keep gcc from fully unrolling a 16-element inner loop (its straight-line vectorization of the
 * unrolled body is 1.5-6x slower here): left a loop, it is vectorized whole. */
#if defined(__GNUC__) && !defined(__clang__)
#define MT_LOOP _Pragma("GCC unroll 1")
#else
#define MT_LOOP
#endif

/* ---------------------------------------------------------------- legacy 32-element blocks */

/* block_q4_0: fp16 d, 16 bytes of nibbles; element j is the low nibble of qs[j], element
 * j + 16 the high one. y = (code - 8) * d. */
static void deq_q4_0(const uint8_t *restrict q, float *restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, q += MT_Q4_0_BYTES, y += QK) {
        const float d = mt_load_fp16(q);
        const uint8_t *restrict qs = q + MT_Q4_0_QS;
        MT_LOOP
        for (int j = 0; j < 16; j++) {
            y[j] = (float)((int)(qs[j] & 0xF) - 8) * d;
            y[j + 16] = (float)((int)(qs[j] >> 4) - 8) * d;
        }
    }
}

/* block_q4_1: fp16 d, fp16 m, 16 bytes of nibbles. y = code * d + m. */
static void deq_q4_1(const uint8_t *restrict q, float *restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, q += MT_Q4_1_BYTES, y += QK) {
        const float d = mt_load_fp16(q);
        const float m = mt_load_fp16(q + MT_Q4_1_M);
        const uint8_t *restrict qs = q + MT_Q4_1_QS;
        MT_LOOP
        for (int j = 0; j < 16; j++) {
            y[j] = (float)(qs[j] & 0xF) * d + m;
            y[j + 16] = (float)(qs[j] >> 4) * d + m;
        }
    }
}

/* Bit j of the little-endian 32-bit qh field is the fifth bit of element j. A mask per element
 * (instead of a shift by j, which SSE2 cannot do per lane) keeps the loops vectorizable. */
static const uint32_t mt_bit[32] = {
    1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,
    1u << 8,  1u << 9,  1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15,
    1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21, 1u << 22, 1u << 23,
    1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31,
};

static inline uint32_t mt_load_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* block_q5_0: fp16 d, 4 bytes qh, 16 bytes of nibbles. y = ((nibble | bit4) - 16) * d. */
static void deq_q5_0(const uint8_t *restrict q, float *restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, q += MT_Q5_0_BYTES, y += QK) {
        const float d = mt_load_fp16(q);
        const uint32_t qh = mt_load_u32(q + MT_Q5_0_QH);
        const uint8_t *restrict qs = q + MT_Q5_0_QS;
        MT_LOOP
        for (int j = 0; j < 16; j++) {
            y[j] = (float)((int)((qs[j] & 0xF) | ((qh & mt_bit[j]) ? 16 : 0)) - 16) * d;
            y[j + 16] = (float)((int)((qs[j] >> 4) | ((qh & mt_bit[j + 16]) ? 16 : 0)) - 16) * d;
        }
    }
}

/* block_q5_1: fp16 d, fp16 m, 4 bytes qh, 16 bytes of nibbles. y = (nibble | bit4) * d + m. */
static void deq_q5_1(const uint8_t *restrict q, float *restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, q += MT_Q5_1_BYTES, y += QK) {
        const float d = mt_load_fp16(q);
        const float m = mt_load_fp16(q + MT_Q5_1_M);
        const uint32_t qh = mt_load_u32(q + MT_Q5_1_QH);
        const uint8_t *restrict qs = q + MT_Q5_1_QS;
        MT_LOOP
        for (int j = 0; j < 16; j++) {
            y[j] = (float)((qs[j] & 0xF) | ((qh & mt_bit[j]) ? 16u : 0u)) * d + m;
            y[j + 16] = (float)((qs[j] >> 4) | ((qh & mt_bit[j + 16]) ? 16u : 0u)) * d + m;
        }
    }
}

/* block_q8_0: fp16 d, 32 int8. y = q * d. */
MT_HOT static void deq_q8_0(const uint8_t *restrict q, float *restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, q += MT_Q8_0_BYTES, y += QK) {
        const float d = mt_load_fp16(q);
        const int8_t *restrict qs = (const int8_t *)(q + MT_Q8_0_QS);
        for (int j = 0; j < QK; j++) y[j] = (float)qs[j] * d;
    }
}

/* ---------------------------------------------------------------- K-quants, 256 per block */

/* block_q2_K: 16 scale bytes (low nibble scale, high nibble min), 64 bytes of 2-bit codes,
 * fp16 d, fp16 dmin. Element 128n + 32s + l is bits 2s of qs[32n + l]; each run of 16 elements
 * is one sub-block (scale byte 8n + 2s + l/16): y = (d * sc) * code - (dmin * m). */
MT_HOT static void deq_q2_k(const uint8_t *restrict q, float *restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, q += MT_Q2_K_BYTES) {
        const uint8_t *restrict sc = q + MT_Q2_K_SCALES;
        const float d = mt_load_fp16(q + MT_Q2_K_D);
        const float dmin = mt_load_fp16(q + MT_Q2_K_DMIN);
        for (int n = 0; n < 2; n++) {
            const uint8_t *restrict qs = q + MT_Q2_K_QS + 32 * n;
            for (int shift = 0; shift < 8; shift += 2, sc += 2, y += 32) {
                const float dl0 = d * (float)(sc[0] & 0xF), ml0 = dmin * (float)(sc[0] >> 4);
                const float dl1 = d * (float)(sc[1] & 0xF), ml1 = dmin * (float)(sc[1] >> 4);
                for (int l = 0; l < 32; l++) {
                    const float dl = l < 16 ? dl0 : dl1, ml = l < 16 ? ml0 : ml1;
                    y[l] = dl * (float)((qs[l] >> shift) & 3) - ml;
                }
            }
        }
    }
}

/* ggml's 6-bit scale unpacking of block_q3_K: 16 signed scales (stored + 32). */
static inline void mt_q3_k_scales(const uint8_t *restrict s, int *restrict out) {
    for (int j = 0; j < 4; j++) {
        out[j] = ((s[j] & 0xF) | (((s[8 + j] >> 0) & 3) << 4)) - 32;
        out[j + 4] = ((s[j + 4] & 0xF) | (((s[8 + j] >> 2) & 3) << 4)) - 32;
        out[j + 8] = ((s[j] >> 4) | (((s[8 + j] >> 4) & 3) << 4)) - 32;
        out[j + 12] = ((s[j + 4] >> 4) | (((s[8 + j] >> 6) & 3) << 4)) - 32;
    }
}

/* block_q3_K: 32 bytes hmask, 64 bytes of 2-bit codes, 12 scale bytes, fp16 d. Element
 * 128n + 32s + l is bits 2s of qs[32n + l], minus 4 unless bit 4n + s of hmask[l] is set (i.e.
 * (code2 | hbit << 2) - 4); sub-block 8n + 2s + l/16. y = (d * (sc - 32)) * code. */
MT_HOT static void deq_q3_k(const uint8_t *restrict q, float *restrict y, int64_t nb) {
    int scales[16];
    for (int64_t i = 0; i < nb; i++, q += MT_Q3_K_BYTES) {
        const uint8_t *restrict hm = q + MT_Q3_K_HMASK;
        const float d = mt_load_fp16(q + MT_Q3_K_D);
        mt_q3_k_scales(q + MT_Q3_K_SCALES, scales);
        for (int n = 0; n < 2; n++) {
            const uint8_t *restrict qs = q + MT_Q3_K_QS + 32 * n;
            for (int s = 0; s < 4; s++, y += 32) {
                const float dl0 = d * (float)scales[8 * n + 2 * s], dl1 = d * (float)scales[8 * n + 2 * s + 1];
                const int sh = 2 * s, hs = 4 * n + s;
                for (int l = 0; l < 32; l++) {
                    const int v = (int)(((qs[l] >> sh) & 3) | (((hm[l] >> hs) & 1) << 2)) - 4;
                    y[l] = (l < 16 ? dl0 : dl1) * (float)v;
                }
            }
        }
    }
}

/* ggml's get_scale_min_k4 for the eight sub-blocks of block_q4_K / block_q5_K. */
static inline void mt_scale_min_k4(const uint8_t *restrict s, int *restrict sc, int *restrict mn) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

/* block_q4_K: fp16 d, fp16 dmin, 12 scale bytes, 128 bytes of nibbles. Each 64 elements read
 * 32 bytes: low nibbles are sub-block 2k, high nibbles 2k + 1. y = (d*sc) * code - (dmin*m). */
MT_HOT static void deq_q4_k(const uint8_t *restrict q, float *restrict y, int64_t nb) {
    int sc[8], mn[8];
    for (int64_t i = 0; i < nb; i++, q += MT_Q4_K_BYTES) {
        const float d = mt_load_fp16(q + MT_Q4_K_D);
        const float dmin = mt_load_fp16(q + MT_Q4_K_DMIN);
        mt_scale_min_k4(q + MT_Q4_K_SCALES, sc, mn);
        const uint8_t *restrict qs = q + MT_Q4_K_QS;
        for (int k = 0; k < 4; k++, qs += 32, y += 64) {
            const float d1 = d * (float)sc[2 * k], m1 = dmin * (float)mn[2 * k];
            const float d2 = d * (float)sc[2 * k + 1], m2 = dmin * (float)mn[2 * k + 1];
            for (int l = 0; l < 32; l++) y[l] = d1 * (float)(qs[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++) y[l + 32] = d2 * (float)(qs[l] >> 4) - m2;
        }
    }
}

/* block_q5_K: fp16 d, fp16 dmin, 12 scale bytes, 32 bytes qh, 128 bytes of nibbles. Bit 2k of
 * qh[l] adds 16 to element l of sub-block 2k, bit 2k + 1 to element l of sub-block 2k + 1. */
MT_HOT static void deq_q5_k(const uint8_t *restrict q, float *restrict y, int64_t nb) {
    int sc[8], mn[8];
    for (int64_t i = 0; i < nb; i++, q += MT_Q5_K_BYTES) {
        const float d = mt_load_fp16(q + MT_Q5_K_D);
        const float dmin = mt_load_fp16(q + MT_Q5_K_DMIN);
        mt_scale_min_k4(q + MT_Q5_K_SCALES, sc, mn);
        const uint8_t *restrict qh = q + MT_Q5_K_QH;
        const uint8_t *restrict qs = q + MT_Q5_K_QS;
        for (int k = 0; k < 4; k++, qs += 32, y += 64) {
            const float d1 = d * (float)sc[2 * k], m1 = dmin * (float)mn[2 * k];
            const float d2 = d * (float)sc[2 * k + 1], m2 = dmin * (float)mn[2 * k + 1];
            const int s1 = 2 * k, s2 = 2 * k + 1;
            for (int l = 0; l < 32; l++)
                y[l] = d1 * (float)((qs[l] & 0xF) | (((qh[l] >> s1) & 1) << 4)) - m1;
            for (int l = 0; l < 32; l++)
                y[l + 32] = d2 * (float)((qs[l] >> 4) | (((qh[l] >> s2) & 1) << 4)) - m2;
        }
    }
}

/* block_q6_K: 128 bytes ql (low nibbles), 64 bytes qh (2 high bits each), 16 int8 scales, fp16 d.
 * Per 128-element half: element 32t + l takes nibble t/2 of ql[l + 32 (t%2)] and bits 2t of
 * qh[l]. y = (d * sc) * (code - 32). */
MT_HOT static void deq_q6_k(const uint8_t *restrict q, float *restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, q += MT_Q6_K_BYTES) {
        const float d = mt_load_fp16(q + MT_Q6_K_D);
        const int8_t *restrict sc = (const int8_t *)(q + MT_Q6_K_SCALES);
        for (int n = 0; n < 2; n++) {
            const uint8_t *restrict qh = q + MT_Q6_K_QH + 32 * n;
            for (int t = 0; t < 4; t++, y += 32) {
                const uint8_t *restrict ql = q + MT_Q6_K_QL + 64 * n + 32 * (t & 1);
                const int sh = 4 * (t >> 1), hs = 2 * t;
                const float ds0 = d * (float)sc[8 * n + 2 * t], ds1 = d * (float)sc[8 * n + 2 * t + 1];
                for (int l = 0; l < 32; l++) {
                    const int v = (int)(((ql[l] >> sh) & 0xF) | (((qh[l] >> hs) & 3) << 4)) - 32;
                    y[l] = (l < 16 ? ds0 : ds1) * (float)v;
                }
            }
        }
    }
}

void mt_register_dequant(mt_kernel_table *t) {
    t->dequantize[MT_Q4_0] = deq_q4_0;
    t->dequantize[MT_Q4_1] = deq_q4_1;
    t->dequantize[MT_Q5_0] = deq_q5_0;
    t->dequantize[MT_Q5_1] = deq_q5_1;
    t->dequantize[MT_Q8_0] = deq_q8_0;
    t->dequantize[MT_Q2_K] = deq_q2_k;
    t->dequantize[MT_Q3_K] = deq_q3_k;
    t->dequantize[MT_Q4_K] = deq_q4_k;
    t->dequantize[MT_Q5_K] = deq_q5_k;
    t->dequantize[MT_Q6_K] = deq_q6_k;
}
