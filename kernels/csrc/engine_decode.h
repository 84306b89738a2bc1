/* Decoding GGUF blocks into the int8 codes the integer-dot engines multiply: one definition of each
 * block type's code and sub-scale unpacking, shared by the CPU engine (engine_cpu.c, ggml's vec_dot
 * against Q8_0/Q8_1/Q8_K activations) and the CUDA engine emulation (engine_cuda.c, MMQ and MMVQ).
 * What each engine does with the block's float scales differs (the CPU engine keeps d and dmin, the
 * CUDA kernels fold them with the sub-scales in half precision), so the scales are returned here as
 * read and each engine forms its own factors.
 *
 * Layouts (offsets, block sizes) come from layouts.h through common.h, the table kernels/layouts.py
 * writes for torch, Triton and C alike. */
#ifndef MOETRACE_ENGINE_DECODE_H
#define MOETRACE_ENGINE_DECODE_H

#include <stdint.h>
#include <string.h>

#include "common.h"

/* ggml's kvalues_mxfp4 (E2M1 doubled) and ggml_e8m0_to_fp32_half (2**(e-128), subnormal below e = 2). */
static const int8_t mt_kvalues_mxfp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

static inline float mt_e8m0_half(uint8_t e) { return mt_bits_f32(e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23); }

/* ggml's get_scale_min_k4: the 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K block. */
static inline void mt_k4_scale_min(const uint8_t *q, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* A 32-element block of type t (Q8_0, MXFP4, Q4_0, Q4_1, Q5_0, Q5_1) at b: its 32 codes into a, minus
 * `off` for Q4_0/Q5_0 (the caller's choice: 8 and 16 give the signed values, 0 the stored ones); *d its
 * scale (MXFP4: the E8M0 scale halved), *m its min (Q4_1, Q5_1; untouched otherwise). Returns the
 * block's size in bytes. */
static inline int mt_decode_block32(int t, const uint8_t *b, int off, int8_t *a, float *d, float *m) {
    if (t == MT_ENG_Q8_0) {
        memcpy(a, b + MT_Q8_0_QS, MT_QK);
        *d = mt_load_fp16(b + MT_Q8_0_D);
        return MT_Q8_0_BYTES;
    }
    if (t == MT_ENG_MXFP4) {
        const uint8_t *qs = b + MT_MXFP4_QS;
        for (int j = 0; j < MT_QK / 2; j++) {
            a[j] = mt_kvalues_mxfp4[qs[j] & 0xF];
            a[j + MT_QK / 2] = mt_kvalues_mxfp4[qs[j] >> 4];
        }
        *d = mt_e8m0_half(b[MT_MXFP4_E]);
        return MT_MXFP4_BYTES;
    }
    const int bytes = t == MT_ENG_Q4_0 ? MT_Q4_0_BYTES : t == MT_ENG_Q4_1 ? MT_Q4_1_BYTES
                    : t == MT_ENG_Q5_0 ? MT_Q5_0_BYTES : MT_Q5_1_BYTES;
    const uint8_t *qs = b + (t == MT_ENG_Q4_0 ? MT_Q4_0_QS : t == MT_ENG_Q4_1 ? MT_Q4_1_QS
                           : t == MT_ENG_Q5_0 ? MT_Q5_0_QS : MT_Q5_1_QS);
    uint32_t qh = 0;
    if (t == MT_ENG_Q5_0) memcpy(&qh, b + MT_Q5_0_QH, 4);
    if (t == MT_ENG_Q5_1) memcpy(&qh, b + MT_Q5_1_QH, 4);
    if (t == MT_ENG_Q4_1 || t == MT_ENG_Q5_1) off = 0;
    for (int j = 0; j < 16; j++) {
        a[j] = (int8_t)(((qs[j] & 0xF) | (((qh >> j) & 1) << 4)) - off);
        a[j + 16] = (int8_t)(((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - off);
    }
    *d = mt_load_fp16(b);
    if (t == MT_ENG_Q4_1) *m = mt_load_fp16(b + MT_Q4_1_M);
    if (t == MT_ENG_Q5_1) *m = mt_load_fp16(b + MT_Q5_1_M);
    return bytes;
}

/* The offset that makes Q4_0/Q5_0's stored codes signed (8, 16), 0 for the other 32-element types. */
static inline int mt_block32_offset(int t) { return t == MT_ENG_Q4_0 ? 8 : t == MT_ENG_Q5_0 ? 16 : 0; }

/* Q4_K (five = 0) or Q5_K (five = 1) at b: 256 unsigned codes into a, the 6-bit scale and min of each
 * 32-value sub-block into sc[8], mn[8], the block's d and dmin. */
static inline void mt_decode_k45(int five, const uint8_t *b, int8_t *a, int *sc, int *mn, float *d, float *dmin) {
    const uint8_t *s12 = b + (five ? MT_Q5_K_SCALES : MT_Q4_K_SCALES);
    const uint8_t *qs = b + (five ? MT_Q5_K_QS : MT_Q4_K_QS), *qh = five ? b + MT_Q5_K_QH : NULL;
    for (int j = 0; j < 8; j++) mt_k4_scale_min(s12, j, &sc[j], &mn[j]);
    for (int j = 0; j < 4; j++)
        for (int l = 0; l < 32; l++) {
            int lo = qs[32 * j + l] & 0xF, hi = qs[32 * j + l] >> 4;
            if (five) {
                lo += (qh[l] & (1u << (2 * j))) ? 16 : 0;
                hi += (qh[l] & (1u << (2 * j + 1))) ? 16 : 0;
            }
            a[64 * j + l] = (int8_t)lo;
            a[64 * j + 32 + l] = (int8_t)hi;
        }
    *d = mt_load_fp16(b + (five ? MT_Q5_K_D : MT_Q4_K_D));
    *dmin = mt_load_fp16(b + (five ? MT_Q5_K_DMIN : MT_Q4_K_DMIN));
}

/* Q3_K at b: 256 signed codes into a, the signed 6-bit scale of each 16-value group into sc[16]; the
 * block's d. */
static inline void mt_decode_q3k(const uint8_t *b, int8_t *a, int16_t *sc, float *d) {
    const uint8_t *qs = b + MT_Q3_K_QS, *hm = b + MT_Q3_K_HMASK, *s12 = b + MT_Q3_K_SCALES;
    for (int g = 0; g < 16; g++) {
        const int lo = g < 8 ? s12[g] & 0xF : s12[g - 8] >> 4;
        const int hi = (s12[8 + g % 4] >> (2 * (g / 4))) & 3;
        sc[g] = (int16_t)((lo | (hi << 4)) - 32);
    }
    for (int k = 0; k < 2; k++)
        for (int s = 0; s < 4; s++) {
            const uint8_t m = (uint8_t)(1u << (4 * k + s));
            for (int l = 0; l < 32; l++)
                a[128 * k + 32 * s + l] = (int8_t)(((qs[32 * k + l] >> (2 * s)) & 3) - ((hm[l] & m) ? 0 : 4));
        }
    *d = mt_load_fp16(b + MT_Q3_K_D);
}

/* Q6_K at b: 256 signed codes (q - 32) into a, the int8 scale of each 16-value group into sc[16]; d. */
static inline void mt_decode_q6k(const uint8_t *b, int8_t *a, int16_t *sc, float *d) {
    const uint8_t *ql = b + MT_Q6_K_QL, *qh = b + MT_Q6_K_QH;
    for (int g = 0; g < 16; g++) sc[g] = (int8_t)b[MT_Q6_K_SCALES + g];
    for (int k = 0; k < 2; k++, ql += 64, qh += 32)
        for (int l = 0; l < 32; l++) {
            int8_t *o = a + 128 * k;
            o[l] = (int8_t)(((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
            o[l + 32] = (int8_t)(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
            o[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            o[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
    *d = mt_load_fp16(b + MT_Q6_K_D);
}

/* Q2_K at b: 256 unsigned 2-bit codes into a, the 4-bit scale and min of each 16-value group into
 * sc[16], mn[16]; d and dmin. */
static inline void mt_decode_q2k(const uint8_t *b, int8_t *a, int16_t *sc, int16_t *mn, float *d, float *dmin) {
    const uint8_t *qs = b + MT_Q2_K_QS;
    for (int g = 0; g < 16; g++) {
        sc[g] = (int16_t)(b[MT_Q2_K_SCALES + g] & 0xF);
        mn[g] = (int16_t)(b[MT_Q2_K_SCALES + g] >> 4);
    }
    for (int k = 0; k < 2; k++)
        for (int s = 0; s < 4; s++)
            for (int l = 0; l < 32; l++) a[128 * k + 32 * s + l] = (int8_t)((qs[32 * k + l] >> (2 * s)) & 3);
    *d = mt_load_fp16(b + MT_Q2_K_D);
    *dmin = mt_load_fp16(b + MT_Q2_K_DMIN);
}

#endif
