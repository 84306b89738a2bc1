"""ggml's make_qkx2_quants / make_qkx3_quants in torch: the scale-and-min search of Q2_K, Q4_K, Q5_K, Q4_1, Q5_1.

ggml chooses each sub-block's scale and min by a small search. The functions here run it for
many sub-blocks at once, bit-exact with ggml-quants.c (float rules in :mod:`ggml_float`).

Shape of the work: ggml's search steps depend on each other (a kept candidate's fitted min is
used by the steps after it), so the 16 to 37 steps run in order, each on all sub-blocks of a
chunk at once. The sequential sums walk the fixed 16 or 32 elements of a sub-block in Python,
so a sub-block's elements are stored element-major, ``(n, sub_blocks)``, and every loop step
touches contiguous memory. A step costs about sixteen passes over the chunk (codes, the three
weighted sums, the error), which bounds the speed of this eager formulation.

Two versions: :func:`make_qkx_quants` (fast, for the K-quants, whose fitted mins are requantized
to 6-bit codes) and :func:`make_qkx3_quants` (for Q4_1 and Q5_1, which store the min as fp16, so
the sign of a zero min reaches the bytes and must follow ggml's steps exactly).
"""

from __future__ import annotations

import numpy as np
import torch

from moetrace.kernels.ggml_float import f32, f32_tensor, fdiv, first_extreme, nearest_int, seq_sum

# The search runs on chunks of about this many elements (per CPU thread): on a CPU large
# enough that each torch op amortizes its dispatch, small enough that a step's working set
# (about ten arrays of the chunk's size) stays in the caches (measured best on 2-core Zen 4:
# 2**18 per thread); a GPU wants as much work per kernel as fits.
_CHUNK_ELEMS_PER_CPU_THREAD = 1 << 18
_CHUNK_ELEMS_GPU = 1 << 24


def _search_multipliers(nmax: int, rmin: float, rdelta: float, nstep: int) -> np.ndarray:
    # ggml evaluates `rmin + rdelta*is + nmax` in float32, left to right.
    steps = np.arange(nstep + 1, dtype=np.float32)
    return (np.float32(rmin) + np.float32(rdelta) * steps) + np.float32(nmax)


def make_qkx_quants(
    x: torch.Tensor,
    w: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted scale-and-min search of many sub-blocks.

    Mirrors ggml's ``make_qkx2_quants`` and ``make_qkx3_quants`` (with weights), which differ
    only in the all-equal test (``max == min`` vs ``max <= min``, the same once ``min`` is
    clamped to <= 0). Start from iscale = nmax / (max - min), then for is = 0..nstep try
    iscale = (rmin + rdelta*is + nmax) / (max - min), fit scale and min by weighted least
    squares, and keep a candidate only when its error is strictly smaller. As in ggml, a kept
    candidate's fitted min replaces ``min`` for the steps after it, so the steps run in order.

    Args:
        x: (sub_blocks, n) float32 values.
        w: (sub_blocks, n) float32 weights.
        nmax: largest code (3, 15 or 31).
        rmin, rdelta, nstep: the search grid, as ggml's arguments.
        use_mad: weigh |error| instead of error**2.

    Returns:
        scale: (sub_blocks,) float32, the function's return value.
        the_min: (sub_blocks,) float32, ggml's ``*the_min`` (minus the fitted offset).
        L: (sub_blocks, n) uint8 codes of the chosen candidate.
    """
    # (n, sub_blocks): element-major, see the module docstring
    scale, the_min, L = make_qkx_quants_t(x.t().contiguous(), w.t().contiguous(), nmax, rmin, rdelta, nstep, use_mad)
    return scale, the_min, L.t()


def make_qkx_quants_t(
    xt: torch.Tensor,
    wt: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`make_qkx_quants` on element-major input: xt, wt (n, sub_blocks); L comes back (n, sub_blocks)."""
    n, n_sub = xt.shape
    mults = [float(c) for c in _search_multipliers(nmax, rmin, rdelta, nstep)]
    if xt.device.type == "cpu":
        chunk = max(1, _CHUNK_ELEMS_PER_CPU_THREAD * torch.get_num_threads() // n)
    else:
        chunk = max(1, _CHUNK_ELEMS_GPU // n)
    scale = torch.empty(n_sub, dtype=torch.float32, device=xt.device)
    the_min = torch.empty_like(scale)
    L = torch.empty((n, n_sub), dtype=torch.uint8, device=xt.device)
    # Chunks of thousands of sub-blocks bound memory and keep the working set in cache;
    # within a chunk everything is vectorized.
    for a in range(0, n_sub, chunk):
        b = min(n_sub, a + chunk)
        s, m, l = _qkx_chunk(xt[:, a:b].contiguous(), wt[:, a:b].contiguous(), nmax, mults, use_mad)
        scale[a:b] = s
        the_min[a:b] = m
        L[:, a:b] = l
    return scale, the_min, L


class _Codes:
    """Codes MAX(0, MIN(nmax, nearest_int(iscale*(x - min)))) of one chunk.

    A float round equals ggml's nearest_int while |iscale*(x - min)| < 2**22. The extreme
    products of a sub-block come from its smallest and largest value (float subtraction and
    multiplication are monotonic), so checking those two per sub-block decides whether the
    cheap path is exact; otherwise (tiny or overflowing ranges, a fitted min far outside the
    data) the integer emulation runs.
    """

    def __init__(self, xt: torch.Tensor, nmax: int):
        self.xt = xt  # (n, b)
        self.nmax = nmax
        self.ext = torch.stack([xt.amin(0), xt.amax(0)])  # (2, b): smallest, largest value

    def __call__(self, iscale: torch.Tensor, mn: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write the (n, b) codes for per-sub-block iscale, mn (b,) into ``out`` (float32)."""
        torch.sub(self.xt, mn, out=out)
        out.mul_(iscale)
        lo, hi = torch.stack(torch.aminmax((self.ext - mn) * iscale)).tolist()
        if lo > -4.0e6 and hi < 4.0e6:  # False for NaN too
            out.round_()
            if lo < -0.5 or hi >= self.nmax + 0.5:  # else every code is already in range
                out.clamp_(0, self.nmax)
            return out
        out.copy_(nearest_int(out).clamp_(0, self.nmax))
        return out


def _qkx_chunk(xt, wt, nmax, mults, use_mad):
    """make_qkx_quants on one chunk; xt, wt are (n, b). Returns scale (b,), the_min (b,), L (n, b) uint8."""
    n, nb = xt.shape
    dev = xt.device
    f32 = dict(dtype=torch.float32, device=dev)
    codes = _Codes(xt, nmax)
    xlo, mx = codes.ext

    sum_w = wt[0].clone()
    sum_x = sum_w * xt[0]
    for i in range(1, n):
        sum_w += wt[i]
        sum_x += wt[i] * xt[i]
    mn0 = torch.where(xlo > 0, torch.zeros_like(xlo), xlo)  # the sign of a zero min never reaches the output
    flat = mx <= mn0  # every value equal: scale 0, L 0, the_min = -min

    # State of the search, one row each: best error, the iscale and min that produced the
    # best codes, the best scale, and the current min. `cand` holds a step's candidate
    # in the same rows so one masked copy applies a win.
    state = torch.empty((5, nb), **f32)
    cand = torch.empty((5, nb), **f32)
    best, gen_iscale, gen_min, scale, mn = state.unbind(0)
    err, c_iscale, c_min, this_scale, this_min = cand.unbind(0)

    l = torch.empty((n, nb), **f32)
    e = torch.empty((n, nb), **f32)
    terms = torch.empty((n, 3, nb), **f32)  # per element: w*l, (w*l)*l, (w*l)*x
    acc = torch.empty((3, nb), **f32)  # sum_l, sum_l2, sum_xl
    dn = torch.empty((3, nb), **f32)  # D, and the numerators of scale and min
    ysl = torch.empty((2, nb), **f32)  # sum_l, sum_x

    # The initial candidate: codes from nmax/(max - min), scale = 1/iscale, the clamped min.
    mn.copy_(mn0)
    torch.div(f32_tensor(nmax, dev), mx - mn, out=gen_iscale)
    torch.div(f32_tensor(1.0, dev), gen_iscale, out=scale)
    gen_min.copy_(mn)
    codes(gen_iscale, mn, l)
    _weighted_error(l, scale, mn, xt, wt, use_mad, e, best)

    ysl[1] = sum_x
    t_rows = terms.view(n, 3 * nb).unbind(0)  # views made once: indexing in the loop costs
    acc_flat = acc.view(-1)
    for c in [f32_tensor(c, dev) for c in mults]:
        torch.div(c, mx - mn, out=c_iscale)
        c_min.copy_(mn)
        codes(c_iscale, mn, l)
        torch.mul(l, wt, out=terms[:, 0])
        torch.mul(terms[:, 0], l, out=terms[:, 1])
        torch.mul(terms[:, 0], xt, out=terms[:, 2])
        acc_flat.copy_(t_rows[0])
        for t in t_rows[1:]:  # ggml's sequential sums, all three at once
            acc_flat += t
        sum_l, sum_l2, sum_xl = acc.unbind(0)

        # D = sum_w*sum_l2 - sum_l*sum_l, scale numerator sum_w*sum_xl - sum_x*sum_l,
        # min numerator sum_l2*sum_x - sum_l*sum_xl, each as ggml rounds it.
        ysl[0] = sum_l
        torch.sub(acc[1:] * sum_w, ysl * sum_l, out=dn[:2])
        torch.sub(sum_l2 * sum_x, sum_l * sum_xl, out=dn[2])
        D = dn[0]
        torch.div(dn[1:], D, out=cand[3:])
        pos = this_min > 0
        this_min.clamp_(max=0.0)  # `if (this_min > 0) this_min = 0`; NaN stays NaN as in C
        torch.where(pos, sum_xl / sum_l2, this_scale, out=this_scale)

        _weighted_error(l, this_scale, this_min, xt, wt, use_mad, e, err)

        # Kept only when D > 0 and strictly better (NaN never wins); the kept min is used
        # by the following steps.
        better = (D > 0) & (err < best)
        torch.where(better, cand, state, out=state)

    L = codes(gen_iscale, gen_min, l)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = L.masked_fill_(flat, 0.0)
    return scale, -mn, L.to(torch.uint8)


def _weighted_error(l, scale, mn, xt, wt, use_mad, e, out):
    """out = sum_i w*f(scale*l + min - x) in element order: l, xt, wt, e (n, b); scale, mn, out (b,)."""
    torch.mul(l, scale, out=e)
    e += mn
    e -= xt
    if use_mad:
        e.abs_()
    else:
        e.mul_(e)
    e *= wt
    rows = e.unbind(0)
    out.copy_(rows[0])
    for r in rows[1:]:
        out += r
    return out



def make_qkx3_quants(
    x: torch.Tensor, nmax: int, weights: torch.Tensor, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's ``make_qkx3_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, use_mad=false)``.

    :func:`make_qkx_quants_t` runs the same search faster for Q2_K/Q4_K/Q5_K, whose fitted
    mins are requantized to 6-bit codes; Q4_1 and Q5_1 store the min itself as fp16, so the sign
    of a zero min reaches the bytes, and only this version keeps it as ggml does (swapping in the
    fast one changes 3 of 1408 golden-vector blocks of each type).

    An affine fit ``x ~ scale*L + min`` (min <= 0) by weighted least squares over ``nstep + 1``
    candidate inverse scales. The running ``min`` is replaced whenever a candidate wins, and
    later candidates start from it, as in ggml; so the steps stay sequential.

    Args:
        x: (n, G) float32 groups, element-major.
        nmax: codes run 0..nmax.
        weights: (n, G) float32 (ggml's imatrix-derived weights; never NULL on the paths used here).
        rmin, rdelta, nstep: the search grid (ggml passes -0.9f, 0.05f, 36 everywhere).

    Returns:
        scale: (G,) float32; the_min: (G,) float32 (``-min``, so >= 0 or -0.0); L: (n, G) int32 in 0..nmax.
    """
    w = weights
    mn = first_extreme(x, largest=False)
    mx = first_extreme(x, largest=True)
    sum_w = w[0].clone()
    sum_x = sum_w * x[0]
    for i in range(1, x.shape[0]):
        sum_w = sum_w + w[i]
        sum_x = sum_x + w[i] * x[i]
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx <= mn  # (G,) ggml returns early: all-zero codes, scale 0, this min
    flat_min = mn

    iscale = fdiv(nmax, mx - mn)
    scale = fdiv(1, iscale)
    L = nearest_int(iscale * (x - mn)).clamp_(0, nmax)
    diff = scale * L.to(torch.float32) + mn - x
    best_mad = seq_sum(w * (diff * diff))
    for step in range(nstep + 1):
        c = f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)  # rmin + rdelta*is + nmax, float32
        iscale = fdiv(c, mx - mn)
        v = iscale * (x - mn)
        # min may be the best fit so far, at or near max: v can be inf or NaN, which ggml maps to 0 here.
        laux = torch.where(v > 0, nearest_int(torch.clamp(v, max=float(nmax))), 0)
        lf = laux.to(torch.float32)
        wl = w * lf
        sum_l = seq_sum(wl)
        sum_l2 = seq_sum(wl * lf)
        sum_xl = seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        diff = this_scale * lf + this_min - x
        mad = seq_sum(w * (diff * diff))
        take = (D > 0) & (mad < best_mad)
        L = torch.where(take, laux, L)
        best_mad = torch.where(take, mad, best_mad)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)
    L = torch.where(flat, 0, L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    mn = torch.where(flat, flat_min, mn)
    return scale, -mn, L
