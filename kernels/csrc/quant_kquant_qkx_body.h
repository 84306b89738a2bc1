/* Q2_K/Q4_K/Q5_K quantization: the part compiled once per vector width, included by
 * quant_kquant_qkx.c with VW (lanes), VF/VI (float/int vector types), VMIN/VMAX/VALL and SFX(name)
 * (the width suffix of every function name) defined. See quant_kquant_qkx.c for the method. */

#define NV (QKX_LANES / VW) /* vectors per row of lanes */

MT_INLINE VF SFX(vld)(const float *p) { VF v; memcpy(&v, p, sizeof v); return v; }
MT_INLINE void SFX(vst)(float *p, VF v) { memcpy(p, &v, sizeof v); }
MT_INLINE VF SFX(vset)(float s) { VF v; for (int k = 0; k < VW; ++k) v[k] = s; return v; }
MT_INLINE VI SFX(vseti)(int32_t s) { VI v; for (int k = 0; k < VW; ++k) v[k] = s; return v; }
MT_INLINE VF SFX(vsel)(VI m, VF a, VF b) { return (VF)((m & (VI)a) | (~m & (VI)b)); }
MT_INLINE VF SFX(vabs)(VF a) { return (VF)((VI)a & 0x7fffffff); }

/* Codes of one vector of f = iscale*(x - min): MAX(0, MIN(nmax, nearest_int(f))), as float.
 * mode QKX_SLOW: ggml's integer trick, exact for any input. Otherwise every lane's |f| is below
 * 2**22 (or the lane's result is discarded), so the float rounding is exact, and the clamps are
 * applied where some lane needs them (QKX_LO: some f < -0.5, QKX_HI: some f >= nmax + 0.5). */
MT_INLINE VF SFX(codes)(VF f, const int nmax, const int mode) {
    if (mode != QKX_SLOW) {
        VF r = (f + QKX_MAGIC) - QKX_MAGIC;
        if (mode & QKX_LO) r = VMAX(r, SFX(vset)(0.f));
        if (mode & QKX_HI) r = VMIN(r, SFX(vset)((float)nmax));
        return r;
    }
    const VF t = f + QKX_MAGIC;
    VI q = ((VI)t & 0x007fffff) - 0x00400000;
    const VI hi = q > SFX(vseti)(nmax);
    q = (q & ~hi) | (SFX(vseti)(nmax) & hi);
    q &= ~(q < SFX(vseti)(0));
    return __builtin_convertvector(q, VF);
}

/* The codes' mode for (ci, m): QKX_SLOW unless every non-flat lane's f = ci*(x - m) is in the
 * float rounding's range (f is monotonic in x, so its extremes come from the lane's extreme
 * values), then QKX_FAST with the clamps some lane needs. */
MT_INLINE int SFX(codes_mode)(const int nmax, const VF *ci, const VF *m, const VF *xlo, const VF *xhi,
                              const VI *flat) {
    const VF lim = SFX(vset)(QKX_FAST_LIMIT), lo_ok = SFX(vset)(-0.5f), hi_ok = SFX(vset)((float)nmax + 0.5f);
    VI ok = SFX(vseti)(-1), no_lo = ok, no_hi = ok;
    for (int v = 0; v < NV; ++v) {
        const VF a = ci[v] * (xlo[v] - m[v]);
        const VF b = ci[v] * (xhi[v] - m[v]);
        ok &= ((SFX(vabs)(a) < lim) & (SFX(vabs)(b) < lim)) | flat[v]; /* false for NaN */
        no_lo &= ((a >= lo_ok) & (b >= lo_ok)) | flat[v];
        no_hi &= ((a < hi_ok) & (b < hi_ok)) | flat[v];
    }
    if (!VALL(ok)) return QKX_SLOW;
    return QKX_FAST | (VALL(no_lo) ? 0 : QKX_LO) | (VALL(no_hi) ? 0 : QKX_HI);
}

/* The codes of every lane for iscale ci and min m into l ([n][QKX_LANES]). */
MT_INLINE void SFX(qkx_codes)(const int n, const int nmax, const int mode, const float *restrict xt,
                              const VF *ci, const VF *m, float *restrict l) {
    for (int i = 0; i < n; ++i)
        for (int v = 0; v < NV; ++v) {
            const int k = i * QKX_LANES + v * VW;
            SFX(vst)(l + k, SFX(codes)(ci[v] * (SFX(vld)(xt + k) - m[v]), nmax, mode));
        }
}

/* One step's pass: the codes into l, and sum_l, sum_l2, sum_xl (each from 0 in element order:
 * w*l, w*l*l, w*l*x as ggml rounds them). */
MT_INLINE void SFX(qkx_codes_sums)(const int n, const int nmax, const int mode, const float *restrict xt,
                                   const float *restrict wt, const VF *ci, const VF *m,
                                   float *restrict l, VF *sl, VF *sl2, VF *sxl) {
    VF a[NV], b[NV], c[NV];
    for (int v = 0; v < NV; ++v) a[v] = b[v] = c[v] = SFX(vset)(0.f);
    for (int i = 0; i < n; ++i)
        for (int v = 0; v < NV; ++v) {
            const int k = i * QKX_LANES + v * VW;
            const VF x = SFX(vld)(xt + k);
            const VF r = SFX(codes)(ci[v] * (x - m[v]), nmax, mode);
            SFX(vst)(l + k, r);
            const VF wl = SFX(vld)(wt + k) * r;
            a[v] += wl;
            b[v] += wl * r;
            c[v] += wl * x;
        }
    for (int v = 0; v < NV; ++v) {
        sl[v] = a[v];
        sl2[v] = b[v];
        sxl[v] = c[v];
    }
}

/* err = sum_i w * f(s*l + m - x), f = |.| (use_mad) or square, from 0 in element order. */
MT_INLINE void SFX(qkx_error)(const int n, const int use_mad, const float *restrict xt, const float *restrict wt,
                              const float *restrict l, const VF *s, const VF *m, VF *err) {
    VF e[NV];
    for (int v = 0; v < NV; ++v) e[v] = SFX(vset)(0.f);
    for (int i = 0; i < n; ++i)
        for (int v = 0; v < NV; ++v) {
            const int k = i * QKX_LANES + v * VW;
            VF d = s[v] * SFX(vld)(l + k) + m[v] - SFX(vld)(xt + k);
            d = use_mad ? SFX(vabs)(d) : d * d;
            e[v] += SFX(vld)(wt + k) * d;
        }
    for (int v = 0; v < NV; ++v) err[v] = e[v];
}

/* ggml's make_qkx2_quants / make_qkx3_quants (with weights) on QKX_LANES sub-blocks of n values
 * at once. xt, wt: [n][QKX_LANES] values and weights. qkx3 selects make_qkx3_quants' all-equal
 * test (max <= min; make_qkx2_quants: max == min). Outputs per lane: scale (the function's
 * return value), the_min, and the codes lt [n][QKX_LANES]. */
MT_INLINE void SFX(qkx_search)(const int n, const int nmax, const float *restrict xt, const float *restrict wt,
                               const float *restrict mults, const int nmult, const int use_mad, const int qkx3,
                               const int nan_input, float *restrict scale_out, float *restrict min_out,
                               float *restrict lt) {
    VF xlo[NV], xhi[NV], mn[NV], sw[NV], sx[NV];
    VI flat[NV];
    for (int v = 0; v < NV; ++v) {
        xlo[v] = xhi[v] = SFX(vld)(xt + v * VW);
        sw[v] = SFX(vld)(wt + v * VW);
        sx[v] = sw[v] * xlo[v];
    }
    for (int i = 1; i < n; ++i)
        for (int v = 0; v < NV; ++v) {
            const int k = i * QKX_LANES + v * VW;
            const VF x = SFX(vld)(xt + k), w = SFX(vld)(wt + k);
            xlo[v] = VMIN(x, xlo[v]); /* if (x[i] < min) min = x[i]; */
            xhi[v] = VMAX(x, xhi[v]); /* if (x[i] > max) max = x[i]; */
            sw[v] += w;
            sx[v] += w * x;
        }
    const VF zero = SFX(vset)(0.f);
    for (int v = 0; v < NV; ++v) {
        mn[v] = SFX(vsel)(xlo[v] > zero, zero, xlo[v]);
        flat[v] = qkx3 ? (xhi[v] <= mn[v]) : (xhi[v] == mn[v]);
    }

    /* The initial candidate: iscale = nmax/(max - min), scale = 1/iscale. The kept candidate is
     * remembered by the iscale and min that produced its codes (gi, gm). */
    VF gi[NV], gm[NV], scale[NV], best[NV];
    float l[QKX_MAX_N * QKX_LANES];
    for (int v = 0; v < NV; ++v) {
        gi[v] = SFX(vset)((float)nmax) / (xhi[v] - mn[v]);
        scale[v] = SFX(vset)(1.f) / gi[v];
        gm[v] = mn[v];
    }
    if (!nan_input && SFX(codes_mode)(nmax, gi, mn, xlo, xhi, flat) != QKX_SLOW)
        SFX(qkx_codes)(n, nmax, QKX_FAST | QKX_LO | QKX_HI, xt, gi, mn, l);
    else
        SFX(qkx_codes)(n, nmax, QKX_SLOW, xt, gi, mn, l);
    SFX(qkx_error)(n, use_mad, xt, wt, l, scale, mn, best);

    for (int is = 0; is < nmult; ++is) {
        VF ci[NV], sl[NV], sl2[NV], sxl[NV], ts[NV], tm[NV], err[NV];
        VI dpos[NV];
        const VF c = SFX(vset)(mults[is]);
        for (int v = 0; v < NV; ++v) ci[v] = c / (xhi[v] - mn[v]);
        switch (nan_input ? QKX_SLOW : SFX(codes_mode)(nmax, ci, mn, xlo, xhi, flat)) {
        case QKX_FAST:
            SFX(qkx_codes_sums)(n, nmax, QKX_FAST, xt, wt, ci, mn, l, sl, sl2, sxl);
            break;
        case QKX_FAST | QKX_LO:
            SFX(qkx_codes_sums)(n, nmax, QKX_FAST | QKX_LO, xt, wt, ci, mn, l, sl, sl2, sxl);
            break;
        case QKX_FAST | QKX_HI:
            SFX(qkx_codes_sums)(n, nmax, QKX_FAST | QKX_HI, xt, wt, ci, mn, l, sl, sl2, sxl);
            break;
        case QKX_FAST | QKX_LO | QKX_HI:
            SFX(qkx_codes_sums)(n, nmax, QKX_FAST | QKX_LO | QKX_HI, xt, wt, ci, mn, l, sl, sl2, sxl);
            break;
        default:
            SFX(qkx_codes_sums)(n, nmax, QKX_SLOW, xt, wt, ci, mn, l, sl, sl2, sxl);
        }
        for (int v = 0; v < NV; ++v) {
            const VF D = sw[v] * sl2[v] - sl[v] * sl[v];
            const VF s = (sw[v] * sxl[v] - sx[v] * sl[v]) / D;
            const VF m = (sl2[v] * sx[v] - sl[v] * sxl[v]) / D;
            const VI pos = m > zero; /* if (this_min > 0) { this_min = 0; this_scale = sum_xl/sum_l2; } */
            ts[v] = SFX(vsel)(pos, sxl[v] / sl2[v], s);
            tm[v] = SFX(vsel)(pos, zero, m);
            dpos[v] = D > zero;
        }
        SFX(qkx_error)(n, use_mad, xt, wt, l, ts, tm, err);
        for (int v = 0; v < NV; ++v) {
            const VI better = dpos[v] & (err[v] < best[v]); /* NaN never wins */
            best[v] = SFX(vsel)(better, err[v], best[v]);
            scale[v] = SFX(vsel)(better, ts[v], scale[v]);
            gi[v] = SFX(vsel)(better, ci[v], gi[v]);
            gm[v] = SFX(vsel)(better, mn[v], gm[v]);
            mn[v] = SFX(vsel)(better, tm[v], mn[v]);
        }
    }

    /* The kept candidate's codes; all-equal lanes: codes 0, scale 0. */
    if (!nan_input && SFX(codes_mode)(nmax, gi, gm, xlo, xhi, flat) != QKX_SLOW)
        SFX(qkx_codes)(n, nmax, QKX_FAST | QKX_LO | QKX_HI, xt, gi, gm, lt);
    else
        SFX(qkx_codes)(n, nmax, QKX_SLOW, xt, gi, gm, lt);
    for (int i = 0; i < n; ++i)
        for (int v = 0; v < NV; ++v) {
            const int k = i * QKX_LANES + v * VW;
            SFX(vst)(lt + k, SFX(vsel)(flat[v], zero, SFX(vld)(lt + k)));
        }
    for (int v = 0; v < NV; ++v) {
        SFX(vst)(scale_out + v * VW, SFX(vsel)(flat[v], zero, scale[v]));
        SFX(vst)(min_out + v * VW, -mn[v]);
    }
}

/* Two Q4_K/Q5_K super-blocks x0, x1 (the same block twice when there is one), their importance
 * weights q0, q1 (use_imatrix), into y0, y1 (y1 NULL: only one). */
MT_INLINE void SFX(quantize_k4_pair)(const int nmax, const int use_imatrix, const float *restrict x0,
                                     const float *restrict x1, const float *restrict q0, const float *restrict q1,
                                     const float *restrict mults, const int nmult, uint8_t *y0, uint8_t *y1) {
    float xt[32 * QKX_LANES], wt[32 * QKX_LANES], lt[32 * QKX_LANES];
    float scales[QKX_LANES], mins[QKX_LANES], sw[QKX_LANES];
    for (int h = 0; h < 2; ++h) {
        const float *xb = h ? x1 : x0;
        for (int j = 0; j < 8; ++j)
            for (int i = 0; i < 32; ++i) xt[i * QKX_LANES + 8 * h + j] = xb[32 * j + i];
    }
    const int nan_input = any_nan(x0, MT_QK_K) | any_nan(x1, MT_QK_K);
    if (!use_imatrix) {
        /* weights: the sub-block's rms plus |x| (sw is not used) */
        float s2[QKX_LANES], av[QKX_LANES];
        for (int j = 0; j < QKX_LANES; ++j) sw[j] = 0.f;
        for (int j = 0; j < QKX_LANES; ++j) s2[j] = 0.f;
        for (int i = 0; i < 32; ++i)
            for (int j = 0; j < QKX_LANES; ++j) s2[j] += xt[i * QKX_LANES + j] * xt[i * QKX_LANES + j];
        for (int j = 0; j < QKX_LANES; ++j) av[j] = sqrtf(s2[j] / 32.f);
        for (int i = 0; i < 32; ++i)
            for (int j = 0; j < QKX_LANES; ++j) wt[i * QKX_LANES + j] = av[j] + fabsf(xt[i * QKX_LANES + j]);
    } else {
        /* weights: qw * sqrtf(sigma2 + x*x), sigma2 = 2*sum(x*x)/256 over the super-block */
        float sa = 0.f, sb = 0.f;
        for (int k = 0; k < MT_QK_K; ++k) {
            sa += x0[k] * x0[k];
            sb += x1[k] * x1[k];
        }
        float sig[QKX_LANES], qt[32 * QKX_LANES];
        for (int j = 0; j < QKX_LANES; ++j) sig[j] = 2.f * (j < 8 ? sa : sb) / (float)MT_QK_K;
        for (int h = 0; h < 2; ++h) {
            const float *qb = h ? q1 : q0;
            for (int j = 0; j < 8; ++j)
                for (int i = 0; i < 32; ++i) qt[i * QKX_LANES + 8 * h + j] = qb[32 * j + i];
        }
        for (int i = 0; i < 32; ++i)
            for (int j = 0; j < QKX_LANES; ++j) {
                const float v = xt[i * QKX_LANES + j];
                wt[i * QKX_LANES + j] = qt[i * QKX_LANES + j] * sqrtf(sig[j] + v * v);
            }
        for (int j = 0; j < QKX_LANES; ++j) sw[j] = 0.f;
        for (int i = 0; i < 32; ++i)
            for (int j = 0; j < QKX_LANES; ++j) sw[j] += wt[i * QKX_LANES + j];
    }
    SFX(qkx_search)(32, nmax, xt, wt, mults, nmult, 0, use_imatrix, nan_input, scales, mins, lt);
    finish_k4_block(nmax, use_imatrix, x0, scales, mins, sw, lt, y0);
    if (y1) finish_k4_block(nmax, use_imatrix, x1, scales + 8, mins + 8, sw + 8, lt + 8, y1);
}

MT_INLINE void SFX(quantize_k4_rows_)(const int nmax, const int use_imatrix, const float *x, uint8_t *y,
                                      int64_t n_rows, int64_t n_per_row, const float *imatrix,
                                      const float *mults, int nmult) {
    const int64_t nb = n_per_row / MT_QK_K, total = n_rows * nb;
    const int64_t bytes = nmax == 15 ? MT_Q4_K_BYTES : MT_Q5_K_BYTES;
    for (int64_t g = 0; g < total; g += 2) {
        const int64_t g1 = g + 1 < total ? g + 1 : g;
        const float *q0 = use_imatrix ? imatrix + (g % nb) * MT_QK_K : NULL;
        const float *q1 = use_imatrix ? imatrix + (g1 % nb) * MT_QK_K : NULL;
        SFX(quantize_k4_pair)(nmax, use_imatrix, x + g * MT_QK_K, x + g1 * MT_QK_K, q0, q1, mults, nmult,
                              y + g * bytes, g1 != g ? y + g1 * bytes : NULL);
    }
}

static void SFX(quantize_k4_rows)(int nmax, const float *x, uint8_t *y, int64_t n_rows, int64_t n_per_row,
                                  const float *imatrix, const float *mults, int nmult) {
    if (nmax == 15) {
        if (imatrix)
            SFX(quantize_k4_rows_)(15, 1, x, y, n_rows, n_per_row, imatrix, mults, nmult);
        else
            SFX(quantize_k4_rows_)(15, 0, x, y, n_rows, n_per_row, imatrix, mults, nmult);
    } else {
        if (imatrix)
            SFX(quantize_k4_rows_)(31, 1, x, y, n_rows, n_per_row, imatrix, mults, nmult);
        else
            SFX(quantize_k4_rows_)(31, 0, x, y, n_rows, n_per_row, imatrix, mults, nmult);
    }
}

/* One Q2_K super-block: its 16 sub-blocks are the 16 lanes. */
MT_INLINE void SFX(quantize_q2_k_block)(const int use_imatrix, const float *restrict x, const float *restrict qw,
                                        const float *restrict mults, const int nmult, uint8_t *restrict y) {
    float xt[16 * QKX_LANES], wt[16 * QKX_LANES], lt[16 * QKX_LANES];
    float scales[16], mins[16], sw[16];
    for (int j = 0; j < 16; ++j)
        for (int i = 0; i < 16; ++i) xt[i * QKX_LANES + j] = x[16 * j + i];
    const int nan_input = any_nan(x, MT_QK_K);
    if (!use_imatrix) {
        for (int j = 0; j < 16; ++j) sw[j] = 0.f; /* not used */
        for (int k = 0; k < 16 * QKX_LANES; ++k) wt[k] = fabsf(xt[k]);
        SFX(qkx_search)(16, 3, xt, wt, mults, nmult, 1, 0, nan_input, scales, mins, lt);
    } else {
        float s = 0.f;
        for (int k = 0; k < MT_QK_K; ++k) s += x[k] * x[k];
        const float sigma2 = s / (float)MT_QK_K;
        for (int j = 0; j < 16; ++j)
            for (int i = 0; i < 16; ++i) wt[i * QKX_LANES + j] = qw[16 * j + i];
        for (int k = 0; k < 16 * QKX_LANES; ++k) wt[k] = wt[k] * sqrtf(sigma2 + xt[k] * xt[k]);
        for (int j = 0; j < 16; ++j) sw[j] = 0.f;
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 16; ++j) sw[j] += wt[i * QKX_LANES + j];
        SFX(qkx_search)(16, 3, xt, wt, mults, nmult, 0, 1, nan_input, scales, mins, lt);
    }
    finish_q2_k_block(use_imatrix, x, scales, mins, sw, lt, y);
}

static void SFX(quantize_q2_k_rows)(const float *x, uint8_t *y, int64_t n_rows, int64_t n_per_row,
                                    const float *imatrix, const float *mults, int nmult) {
    const int64_t nb = n_per_row / MT_QK_K, total = n_rows * nb;
    for (int64_t g = 0; g < total; ++g) {
        if (imatrix)
            SFX(quantize_q2_k_block)(1, x + g * MT_QK_K, imatrix + (g % nb) * MT_QK_K, mults, nmult, y + g * MT_Q2_K_BYTES);
        else
            SFX(quantize_q2_k_block)(0, x + g * MT_QK_K, NULL, mults, nmult, y + g * MT_Q2_K_BYTES);
    }
}

#undef NV

