/* llama.cpp's CPU matmul, emulated bit for bit: activations quantized to the weight type's
 * vec_dot_type (quantize_row_q8_0_ref / q8_1_ref / q8_K_ref) and ggml's generic (scalar reference)
 * vec_dot_<type>_<vec_dot_type> per (weight row, token).
 *
 * What must match ggml exactly is the float arithmetic: which float32 products are formed and the
 * order they are added in. The integer parts (sums of code products inside a block) are exact, so
 * they may be formed in any order; the float parts follow the generic C code:
 *  - legacy 32-element blocks: one float32 accumulator over blocks, the per-block term as ggml
 *    writes it (Q4_0: (sumi*dx)*dy; Q8_0: sumi*(dx*dy); Q5_0: (dx*dy)*sumi;
 *    Q4_1/Q5_1: (dx*dy)*sumi + mx*sy);
 *  - Q3_K/Q4_K/Q5_K/Q6_K: eight float32 lane accumulators (lane l holds elements j with j % 8 == l)
 *    over super-blocks, sums[l] += (dx*dy)*aux[l]; for Q4_K/Q5_K one more accumulator takes
 *    -= (dminx*dy)*sum(bsums*mins); at the end sumf += sums[0..7] in order;
 *  - Q2_K: one accumulator, sumf += (dy*dx)*isum - (dy*dminx)*summs;
 *  - MXFP4 (ggml_vec_dot_mxfp4_q8_0_generic): one accumulator, sumf += (dy*dx)*sumi with dx the
 *    block's E8M0 scale halved (ggml_e8m0_to_fp32_half) and codes the doubled E2M1 kvalues.
 * -ffp-contract=off (setup.py) keeps a*b+c two roundings, as ggml's generic build has them.
 *
 * Speed: each weight row is decoded once into int8 codes and per-16 scales, then dotted with every
 * token's quantized activations (the loops over 8 or 32 int8 lanes vectorize). */
#include <stdlib.h>

#include "common.h"
#include "engine_cpu.h"
#include "engine_decode.h"

#define QK MT_QK

/* ------------------------------------------------------------------ activation quantizers */

/* quantize_row_q8_0_ref: d = amax/127 (fp16), q = roundf(x * (1/d)). */
void mt_quantize_q8_0(const float *x, uint8_t *y, int64_t n) {
    for (int64_t b = 0; b < n / QK; b++, x += QK, y += MT_Q8_0_BYTES) {
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f;
        const float id = d ? 1.0f / d : 0.0f;
        mt_store_fp16(y + MT_Q8_0_D, d);
        int8_t *qs = (int8_t *)(y + MT_Q8_0_QS);
        for (int j = 0; j < QK; j++) qs[j] = (int8_t)roundf(x[j] * id);
    }
}

/* quantize_row_q8_1_ref: as Q8_0, plus s = fp16(d * sum(q)) with d the float32 (unrounded) scale. */
void mt_quantize_q8_1(const float *x, uint8_t *y, int64_t n) {
    for (int64_t b = 0; b < n / QK; b++, x += QK, y += MT_Q8_1_BYTES) {
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f;
        const float id = d ? 1.0f / d : 0.0f;
        mt_store_fp16(y + MT_Q8_1_D, d);
        int8_t *qs = (int8_t *)(y + MT_Q8_1_QS);
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            qs[j] = (int8_t)roundf(x[j] * id);
            sum += qs[j];
        }
        mt_store_fp16(y + MT_Q8_1_S, (float)sum * d);
    }
}

/* quantize_row_q8_K_ref: iscale = -127/max with max the signed value of largest magnitude (the
 * first one), q = MIN(127, nearest_int(iscale*x)), d = 1/iscale (float32), bsums = sums of 16 codes.
 * An all-zero block gets d = 0 and zero codes (ggml leaves its bsums unwritten; we write zeros). */
void mt_quantize_q8_k(const float *x, uint8_t *y, int64_t n) {
    for (int64_t b = 0; b < n / MT_QK_K; b++, x += MT_QK_K, y += MT_Q8_K_BYTES) {
        float max = 0.0f, amax = 0.0f;
        for (int j = 0; j < MT_QK_K; j++) {
            const float ax = fabsf(x[j]);
            if (ax > amax) {
                amax = ax;
                max = x[j];
            }
        }
        int8_t *qs = (int8_t *)(y + MT_Q8_K_QS);
        int16_t bsums[MT_QK_K / 16] = {0};
        float d = 0.0f;
        if (amax != 0.0f) {
            const float iscale = -127.0f / max;
            for (int j = 0; j < MT_QK_K; j++) {
                const int v = mt_nearest_int(iscale * x[j]);
                qs[j] = (int8_t)(v < 127 ? v : 127);
            }
            for (int g = 0; g < MT_QK_K / 16; g++) {
                int s = 0;
                for (int l = 0; l < 16; l++) s += qs[16 * g + l];
                bsums[g] = (int16_t)s;
            }
            d = 1.0f / iscale;
        } else {
            memset(qs, 0, MT_QK_K);
        }
        memcpy(y + MT_Q8_K_D, &d, 4);
        memcpy(y + MT_Q8_K_BSUMS, bsums, sizeof bsums);
    }
}

/* ------------------------------------------------------------------ weight rows, decoded */

/* One weight row decoded: a[n] int8 codes in element order (with the type's offset applied), for
 * K-quants the scale (sc) and min (mn) of each 16-element group, and per block the float32 scale d
 * and dm (dmin for K-quants, m for Q4_1/Q5_1). */
typedef struct {
    int8_t *a;
    int16_t *sc, *mn;
    float *d, *dm;
} mt_row;

static void decode_row(int t, const uint8_t *w, int64_t n, mt_row *r) {
    if (t == MT_ENG_Q2_K || t == MT_ENG_Q3_K || t == MT_ENG_Q4_K || t == MT_ENG_Q5_K || t == MT_ENG_Q6_K) {
        for (int64_t i = 0; i < n / MT_QK_K; i++) {
            int8_t *a = r->a + i * MT_QK_K;
            int16_t *sc = r->sc + i * 16, *mn = r->mn + i * 16;
            if (t == MT_ENG_Q2_K) {
                mt_decode_q2k(w + i * MT_Q2_K_BYTES, a, sc, mn, &r->d[i], &r->dm[i]);
            } else if (t == MT_ENG_Q3_K) {
                mt_decode_q3k(w + i * MT_Q3_K_BYTES, a, sc, &r->d[i]);
                memset(mn, 0, 16 * sizeof *mn);
            } else if (t == MT_ENG_Q4_K || t == MT_ENG_Q5_K) {
                const int five = t == MT_ENG_Q5_K;
                int s8[8], m8[8];
                mt_decode_k45(five, w + i * (five ? MT_Q5_K_BYTES : MT_Q4_K_BYTES), a, s8, m8, &r->d[i], &r->dm[i]);
                for (int j = 0; j < 8; j++) {
                    sc[2 * j] = sc[2 * j + 1] = (int16_t)s8[j];
                    mn[2 * j] = mn[2 * j + 1] = (int16_t)m8[j];
                }
            } else { /* Q6_K */
                mt_decode_q6k(w + i * MT_Q6_K_BYTES, a, sc, &r->d[i]);
                memset(mn, 0, 16 * sizeof *mn);
            }
        }
        return;
    }
    const int off = mt_block32_offset(t);  /* the CPU dots take Q4_0/Q5_0's signed values */
    const uint8_t *b = w;
    for (int64_t i = 0; i < n / QK; i++) b += mt_decode_block32(t, b, off, r->a + i * QK, &r->d[i], &r->dm[i]);
}

/* ------------------------------------------------------------------ dots of a decoded row */

static float dot_legacy(int t, const mt_row *r, const uint8_t *y, int64_t n) {
    const int q81 = t == MT_ENG_Q4_1 || t == MT_ENG_Q5_1;
    const int ybytes = q81 ? MT_Q8_1_BYTES : MT_Q8_0_BYTES, yqs = q81 ? MT_Q8_1_QS : MT_Q8_0_QS;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / QK; i++, y += ybytes) {
        const int8_t *restrict a = r->a + i * QK, *restrict q8 = (const int8_t *)(y + yqs);
        int sumi = 0;
        for (int j = 0; j < QK; j++) sumi += a[j] * q8[j];
        const float dx = r->d[i], dy = mt_load_fp16(y);
        switch (t) {
        case MT_ENG_Q4_0: sumf += (float)sumi * dx * dy; break;
        case MT_ENG_Q8_0: sumf += (float)sumi * (dx * dy); break;
        case MT_ENG_Q5_0: sumf += (dx * dy) * (float)sumi; break;
        case MT_ENG_MXFP4: sumf += (dy * dx) * (float)sumi; break;
        default: sumf += (dx * dy) * (float)sumi + r->dm[i] * mt_load_fp16(y + MT_Q8_1_S); break;
        }
    }
    return sumf;
}

static float dot_k(int t, const mt_row *r, const uint8_t *y, int64_t n) {
    float sums[8] = {0}, sumf = 0.0f;
    for (int64_t i = 0; i < n / MT_QK_K; i++, y += MT_Q8_K_BYTES) {
        const int8_t *restrict a = r->a + i * MT_QK_K, *restrict q8 = (const int8_t *)(y + MT_Q8_K_QS);
        const int16_t *sc = r->sc + i * 16, *mn = r->mn + i * 16;
        float yd;
        int16_t bsums[16];
        memcpy(&yd, y + MT_Q8_K_D, 4);
        memcpy(bsums, y + MT_Q8_K_BSUMS, sizeof bsums);
        int32_t aux[8] = {0};
        for (int g = 0; g < 16; g++) {
            const int32_t s = sc[g];
            int32_t p[8];
            for (int l = 0; l < 8; l++) p[l] = q8[16 * g + l] * a[16 * g + l] + q8[16 * g + 8 + l] * a[16 * g + 8 + l];
            for (int l = 0; l < 8; l++) aux[l] += s * p[l];
        }
        if (t == MT_ENG_Q2_K) {
            int isum = 0, summs = 0;
            for (int l = 0; l < 8; l++) isum += aux[l];
            for (int g = 0; g < 16; g++) summs += bsums[g] * mn[g];
            const float dall = yd * r->d[i], dmin = yd * r->dm[i];
            sumf += dall * (float)isum - dmin * (float)summs;
            continue;
        }
        const float d = r->d[i] * yd;
        for (int l = 0; l < 8; l++) sums[l] += d * (float)aux[l];
        if (t == MT_ENG_Q4_K || t == MT_ENG_Q5_K) {
            int sumi = 0;
            for (int g = 0; g < 16; g++) sumi += bsums[g] * mn[g];
            const float dmin = r->dm[i] * yd;
            sumf -= dmin * (float)sumi;
        }
    }
    if (t != MT_ENG_Q2_K)
        for (int l = 0; l < 8; l++) sumf += sums[l];
    return sumf;
}

int mt_engine_matmul(int t, const uint8_t *w, int64_t row_bytes, int64_t r0, int64_t r1, const uint8_t *act,
                     int64_t act_row_bytes, int64_t n_tokens, int64_t n, float *out, int64_t n_rows) {
    const int k = t >= MT_ENG_Q2_K;
    const int64_t nb = n / (k ? MT_QK_K : QK);
    mt_row r;
    r.a = malloc((size_t)n);
    r.sc = malloc(sizeof(int16_t) * (size_t)(n / 16 + 1));
    r.mn = malloc(sizeof(int16_t) * (size_t)(n / 16 + 1));
    r.d = malloc(sizeof(float) * (size_t)nb);
    r.dm = malloc(sizeof(float) * (size_t)nb);
    if (!r.a || !r.sc || !r.mn || !r.d || !r.dm) {
        free(r.a), free(r.sc), free(r.mn), free(r.d), free(r.dm);
        return 1;
    }
    for (int64_t row = r0; row < r1; row++) {
        decode_row(t, w + row * row_bytes, n, &r);
        for (int64_t tok = 0; tok < n_tokens; tok++)
            out[tok * n_rows + row] = k ? dot_k(t, &r, act + tok * act_row_bytes, n)
                                        : dot_legacy(t, &r, act + tok * act_row_bytes, n);
    }
    free(r.a), free(r.sc), free(r.mn), free(r.d), free(r.dm);
    return 0;
}
