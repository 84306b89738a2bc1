"""ggml's make_qp_quants in torch: the super-block scales of the K-quants' importance-matrix paths.

Q2_K, Q4_K and Q5_K with an importance matrix quantize their non-negative sub-block scales and
mins with this search, bit-exact with ggml-quants.c (float rules in :mod:`ggml_float`).
"""

from __future__ import annotations

import numpy as np
import torch

from moetrace.kernels.ggml_float import GROUP_MAX_EPS, fdiv, nearest_int, seq_sum


def make_qp_quants(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the non-negative sub-block scales of many super-blocks to codes 0..nmax.

    Mirrors ggml's ``make_qp_quants``: a scale search over iscale = (0.1*is + nmax)/max for
    is = -4..4, then up to five passes that move single codes while that raises
    sumlx**2/suml2. Codes are kept as ggml's uint8 array keeps them (wrapped to 8 bits).

    Args:
        x: (groups, n) float32 values to quantize (sub-block scales or mins).
        w: (groups, n) float32 weights.
        nmax: largest code.

    Returns:
        scale: (groups,) float32 super-block scale (``sumlx / suml2``).
        L: (groups, n) int32 codes in 0..255.
    """
    ng, n = x.shape
    mx = torch.zeros(ng, dtype=torch.float32, device=x.device)
    for i in range(n):  # MAX(max, x[i]) from 0, in order
        mx = torch.where(mx > x[:, i], mx, x[:, i])
    zero = mx < GROUP_MAX_EPS
    iscale = fdiv(nmax, mx)  # (groups,)
    iscale_col = iscale[:, None]
    L = nearest_int(iscale_col * x) & 0xFF
    scale = fdiv(1.0, iscale)
    best = _qp_error(x, w, scale[:, None], L.to(torch.float32))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        c = float(np.float32(0.1) * np.float32(step) + np.float32(nmax))
        iscale_is = fdiv(c, mx)
        scale_is = fdiv(1.0, iscale_is)
        l = nearest_int(iscale_is[:, None] * x).clamp(max=nmax).to(torch.float32)
        mse = _qp_error(x, w, scale_is[:, None], l)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, iscale_is, iscale)

    li = nearest_int(iscale[:, None] * x).clamp(max=nmax)  # (groups, n) int32, may be negative
    lf = li.to(torch.float32)
    L = li & 0xFF
    sumlx = seq_sum(w * x * lf, dim=1)
    suml2 = seq_sum(w * lf * lf, dim=1)
    wx = w * x
    for _ in range(5):
        changed = torch.zeros(ng, dtype=torch.bool, device=x.device)
        for i in range(n):
            Li = L[:, i]
            Lf = Li.to(torch.float32)
            wi = w[:, i]
            slx = sumlx - wx[:, i] * Lf
            sl2 = suml2 - wi * Lf * Lf
            ok = (slx > 0) & (sl2 > 0)
            new_l = nearest_int(x[:, i] * sl2 / slx).clamp(max=nmax)
            ok &= new_l != Li
            nf = new_l.to(torch.float32)
            slx = slx + wx[:, i] * nf
            sl2 = sl2 + wi * nf * nf
            ok &= slx * slx * suml2 > sumlx * sumlx * sl2
            L[:, i] = torch.where(ok, new_l & 0xFF, Li)
            sumlx = torch.where(ok, slx, sumlx)
            suml2 = torch.where(ok, sl2, suml2)
            changed |= ok
        # A group with no change in a pass would repeat it exactly, so ggml's per-group
        # early exit changes nothing; stop once no group changes.
        if not bool(changed.any()):
            break
    out = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    out = torch.where(zero, torch.zeros_like(out), out)
    L = torch.where(zero[:, None], torch.zeros_like(L), L)
    return out, L


def _qp_error(x, w, scale, l):
    """sum_i w*diff*diff with diff = x - scale*l, in element order: (groups, n) -> (groups,)."""
    diff = x - scale * l
    return seq_sum(w * diff * diff, dim=1)
