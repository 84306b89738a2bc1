"""Q2_K: 256-element super-blocks of sixteen 16-element sub-blocks, 2-bit codes, 4-bit scales and mins.

Block layout (84 bytes)::

    scales[16] (low nibble scale, high nibble min) | qs[64] | d fp16 | dmin fp16
    value = d*(sc & 15)*q - dmin*(sc >> 4)

``qs[32*h + l]`` holds element ``128*h + 32*k + l`` in bits ``2k..2k+1``. The quantizer is
bit-exact with ggml: ``quantize_row_q2_K_ref`` without an importance matrix,
``quantize_row_q2_K_impl`` with one.
"""

from __future__ import annotations

import torch

from moetrace.kernels.base import QK_K, BlockFormat
from moetrace.kernels.block_bytes import fp16_bytes, fp16_field
from moetrace.kernels.ggml_float import fdiv, fdiv_by, fp16_round, nearest_int, running_max_from_zero, seq_sum, sqrtf
from moetrace.kernels.parallel import split_over_threads
from moetrace.kernels.search_qkx import make_qkx_quants_t
from moetrace.kernels.search_qp import make_qp_quants
from moetrace.kernels.layouts import LAYOUTS

_L = LAYOUTS["Q2_K"]  # field offsets of block_q2_K

N_SUB = QK_K // 16  # sub-blocks per super-block


def _ref_scales(x: torch.Tensor):
    """The scale search of quantize_row_q2_K_ref.

    Returns the scale bytes (blocks, 16) int32, the fp32 ``d`` and ``dmin`` before fp16, and
    the search codes (16, blocks*16) uint8, element-major.
    """
    nb = x.shape[0]
    xt = x.reshape(nb * N_SUB, 16).t().contiguous()  # (16, sub-blocks), as the search wants it
    scales, mins, Lt = make_qkx_quants_t(xt, xt.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scales = scales.view(nb, N_SUB)
    mins = mins.view(nb, N_SUB)
    max_scale = running_max_from_zero(scales)
    max_min = running_max_from_zero(mins)
    zero = torch.zeros_like(max_scale)
    has_scale = max_scale > 0
    has_min = max_min > 0
    # `y[i].scales[j] = l;` then `y[i].scales[j] |= (l << 4);`, both through uint8.
    ls = nearest_int(fdiv(15.0, max_scale)[:, None] * scales)
    ls = torch.where(has_scale[:, None], ls, torch.zeros_like(ls))
    lm = nearest_int(fdiv(15.0, max_min)[:, None] * mins)
    lm = torch.where(has_min[:, None], lm << 4, torch.zeros_like(lm))
    sc = (ls | lm) & 0xFF
    d = torch.where(has_scale, fdiv_by(max_scale, 15), zero)
    dmin = torch.where(has_min, fdiv_by(max_min, 15), zero)
    return sc, d, dmin, Lt


def _imatrix_scales(x: torch.Tensor, qw: torch.Tensor):
    """The scale search of quantize_row_q2_K_impl; returns as :func:`_ref_scales`."""
    nb = x.shape[0]
    sigma2 = fdiv_by(seq_sum(x * x, dim=1), QK_K)  # (blocks,)
    xt = x.reshape(nb * N_SUB, 16).t().contiguous()  # (16, sub-blocks)
    qwt = qw.reshape(nb * N_SUB, 16).t()
    s2 = sigma2.repeat_interleave(N_SUB)  # (sub-blocks,): each sub-block's super-block sigma2
    wt = sqrtf(xt * xt + s2).mul_(qwt)  # qw * sqrtf(sigma2 + x*x), contiguous like xt
    sw = seq_sum(wt, dim=0).view(nb, N_SUB)
    scales, mins, Lt = make_qkx_quants_t(xt, wt, 3, -0.9, 0.05, 36, use_mad=False)
    dm, ls = make_qp_quants(scales.view(nb, N_SUB), sw, 15)
    mm, lm = make_qp_quants(mins.view(nb, N_SUB), sw, 15)
    sc = (ls | (lm << 4)) & 0xFF
    return sc, dm, mm, Lt


def _quantize_q2_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """quantize_row_q2_K_ref / _impl on (blocks, 256) -> (blocks, 84) uint8."""
    nb = x.shape[0]
    if qw is None:
        sc, d, dmin, Lt = _ref_scales(x)
    else:
        sc, d, dmin, Lt = _imatrix_scales(x, qw)

    # Requantize with the stored scales; a sub-block whose scale is 0 keeps the search's codes.
    dd = fp16_round(d)[:, None] * (sc & 0xF).to(torch.float32)  # (blocks, 16)
    dm = fp16_round(dmin)[:, None] * (sc >> 4).to(torch.float32)
    v = x.reshape(nb, N_SUB, 16) + dm[:, :, None]
    v /= dd[:, :, None]
    L = nearest_int(v).clamp_(0, 3).to(torch.uint8)  # (blocks, 16, 16)
    keep = (dd == 0)[:, :, None]
    if bool(keep.any()):
        torch.where(keep, Lt.t().reshape(nb, N_SUB, 16), L, out=L)

    L = L.view(nb, 2, 4, 32)  # (half, bit pair k, l)
    qs = L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)
    return torch.cat(
        [sc.to(torch.uint8), qs.view(nb, 64).to(torch.uint8), fp16_bytes(d), fp16_bytes(dmin)], dim=1
    )


def _dequantize_q2_k(q: torch.Tensor) -> torch.Tensor:
    """dequantize_row_q2_K: (blocks, 84) uint8 -> (blocks, 256) float32."""
    nb = q.shape[0]
    sc = q[:, _L.span("scales")]
    d = fp16_field(q, _L.offset("d"))
    dmin = fp16_field(q, _L.offset("dmin"))
    dl = (d[:, None] * (sc & 0xF).to(torch.float32))[:, :, None]  # (blocks, 16, 1)
    ml = (dmin[:, None] * (sc >> 4).to(torch.float32))[:, :, None]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=q.device)[None, None, :, None]
    codes = (q[:, _L.span("qs")].reshape(nb, 2, 1, 32) >> shifts) & 3  # (blocks, 2, 4, 32)
    out = codes.view(nb, N_SUB, 16).to(torch.float32).mul_(dl).sub_(ml)  # two roundings, as ggml's C
    return out.view(nb, QK_K)


class Q2K(BlockFormat):
    """Q2_K: 2-bit codes, 84 bytes per 256 values (2.625 bits per weight)."""

    name = "Q2_K"
    vec_dot_type = "Q8_K"

    # Mirrors quantize_row_q2_K_ref (no imatrix) and quantize_row_q2_K_impl (imatrix).
    def quantize_blocks(self, x: torch.Tensor, quant_weights: torch.Tensor | None) -> torch.Tensor:
        """(blocks, 256) float32 [+ (blocks, 256) importance] -> (blocks, 84) uint8."""
        return split_over_threads(_quantize_q2_k, x, quant_weights)

    # Mirrors dequantize_row_q2_K.
    def dequantize_blocks(self, q: torch.Tensor) -> torch.Tensor:
        """(blocks, 84) uint8 -> (blocks, 256) float32."""
        return split_over_threads(_dequantize_q2_k, q, split=False)
