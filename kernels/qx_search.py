"""ggml's scale searches, vectorized across groups and bit-exact with ``ggml-quants.c``.

Every routine here takes its groups *element-major*: ``x`` is ``(n, G)``, one column per group of
``n`` elements, so that the per-element steps ggml runs in a loop become contiguous vector ops over
all ``G`` groups at once. The loops that remain are over the fixed ``n`` elements of a group (ggml
accumulates its sums in float32 in index order, and float addition does not reassociate) and over
the fixed search steps.

C expression order is kept term by term: ``w*x[i]*l`` is ``(w*x[i])*l``, float literals such as
``0.1f`` are float32, integer operands are converted to float32 before the float operation.
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15  # ggml's GROUP_MAX_EPS (a float literal; compared against float32 tensors)
_MAGIC = 12582912.0  # 1.5 * 2**23, the constant of ggml's nearest_int


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: round half to even via the float32 magic-number trick, as int32.

    Inside ggml's asserted range (``|v| <= 4194303``) this equals ``torch.round``; outside it,
    it reproduces the same bits ggml's release build computes, so out-of-range corner cases
    still match after clamping.
    """
    return ((v + _MAGIC).view(torch.int32) & 0x007FFFFF) - 0x00400000


def fdiv(num: float, den: torch.Tensor) -> torch.Tensor:
    """C's ``num / den`` for a float32 constant ``num``: a true float32 division.

    ``python_scalar / tensor`` in torch is ``tensor.reciprocal() * scalar``, which rounds twice and
    differs from the C quotient in about a quarter of cases (e.g. ``15.0 / t``); a 0-d tensor
    numerator takes the correctly rounded division kernel.
    """
    return torch.tensor(num, dtype=torch.float32, device=den.device) / den


def fdiv_by(num: torch.Tensor, den: float) -> torch.Tensor:
    """C's ``num / den`` for a float32 constant ``den``: a true float32 division on every device.

    On CUDA, ``tensor / python_scalar`` multiplies by the scalar's reciprocal (one rounding too
    many unless ``den`` is a power of two); a 0-d tensor on the same device divides.
    """
    return num / torch.tensor(den, dtype=torch.float32, device=num.device)


def sqrtf(v: torch.Tensor) -> torch.Tensor:
    """C ``sqrtf``: the correctly rounded float32 square root.

    ``torch.sqrt`` on float32 CPU tensors is not correctly rounded (about one result in six is
    off by an ulp on AVX-512 builds), which flips ggml's exact-tie comparisons downstream. The
    float64 root, correctly rounded and then rounded to float32, equals the correctly rounded
    float32 root (53 >= 2*24 + 2 bits, so the double rounding is innocuous).
    """
    return torch.sqrt(v.to(torch.float64)).to(torch.float32)


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero) on float32, exact for |v| < 2**31: trunc, then step if the fraction is >= 0.5."""
    r = v.to(torch.int32).to(torch.float32)  # truncation toward zero (torch.trunc is much slower on CPU)
    frac = v - r  # exact: the fraction of a float is representable
    return r + torch.where(frac.abs() >= 0.5, torch.sign(v), torch.zeros_like(v))


def seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``(n, G)`` over ``n`` in index order from ``0.0f`` in float32, like ggml's ``s += t[i]`` loops."""
    acc = torch.zeros_like(t[0])
    for i in range(t.shape[0]):
        acc = acc + t[i]
    return acc


def first_absmax(x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed value and magnitude of the first element of largest magnitude along ``dim``.

    Mirrors ggml's ``if (ax > amax) { amax = ax; max = x[i]; }`` loop started from zero:
    ``argmax`` returns the first maximal index, as the strict comparison keeps the first,
    and an all-zero column keeps the initial ``+0.0``.

    Args:
        x: (n, G) float32 (or (G, n) with ``dim=1``).

    Returns:
        max: (G,) signed value; amax: (G,) its magnitude.
    """
    ax = x.abs()
    if dim == 0:
        # ggml's loop itself, vectorized across columns: cheaper than argmax along dim 0.
        amax, mx = torch.zeros_like(ax[0]), torch.zeros_like(x[0])
        for i in range(x.shape[0]):
            take = ax[i] > amax
            amax = torch.where(take, ax[i], amax)
            mx = torch.where(take, x[i], mx)
        return mx, amax
    idx = ax.argmax(dim, keepdim=True)
    mx, amax = x.gather(dim, idx).squeeze(dim), ax.gather(dim, idx).squeeze(dim)
    # ggml never updates max when every |x| is 0: it stays +0.0 even if the first element is -0.0.
    return torch.where(amax > 0, mx, torch.zeros_like(mx)), amax


def first_extreme(x: torch.Tensor, largest: bool, dim: int = 0) -> torch.Tensor:
    """min (or max) along ``dim``, choosing the first of equal values (-0.0 vs 0.0) like ggml's ``v < min`` loop.

    Args:
        x: (n, G) float32 (or (G, n) with ``dim=1``).

    Returns:
        (G,) float32.
    """
    m = x.amax(dim, keepdim=True) if largest else x.amin(dim, keepdim=True)
    idx = (x == m).to(torch.uint8).argmax(dim, keepdim=True)  # first index equal to the extreme
    return x.gather(dim, idx).squeeze(dim)


def _f32(v: float) -> np.float32:
    return np.float32(v)


def make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: a signed scale searched over 19 candidates.

    All 19 candidate inverse scales (``-nmax/max``, then ``-(nmax + 0.1f*is)/max`` for is = -9..9,
    is != 0) are rounded and summed at once; only the strictly-better selection, which compares
    against the running best, runs candidate by candidate. ggml recomputes the winner's codes from
    its inverse scale, so taking the winner's codes here is the same.

    Args:
        x: (n, G) float32 groups, element-major.
        nmax: levels run -nmax..nmax-1.
        qw: (n, G) float32 weights, or None for ggml's default ``x*x``.

    Returns:
        scale: (G,) float32, the value ggml returns.
        L: (n, G) int32 codes ``l + nmax`` in 0..2*nmax-1 (all 0 for an all-zero group).
    """
    mx, amax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS  # (G,)
    w = x * x if qw is None else qw
    wx = w * x  # the (w*x[i]) of (w*x[i])*l, the same for every candidate

    # Candidate numerators in ggml's order, each a float32 constant: nmax, then nmax + 0.1f*is.
    cs = [_f32(nmax)] + [_f32(nmax) + _f32(0.1) * _f32(i) for i in range(-9, 10) if i != 0]
    iscale = torch.stack([fdiv(-float(c), mx) for c in cs])  # (C, G)
    # |iscale * x| <= nmax + 0.9 for finite x: far inside nearest_int's range, where it is
    # round-half-even. Where sums overflowed (x itself a NaN or Inf scale from a first-level
    # search), ggml's nearest_int gives 0 for NaN and -2**22 for +-Inf before the clamp.
    v = iscale[None] * x[:, None]
    lf = torch.round(v).clamp_(-nmax, nmax - 1)  # (n, C, G)
    if not torch.isfinite(v).all():
        lf = torch.where(torch.isnan(v), 0.0, torch.where(torch.isinf(v), float(-nmax), lf))
    sumlx = seq_sum(wx[:, None] * lf)  # (C, G)
    suml2 = seq_sum(w[:, None] * lf * lf)

    scale = torch.where(suml2[0] != 0, sumlx[0] / suml2[0], torch.zeros_like(sumlx[0]))
    best = scale * sumlx[0]
    win = torch.zeros_like(mx, dtype=torch.int64)
    for k in range(1, len(cs)):
        slx, sl2 = sumlx[k], suml2[k]
        better = (sl2 > 0) & (slx * slx > best * sl2)  # strictly better, as in ggml
        scale = torch.where(better, slx / sl2, scale)
        best = torch.where(better, scale * slx, best)
        win = torch.where(better, k, win)
    L = lf.gather(1, win.expand(x.shape[0], 1, -1))[:, 0].to(torch.int32)  # (n, G) the winner's codes
    L = torch.where(zero, 0, L + nmax)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_q3_quants(n, nmax, x, L, do_rmse=true)``: greedy coordinate refinement, 5 passes.

    Each pass visits the elements in order and keeps a changed code only when it strictly
    improves ``sumlx^2 / suml2``; the running sums change inside a pass, so the loop over
    elements stays sequential (vectorized across groups). A pass that changes nothing leaves
    the state as it was, so groups that ggml stops early are unaffected by further passes.

    Args:
        x: (n, G) float32 groups, element-major.
        nmax: levels run -nmax..nmax-1.

    Returns:
        scale: (G,) float32; L: (n, G) int32 codes ``l + nmax`` (all 0 for an all-zero group).
    """
    n = x.shape[0]
    mx, amax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    iscale = fdiv(-nmax, mx)
    L = torch.round(iscale * x).clamp_(-nmax, nmax - 1)  # (n, G) signed codes, as floats; |iscale*x| <= nmax
    w = x * x
    wx = w * x
    sumlx = seq_sum(wx * L)
    suml2 = seq_sum(w * L * L)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(n):
            li = L[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            # x*sl2/slx is unbounded in principle: keep ggml's exact nearest_int here.
            new_l = nearest_int(x[i] * sl2 / slx).clamp_(-nmax, nmax - 1).to(torch.float32)
            slx_new = slx + wx[i] * new_l
            sl2_new = sl2 + w[i] * new_l * new_l
            take = (
                (slx > 0) & (new_l != li) & (sl2_new > 0)
                & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            )
            L[i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx_new, sumlx)
            suml2 = torch.where(take, sl2_new, suml2)
            changed |= take
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    L = torch.where(zero, 0, L.to(torch.int32) + nmax)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def make_qkx3_quants(
    x: torch.Tensor, nmax: int, weights: torch.Tensor, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's ``make_qkx3_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, use_mad=false)``.

    kquant_search.make_qkx_quants_t runs the same search faster for Q2_K/Q4_K/Q5_K, whose fitted
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
        c = _f32(rmin) + _f32(rdelta) * _f32(step) + _f32(nmax)  # rmin + rdelta*is + nmax, float32
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
