/* Q2_K, Q4_K and Q5_K quantization, bit-exact with ggml's quantize_row_q{2,4,5}_K_ref (no imatrix)
 * and quantize_row_q{2,4,5}_K_impl (imatrix). Translated from moetrace's torch kernels
 * (formats_q2k.py, formats_q4k_q5k.py, search_qkx.py, search_qp.py). One super-block at a time (two for
 * Q4_K/Q5_K, see below), row by row, all scratch on the stack.
 *
 * The cost is ggml's per-sub-block scale search (make_qkx2_quants / make_qkx3_quants): 16 to 37
 * candidate scales, each one pass computing codes and three weighted sums and one pass summing
 * the weighted error, every sum a sequential chain in element order. ggml's scalar code is bound
 * by those chains' add latency. Here sub-blocks run side by side: they are transposed to
 * element-major (element i of sub-block j at [i][j]), so each vector operation applies one of
 * ggml's float operations to independent sub-blocks ("lanes"), and each lane still adds its own
 * terms in ggml's order. Decisions ggml takes per sub-block (keep a candidate or not) become
 * per-lane selects. The search runs on 16 lanes: one Q2_K super-block (16 sub-blocks of 16), or
 * two consecutive Q4_K/Q5_K super-blocks (8 sub-blocks of 32 each), which keeps enough
 * independent chains in flight.
 *
 * Codes: ggml's MAX(0, MIN(nmax, nearest_int(f))), f = iscale*(x - min). While |f| < 2**22 that
 * equals the float round-to-nearest-even (f + 1.5*2**23) - 1.5*2**23 clamped in float. Whether a
 * step is in that range is decided from each lane's smallest and largest value (f is monotonic
 * in x); otherwise (tiny or huge ranges, NaN, infinities) the step runs ggml's integer trick
 * lane by lane, which is exact for every input.
 *
 * The search and the block loops are written once (quant_kquant_qkx_body.h) and
 * compiled twice, for 4-lane SSE2 (or generic) vectors and, on x86-64 with gcc, for 8-lane AVX2
 * vectors picked when the module loads (module.c: the CPU has AVX2 and MOETRACE_NO_AVX2 is unset). AVX2 brings no FMA (a separate target, and
 * -ffp-contract=off forbids contraction anyway): both perform the same IEEE float32 operations
 * and give the same bits. */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "ckernels.h"
#include "common.h"

/* Sizes and offsets come from layouts.h; the lane layout below is written for this block length. */
_Static_assert(MT_QK_K == 256, "Q4_K/Q5_K super-blocks are 8 sub-blocks of 32 and Q2_K's 16 of 16, one per lane");

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(MT_NO_CLONES)
#define QKX_AVX2 1
#include <immintrin.h>
#endif

#define MT_INLINE static inline __attribute__((always_inline))
#define QKX_MAGIC 12582912.f     /* 1.5 * 2**23, ggml's nearest_int constant */
#define QKX_FAST_LIMIT 4.0e6f    /* below 2**22: the float rounding equals nearest_int */
#define QKX_LANES 16             /* sub-blocks searched side by side */
#define QKX_MAX_N 32             /* largest sub-block */
#define QKX_MAX_MULTS 37         /* largest search grid (nstep 36) */

/* How the codes are rounded (see SFX(codes) below). */
#define QKX_SLOW 0
#define QKX_FAST 1
#define QKX_LO 2
#define QKX_HI 4

/* 4-lane vectors: SSE2 on x86-64, gcc's generic vectors elsewhere. */
typedef float qkx_v4f __attribute__((vector_size(16)));
typedef int32_t qkx_v4i __attribute__((vector_size(16)));

MT_INLINE qkx_v4f v4_min(qkx_v4f a, qkx_v4f b) { /* a < b ? a : b */
#if defined(__SSE2__)
    return (qkx_v4f)_mm_min_ps((__m128)a, (__m128)b);
#else
    qkx_v4i m = a < b;
    return (qkx_v4f)((m & (qkx_v4i)a) | (~m & (qkx_v4i)b));
#endif
}
MT_INLINE qkx_v4f v4_max(qkx_v4f a, qkx_v4f b) { /* a > b ? a : b */
#if defined(__SSE2__)
    return (qkx_v4f)_mm_max_ps((__m128)a, (__m128)b);
#else
    qkx_v4i m = a > b;
    return (qkx_v4f)((m & (qkx_v4i)a) | (~m & (qkx_v4i)b));
#endif
}
MT_INLINE int v4_all(qkx_v4i m) {
#if defined(__SSE2__)
    return _mm_movemask_ps((__m128)m) == 0xF;
#else
    return (m[0] & m[1] & m[2] & m[3]) != 0;
#endif
}

MT_INLINE qkx_v4f v4_set(float s) { return (qkx_v4f){s, s, s, s}; }
MT_INLINE qkx_v4f v4_load(const float *p) { qkx_v4f v; memcpy(&v, p, sizeof v); return v; }

/* ggml's MAX(0?, MIN(nmax, nearest_int(f))) on 4 lanes, bit for bit for any input (lo: whether
 * the MAX(0, .) applies). */
MT_INLINE qkx_v4i v4_nearest_clamped(qkx_v4f f, int32_t nmax, int lo) {
    const qkx_v4f t = f + QKX_MAGIC;
    qkx_v4i q = ((qkx_v4i)t & 0x007fffff) - 0x00400000;
    const qkx_v4i n = {nmax, nmax, nmax, nmax};
    const qkx_v4i hi = q > n;
    q = (q & ~hi) | (n & hi);
    if (lo) q &= ~(q < (qkx_v4i){0, 0, 0, 0});
    return q;
}

/* ggml's search multipliers rmin + rdelta*is + nmax, in float32 left to right. */
static int search_multipliers(float *m, int nmax, float rmin, float rdelta, int nstep) {
    for (int is = 0; is <= nstep; ++is) m[is] = rmin + rdelta * (float)is + (float)nmax;
    return nstep + 1;
}

/* ggml's make_qp_quants: quantize n non-negative sub-block scales to codes 0..nmax (kept as
 * ggml's uint8 array keeps them, wrapped to 8 bits); returns the super-block scale. */
static float make_qp_quants(int n, int nmax, const float *restrict x, uint8_t *restrict L,
                            const float *restrict w) {
    float max = 0.f;
    for (int i = 0; i < n; ++i) max = max > x[i] ? max : x[i];
    if (max < MT_GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = (float)nmax / max;
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)mt_nearest_int(iscale * x[i]);
    const float scale = 1.f / iscale;
    float best_mse = 0.f;
    for (int i = 0; i < n; ++i) {
        const float diff = x[i] - scale * (float)L[i];
        best_mse += w[i] * diff * diff;
    }
    /* The eight candidates is = -4..-1, 1..4 side by side (each lane sums in ggml's order), then
     * ggml's strictly-better selection in candidate order. */
    float isc[8], mse[8];
    for (int c = 0; c < 8; ++c) {
        const int is = c < 4 ? c - 4 : c - 3;
        isc[c] = (0.1f * (float)is + (float)nmax) / max;
    }
    qkx_v4f iv[2], sv[2], acc[2];
    for (int h = 0; h < 2; ++h) {
        iv[h] = v4_load(isc + 4 * h);
        sv[h] = v4_set(1.f) / iv[h];
        acc[h] = v4_set(0.f);
    }
    for (int i = 0; i < n; ++i) {
        const qkx_v4f xi = v4_set(x[i]), wi = v4_set(w[i]);
        for (int h = 0; h < 2; ++h) {
            const qkx_v4f l = __builtin_convertvector(v4_nearest_clamped(iv[h] * xi, nmax, 0), qkx_v4f);
            const qkx_v4f diff = xi - sv[h] * l;
            acc[h] += wi * diff * diff;
        }
    }
    memcpy(mse, acc, sizeof mse);
    for (int c = 0; c < 8; ++c) {
        if (mse[c] < best_mse) {
            best_mse = mse[c];
            iscale = isc[c];
        }
    }
    float sumlx = 0.f, suml2 = 0.f;
    for (int i = 0; i < n; ++i) {
        int l = mt_nearest_int(iscale * x[i]);
        l = l < nmax ? l : nmax;
        L[i] = (uint8_t)l;
        sumlx += w[i] * x[i] * (float)l;
        suml2 += w[i] * (float)l * (float)l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            const float wi = w[i];
            const float Li = (float)L[i];
            float slx = sumlx - wi * x[i] * Li;
            float sl2 = suml2 - wi * Li * Li;
            if (slx > 0.f && sl2 > 0.f) {
                int new_l = mt_nearest_int(x[i] * sl2 / slx);
                new_l = new_l < nmax ? new_l : nmax;
                if (new_l != (int)L[i]) {
                    slx += wi * x[i] * (float)new_l;
                    sl2 += wi * (float)new_l * (float)new_l;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* Whether any of the n values is NaN (the codes' range check reads only the extremes). */
static int any_nan(const float *x, int n) {
    int bad = 0;
    for (int i = 0; i < n; ++i) bad |= x[i] != x[i];
    return bad;
}

/* ggml's get_scale_min_k4. */
static inline void get_scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
    }
}

/* Pack eight 6-bit scale and min codes into ggml's 12 bytes (with its uint8 wrap-around). */
static void pack_scales_k4(const uint8_t *ls, const uint8_t *lm, uint8_t *scales) {
    for (int j = 0; j < 8; ++j) {
        if (j < 4) {
            scales[j] = ls[j];
            scales[j + 4] = lm[j];
        } else {
            scales[j + 4] = (uint8_t)((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
            scales[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
            scales[j - 0] |= (uint8_t)((lm[j] >> 4) << 6);
        }
    }
}

/* Q4_K: 16 header bytes, then qs[32k + l] = code 64k + l | code 64k + 32 + l << 4. */
static void pack_q4_k(const uint8_t *L, uint8_t *q) {
    for (int j = 0; j < 256; j += 64) {
        for (int l = 0; l < 32; ++l) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
        q += 32;
    }
}

/* Q5_K: qh[32] (bit 2k + t of qh[l]: the high bit of code 64k + 32t + l), then ql[128]. */
static void pack_q5_k(const uint8_t *L, uint8_t *qh, uint8_t *ql) {
    memset(qh, 0, 32);
    uint8_t m1 = 1, m2 = 2;
    for (int n = 0; n < 256; n += 64) {
        for (int j = 0; j < 32; ++j) {
            int l1 = L[n + j];
            if (l1 > 15) {
                l1 -= 16;
                qh[j] |= m1;
            }
            int l2 = L[n + j + 32];
            if (l2 > 15) {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[j] = (uint8_t)(l1 | (l2 << 4));
        }
        m1 = (uint8_t)(m1 << 2);
        m2 = (uint8_t)(m2 << 2);
        ql += 32;
    }
}

/* Q2_K: qs[32h + l] holds code 128h + 32k + l in bits 2k..2k+1. */
static void pack_q2_k(const uint8_t *L, uint8_t *qs) {
    for (int j = 0; j < 256; j += 128)
        for (int l = 0; l < 32; ++l)
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

/* Requantize the codes of one sub-block of len values with its stored scale d and min dm:
 * MAX(0, MIN(nmax, nearest_int((x + dm)/d))). */
static inline void requantize(int len, int nmax, const float *restrict x, float d, float dm, uint8_t *restrict L) {
    const qkx_v4f dv = v4_set(d), mv = v4_set(dm);
    for (int i = 0; i < len; i += 4) {
        const qkx_v4i q = v4_nearest_clamped((v4_load(x + i) + mv) / dv, nmax, 1);
        for (int k = 0; k < 4; ++k) L[i + k] = (uint8_t)q[k];
    }
}

/* The rest of quantize_row_q{4,5}_K_ref / _impl for one super-block after the search: the
 * sub-block scales and mins (8 each, and their weight sums sw on the imatrix path), to 6-bit codes
 * and fp16 super-scales, then the codes requantized with the scales as stored; a sub-block whose
 * stored scale is 0 keeps the search's codes lt (stride QKX_LANES). */
static void finish_k4_block(int nmax, int use_imatrix, const float *x, const float *scales, const float *mins,
                            const float *sw, const float *lt, uint8_t *y) {
    uint8_t ls[8], lm[8];
    float d_block, m_block;
    if (!use_imatrix) {
        float max_scale = 0.f, max_min = 0.f;
        for (int j = 0; j < 8; ++j) {
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        for (int j = 0; j < 8; ++j) {
            const uint8_t a = (uint8_t)mt_nearest_int(inv_scale * scales[j]);
            const uint8_t b = (uint8_t)mt_nearest_int(inv_min * mins[j]);
            ls[j] = a < 63 ? a : 63;
            lm[j] = b < 63 ? b : 63;
        }
        d_block = max_scale / 63.f;
        m_block = max_min / 63.f;
    } else {
        d_block = make_qp_quants(8, 63, scales, ls, sw);
        m_block = make_qp_quants(8, 63, mins, lm, sw);
        if (nmax == 31) { /* Q5_K's impl clamps to 63 here, Q4_K's does not */
            for (int j = 0; j < 8; ++j) {
                ls[j] = ls[j] < 63 ? ls[j] : 63;
                lm[j] = lm[j] < 63 ? lm[j] : 63;
            }
        }
    }
    /* Q4_K and Q5_K share d, dmin and scales; they differ after them (Q5_K's qh, then qs). */
    uint8_t *dp = y + (nmax == 15 ? MT_Q4_K_D : MT_Q5_K_D), *mp = y + (nmax == 15 ? MT_Q4_K_DMIN : MT_Q5_K_DMIN);
    mt_store_fp16(dp, d_block);
    mt_store_fp16(mp, m_block);
    uint8_t *sc = y + (nmax == 15 ? MT_Q4_K_SCALES : MT_Q5_K_SCALES);
    pack_scales_k4(ls, lm, sc);

    uint8_t L[MT_QK_K];
    const float d16 = mt_load_fp16(dp), m16 = mt_load_fp16(mp);
    for (int j = 0; j < 8; ++j) {
        uint8_t s, m;
        get_scale_min_k4(j, sc, &s, &m);
        const float d = d16 * (float)s;
        if (!d) {
            for (int i = 0; i < 32; ++i) L[32 * j + i] = (uint8_t)lt[i * QKX_LANES + j];
            continue;
        }
        requantize(32, nmax, x + 32 * j, d, m16 * (float)m, L + 32 * j);
    }
    if (nmax == 15)
        pack_q4_k(L, y + MT_Q4_K_QS);
    else
        pack_q5_k(L, y + MT_Q5_K_QH, y + MT_Q5_K_QS);
}

/* The rest of quantize_row_q2_K_ref / _impl for one super-block after the search (16 sub-block
 * scales and mins, codes lt with stride QKX_LANES). */
static void finish_q2_k_block(int use_imatrix, const float *x, const float *scales, const float *mins,
                              const float *sw, const float *lt, uint8_t *y) {
    uint8_t sc[16];
    float d_block, m_block;
    if (!use_imatrix) {
        float max_scale = 0.f, max_min = 0.f;
        for (int j = 0; j < 16; ++j) {
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        if (max_scale > 0) {
            const float iscale = 15.f / max_scale;
            for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)mt_nearest_int(iscale * scales[j]);
            d_block = max_scale / 15.f;
        } else {
            for (int j = 0; j < 16; ++j) sc[j] = 0;
            d_block = 0.f;
        }
        if (max_min > 0) {
            const float iscale = 15.f / max_min;
            for (int j = 0; j < 16; ++j) sc[j] |= (uint8_t)((unsigned)mt_nearest_int(iscale * mins[j]) << 4);
            m_block = max_min / 15.f;
        } else {
            m_block = 0.f;
        }
    } else {
        uint8_t ls[16], lm[16];
        d_block = make_qp_quants(16, 15, scales, ls, sw);
        m_block = make_qp_quants(16, 15, mins, lm, sw);
        for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)(ls[j] | (lm[j] << 4));
    }
    memcpy(y + MT_Q2_K_SCALES, sc, MT_Q2_K_SCALES_SIZE);
    mt_store_fp16(y + MT_Q2_K_D, d_block);
    mt_store_fp16(y + MT_Q2_K_DMIN, m_block);

    uint8_t L[MT_QK_K];
    const float d16 = mt_load_fp16(y + MT_Q2_K_D), m16 = mt_load_fp16(y + MT_Q2_K_DMIN);
    for (int j = 0; j < 16; ++j) {
        const float d = d16 * (float)(sc[j] & 0xF);
        if (!d) {
            for (int i = 0; i < 16; ++i) L[16 * j + i] = (uint8_t)lt[i * QKX_LANES + j];
            continue;
        }
        requantize(16, 3, x + 16 * j, d, m16 * (float)(sc[j] >> 4), L + 16 * j);
    }
    pack_q2_k(L, y + MT_Q2_K_QS);
}

/* ---------------------------------------------------------------- instantiations */

#define VW 4
#define VF qkx_v4f
#define VI qkx_v4i
#define VMIN v4_min
#define VMAX v4_max
#define VALL v4_all
#define SFX(name) name##_v4
#include "quant_kquant_qkx_body.h"
#undef VW
#undef VF
#undef VI
#undef VMIN
#undef VMAX
#undef VALL
#undef SFX

#ifdef QKX_AVX2
#pragma GCC push_options
#pragma GCC target("avx2")
typedef float qkx_v8f __attribute__((vector_size(32)));
typedef int32_t qkx_v8i __attribute__((vector_size(32)));
MT_INLINE qkx_v8f v8_min(qkx_v8f a, qkx_v8f b) { return (qkx_v8f)_mm256_min_ps((__m256)a, (__m256)b); }
MT_INLINE qkx_v8f v8_max(qkx_v8f a, qkx_v8f b) { return (qkx_v8f)_mm256_max_ps((__m256)a, (__m256)b); }
MT_INLINE int v8_all(qkx_v8i m) { return _mm256_movemask_ps((__m256)m) == 0xFF; }
#define VW 8
#define VF qkx_v8f
#define VI qkx_v8i
#define VMIN v8_min
#define VMAX v8_max
#define VALL v8_all
#define SFX(name) name##_v8
#include "quant_kquant_qkx_body.h"
#undef VW
#undef VF
#undef VI
#undef VMIN
#undef VMAX
#undef VALL
#undef SFX
#pragma GCC pop_options

/* Whether the AVX2 instantiation runs; set once, when the module registers its kernels. */
static int qkx_avx2;
#define QKX_DISPATCH(name, ...) (qkx_avx2 ? name##_v8(__VA_ARGS__) : name##_v4(__VA_ARGS__))
#else
#define QKX_DISPATCH(name, ...) name##_v4(__VA_ARGS__)
#endif

/* ---------------------------------------------------------------- entry points */

static int quantize_q4_k(const float *x, uint8_t *y, int64_t n_rows, int64_t n_per_row, const float *imatrix) {
    float mults[QKX_MAX_MULTS];
    const int nmult = imatrix ? search_multipliers(mults, 15, -0.9f, 0.05f, 36)
                              : search_multipliers(mults, 15, -1.f, 0.1f, 20);
    QKX_DISPATCH(quantize_k4_rows, 15, x, y, n_rows, n_per_row, imatrix, mults, nmult);
    return 0;
}

static int quantize_q5_k(const float *x, uint8_t *y, int64_t n_rows, int64_t n_per_row, const float *imatrix) {
    float mults[QKX_MAX_MULTS];
    const int nmult = imatrix ? search_multipliers(mults, 31, -0.9f, 0.05f, 36)
                              : search_multipliers(mults, 31, -0.5f, 0.1f, 15);
    QKX_DISPATCH(quantize_k4_rows, 31, x, y, n_rows, n_per_row, imatrix, mults, nmult);
    return 0;
}

static int quantize_q2_k(const float *x, uint8_t *y, int64_t n_rows, int64_t n_per_row, const float *imatrix) {
    float mults[QKX_MAX_MULTS];
    const int nmult = imatrix ? search_multipliers(mults, 3, -0.9f, 0.05f, 36)
                              : search_multipliers(mults, 3, -0.5f, 0.1f, 15);
    QKX_DISPATCH(quantize_q2_k_rows, x, y, n_rows, n_per_row, imatrix, mults, nmult);
    return 0;
}

void mt_register_kquant_qkx(mt_kernel_table *t, int use_avx2) {
#ifdef QKX_AVX2
    qkx_avx2 = use_avx2;
#else
    use_avx2 = 0; /* no AVX2 build here (not gcc on x86-64) */
#endif
    t->search_impl[MT_SEARCH_QKX] = use_avx2 ? "avx2" : MT_PORTABLE_IMPL;
    t->quantize[MT_Q2_K] = quantize_q2_k;
    t->quantize[MT_Q4_K] = quantize_q4_k;
    t->quantize[MT_Q5_K] = quantize_q5_k;
}

