/* llama.cpp's CUDA integer matmuls (MMQ and MMVQ) emulated on the CPU: q8_1 activations, exact int8
 * dots per 32 values, the kernels' float32 scale products, float32 sums.
 *
 * Read at ggml-org/llama.cpp, ggml/src/ggml-cuda/: vecdotq.cuh (commit 027ef876: the MMVQ dots
 * vec_dot_*_q8_1 and their *_impl), mmq.cuh (commit 00cd2085: load_tiles_* and the tensor-core
 * vec_dot_*_mma of Turing and newer, mmq_get_q8_1_ds_layout), quantize.cu (000f4625).
 *
 * Activations. MMVQ (quantize_q8_1): d = amax/127, q = roundf(x/d), half2(d, sum x) with the sum
 * reduced over the warp by xor shuffles. MMQ (quantize_mmq_q8_1): d_inv = 127/amax,
 * q = roundf(x*d_inv), d = 1/d_inv, kept as a float (layout D4) or as half2(d, sum) with the sum of
 * 4 values per thread and 3 xor shuffles (DS4), by weight type (mmq_get_q8_1_ds_layout).
 *
 * Per 32-value block b with integer dot C (C0, C1 over its two 16-value halves), activation scale
 * d_a and sum s_a, a float32 accumulator takes (MMQ: the mma tile's scaling; MMVQ: the vec_dot
 * impl with the threads that share a block merged into one term):
 *
 *   type          MMQ                                        MMVQ
 *   Q8_0, MXFP4   acc += (C*d)*d_a                           acc += (d*d_a)*C
 *   Q4_0, Q5_0    as Q8_0 on the signed codes (q-8, q-16)    acc += d*(C*d_a - 8*s_a)  (16 for Q5_0; q unsigned)
 *   Q4_1, Q5_1    acc += (d*d_a)*C; acc += m*s_a             acc += C*h(d*d_a) + h(m*s_a)  (h: fp16 rounding,
 *                                                             __hmul2 where FAST_FP16_AVAILABLE)
 *   Q4_K, Q5_K    acc += (A*d_a)*C; acc += M*s_a with        acc += d*(d_a*(sc*C)) - dmin*(d_a*(m*S))
 *                 A = h(d*sc), M = h(-dmin*m) (load_tiles)   (S: the sum of the activation codes)
 *   Q6_K          per 128 values: t += (C0*sc0 + C1*sc1)*d_a acc += d*(d_a*(C0*sc0 + C1*sc1))
 *                 over 4 blocks, then acc += t*d
 *   Q3_K          acc += d_a*(C0*(d*sc0) + C1*(d*sc1))       acc += d*(d_a*(C0*sc0 + C1*sc1))
 *   Q2_K          see below                                  acc += d*(d_a*(C0*sc0 + C1*sc1))
 *                                                              - dmin*(d_a*(S0*m0 + S1*m1))
 *
 * The accumulator runs over the blocks in order: one MMQ thread's order over k (without stream-k's
 * split of long k ranges into partial sums added at the end); MMVQ's per-thread partial sums and
 * warp reduction are not modelled (a float32 reordering, within the bound the tests assert).
 *
 * Q2_K's MMQ (vec_dot_q2_K_q8_1_mma; activation layout D2S6: one fp16 scale d_a per 64 values, fp16
 * sums s_g per 16 values for the first 96 of every 128, each the sum of 4 values per thread and 2 xor
 * shuffles; A_g = h(d*sc_g), M_g = h(dmin*m_g) per 16 values): per 128 values, for each block
 * t = C0*A0 + C1*A1 (the last block also t -= S0*M0 + S1*M1), acc += t*d_a; then for the first three
 * blocks acc -= M_g*s_g for each of their two halves.
 *
 * Speed: each weight row is decoded once into the kernel's int8 codes and scales, then dotted with
 * every token's activations: the integer dots per 16 values first (AVX2 where the CPU has it), then
 * the float pass over blocks in the kernel's order. */
#include <stdlib.h>

#include "common.h"
#include "engine_cuda.h"
#include "engine_decode.h"

#define QK MT_QK

int mt_cuda_sums_per_block(int t, int kernel) { return t == MT_ENG_Q2_K && kernel == MT_CUDA_MMQ ? 2 : 1; }

int mt_cuda_ds4(int t) {
    return t == MT_ENG_Q4_0 || t == MT_ENG_Q4_1 || t == MT_ENG_Q5_1 || t == MT_ENG_Q4_K || t == MT_ENG_Q5_K;
}

static inline float h(float f) { return mt_fp16_to_fp32(mt_fp32_to_fp16(f)); }

/* Lane 0 of a warp sum by xor shuffles over `lanes` values: at offset off lane i adds lane i ^ off;
 * lane 0 needs only lanes below 2*off at each step. Overwrites v. */
static float xor_sum(float *v, int lanes) {
    for (int off = lanes / 2; off >= 1; off /= 2)
        for (int i = 0; i < off; i++) v[i] = v[i] + v[i + off];
    return v[0];
}

/* quantize_mmq_q8_1 with layout D2S6 (Q2_K): per 64 values one scale, per 16 values a sum (the first 96 of
 * every 128; the others 0). d and s per 32 values: d repeated over the two blocks of a 64, two sums each. */
static void quantize_d2s6(const float *x, int64_t n, int8_t *qs, float *d, float *s) {
    for (int64_t g = 0; g < n / 64; g++, x += 64, qs += 64) {
        float amax = 0.0f, v[4];
        for (int j = 0; j < 64; j++) amax = fmaxf(amax, fabsf(x[j]));
        float dd = 0.0f;
        if (amax == 0.0f) {
            memset(qs, 0, 64);
        } else {
            const float d_inv = 127.0f / amax;
            for (int j = 0; j < 64; j++) qs[j] = (int8_t)roundf(x[j] * d_inv);
            dd = 1.0f / d_inv;
        }
        d[2 * g] = d[2 * g + 1] = h(dd);
        for (int k = 0; k < 4; k++) { /* the 16-value groups of this 64 */
            const int64_t g16 = 4 * g + k;
            const float *x16 = x + 16 * k;
            for (int th = 0; th < 4; th++)
                v[th] = ((x16[4 * th] + x16[4 * th + 1]) + x16[4 * th + 2]) + x16[4 * th + 3];
            s[g16] = g16 % 8 < 6 ? h(xor_sum(v, 4)) : 0.0f;
        }
    }
}

void mt_cuda_quantize(const float *x, int64_t n, int kernel, int t, int8_t *qs, float *d, float *s) {
    const int ds4 = mt_cuda_ds4(t);
    if (kernel == MT_CUDA_MMQ && t == MT_ENG_Q2_K) {
        quantize_d2s6(x, n, qs, d, s);
        return;
    }
    for (int64_t b = 0; b < n / QK; b++, x += QK, qs += QK) {
        float amax = 0.0f, v[QK];
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        if (kernel == MT_CUDA_MMVQ) {
            const float dd = amax / 127.0f;
            for (int j = 0; j < QK; j++) qs[j] = amax == 0.0f ? 0 : (int8_t)roundf(x[j] / dd);
            memcpy(v, x, sizeof v);
            d[b] = h(dd);
            s[b] = h(xor_sum(v, QK));
            continue;
        }
        float dd = 0.0f;
        if (amax == 0.0f) {
            memset(qs, 0, QK);
        } else {
            const float d_inv = 127.0f / amax;
            for (int j = 0; j < QK; j++) qs[j] = (int8_t)roundf(x[j] * d_inv);
            dd = 1.0f / d_inv;
        }
        if (!ds4) {
            d[b] = dd;
            s[b] = 0.0f;
            continue;
        }
        for (int k = 0; k < QK / 4; k++) v[k] = ((x[4 * k] + x[4 * k + 1]) + x[4 * k + 2]) + x[4 * k + 3];
        d[b] = h(dd);
        s[b] = h(xor_sum(v, QK / 4));
    }
}

/* ------------------------------------------------------------------ weight rows, decoded */

/* One weight row as the kernel dots it: a[n] int8 codes, sc/mn per 16 values, f0/f1 per 32 (what each
 * type keeps there is listed in decode_row). */
typedef struct {
    int8_t *a;
    int16_t *sc, *mn;
    float *f0, *f1;
} mt_crow;

/* 32-element types: f0 = d (MXFP4: the E8M0 scale halved), f1 = m (Q4_1, Q5_1). MMQ loads Q4_0/Q5_0 as
 * signed codes (q - 8, q - 16); MMVQ dots the unsigned ones and subtracts the offset through s_a. */
static void decode_legacy(int t, int mmq, const uint8_t *w, int64_t n, mt_crow *r) {
    const int off = mmq ? mt_block32_offset(t) : 0;
    const uint8_t *b = w;
    for (int64_t i = 0; i < n / QK; i++) b += mt_decode_block32(t, b, off, r->a + i * QK, &r->f0[i], &r->f1[i]);
}

/* Q4_K/Q5_K: unsigned codes; sc, mn the 6-bit scale and min (per 16, repeated); MMQ f0 = h(d*sc),
 * f1 = h(-dmin*m) as load_tiles_q4_K forms them in half; MMVQ f0 = d, f1 = dmin. */
static void decode_k45(int five, int mmq, const uint8_t *b, int64_t i, mt_crow *r) {
    int sc[8], m[8];
    float d, dmin;
    mt_decode_k45(five, b, r->a + i * MT_QK_K, sc, m, &d, &dmin);
    for (int j = 0; j < 8; j++) {
        r->sc[16 * i + 2 * j] = r->sc[16 * i + 2 * j + 1] = (int16_t)sc[j];
        r->mn[16 * i + 2 * j] = r->mn[16 * i + 2 * j + 1] = (int16_t)m[j];
        r->f0[8 * i + j] = mmq ? h(d * (float)sc[j]) : d;
        r->f1[8 * i + j] = mmq ? h(-dmin * (float)m[j]) : dmin;
    }
}

/* Q3_K: signed codes, sc the 6-bit scale - 32 per 16; MMQ f0/f1 = d*sc of the block's two halves
 * (load_tiles_q3_K's x_df, exact), MMVQ f0 = d. */
static void decode_q3k(int mmq, const uint8_t *b, int64_t i, mt_crow *r) {
    int16_t *sc = r->sc + 16 * i;
    float d;
    mt_decode_q3k(b, r->a + i * MT_QK_K, sc, &d);
    for (int j = 0; j < 8; j++) {
        r->f0[8 * i + j] = mmq ? d * (float)sc[2 * j] : d;
        r->f1[8 * i + j] = mmq ? d * (float)sc[2 * j + 1] : 0.0f;
    }
}

/* Q6_K: signed codes q - 32, sc the int8 scale per 16, f0 = d. */
static void decode_q6k(const uint8_t *b, int64_t i, mt_crow *r) {
    float d;
    mt_decode_q6k(b, r->a + i * MT_QK_K, r->sc + 16 * i, &d);
    for (int j = 0; j < 8; j++) r->f0[8 * i + j] = d;
}

/* Q2_K: unsigned 2-bit codes, sc and mn the 4-bit scale and min per 16; MMQ f0/f1 per 16 values
 * h(d*sc), h(dmin*m) (load_tiles_q2_K's __hmul2), MMVQ f0/f1 per 32 values d, dmin. */
static void decode_q2k(int mmq, const uint8_t *b, int64_t i, mt_crow *r) {
    int16_t *sc = r->sc + 16 * i, *mn = r->mn + 16 * i;
    float d, dmin;
    mt_decode_q2k(b, r->a + i * MT_QK_K, sc, mn, &d, &dmin);
    if (mmq)
        for (int g = 0; g < 16; g++) {
            r->f0[16 * i + g] = h(d * (float)sc[g]);
            r->f1[16 * i + g] = h(dmin * (float)mn[g]);
        }
    else
        for (int j = 0; j < 8; j++) {
            r->f0[8 * i + j] = d;
            r->f1[8 * i + j] = dmin;
        }
}

static void decode_row(int t, int mmq, const uint8_t *w, int64_t n, mt_crow *r) {
    if (t < MT_ENG_Q2_K) {
        decode_legacy(t, mmq, w, n, r);
        return;
    }
    for (int64_t i = 0; i < n / MT_QK_K; i++) {
        if (t == MT_ENG_Q4_K) decode_k45(0, mmq, w + i * MT_Q4_K_BYTES, i, r);
        else if (t == MT_ENG_Q5_K) decode_k45(1, mmq, w + i * MT_Q5_K_BYTES, i, r);
        else if (t == MT_ENG_Q3_K) decode_q3k(mmq, w + i * MT_Q3_K_BYTES, i, r);
        else if (t == MT_ENG_Q2_K) decode_q2k(mmq, w + i * MT_Q2_K_BYTES, i, r);
        else decode_q6k(w + i * MT_Q6_K_BYTES, i, r);
    }
}

/* ------------------------------------------------------------------ dots of a decoded row */

/* c[g] = the exact integer dot of codes a and activation codes q over 16-value group g, for 2*nb groups.
 * Integer sums are exact in any order, so the AVX2 form (x86-64 CPUs that have it, chosen at run time)
 * gives the same numbers as the scalar one: |a|, q*sign(a) through maddubs (pairs of products of at most
 * 128*127 in int16), then madd with ones to int32 lanes, each 128-bit half one group. */
static void dots_scalar(const int8_t *restrict a, const int8_t *restrict q, int64_t nb, int32_t *restrict c) {
    for (int64_t g = 0; g < 2 * nb; g++) {
        int32_t acc = 0;
        for (int j = 0; j < 16; j++) acc += a[16 * g + j] * q[16 * g + j];
        c[g] = acc;
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MT_HAVE_AVX2 1
__attribute__((target("avx2"))) static void dots_avx2(const int8_t *a, const int8_t *q, int64_t nb, int32_t *c) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < nb; b++) {
        const __m256i va = _mm256_loadu_si256((const __m256i *)(a + 32 * b));
        const __m256i vq = _mm256_loadu_si256((const __m256i *)(q + 32 * b));
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(va, va), _mm256_sign_epi8(vq, va)),
                                            ones);
        __m128i h2 = _mm_hadd_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
        h2 = _mm_hadd_epi32(h2, h2);
        c[2 * b] = _mm_cvtsi128_si32(h2);
        c[2 * b + 1] = _mm_extract_epi32(h2, 1);
    }
}
#endif

typedef void (*mt_dots_fn)(const int8_t *, const int8_t *, int64_t, int32_t *);

static mt_dots_fn dots_impl(void) {
#ifdef MT_HAVE_AVX2
    if (__builtin_cpu_supports("avx2")) return dots_avx2;
#endif
    return dots_scalar;
}

/* The kernel's result for one row and one token from the integer dots c and activation code sums S per
 * 16 values (2*nb each) and the token's d and s (nb blocks of 32). */
static float dot_row(int t, int mmq, const mt_crow *r, const int32_t *c, const int32_t *S, const float *d,
                     const float *s, int64_t nb) {
    const float *f0 = r->f0, *f1 = r->f1;
    const int16_t *sc = r->sc, *mn = r->mn;
    float acc = 0.0f;
    if (t == MT_ENG_Q2_K && mmq) { /* per 128 values: the blocks' scaled dots, then the mins of the first 96 */
        for (int64_t b0 = 0; b0 < nb; b0 += 4) {
            for (int64_t b = b0; b < b0 + 4; b++) {
                float tmp = (float)c[2 * b] * f0[2 * b] + (float)c[2 * b + 1] * f0[2 * b + 1];
                if (b == b0 + 3) tmp -= (float)S[2 * b] * f1[2 * b] + (float)S[2 * b + 1] * f1[2 * b + 1];
                acc += tmp * d[b];
            }
            for (int64_t b = b0; b < b0 + 3; b++) {
                acc -= f1[2 * b] * s[2 * b];
                acc -= f1[2 * b + 1] * s[2 * b + 1];
            }
        }
        return acc;
    }
    if (t == MT_ENG_Q6_K && mmq) { /* a float partial sum per 128 values, scaled by d once */
        for (int64_t b0 = 0; b0 < nb; b0 += 4) {
            float tmp = 0.0f;
            for (int64_t b = b0; b < b0 + 4; b++)
                tmp += (float)(c[2 * b] * sc[2 * b] + c[2 * b + 1] * sc[2 * b + 1]) * d[b];
            acc += tmp * f0[b0];
        }
        return acc;
    }
    for (int64_t b = 0; b < nb; b++) {
        const int32_t c0 = c[2 * b], c1 = c[2 * b + 1], cb = c0 + c1;
        switch (t) {
        case MT_ENG_Q8_0:
        case MT_ENG_MXFP4:
            acc += mmq ? ((float)cb * f0[b]) * d[b] : (f0[b] * d[b]) * (float)cb;
            break;
        case MT_ENG_Q4_0:
        case MT_ENG_Q5_0:
            if (mmq) acc += ((float)cb * f0[b]) * d[b];
            else acc += f0[b] * ((float)cb * d[b] - (t == MT_ENG_Q4_0 ? 8.0f : 16.0f) * s[b]);
            break;
        case MT_ENG_Q4_1:
        case MT_ENG_Q5_1:
            if (mmq) {
                acc += (f0[b] * d[b]) * (float)cb;
                acc += f1[b] * s[b];
            } else {
                acc += (float)cb * h(f0[b] * d[b]) + h(f1[b] * s[b]);
            }
            break;
        case MT_ENG_Q4_K:
        case MT_ENG_Q5_K:
            if (mmq) {
                acc += (f0[b] * d[b]) * (float)cb;
                acc += f1[b] * s[b];
            } else {
                acc += f0[b] * (d[b] * (float)(sc[2 * b] * cb))
                     - f1[b] * (d[b] * (float)(mn[2 * b] * (S[2 * b] + S[2 * b + 1])));
            }
            break;
        case MT_ENG_Q2_K: /* MMVQ */
            acc += f0[b] * (d[b] * (float)(c0 * sc[2 * b] + c1 * sc[2 * b + 1]))
                 - f1[b] * (d[b] * (float)(S[2 * b] * mn[2 * b] + S[2 * b + 1] * mn[2 * b + 1]));
            break;
        case MT_ENG_Q3_K:
            if (mmq) acc += d[b] * ((float)c0 * f0[b] + (float)c1 * f1[b]);
            else acc += f0[b] * (d[b] * (float)(c0 * sc[2 * b] + c1 * sc[2 * b + 1]));
            break;
        default: /* Q6_K, MMVQ */
            acc += f0[b] * (d[b] * (float)(c0 * sc[2 * b] + c1 * sc[2 * b + 1]));
        }
    }
    return acc;
}

int mt_cuda_matmul(int t, int kernel, const uint8_t *w, int64_t row_bytes, int64_t r0, int64_t r1, const int8_t *qs,
                   const float *d, const float *s, int64_t n_tokens, int64_t n, float *out, int64_t n_rows) {
    if (t < 0 || t >= MT_ENG_N) return 2;
    const int mmq = kernel == MT_CUDA_MMQ;
    const int64_t nb = n / QK, ns = nb * mt_cuda_sums_per_block(t, kernel);
    mt_crow r;
    const mt_dots_fn dots = dots_impl();
    r.a = malloc((size_t)n);
    r.sc = calloc((size_t)(n / 16), sizeof(int16_t));
    r.mn = calloc((size_t)(n / 16), sizeof(int16_t));
    r.f0 = calloc((size_t)(n / 16), sizeof(float)); /* per 32 values, or per 16 (Q2_K's MMQ) */
    r.f1 = calloc((size_t)(n / 16), sizeof(float));
    int32_t *c = malloc(sizeof(int32_t) * (size_t)(2 * nb));
    int32_t *S = malloc(sizeof(int32_t) * (size_t)(2 * nb * (n_tokens ? n_tokens : 1)));
    if (!r.a || !r.sc || !r.mn || !r.f0 || !r.f1 || !c || !S) {
        free(r.a), free(r.sc), free(r.mn), free(r.f0), free(r.f1), free(c), free(S);
        return 1;
    }
    for (int64_t g = 0; g < 2 * nb * n_tokens; g++) { /* each token's activation code sums per 16, once */
        int32_t acc = 0;
        for (int j = 0; j < 16; j++) acc += qs[16 * g + j];
        S[g] = acc;
    }
    for (int64_t row = r0; row < r1; row++) {
        decode_row(t, mmq, w + row * row_bytes, n, &r);
        for (int64_t tok = 0; tok < n_tokens; tok++) {
            dots(r.a, qs + tok * n, nb, c);
            out[tok * n_rows + row] = dot_row(t, mmq, &r, c, S + tok * 2 * nb, d + tok * nb, s + tok * ns, nb);
        }
    }
    free(r.a), free(r.sc), free(r.mn), free(r.f0), free(r.f1), free(c), free(S);
    return 0;
}
