"""ggml's make_qx_quants and make_q3_quants in torch: the signed scale searches of Q3_K, Q6_K and the legacy types.

Every routine here takes its groups *element-major*: ``x`` is ``(n, G)``, one column per group of
``n`` elements, so that the per-element steps ggml runs in a loop become contiguous vector ops over
all ``G`` groups at once. The loops that remain are over the fixed ``n`` elements of a group (ggml
accumulates its sums in float32 in index order) and over the fixed search steps.

C expression order is kept term by term: ``w*x[i]*l`` is ``(w*x[i])*l``, float literals such as
``0.1f`` are float32, integer operands are converted to float32 before the float operation (the
float rules are in :mod:`ggml_float`).
"""

from __future__ import annotations

import torch

from moetrace.kernels.ggml_float import GROUP_MAX_EPS, f32, fdiv, first_absmax, nearest_int, seq_sum


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
    cs = [f32(nmax)] + [f32(nmax) + f32(0.1) * f32(i) for i in range(-9, 10) if i != 0]
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
