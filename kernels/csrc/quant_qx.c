/* Quantizers of Q3_K, Q6_K and the legacy 32-element formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
 * bit-exact with ggml's quantize_row_*_ref (imatrix NULL) and quantize_row_*_impl (imatrix given).
 *
 * They translate the torch kernels of formats_q3k_q6k.py, formats_legacy.py, search_qx.py and search_qkx.py
 * (which mirror ggml-quants.c). One block at a time, row by row, scratch on the stack.
 *
 * Speed without changing a bit:
 *  - make_qx_quants (Q6_K, Q3_K with weights, Q4_0/Q5_0 with weights) runs its 19 candidate scales
 *    side by side in vector lanes: each lane keeps ggml's sequential sums in element order, and
 *    only the strictly-better selection, which depends on the running best, runs candidate by
 *    candidate afterwards;
 *  - make_q3_quants (Q3_K) runs the 16 groups of a super-block side by side, one group per lane;
 *  - make_qkx3_quants (Q4_1/Q5_1 with weights) runs 8 blocks of a row side by side, one per lane;
 *  - the reference paths of the legacy types and Q8_0 scale, round and pack 4 values per op
 *    (8 on AVX2 machines, where 8 blocks also share one vector for d, 1/d and the fp16 of d).
 * Lane arithmetic is the same IEEE float32 operation as ggml's scalar code (no FMA: the build
 * passes -ffp-contract=off), so every lane computes exactly the value ggml computes.
 *
 * The build is portable (SSE2 on x86-64). The two search kernels and the reference paths also have an AVX2 version,
 * chosen at load time on CPUs that have AVX2; it performs the same operations, so the bytes do not
 * depend on the machine. MOETRACE_NO_AVX2=1 in the environment (read once, by module.c when the module loads) keeps
 * the portable version, so tests can check both on one machine. Inputs are finite (the caller
 * rejects NaN and Inf), but float32 sums of huge inputs can overflow to Inf and NaN inside the
 * searches; those cases follow ggml's scalar comparisons too (see make_qx_quants_scalar). */
#include "ckernels.h"
#include "common.h"

/* Sizes and offsets come from layouts.h; the vector code below is written for these block lengths. */
_Static_assert(MT_QK == 32, "legacy blocks are taken as 8 vectors of 4 floats (4 of 8 on AVX2), qh as one uint32");
_Static_assert(MT_QK_K == 256, "Q3_K and Q6_K super-blocks are taken as 16 sub-blocks of 16");

#include <float.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));
typedef int8_t v4c __attribute__((vector_size(4)));

#define MAGIC 12582912.f /* 1.5 * 2**23, ggml's nearest_int constant */

static inline v4f v4f_load(const float *p) { v4f v; memcpy(&v, p, sizeof v); return v; }
static inline v4f v4f_set1(float s) { return (v4f){s, s, s, s}; }
static inline v4i v4i_set1(int32_t s) { return (v4i){s, s, s, s}; }

/* a < b ? a : b, lane by lane (x86's minps). */
static inline v4f v4f_min(v4f a, v4f b) {
#if defined(__SSE2__)
    return (v4f)_mm_min_ps((__m128)a, (__m128)b);
#else
    v4i m = a < b;
    return (v4f)((m & (v4i)a) | (~m & (v4i)b));
#endif
}

/* a > b ? a : b, lane by lane (x86's maxps). */
static inline v4f v4f_max(v4f a, v4f b) {
#if defined(__SSE2__)
    return (v4f)_mm_max_ps((__m128)a, (__m128)b);
#else
    v4i m = a > b;
    return (v4f)((m & (v4i)a) | (~m & (v4i)b));
#endif
}

static inline v4f v4f_select(v4i m, v4f a, v4f b) { return (v4f)((m & (v4i)a) | (~m & (v4i)b)); }
static inline v4i v4i_select(v4i m, v4i a, v4i b) { return (m & a) | (~m & b); }
static inline v4i v4i_clamp(v4i v, int32_t lo, int32_t hi) {
    v = v4i_select(v < lo, v4i_set1(lo), v);
    return v4i_select(v > hi, v4i_set1(hi), v);
}

/* ggml's nearest_int on 4 lanes, bit for bit (out-of-range inputs included). */
static inline v4i v4_nearest_int(v4f v) {
    v4f t = v + MAGIC;
    v4i i;
    memcpy(&i, &t, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

/* For |v| <= 2**22: (float)nearest_int(v), exactly (v + 1.5*2**23 has an ulp of 1 there). */
static inline v4f v4f_round(v4f v) { return (v + MAGIC) - MAGIC; }

static inline float hmax4(v4f v) {
    float a = v[0] > v[1] ? v[0] : v[1];
    float b = v[2] > v[3] ? v[2] : v[3];
    return a > b ? a : b;
}

static inline float f32_max_of(float a, float b) { return a > b ? a : b; }

/* ------------------------------------------------------------------------------------------ */
/* make_qx_quants(n, nmax, x, L, rmse_type=1, qw): the 19 candidates side by side in lanes.      */

#define QX_LANES 24 /* 19 candidates, padded to 3 vectors of 8 (or 6 of 4) */
#define QX_MAXN 32

/* ggml's first element of largest magnitude (its `if (ax > amax)` loop from 0): the largest |x|,
 * then the first element that has it; +0.0 when every |x| is 0. NaN elements are skipped, as
 * ggml's comparison skips them (`ax > amax ? ax : amax`, never the other way round). *nonfinite
 * is set when some x is Inf or NaN (possible for Q3_K's second-level call, whose x are the group
 * scales, when float32 sums overflowed). */
static inline float first_absmax(int n, const float *x, float *amax_out, int *nonfinite) {
    float amax = 0.f;
    uint32_t expo = 0;
    for (int i = 0; i < n; ++i) {
        const float ax = fabsf(x[i]);
        amax = ax > amax ? ax : amax;
        uint32_t b;
        memcpy(&b, x + i, sizeof b);
        expo |= (b & 0x7f800000u) == 0x7f800000u;
    }
    *amax_out = amax;
    *nonfinite = expo != 0;
    if (amax == 0.f) return 0.f;
    for (int i = 0; i < n; ++i)
        if (fabsf(x[i]) == amax) return x[i];
    return 0.f; /* not reached */
}

/* The kernel of make_qx_quants: for each candidate lane k (isc[k] = num[k] / max),
 *   sumlx[k] = sum_i (w[i]*x[i]) * l,  suml2[k] = sum_i (w[i]*l) * l,  l = clamp(nearest_int(isc[k]*x[i]), -nmax, nmax-1),
 * accumulated in element order from +0.0f, exactly as ggml's loops (clamping before rounding is the
 * same: the bounds are integers; nearest_int is exact round-half-even here as |isc*x| <= nmax+1). */
typedef void (*qx_sums_fn)(int n, const float *x, const float *w, const float *num, float max, float fnmax,
                           float *isc, float *sumlx, float *suml2);

static void qx_sums_generic(int n, const float *x, const float *w, const float *num, float max, float fnmax,
                            float *isc, float *sumlx, float *suml2) {
    enum { NV = QX_LANES / 4 };
    float wx[QX_MAXN];
    for (int i = 0; i < n; ++i) wx[i] = w[i] * x[i];
    const v4f mv = v4f_set1(max), lo = v4f_set1(-fnmax), hi = v4f_set1(fnmax - 1.f);
    /* two passes of 3 vectors keep the sums in registers */
    for (int v0 = 0; v0 < NV; v0 += 3) {
        v4f iv[3], slx[3], sl2[3];
        for (int v = 0; v < 3; ++v) {
            iv[v] = v4f_load(num + 4 * (v0 + v)) / mv;
            memcpy(isc + 4 * (v0 + v), &iv[v], sizeof(v4f));
            slx[v] = v4f_set1(0.f);
            sl2[v] = v4f_set1(0.f);
        }
        for (int i = 0; i < n; ++i) {
            const float xi = x[i], wi = w[i], wxi = wx[i];
            for (int v = 0; v < 3; ++v) {
                const v4f l = v4f_round(v4f_min(v4f_max(iv[v] * xi, lo), hi));
                slx[v] += wxi * l;
                sl2[v] += (wi * l) * l;
            }
        }
        for (int v = 0; v < 3; ++v) {
            memcpy(sumlx + 4 * (v0 + v), &slx[v], sizeof(v4f));
            memcpy(suml2 + 4 * (v0 + v), &sl2[v], sizeof(v4f));
        }
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MT_HAVE_AVX2_PATH 1
/* The same kernel on 8 lanes (AVX2 machines; chosen at load time, same float operations). */
__attribute__((target("avx2"))) static void qx_sums_avx2(int n, const float *x, const float *w, const float *num,
                                                         float max, float fnmax, float *isc, float *sumlx,
                                                         float *suml2) {
    const __m256 mv = _mm256_set1_ps(max), lo = _mm256_set1_ps(-fnmax), hi = _mm256_set1_ps(fnmax - 1.f);
    const __m256 i0 = _mm256_div_ps(_mm256_loadu_ps(num), mv);
    const __m256 i1 = _mm256_div_ps(_mm256_loadu_ps(num + 8), mv);
    const __m256 i2 = _mm256_div_ps(_mm256_loadu_ps(num + 16), mv);
    _mm256_storeu_ps(isc, i0);
    _mm256_storeu_ps(isc + 8, i1);
    _mm256_storeu_ps(isc + 16, i2);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, b0 = a0, b1 = a0, b2 = a0;
    for (int i = 0; i < n; ++i) {
        const __m256 xi = _mm256_broadcast_ss(x + i), wi = _mm256_broadcast_ss(w + i);
        const __m256 wxi = _mm256_mul_ps(wi, xi);
#define MT_QX_LANE(iv, a, b)                                                                                      \
    do {                                                                                                          \
        const __m256 l = _mm256_round_ps(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(iv, xi), lo), hi),             \
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);                          \
        a = _mm256_add_ps(a, _mm256_mul_ps(wxi, l));                                                              \
        b = _mm256_add_ps(b, _mm256_mul_ps(_mm256_mul_ps(wi, l), l));                                             \
    } while (0)
        MT_QX_LANE(i0, a0, b0);
        MT_QX_LANE(i1, a1, b1);
        MT_QX_LANE(i2, a2, b2);
#undef MT_QX_LANE
    }
    _mm256_storeu_ps(sumlx, a0);
    _mm256_storeu_ps(sumlx + 8, a1);
    _mm256_storeu_ps(sumlx + 16, a2);
    _mm256_storeu_ps(suml2, b0);
    _mm256_storeu_ps(suml2 + 8, b1);
    _mm256_storeu_ps(suml2 + 16, b2);
}
#endif

static qx_sums_fn qx_sums = qx_sums_generic;

/* Candidate numerators -(nmax + 0.1f*is) in ggml's order (is = 0, then -9..9 except 0); padding
 * lanes repeat candidate 0 and are never selected. */
static void qx_numerators(int nmax, float *num) {
    const float fn = (float)nmax;
    num[0] = -fn;
    int k = 1;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        num[k++] = -(fn + 0.1f * (float)is);
    }
    for (; k < QX_LANES; ++k) num[k] = num[0];
}

static float qx_num4[QX_LANES], qx_num8[QX_LANES], qx_num16[QX_LANES], qx_num32[QX_LANES];

static const float *qx_num(int nmax) {
    return nmax == 4 ? qx_num4 : nmax == 8 ? qx_num8 : nmax == 16 ? qx_num16 : qx_num32;
}

/* make_qx_quants candidate by candidate, as ggml's scalar loops, for x holding Inf or NaN: there
 * iscale*x is NaN or +-Inf, whose nearest_int bits ggml clamps as integers (a NaN gives l = 0),
 * which the lanes' clamp-then-round does not reproduce. max: first_absmax's value (nonzero). */
static float qx_candidate(int n, int nmax, const float *x, const float *w, float iscale, float *suml2_out) {
    float sumlx = 0.f, suml2 = 0.f;
    for (int i = 0; i < n; ++i) {
        int l = mt_nearest_int(iscale * x[i]);
        l = l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
        sumlx += (w[i] * x[i]) * (float)l;
        suml2 += (w[i] * (float)l) * (float)l;
    }
    *suml2_out = suml2;
    return sumlx;
}

static void qx_codes(int n, int nmax, const float *x, float iscale, int8_t *L) {
    for (int i = 0; i < n; ++i) {
        const int l = mt_nearest_int(iscale * x[i]);
        L[i] = (int8_t)(nmax + (l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l)));
    }
}

static float make_qx_quants_scalar(int n, int nmax, const float *x, int8_t *L, const float *w, float max) {
    float suml2;
    float iscale = -(float)nmax / max;
    float sumlx = qx_candidate(n, nmax, x, w, iscale, &suml2);
    qx_codes(n, nmax, x, iscale, L);
    float scale = suml2 != 0.f ? sumlx / suml2 : 0.f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -((float)nmax + 0.1f * (float)is) / max;
        sumlx = qx_candidate(n, nmax, x, w, iscale, &suml2);
        if (suml2 > 0.f && sumlx * sumlx > best * suml2) {
            qx_codes(n, nmax, x, iscale, L);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* Returns ggml's scale; L[i] = l + nmax in 0..2*nmax-1 (all 0 for an all-zero group).
 * qw NULL means ggml's default weights x*x. n <= QX_MAXN; nmax is 4, 8, 16 or 32. */
static float make_qx_quants(int n, int nmax, const float *x, int8_t *L, const float *qw) {
    float amax;
    int nonfinite;
    const float max = first_absmax(n, x, &amax, &nonfinite);
    if (amax < MT_GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float wbuf[QX_MAXN];
    const float *w = qw;
    if (!qw) {
        for (int i = 0; i < n; ++i) wbuf[i] = x[i] * x[i];
        w = wbuf;
    }
    if (nonfinite) return make_qx_quants_scalar(n, nmax, x, L, w, max);
    float isc[QX_LANES], sumlx[QX_LANES], suml2[QX_LANES];
    qx_sums(n, x, w, qx_num(nmax), max, (float)nmax, isc, sumlx, suml2);

    /* Every candidate's scale = sumlx/suml2, best = scale*sumlx and sumlx*sumlx, lane by lane up
     * front (the same float operations ggml performs for each winner), so the sequential
     * strictly-better walk below has no division in its chain. */
    float sc[QX_LANES], bst[QX_LANES], sq[QX_LANES];
    for (int k = 0; k < QX_LANES; k += 4) {
        const v4f a = v4f_load(sumlx + k), b = v4f_load(suml2 + k);
        const v4f s4 = a / b;
        const v4f b4 = s4 * a, q4 = a * a;
        memcpy(sc + k, &s4, sizeof s4);
        memcpy(bst + k, &b4, sizeof b4);
        memcpy(sq + k, &q4, sizeof q4);
    }
    if (suml2[0] == 0.f) {
        sc[0] = 0.f;
        bst[0] = 0.f * sumlx[0];
    }
    int win = 0;
    float best = bst[0];
    for (int k = 1; k < 19; ++k) {
        if (suml2[k] > 0.f && sq[k] > best * suml2[k]) {
            best = bst[k];
            win = k;
        }
    }
    const float scale = sc[win];
    const v4f iv = v4f_set1(isc[win]);
    for (int i = 0; i < n; i += 4) {
        const v4i l = v4i_clamp(v4_nearest_int(iv * v4f_load(x + i)), -nmax, nmax - 1) + nmax;
        const v4c c = __builtin_convertvector(l, v4c);
        memcpy(L + i, &c, 4);
    }
    return scale;
}

/* ------------------------------------------------------------------------------------------ */
/* Q6_K                                                                                         */

static void q6_k_block(const float *x, const float *qw, uint8_t *y) {
    int8_t L[MT_QK_K];
    float scales[16];
    float max_scale = 0.f, max_abs_scale = 0.f;
    for (int ib = 0; ib < 16; ++ib) {
        const float scale = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib, qw ? qw + 16 * ib : NULL);
        scales[ib] = scale;
        const float abs_scale = fabsf(scale);
        if (abs_scale > max_abs_scale) { max_abs_scale = abs_scale; max_scale = scale; }
    }
    if (max_abs_scale < MT_GROUP_MAX_EPS) {
        memset(y, 0, MT_Q6_K_BYTES);
        return;
    }
    const float iscale = -128.f / max_scale;
    const uint16_t dh = mt_fp32_to_fp16(1.f / iscale);
    const float dq = mt_fp16_to_fp32(dh);
    int8_t sc[16];
    for (int ib = 0; ib < 16; ++ib) {
        int l = mt_nearest_int(iscale * scales[ib]);
        sc[ib] = (int8_t)(l < 127 ? l : 127);
    }
    for (int j = 0; j < 16; ++j) {
        const float d = dq * (float)sc[j];
        if (!d) continue;
        const v4f dv = v4f_set1(d);
        for (int q = 0; q < 4; ++q) {
            v4i l = v4i_clamp(v4_nearest_int(v4f_load(x + 16 * j + 4 * q) / dv), -32, 31) + 32;
            for (int t = 0; t < 4; ++t) L[16 * j + 4 * q + t] = (int8_t)l[t];
        }
    }
    uint8_t *ql = y + MT_Q6_K_QL, *qh = y + MT_Q6_K_QH;
    for (int j = 0; j < MT_QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            const uint8_t q1 = (uint8_t)L[j + l], q2 = (uint8_t)L[j + l + 32];
            const uint8_t q3 = (uint8_t)L[j + l + 64], q4 = (uint8_t)L[j + l + 96];
            ql[l] = (uint8_t)((q1 & 0xF) | ((q3 & 0xF) << 4));
            ql[l + 32] = (uint8_t)((q2 & 0xF) | ((q4 & 0xF) << 4));
            qh[l] = (uint8_t)((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
        }
        ql += 64;
        qh += 32;
    }
    memcpy(y + MT_Q6_K_SCALES, sc, MT_Q6_K_SCALES_SIZE);
    y[MT_Q6_K_D] = (uint8_t)(dh & 0xff);
    y[MT_Q6_K_D + 1] = (uint8_t)(dh >> 8);
}

static int quantize_q6_k(const float *x, uint8_t *y, int64_t n_rows, int64_t n_per_row, const float *imatrix) {
    const int64_t nb = n_per_row / MT_QK_K;
    for (int64_t r = 0; r < n_rows; ++r)
        for (int64_t i = 0; i < nb; ++i)
            q6_k_block(x + (r * nb + i) * MT_QK_K, imatrix ? imatrix + i * MT_QK_K : NULL, y + (r * nb + i) * MT_Q6_K_BYTES);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Q3_K                                                                                         */

/* make_q3_quants(16, 4, x, L, do_rmse=true) on the 16 groups of a super-block, one per lane:
 * scales[g] is ggml's return value for group g; L[16*g + i] its codes l + 4 (0 for an all-zero group).
 * A pass that changes nothing in a group leaves it as it was, so running every group for as many
 * passes as the busiest one needs is the same as ggml's early exit per group. */
static void make_q3_quants_16x16(const float *x, int8_t *L, float *scales) {
    enum { NV = 4 }; /* 16 groups = 4 vectors of 4 lanes */
    v4f X[16][NV]; /* X[i][v][lane]: element i of group 4*v + lane */
    for (int g = 0; g < 16; ++g)
        for (int i = 0; i < 16; ++i) X[i][g >> 2][g & 3] = x[16 * g + i];

    float isc[16];
    int zero[16];
    for (int g = 0; g < 16; ++g) {
        float max = 0.f, amax = 0.f;
        for (int i = 0; i < 16; ++i) {
            float ax = fabsf(x[16 * g + i]);
            if (ax > amax) { amax = ax; max = x[16 * g + i]; }
        }
        zero[g] = amax < MT_GROUP_MAX_EPS;
        isc[g] = zero[g] ? 0.f : -4.f / max; /* a zero group's lanes run on zeros, their results discarded */
    }
    v4f Lf[16][NV], W[16][NV], WX[16][NV];
    v4f sumlx[NV], suml2[NV];
    const v4f lo = v4f_set1(-4.f), hi = v4f_set1(3.f);
    v4f iv[NV];
    for (int v = 0; v < NV; ++v) {
        iv[v] = v4f_load(isc + 4 * v);
        sumlx[v] = v4f_set1(0.f);
        suml2[v] = v4f_set1(0.f);
    }
    /* element outer, group vector inner: 4 independent sum chains in flight */
    for (int i = 0; i < 16; ++i) {
        for (int v = 0; v < NV; ++v) {
            const v4f xi = X[i][v];
            const v4f l = v4f_round(v4f_min(v4f_max(iv[v] * xi, lo), hi));
            const v4f w = xi * xi;
            Lf[i][v] = l;
            W[i][v] = w;
            WX[i][v] = w * xi;
            sumlx[v] += WX[i][v] * l;
            suml2[v] += (w * l) * l;
        }
    }
    for (int itry = 0; itry < 5; ++itry) {
        v4i changed = v4i_set1(0);
        for (int i = 0; i < 16; ++i) {
            for (int v = 0; v < NV; ++v) {
                const v4f xi = X[i][v], w = W[i][v], wx = WX[i][v], li = Lf[i][v];
                const v4f slx = sumlx[v] - wx * li;
                const v4f sl2 = suml2[v] - (w * li) * li;
                /* x*sl2/slx is unbounded: ggml's exact nearest_int bits, then the clamp */
                const v4i nl = v4i_clamp(v4_nearest_int((xi * sl2) / slx), -4, 3);
                const v4f new_l = __builtin_convertvector(nl, v4f);
                const v4f slx_new = slx + wx * new_l;
                const v4f sl2_new = sl2 + (w * new_l) * new_l;
                const v4i take = (slx > 0.f) & (new_l != li) & (sl2_new > 0.f) &
                                 ((slx_new * slx_new) * suml2[v] > (sumlx[v] * sumlx[v]) * sl2_new);
                Lf[i][v] = v4f_select(take, new_l, li);
                sumlx[v] = v4f_select(take, slx_new, sumlx[v]);
                suml2[v] = v4f_select(take, sl2_new, suml2[v]);
                changed |= take;
            }
        }
        if (!(changed[0] | changed[1] | changed[2] | changed[3])) break;
    }
    for (int g = 0; g < 16; ++g) {
        const int v = g >> 2, lane = g & 3;
        if (zero[g]) {
            memset(L + 16 * g, 0, 16);
            scales[g] = 0.f;
            continue;
        }
        for (int i = 0; i < 16; ++i) L[16 * g + i] = (int8_t)((int)Lf[i][v][lane] + 4);
        const float s2 = suml2[v][lane];
        scales[g] = s2 > 0.f ? sumlx[v][lane] / s2 : 0.f;
    }
}

static void q3_k_block(const float *x, const float *qw, uint8_t *y) {
    int8_t L[MT_QK_K];
    float scales[16];
    uint8_t ls[16]; /* 6-bit scales, offset by 32 */
    uint16_t dh;
    if (!qw) {
        make_q3_quants_16x16(x, L, scales);
        float max_scale = 0.f, amax = 0.f;
        for (int j = 0; j < 16; ++j) {
            const float s = fabsf(scales[j]);
            if (s > amax) { amax = s; max_scale = scales[j]; }
        }
        if (max_scale != 0.f) {
            const float iscale = -32.f / max_scale;
            for (int j = 0; j < 16; ++j) {
                int l = (int8_t)mt_nearest_int(iscale * scales[j]);
                l = (l < -32 ? -32 : (l > 31 ? 31 : l)) + 32;
                ls[j] = (uint8_t)l;
            }
            dh = mt_fp32_to_fp16(1.f / iscale);
        } else {
            memset(ls, 0, 16);
            dh = mt_fp32_to_fp16(0.f);
        }
    } else {
        float sumx2 = 0.f;
        for (int j = 0; j < MT_QK_K; ++j) sumx2 += x[j] * x[j];
        const float sigma2 = 2.f * sumx2 / (float)MT_QK_K;
        float weight[16], sw[16];
        for (int j = 0; j < 16; ++j) {
            const float *xg = x + 16 * j;
            for (int l = 0; l < 16; ++l) weight[l] = qw[16 * j + l] * sqrtf(sigma2 + xg[l] * xg[l]);
            float sumw = 0.f;
            for (int l = 0; l < 16; ++l) sumw += weight[l];
            sw[j] = sumw;
            scales[j] = make_qx_quants(16, 4, xg, L + 16 * j, weight);
        }
        int8_t Ls[16];
        const float d_block = make_qx_quants(16, 32, scales, Ls, sw);
        for (int j = 0; j < 16; ++j) ls[j] = (uint8_t)Ls[j];
        dh = mt_fp32_to_fp16(d_block);
    }
    const float dq = mt_fp16_to_fp32(dh);
    for (int j = 0; j < 16; ++j) {
        const float d = dq * (float)((int)ls[j] - 32);
        if (!d) continue;
        const v4f dv = v4f_set1(d);
        for (int q = 0; q < 4; ++q) {
            v4i l = v4i_clamp(v4_nearest_int(v4f_load(x + 16 * j + 4 * q) / dv), -4, 3) + 4;
            for (int t = 0; t < 4; ++t) L[16 * j + 4 * q + t] = (int8_t)l[t];
        }
    }
    uint8_t *hmask = y + MT_Q3_K_HMASK, *qs = y + MT_Q3_K_QS, *sc = y + MT_Q3_K_SCALES;
    /* bit k of hmask[m] is bit 2 of code 32k+m; the low 2 bits go to qs (L - 4 == L & 3 for L > 3) */
    for (int m = 0; m < 32; ++m) {
        unsigned b = 0;
        for (int k = 0; k < 8; ++k) b |= (unsigned)((L[32 * k + m] >> 2) & 1) << k;
        hmask[m] = (uint8_t)b;
    }
    for (int j = 0; j < MT_QK_K; ++j) L[j] &= 3;
    for (int j = 0; j < MT_QK_K; j += 128)
        for (int l = 0; l < 32; ++l)
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
    memset(sc, 0, MT_Q3_K_SCALES_SIZE);
    for (int j = 0; j < 16; ++j) {
        const int l = ls[j];
        if (j < 8) sc[j] = (uint8_t)(l & 0xF);
        else sc[j - 8] |= (uint8_t)((l & 0xF) << 4);
        sc[j % 4 + 8] |= (uint8_t)((l >> 4) << (2 * (j / 4)));
    }
    y[MT_Q3_K_D] = (uint8_t)(dh & 0xff);
    y[MT_Q3_K_D + 1] = (uint8_t)(dh >> 8);
}

static int quantize_q3_k(const float *x, uint8_t *y, int64_t n_rows, int64_t n_per_row, const float *imatrix) {
    const int64_t nb = n_per_row / MT_QK_K;
    for (int64_t r = 0; r < n_rows; ++r)
        for (int64_t i = 0; i < nb; ++i)
            q3_k_block(x + (r * nb + i) * MT_QK_K, imatrix ? imatrix + i * MT_QK_K : NULL, y + (r * nb + i) * MT_Q3_K_BYTES);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Q8_0: d = amax/127, q = roundf(x/d); the importance matrix is ignored, as in ggml.            */

static void q8_0_ref_block(const float *xb, uint8_t *yb) {
    const v4i absmask = v4i_set1(0x7fffffff);
    {
        v4f xv[8];
        for (int k = 0; k < 8; ++k) xv[k] = v4f_load(xb + 4 * k);
        /* MAX(amax, fabsf(v)) from 0: order-free for non-NaN magnitudes */
        v4f a0 = (v4f)((v4i)xv[0] & absmask), a1 = (v4f)((v4i)xv[1] & absmask);
        for (int k = 2; k < 8; k += 2) {
            a0 = v4f_max(a0, (v4f)((v4i)xv[k] & absmask));
            a1 = v4f_max(a1, (v4f)((v4i)xv[k + 1] & absmask));
        }
        const float amax = hmax4(v4f_max(a0, a1));
        const float d = amax / 127.f;
        const float id = d != 0.f ? 1.f / d : 0.f;
        mt_store_fp16(yb, d);
        const v4f idv = v4f_set1(id);
        for (int k = 0; k < 8; ++k) {
            v4f v = xv[k] * idv;
            /* |v| <= ~127 unless 1/d overflowed; then v is +-inf or NaN and ggml's
             * (int8_t)roundf(v) (cvttss2si: INT_MIN) stores 0, as zeroing v does here. */
            v = v4f_select((v4f)((v4i)v & absmask) < 256.f, v, v4f_set1(0.f));
            v4i t = __builtin_convertvector(v, v4i);          /* truncation toward zero */
            const v4f fr = v - __builtin_convertvector(t, v4f); /* exact */
            t = t - (fr >= 0.5f) + (fr <= -0.5f);              /* roundf: half away from zero */
            const v4c c = __builtin_convertvector(t, v4c);
            memcpy(yb + MT_Q8_0_QS + 4 * k, &c, 4);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Legacy reference paths (imatrix NULL).                                                       */

/* qs[j] = low nibble of code j | low nibble of code j+16 << 4. */
static inline void pack_q4(uint8_t *qs, const uint8_t *b) {
    for (int j = 0; j < 16; ++j) qs[j] = (uint8_t)((b[j] & 0xF) | ((b[j + 16] & 0xF) << 4));
}

/* qh: little-endian uint32 whose bit j is bit 4 of code j; then the nibbles. */
static inline void pack_q5(uint8_t *qh_out, uint8_t *qs, const uint8_t *b) {
    uint32_t qh = 0;
    for (int j = 0; j < 32; ++j) qh |= (uint32_t)((b[j] >> 4) & 1) << j;
    for (int k = 0; k < 4; ++k) qh_out[k] = (uint8_t)(qh >> (8 * k));
    pack_q4(qs, b);
}

/* The same packings from 32 codes in 8 vectors (only their low 8 bits count); qh NULL for 4 bits. */
static inline void pack_codes(const v4i *q, uint8_t *qh_out, uint8_t *qs) {
#if defined(__SSE2__)
    const __m128i m8 = _mm_set1_epi32(0xFF), m4 = _mm_set1_epi8(0x0F);
    __m128i b[2];
    for (int h = 0; h < 2; ++h) {
        const __m128i lo = _mm_packs_epi32(_mm_and_si128((__m128i)q[4 * h], m8), _mm_and_si128((__m128i)q[4 * h + 1], m8));
        const __m128i hi = _mm_packs_epi32(_mm_and_si128((__m128i)q[4 * h + 2], m8), _mm_and_si128((__m128i)q[4 * h + 3], m8));
        b[h] = _mm_packus_epi16(lo, hi); /* codes 16h .. 16h+15 as bytes */
    }
    const __m128i nib = _mm_or_si128(_mm_and_si128(b[0], m4), _mm_slli_epi16(_mm_and_si128(b[1], m4), 4));
    _mm_storeu_si128((__m128i *)qs, nib);
    if (qh_out) {
        const uint32_t qh = (uint32_t)_mm_movemask_epi8(_mm_slli_epi16(b[0], 3)) |
                            ((uint32_t)_mm_movemask_epi8(_mm_slli_epi16(b[1], 3)) << 16);
        for (int k = 0; k < 4; ++k) qh_out[k] = (uint8_t)(qh >> (8 * k));
    }
#else
    uint8_t b[32];
    for (int k = 0; k < 8; ++k)
        for (int t = 0; t < 4; ++t) b[4 * k + t] = (uint8_t)q[k][t];
    if (qh_out) pack_q5(qh_out, qs, b);
    else pack_q4(qs, b);
#endif
}

static inline void load32(const float *x, v4f *xv) {
    for (int k = 0; k < 8; ++k) xv[k] = v4f_load(x + 4 * k);
}

static inline v4f v4f_abs(v4f v) { return (v4f)((v4i)v & 0x7fffffff); }

/* ggml's `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }` over 32 values from 0. */
static inline float first_absmax32(const float *x, const v4f *xv) {
    v4f a = v4f_max(v4f_abs(xv[0]), v4f_abs(xv[1]));
    for (int k = 2; k < 8; ++k) a = v4f_max(a, v4f_abs(xv[k]));
    const float amax = hmax4(a);
    if (amax == 0.f) return 0.f;
#if defined(__SSE2__)
    (void)x;
    uint32_t mask = 0;
    for (int k = 0; k < 8; ++k)
        mask |= (uint32_t)_mm_movemask_ps((__m128)(v4f_abs(xv[k]) == amax)) << (4 * k);
    return mask ? x[__builtin_ctz(mask)] : 0.f;
#else
    for (int j = 0; j < 32; ++j)
        if (fabsf(x[j]) == amax) return x[j];
    return 0.f; /* not reached for non-NaN input */
#endif
}

/* ggml's `if (v < min) min = v` (largest: `v > max`) over 32 values: the first value equal to the
 * extreme, which only matters for the sign of a zero. */
static inline float first_extreme32(const float *x, const v4f *xv, int largest) {
    v4f m = xv[0];
    for (int k = 1; k < 8; ++k) m = largest ? v4f_max(m, xv[k]) : v4f_min(m, xv[k]);
    float e = m[0];
    for (int t = 1; t < 4; ++t) e = largest ? (m[t] > e ? m[t] : e) : (m[t] < e ? m[t] : e);
    if (e == 0.f)
        for (int j = 0; j < 32; ++j)
            if (x[j] == 0.f) return x[j];
    return e;
}

/* C's float -> int conversion where only the low 8 bits are kept: truncation toward zero, and
 * 0 where x86 gives INT_MIN (out of range, NaN), whose low 8 bits are 0 too. */
static inline v4i v4_cvtt_low8(v4f v) {
    v = v4f_select(v4f_abs(v) < 2147483648.f, v, v4f_set1(0.f));
    return __builtin_convertvector(v, v4i);
}

/* (int8_t) of an int, as C converts (two's complement wrap). */
static inline v4i v4i_int8(v4i t) { return ((t & 0xFF) ^ 0x80) - 0x80; }

/* quantize_row_q4_0_ref (nlev 8) / quantize_row_q5_0_ref (nlev 16): MIN(2*nlev-1, (int8_t)(x*id + nlev+0.5f)). */
static inline float symmetric_ref(const float *x, int nlev, v4i *q) {
    v4f xv[8];
    load32(x, xv);
    const float max = first_absmax32(x, xv);
    const float d = max / (float)-nlev;
    const float id = d != 0.f ? 1.f / d : 0.f;
    const float off = (float)nlev + 0.5f;
    for (int k = 0; k < 8; ++k) {
        const v4i t = v4i_int8(v4_cvtt_low8(xv[k] * id + off));
        q[k] = v4i_select(t > 2 * nlev - 1, v4i_set1(2 * nlev - 1), t);
    }
    return d;
}

/* quantize_row_q4_1_ref / quantize_row_q5_1_ref: (x - min)*id + 0.5f converted to int (low 8 bits). */
static inline void affine_ref(const float *x, int nmax, float *d_out, float *min_out, v4i *q) {
    v4f xv[8];
    load32(x, xv);
    const float min = first_extreme32(x, xv, 0), max = first_extreme32(x, xv, 1);
    const float d = (max - min) / (float)nmax;
    const float id = d != 0.f ? 1.f / d : 0.f;
    for (int k = 0; k < 8; ++k) q[k] = v4_cvtt_low8((xv[k] - min) * id + 0.5f);
    *d_out = d;
    *min_out = min;
}

static void q4_0_ref_block(const float *x, uint8_t *y) {
    v4i q[8];
    const float d = symmetric_ref(x, 8, q);
    mt_store_fp16(y + MT_Q4_0_D, d);
    pack_codes(q, NULL, y + MT_Q4_0_QS);
}

static void q5_0_ref_block(const float *x, uint8_t *y) {
    v4i q[8];
    const float d = symmetric_ref(x, 16, q);
    mt_store_fp16(y + MT_Q5_0_D, d);
    pack_codes(q, y + MT_Q5_0_QH, y + MT_Q5_0_QS);
}

static void q4_1_ref_block(const float *x, uint8_t *y) {
    v4i q[8];
    float d, min;
    affine_ref(x, 15, &d, &min, q);
    for (int k = 0; k < 8; ++k) { /* MIN(15, (int8_t)(...)) */
        const v4i t = v4i_int8(q[k]);
        q[k] = v4i_select(t > 15, v4i_set1(15), t);
    }
    mt_store_fp16(y + MT_Q4_1_D, d);
    mt_store_fp16(y + MT_Q4_1_M, min);
    pack_codes(q, NULL, y + MT_Q4_1_QS);
}

static void q5_1_ref_block(const float *x, uint8_t *y) {
    v4i q[8];
    float d, min;
    affine_ref(x, 31, &d, &min, q); /* (uint8_t)(x0 + 0.5f): no clamp in ggml */
    mt_store_fp16(y + MT_Q5_1_D, d);
    mt_store_fp16(y + MT_Q5_1_M, min);
    pack_codes(q, y + MT_Q5_1_QH, y + MT_Q5_1_QS);
}

/* All the reference paths, row range by row range: the blocks of a row range are contiguous. */
typedef void (*ref_blocks_fn)(const float *x, uint8_t *y, int64_t nb);

#define DEFINE_REF_BLOCKS(fname, ref_block, bytes)                                \
    static void fname(const float *x, uint8_t *y, int64_t nb) {                   \
        for (int64_t b = 0; b < nb; ++b) ref_block(x + MT_QK * b, y + (bytes) * b); \
    }
DEFINE_REF_BLOCKS(q4_0_ref_generic, q4_0_ref_block, MT_Q4_0_BYTES)
DEFINE_REF_BLOCKS(q4_1_ref_generic, q4_1_ref_block, MT_Q4_1_BYTES)
DEFINE_REF_BLOCKS(q5_0_ref_generic, q5_0_ref_block, MT_Q5_0_BYTES)
DEFINE_REF_BLOCKS(q5_1_ref_generic, q5_1_ref_block, MT_Q5_1_BYTES)
DEFINE_REF_BLOCKS(q8_0_ref_generic, q8_0_ref_block, MT_Q8_0_BYTES)

static ref_blocks_fn q4_0_ref_blocks = q4_0_ref_generic, q4_1_ref_blocks = q4_1_ref_generic,
                     q5_0_ref_blocks = q5_0_ref_generic, q5_1_ref_blocks = q5_1_ref_generic,
                     q8_0_ref_blocks = q8_0_ref_generic;

#ifdef MT_HAVE_AVX2_PATH
/* The reference paths on AVX2 machines, 8 blocks at a time: per block, its 32 values in 4 vectors
 * of 8 (extreme search, scaling, rounding, packing), and the scalar part (d, 1/d, fp16 of d) of the
 * 8 blocks side by side in one vector. The same IEEE float32 operations as above, so the same bytes;
 * a tail of fewer than 8 blocks takes the portable block functions. */
#define AVX2_FN __attribute__((target("avx2")))
#define REF_GROUP 8

/* mt_fp32_to_fp16 on 8 lanes (the same integer steps; the result in the low 16 bits of each lane). */
AVX2_FN static inline __m256i fp16_bits8(__m256 f) {
    const __m256i x = _mm256_castps_si256(f);
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x8000));
    const __m256i ax = _mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff));
    /* normal results: rebias and round to nearest even */
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(ax, 13), _mm256_set1_epi32(1));
    __m256i h = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(ax, _mm256_set1_epi32((int)0xc8000fffu)), odd), 13);
    /* subnormal or zero results: ax as float + 0.5f */
    const __m256i sub = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(ax), _mm256_set1_ps(0.5f))),
                                         _mm256_set1_epi32(0x3f000000));
    h = _mm256_blendv_epi8(h, sub, _mm256_cmpgt_epi32(_mm256_set1_epi32(0x38800000), ax));
    /* rounds to >= 65520: infinity; infinity; NaN */
    h = _mm256_blendv_epi8(h, _mm256_set1_epi32(0x7c00), _mm256_cmpgt_epi32(ax, _mm256_set1_epi32(0x477fefff)));
    h = _mm256_blendv_epi8(h, _mm256_set1_epi32(0x7e00), _mm256_cmpgt_epi32(ax, _mm256_set1_epi32(0x7f800000)));
    return _mm256_or_si256(_mm256_and_si256(h, _mm256_set1_epi32(0xffff)), sign);
}

/* Stores lane b of h (fp16 bits) at y + stride * b + off, little-endian. */
AVX2_FN static inline void store_fp16_8(uint8_t *y, int stride, int off, __m256i h) {
    uint32_t hb[8];
    _mm256_storeu_si256((__m256i *)hb, h);
    for (int b = 0; b < 8; ++b) {
        y[stride * b + off] = (uint8_t)(hb[b] & 0xff);
        y[stride * b + off + 1] = (uint8_t)(hb[b] >> 8);
    }
}

/* Every lane: the largest (smallest) lane of a; max/min are exact here (no NaN; zeros of both
 * signs are told apart afterwards). */
AVX2_FN static inline __m256 bcast_max8(__m256 a) {
    a = _mm256_max_ps(a, _mm256_permute2f128_ps(a, a, 1));
    a = _mm256_max_ps(a, _mm256_shuffle_ps(a, a, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm256_max_ps(a, _mm256_shuffle_ps(a, a, _MM_SHUFFLE(2, 3, 0, 1)));
}
AVX2_FN static inline __m256 bcast_min8(__m256 a) {
    a = _mm256_min_ps(a, _mm256_permute2f128_ps(a, a, 1));
    a = _mm256_min_ps(a, _mm256_shuffle_ps(a, a, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm256_min_ps(a, _mm256_shuffle_ps(a, a, _MM_SHUFFLE(2, 3, 0, 1)));
}

/* Bit j: v[j / 8][j % 8] == e. */
AVX2_FN static inline uint32_t eq_mask32(const __m256 *v, __m256 e) {
    return (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(v[0], e, _CMP_EQ_OQ)) |
           (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(v[1], e, _CMP_EQ_OQ)) << 8 |
           (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(v[2], e, _CMP_EQ_OQ)) << 16 |
           (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(v[3], e, _CMP_EQ_OQ)) << 24;
}

AVX2_FN static inline void load32_8(const float *x, __m256 *v) {
    for (int k = 0; k < 4; ++k) v[k] = _mm256_loadu_ps(x + 8 * k);
}

AVX2_FN static inline __m256 abs8(__m256 v) { return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }

/* first_absmax32: ggml's signed value of the first element of largest |x|; +0.0 if all are 0. */
AVX2_FN static inline float first_absmax32_8(const float *x) {
    __m256 v[4];
    load32_8(x, v);
    for (int k = 0; k < 4; ++k) v[k] = abs8(v[k]);
    const __m256 m = bcast_max8(_mm256_max_ps(_mm256_max_ps(v[0], v[1]), _mm256_max_ps(v[2], v[3])));
    if (_mm256_cvtss_f32(m) == 0.f) return 0.f;
    return x[__builtin_ctz(eq_mask32(v, m))];
}

/* first_extreme32 (both): the first element equal to the smallest / largest value. */
AVX2_FN static inline void first_minmax32_8(const float *x, float *min_out, float *max_out) {
    __m256 v[4];
    load32_8(x, v);
    const __m256 mn = bcast_min8(_mm256_min_ps(_mm256_min_ps(v[0], v[1]), _mm256_min_ps(v[2], v[3])));
    const __m256 mx = bcast_max8(_mm256_max_ps(_mm256_max_ps(v[0], v[1]), _mm256_max_ps(v[2], v[3])));
    const float e0 = _mm256_cvtss_f32(mn), e1 = _mm256_cvtss_f32(mx);
    /* the index only matters for the sign of a zero */
    *min_out = e0 != 0.f ? e0 : x[__builtin_ctz(eq_mask32(v, mn))];
    *max_out = e1 != 0.f ? e1 : x[__builtin_ctz(eq_mask32(v, mx))];
}

/* The low 8 bits of 4 x 8 ints, as 32 bytes in element order. */
AVX2_FN static inline __m256i low_bytes32(__m256i q0, __m256i q1, __m256i q2, __m256i q3) {
    const __m256i m8 = _mm256_set1_epi32(0xFF);
    const __m256i a = _mm256_packs_epi32(_mm256_and_si256(q0, m8), _mm256_and_si256(q1, m8));
    const __m256i b = _mm256_packs_epi32(_mm256_and_si256(q2, m8), _mm256_and_si256(q3, m8));
    /* dwords of c: q0[0:4] q1[0:4] q2[0:4] q3[0:4] q0[4:8] q1[4:8] q2[4:8] q3[4:8] */
    const __m256i c = _mm256_packus_epi16(a, b);
    return _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* Nibbles (byte j | byte j+16 << 4) and, when qh is given, bit 4 of each byte as a little-endian uint32. */
AVX2_FN static inline void store_codes32(__m256i c, uint8_t *qh, uint8_t *qs) {
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
    _mm_storeu_si128((__m128i *)qs, _mm_or_si128(_mm_and_si128(lo, m4), _mm_slli_epi16(_mm_and_si128(hi, m4), 4)));
    if (qh) {
        const uint32_t bits = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(c, 3));
        for (int k = 0; k < 4; ++k) qh[k] = (uint8_t)(bits >> (8 * k));
    }
}

/* v4_cvtt_low8 on 8 lanes: x86's cvttps2dq gives INT_MIN where the value is out of range, whose low
 * 8 bits are 0 as well. */
AVX2_FN static inline __m256i cvtt8(__m256 v) { return _mm256_cvttps_epi32(v); }

/* d = max / -nlev and id = d != 0 ? 1/d : 0 for 8 blocks. */
AVX2_FN static inline __m256 inv_or_zero8(__m256 d) {
    const __m256 nz = _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_NEQ_UQ);
    return _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.f), d), nz);
}

/* Q4_0 (nlev 8) / Q5_0 (nlev 16). */
AVX2_FN static inline void symmetric_ref_avx2(const float *x, uint8_t *y, int64_t nb, int nlev, int bytes) {
    const int64_t ng = nb / REF_GROUP;
    const __m256 off = _mm256_set1_ps((float)nlev + 0.5f);
    const __m256i top = _mm256_set1_epi8((char)(2 * nlev - 1));
    for (int64_t g = 0; g < ng; ++g) {
        const float *xg = x + MT_QK * REF_GROUP * g;
        uint8_t *yg = y + bytes * REF_GROUP * g;
        float mx[REF_GROUP], idb[REF_GROUP];
        for (int b = 0; b < REF_GROUP; ++b) mx[b] = first_absmax32_8(xg + MT_QK * b);
        const __m256 d = _mm256_div_ps(_mm256_loadu_ps(mx), _mm256_set1_ps((float)-nlev));
        _mm256_storeu_ps(idb, inv_or_zero8(d));
        store_fp16_8(yg, bytes, nlev == 8 ? MT_Q4_0_D : MT_Q5_0_D, fp16_bits8(d));
        for (int b = 0; b < REF_GROUP; ++b) {
            const float *xb = xg + MT_QK * b;
            const __m256 id = _mm256_set1_ps(idb[b]);
            __m256i q[4];
            for (int k = 0; k < 4; ++k)
                q[k] = cvtt8(_mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * k), id), off));
            /* MIN(2*nlev-1, (int8_t)t) */
            const __m256i c = _mm256_min_epi8(low_bytes32(q[0], q[1], q[2], q[3]), top);
            uint8_t *yb = yg + bytes * b;
            if (nlev == 8) store_codes32(c, NULL, yb + MT_Q4_0_QS);
            else store_codes32(c, yb + MT_Q5_0_QH, yb + MT_Q5_0_QS);
        }
    }
    if (nlev == 8) q4_0_ref_generic(x + MT_QK * REF_GROUP * ng, y + bytes * REF_GROUP * ng, nb - REF_GROUP * ng);
    else q5_0_ref_generic(x + MT_QK * REF_GROUP * ng, y + bytes * REF_GROUP * ng, nb - REF_GROUP * ng);
}

/* Q4_1 (nmax 15, codes clamped to 15 as int8) / Q5_1 (nmax 31, low 8 bits). */
AVX2_FN static inline void affine_ref_avx2(const float *x, uint8_t *y, int64_t nb, int nmax, int bytes) {
    const int64_t ng = nb / REF_GROUP;
    const __m256 half = _mm256_set1_ps(0.5f);
    const __m256i top = _mm256_set1_epi8(15);
    for (int64_t g = 0; g < ng; ++g) {
        const float *xg = x + MT_QK * REF_GROUP * g;
        uint8_t *yg = y + bytes * REF_GROUP * g;
        float mn[REF_GROUP], mx[REF_GROUP], idb[REF_GROUP];
        for (int b = 0; b < REF_GROUP; ++b) first_minmax32_8(xg + MT_QK * b, &mn[b], &mx[b]);
        const __m256 minv = _mm256_loadu_ps(mn);
        const __m256 d = _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(mx), minv), _mm256_set1_ps((float)nmax));
        _mm256_storeu_ps(idb, inv_or_zero8(d));
        store_fp16_8(yg, bytes, nmax == 15 ? MT_Q4_1_D : MT_Q5_1_D, fp16_bits8(d));
        store_fp16_8(yg, bytes, nmax == 15 ? MT_Q4_1_M : MT_Q5_1_M, fp16_bits8(minv));
        for (int b = 0; b < REF_GROUP; ++b) {
            const float *xb = xg + MT_QK * b;
            const __m256 id = _mm256_set1_ps(idb[b]), m = _mm256_set1_ps(mn[b]);
            __m256i q[4];
            for (int k = 0; k < 4; ++k)
                q[k] = cvtt8(_mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xb + 8 * k), m), id), half));
            __m256i c = low_bytes32(q[0], q[1], q[2], q[3]);
            uint8_t *yb = yg + bytes * b;
            if (nmax == 15) store_codes32(_mm256_min_epi8(c, top), NULL, yb + MT_Q4_1_QS);
            else store_codes32(c, yb + MT_Q5_1_QH, yb + MT_Q5_1_QS);
        }
    }
    if (nmax == 15) q4_1_ref_generic(x + MT_QK * REF_GROUP * ng, y + bytes * REF_GROUP * ng, nb - REF_GROUP * ng);
    else q5_1_ref_generic(x + MT_QK * REF_GROUP * ng, y + bytes * REF_GROUP * ng, nb - REF_GROUP * ng);
}

AVX2_FN static void q4_0_ref_avx2(const float *x, uint8_t *y, int64_t nb) { symmetric_ref_avx2(x, y, nb, 8, MT_Q4_0_BYTES); }
AVX2_FN static void q5_0_ref_avx2(const float *x, uint8_t *y, int64_t nb) { symmetric_ref_avx2(x, y, nb, 16, MT_Q5_0_BYTES); }
AVX2_FN static void q4_1_ref_avx2(const float *x, uint8_t *y, int64_t nb) { affine_ref_avx2(x, y, nb, 15, MT_Q4_1_BYTES); }
AVX2_FN static void q5_1_ref_avx2(const float *x, uint8_t *y, int64_t nb) { affine_ref_avx2(x, y, nb, 31, MT_Q5_1_BYTES); }

/* Q8_0: d = amax/127, q = roundf(x*id) (0 where x*id is not finite, as in q8_0_ref_block). */
AVX2_FN static void q8_0_ref_avx2(const float *x, uint8_t *y, int64_t nb) {
    const int64_t ng = nb / REF_GROUP;
    for (int64_t g = 0; g < ng; ++g) {
        const float *xg = x + MT_QK * REF_GROUP * g;
        uint8_t *yg = y + MT_Q8_0_BYTES * REF_GROUP * g;
        float am[REF_GROUP], idb[REF_GROUP];
        for (int b = 0; b < REF_GROUP; ++b) {
            __m256 v[4];
            load32_8(xg + MT_QK * b, v);
            const __m256 a = _mm256_max_ps(_mm256_max_ps(abs8(v[0]), abs8(v[1])), _mm256_max_ps(abs8(v[2]), abs8(v[3])));
            am[b] = _mm256_cvtss_f32(bcast_max8(a));
        }
        const __m256 d = _mm256_div_ps(_mm256_loadu_ps(am), _mm256_set1_ps(127.f));
        _mm256_storeu_ps(idb, inv_or_zero8(d));
        store_fp16_8(yg, MT_Q8_0_BYTES, MT_Q8_0_D, fp16_bits8(d));
        for (int b = 0; b < REF_GROUP; ++b) {
            const float *xb = xg + MT_QK * b;
            const __m256 id = _mm256_set1_ps(idb[b]);
            __m256i q[4];
            for (int k = 0; k < 4; ++k) {
                __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xb + 8 * k), id);
                v = _mm256_and_ps(v, _mm256_cmp_ps(abs8(v), _mm256_set1_ps(256.f), _CMP_LT_OQ));
                const __m256i t = _mm256_cvttps_epi32(v);
                const __m256 fr = _mm256_sub_ps(v, _mm256_cvtepi32_ps(t)); /* exact */
                /* roundf: half away from zero (compare masks are -1) */
                q[k] = _mm256_add_epi32(_mm256_sub_epi32(t, _mm256_castps_si256(_mm256_cmp_ps(fr, _mm256_set1_ps(0.5f), _CMP_GE_OQ))),
                                        _mm256_castps_si256(_mm256_cmp_ps(fr, _mm256_set1_ps(-0.5f), _CMP_LE_OQ)));
            }
            _mm256_storeu_si256((__m256i *)(yg + MT_Q8_0_BYTES * b + MT_Q8_0_QS), low_bytes32(q[0], q[1], q[2], q[3]));
        }
    }
    q8_0_ref_generic(x + MT_QK * REF_GROUP * ng, y + MT_Q8_0_BYTES * REF_GROUP * ng, nb - REF_GROUP * ng);
}
#endif

/* ------------------------------------------------------------------------------------------ */
/* Legacy importance-matrix paths.                                                              */

/* ggml's per-element weights: qw * sqrtf(sigma2 + x*x). */
static inline void legacy_weights(const float *x, const float *qw, float sigma2, float *w) {
    for (int j = 0; j < MT_QK; ++j) w[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
}

static float row_sigma2(const float *x, int64_t n) {
    float s = 0.f;
    for (int64_t j = 0; j < n; ++j) s += x[j] * x[j];
    return s / (float)n;
}

static void q4_0_impl_block(const float *x, const float *w, uint8_t *y) {
    int8_t L[MT_QK];
    const float d = make_qx_quants(MT_QK, 8, x, L, w);
    mt_store_fp16(y + MT_Q4_0_D, d);
    pack_q4(y + MT_Q4_0_QS, (const uint8_t *)L);
}

static void q5_0_impl_block(const float *x, const float *w, uint8_t *y) {
    int8_t L[MT_QK];
    const float d = make_qx_quants(MT_QK, 16, x, L, w);
    mt_store_fp16(y + MT_Q5_0_D, d);
    pack_q5(y + MT_Q5_0_QH, y + MT_Q5_0_QS, (const uint8_t *)L);
}

/* make_qkx3_quants(32, nmax, x, weights, L, &the_min, Laux, -0.9f, 0.05f, 36, use_mad=false) on 8
 * blocks at once, one per lane, as search_qkx.make_qkx3_quants (moetrace's own version for Q4_1 and
 * Q5_1, which keeps the sign of a zero min). xs[lane], ws[lane]: each block's 32 values and weights.
 * Out: scale[lane], the_min[lane], L[lane][32] in 0..nmax.
 *
 * DEFINE_QKX3 writes the search once for a vector type VF (int mask type VI) of NV vectors per
 * 8 lanes: 2 x 4 lanes for every machine, 1 x 8 lanes for AVX2 machines (chosen at load time).
 * Both perform the same float operations on every lane. */
#define QK3_LANES 8
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

typedef void (*qkx3_fn)(const float *const *xs, const float *const *ws, int nmax, float *scale_out,
                        float *the_min_out, uint8_t *L_out);

#define QK3_SEL(VF, VI, m, a, b) ((VF)(((m) & (VI)(a)) | (~(m) & (VI)(b))))
#define QK3_ISEL(m, a, b) (((m) & (a)) | (~(m) & (b)))

#define DEFINE_QKX3(NAME, ATTR, VF, VI, NV)                                                                     \
    ATTR static void NAME(const float *const *xs, const float *const *ws, int nmax, float *scale_out,           \
                          float *the_min_out, uint8_t *L_out) {                                                 \
        enum { W_ = (int)(sizeof(VF) / sizeof(float)) };                                                        \
        const VF zero = {0};                                                                                    \
        const VI izero = {0};                                                                                   \
        const float fnmax = (float)nmax;                                                                        \
        VF X[MT_QK][NV], W[MT_QK][NV], mx[NV], mn[NV], flat_min[NV], sum_w[NV], sum_x[NV], scale[NV], best_mad[NV]; \
        VI flat[NV], L[MT_QK][NV];                                                                              \
        for (int b = 0; b < QK3_LANES; ++b) {                                                                   \
            const float *xb = xs[b];                                                                            \
            float lo = xb[0], hi = xb[0];                                                                       \
            for (int i = 1; i < MT_QK; ++i) {                                                                   \
                if (xb[i] < lo) lo = xb[i];                                                                     \
                if (xb[i] > hi) hi = xb[i];                                                                     \
            }                                                                                                   \
            if (lo > 0.f) lo = 0.f;                                                                             \
            mx[b / W_][b % W_] = hi;                                                                            \
            flat_min[b / W_][b % W_] = lo;                                                                      \
            for (int i = 0; i < MT_QK; ++i) {                                                                   \
                X[i][b / W_][b % W_] = xb[i];                                                                   \
                W[i][b / W_][b % W_] = ws[b][i];                                                                \
            }                                                                                                   \
        }                                                                                                       \
        for (int v = 0; v < NV; ++v) {                                                                          \
            sum_w[v] = W[0][v];                                                                                 \
            sum_x[v] = W[0][v] * X[0][v];                                                                       \
            for (int i = 1; i < MT_QK; ++i) {                                                                   \
                sum_w[v] += W[i][v];                                                                            \
                sum_x[v] += W[i][v] * X[i][v];                                                                  \
            }                                                                                                   \
            flat[v] = mx[v] <= flat_min[v]; /* ggml returns early there; replaced below */                      \
            mn[v] = flat_min[v];                                                                                \
            const VF iscale = fnmax / (mx[v] - mn[v]);                                                          \
            scale[v] = 1.f / iscale;                                                                            \
            best_mad[v] = zero;                                                                                 \
            for (int i = 0; i < MT_QK; ++i) {                                                                   \
                VI l = ((VI)(iscale * (X[i][v] - mn[v]) + MAGIC) & 0x007fffff) - 0x00400000; /* nearest_int */  \
                l = QK3_ISEL(l < 0, izero, l);                                                                  \
                L[i][v] = QK3_ISEL(l > nmax, izero + nmax, l);                                                  \
                const VF diff = (scale[v] * __builtin_convertvector(L[i][v], VF) + mn[v]) - X[i][v];            \
                best_mad[v] += W[i][v] * (diff * diff);                                                         \
            }                                                                                                   \
        }                                                                                                       \
        for (int is = 0; is <= 36; ++is) {                                                                      \
            const float c = -0.9f + 0.05f * (float)is + fnmax;                                                  \
            for (int v = 0; v < NV; ++v) {                                                                      \
                const VF iscale = c / (mx[v] - mn[v]);                                                          \
                VF lf[MT_QK];                                                                                   \
                VF sum_l = zero, sum_l2 = zero, sum_xl = zero;                                                  \
                for (int i = 0; i < MT_QK; ++i) {                                                               \
                    const VF t = iscale * (X[i][v] - mn[v]);                                                    \
                    /* inf or NaN (min at or near max) gives 0, as the torch kernel's guard does */             \
                    const VF r = (VF)((t > 0.f) & (VI)(((QK3_SEL(VF, VI, t < fnmax, t, zero + fnmax)) + MAGIC) - MAGIC)); \
                    lf[i] = r;                                                                                  \
                    const VF wl = W[i][v] * r;                                                                  \
                    sum_l += wl;                                                                                \
                    sum_l2 += wl * r;                                                                           \
                    sum_xl += wl * X[i][v];                                                                     \
                }                                                                                               \
                const VF D = sum_w[v] * sum_l2 - sum_l * sum_l;                                                 \
                VF this_scale = (sum_w[v] * sum_xl - sum_x[v] * sum_l) / D;                                     \
                VF this_min = (sum_l2 * sum_x[v] - sum_l * sum_xl) / D;                                         \
                const VI pos = this_min > 0.f;                                                                  \
                this_min = QK3_SEL(VF, VI, pos, zero, this_min);                                                \
                this_scale = QK3_SEL(VF, VI, pos, sum_xl / sum_l2, this_scale);                                 \
                VF mad = zero;                                                                                  \
                for (int i = 0; i < MT_QK; ++i) {                                                               \
                    const VF diff = (this_scale * lf[i] + this_min) - X[i][v];                                  \
                    mad += W[i][v] * (diff * diff);                                                             \
                }                                                                                               \
                const VI take = (D > 0.f) & (mad < best_mad[v]);                                                \
                int any = 0;                                                                                    \
                for (int k = 0; k < W_; ++k) any |= take[k];                                                    \
                if (any) {                                                                                      \
                    for (int i = 0; i < MT_QK; ++i)                                                             \
                        L[i][v] = QK3_ISEL(take, __builtin_convertvector(lf[i], VI), L[i][v]);                  \
                    best_mad[v] = QK3_SEL(VF, VI, take, mad, best_mad[v]);                                      \
                    scale[v] = QK3_SEL(VF, VI, take, this_scale, scale[v]);                                     \
                    mn[v] = QK3_SEL(VF, VI, take, this_min, mn[v]);                                             \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
        for (int b = 0; b < QK3_LANES; ++b) {                                                                   \
            const int v = b / W_, k = b % W_;                                                                   \
            if (flat[v][k]) {                                                                                   \
                scale_out[b] = 0.f;                                                                             \
                the_min_out[b] = -flat_min[v][k];                                                               \
                memset(L_out + MT_QK * b, 0, MT_QK);                                                            \
                continue;                                                                                       \
            }                                                                                                   \
            scale_out[b] = scale[v][k];                                                                         \
            the_min_out[b] = -mn[v][k];                                                                         \
            for (int i = 0; i < MT_QK; ++i) L_out[MT_QK * b + i] = (uint8_t)L[i][v][k];                         \
        }                                                                                                       \
    }

DEFINE_QKX3(qkx3_generic, , v4f, v4i, 2)
#ifdef MT_HAVE_AVX2_PATH
DEFINE_QKX3(qkx3_avx2, __attribute__((target("avx2"))), v8f, v8i, 1)
#endif

static qkx3_fn make_qkx3_quants_x8 = qkx3_generic;

static int quantize_legacy_impl(const float *x, uint8_t *y, int64_t n_rows, int64_t n_per_row,
                                const float *imatrix, enum mt_type type) {
    const int64_t nb = n_per_row / MT_QK;
    const int bytes = type == MT_Q4_0   ? MT_Q4_0_BYTES
                      : type == MT_Q4_1 ? MT_Q4_1_BYTES
                      : type == MT_Q5_0 ? MT_Q5_0_BYTES
                                        : MT_Q5_1_BYTES;
    for (int64_t r = 0; r < n_rows; ++r) {
        const float *xr = x + r * n_per_row;
        uint8_t *yr = y + r * nb * bytes;
        const float sigma2 = row_sigma2(xr, n_per_row);
        if (type == MT_Q4_0 || type == MT_Q5_0) {
            for (int64_t ib = 0; ib < nb; ++ib) {
                float w[MT_QK];
                legacy_weights(xr + MT_QK * ib, imatrix + MT_QK * ib, sigma2, w);
                if (type == MT_Q4_0) q4_0_impl_block(xr + MT_QK * ib, w, yr + bytes * ib);
                else q5_0_impl_block(xr + MT_QK * ib, w, yr + bytes * ib);
            }
            continue;
        }
        const int nmax = type == MT_Q4_1 ? 15 : 31;
        for (int64_t ib0 = 0; ib0 < nb; ib0 += QK3_LANES) {
            float w[QK3_LANES][MT_QK];
            const float *xs[QK3_LANES], *ws[QK3_LANES];
            const int nlanes = nb - ib0 < QK3_LANES ? (int)(nb - ib0) : QK3_LANES;
            for (int b = 0; b < QK3_LANES; ++b) {
                const int64_t ib = ib0 + (b < nlanes ? b : nlanes - 1); /* spare lanes repeat a block */
                if (b < nlanes) legacy_weights(xr + MT_QK * ib, imatrix + MT_QK * ib, sigma2, w[b]);
                xs[b] = xr + MT_QK * ib;
                ws[b] = w[b < nlanes ? b : nlanes - 1];
            }
            float scale[QK3_LANES], the_min[QK3_LANES];
            uint8_t L[QK3_LANES * MT_QK];
            make_qkx3_quants_x8(xs, ws, nmax, scale, the_min, L);
            for (int b = 0; b < nlanes; ++b) {
                uint8_t *yb = yr + bytes * (ib0 + b);
                if (type == MT_Q4_1) {
                    mt_store_fp16(yb + MT_Q4_1_D, scale[b]);
                    mt_store_fp16(yb + MT_Q4_1_M, -the_min[b]);
                    pack_q4(yb + MT_Q4_1_QS, L + MT_QK * b);
                } else {
                    mt_store_fp16(yb + MT_Q5_1_D, scale[b]);
                    mt_store_fp16(yb + MT_Q5_1_M, -the_min[b]);
                    pack_q5(yb + MT_Q5_1_QH, yb + MT_Q5_1_QS, L + MT_QK * b);
                }
            }
        }
    }
    return 0;
}

#define LEGACY_QUANTIZER(fname, TYPE, ref_blocks)                                                         \
    static int fname(const float *x, uint8_t *y, int64_t n_rows, int64_t n_per_row, const float *imatrix) { \
        if (imatrix) return quantize_legacy_impl(x, y, n_rows, n_per_row, imatrix, TYPE);                 \
        ref_blocks(x, y, n_rows * (n_per_row / MT_QK));                                                      \
        return 0;                                                                                          \
    }

LEGACY_QUANTIZER(quantize_q4_0, MT_Q4_0, q4_0_ref_blocks)
LEGACY_QUANTIZER(quantize_q4_1, MT_Q4_1, q4_1_ref_blocks)
LEGACY_QUANTIZER(quantize_q5_0, MT_Q5_0, q5_0_ref_blocks)
LEGACY_QUANTIZER(quantize_q5_1, MT_Q5_1, q5_1_ref_blocks)

/* Q8_0: the importance matrix is ignored, as in ggml. */
static int quantize_q8_0(const float *x, uint8_t *y, int64_t n_rows, int64_t n_per_row, const float *imatrix) {
    (void)imatrix;
    q8_0_ref_blocks(x, y, n_rows * (n_per_row / MT_QK));
    return 0;
}

void mt_register_qx(mt_kernel_table *t, int use_avx2) {
    qx_numerators(4, qx_num4);
    qx_numerators(8, qx_num8);
    qx_numerators(16, qx_num16);
    qx_numerators(32, qx_num32);
#ifdef MT_HAVE_AVX2_PATH
    if (use_avx2) {
        qx_sums = qx_sums_avx2;
        make_qkx3_quants_x8 = qkx3_avx2;
        q4_0_ref_blocks = q4_0_ref_avx2;
        q4_1_ref_blocks = q4_1_ref_avx2;
        q5_0_ref_blocks = q5_0_ref_avx2;
        q5_1_ref_blocks = q5_1_ref_avx2;
        q8_0_ref_blocks = q8_0_ref_avx2;
    }
#else
    use_avx2 = 0; /* no AVX2 build here (not gcc/clang on x86-64) */
#endif
    const char *impl = use_avx2 ? "avx2" : MT_PORTABLE_IMPL;
    t->search_impl[MT_SEARCH_QX] = impl;
    t->search_impl[MT_SEARCH_QKX3] = impl;
    t->search_impl[MT_SEARCH_LEGACY_REF] = impl;
    t->quantize[MT_Q6_K] = quantize_q6_k;
    t->quantize[MT_Q3_K] = quantize_q3_k;
    t->quantize[MT_Q8_0] = quantize_q8_0;
    t->quantize[MT_Q4_0] = quantize_q4_0;
    t->quantize[MT_Q4_1] = quantize_q4_1;
    t->quantize[MT_Q5_0] = quantize_q5_0;
    t->quantize[MT_Q5_1] = quantize_q5_1;
}
