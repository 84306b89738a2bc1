"""Q4_K and Q5_K: 256-element super-blocks of eight 32-element sub-blocks with 6-bit scales and mins.

Block layouts (bytes)::

    Q4_K (144): d fp16 | dmin fp16 | scales[12] | qs[128]             value = d*sc*q - dmin*m
    Q5_K (176): d fp16 | dmin fp16 | scales[12] | qh[32] | qs[128]    q = low nibble + 16*high bit

``scales`` packs eight 6-bit scales and eight 6-bit mins (ggml's ``get_scale_min_k4``).
Both quantizers are bit-exact with ggml: ``quantize_row_q{4,5}_K_ref`` without an importance
matrix, ``quantize_row_q{4,5}_K_impl`` with one.
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

# Field offsets; Q4_K and Q5_K share d, dmin and scales (the header read by both).
_Q4K, _Q5K = LAYOUTS["Q4_K"], LAYOUTS["Q5_K"]

N_SUB = QK_K // 32  # sub-blocks per super-block


def pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Pack 6-bit scales and mins into ggml's 12 bytes.

    Mirrors the packing loop of ``quantize_row_q4_K_ref``, including its uint8 wrap-around for
    codes above 63 (which only ggml's imatrix Q4_K path can produce, from degenerate input).

    Args:
        ls, lm: (blocks, 8) int32 scale and min codes in 0..255.

    Returns:
        (blocks, 12) uint8.
    """
    lo_s, hi_s = ls[:, :4], ls[:, 4:]
    lo_m, hi_m = lm[:, :4], lm[:, 4:]
    b0 = lo_s | ((hi_s >> 4) << 6)  # bytes 0-3: scales 0-3, top bits of scales 4-7
    b1 = lo_m | ((hi_m >> 4) << 6)  # bytes 4-7: mins 0-3, top bits of mins 4-7
    b2 = (hi_s & 0xF) | ((hi_m & 0xF) << 4)  # bytes 8-11: low nibbles of scales and mins 4-7
    return (torch.cat([b0, b1, b2], dim=1) & 0xFF).to(torch.uint8)


def unpack_scales_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``get_scale_min_k4`` for all eight sub-blocks: (blocks, 12) uint8 -> two (blocks, 8) uint8."""
    q = scales
    d_lo, m_lo, mix = q[:, 0:4], q[:, 4:8], q[:, 8:12]
    sc = torch.cat([d_lo & 63, (mix & 0xF) | ((d_lo >> 6) << 4)], dim=1)
    mn = torch.cat([m_lo & 63, (mix >> 4) | ((m_lo >> 6) << 4)], dim=1)
    return sc, mn


def _ref_scales(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """The no-imatrix scale search of quantize_row_q{4,5}_K_ref.

    Returns the sub-block codes (blocks, 8) int32 ``ls``, ``lm``, the fp32 values of ``d`` and
    ``dmin`` before fp16, and the search codes (32, blocks*8) uint8, element-major.
    """
    nb = x.shape[0]
    xt = x.reshape(nb * N_SUB, 32).t().contiguous()  # (32, sub-blocks), as the search wants it
    # Weights: rms of the sub-block plus |x|, as ggml.
    av_x = sqrtf(fdiv_by(seq_sum(xt * xt, dim=0), 32))  # (sub-blocks,)
    wt = xt.abs().add_(av_x)
    scales, mins, Lt = make_qkx_quants_t(xt, wt, nmax, rmin, 0.1, nstep, use_mad=False)
    scales = scales.view(nb, N_SUB)
    mins = mins.view(nb, N_SUB)
    max_scale = running_max_from_zero(scales)
    max_min = running_max_from_zero(mins)
    zero = torch.zeros_like(max_scale)
    inv_scale = torch.where(max_scale > 0, fdiv(63.0, max_scale), zero)
    inv_min = torch.where(max_min > 0, fdiv(63.0, max_min), zero)
    # `uint8_t ls = nearest_int(...); ls = MIN(63, ls);`
    ls = (nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp(max=63)
    lm = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp(max=63)
    return ls, lm, fdiv_by(max_scale, 63), fdiv_by(max_min, 63), Lt


def _imatrix_scales(x: torch.Tensor, qw: torch.Tensor, nmax: int):
    """The imatrix scale search of quantize_row_q{4,5}_K_impl; returns as :func:`_ref_scales`."""
    nb = x.shape[0]
    sigma2 = fdiv_by(2 * seq_sum(x * x, dim=1), QK_K)  # (blocks,)
    xt = x.reshape(nb * N_SUB, 32).t().contiguous()  # (32, sub-blocks)
    qwt = qw.reshape(nb * N_SUB, 32).t()
    s2 = sigma2.repeat_interleave(N_SUB)  # (sub-blocks,): each sub-block's super-block sigma2
    wt = sqrtf(xt * xt + s2).mul_(qwt)  # qw * sqrtf(sigma2 + x*x), contiguous like xt
    sw = seq_sum(wt, dim=0).view(nb, N_SUB)
    scales, mins, Lt = make_qkx_quants_t(xt, wt, nmax, -0.9, 0.05, 36, use_mad=False)
    d_block, ls = make_qp_quants(scales.view(nb, N_SUB), sw, 63)
    m_block, lm = make_qp_quants(mins.view(nb, N_SUB), sw, 63)
    return ls, lm, d_block, m_block, Lt


def _quantize_k4(x: torch.Tensor, qw: torch.Tensor | None, nmax: int, rmin: float, nstep: int, clamp_imatrix: bool):
    """Shared body of the Q4_K and Q5_K quantizers.

    Returns the header bytes (blocks, 16) uint8 (d, dmin, scales) and the codes (blocks, 256)
    uint8 in 0..nmax.
    """
    nb = x.shape[0]
    if qw is None:
        ls, lm, d, dmin, Lt = _ref_scales(x, nmax, rmin, nstep)
    else:
        ls, lm, d, dmin, Lt = _imatrix_scales(x, qw, nmax)
        if clamp_imatrix:  # Q5_K's impl clamps to 63 here, Q4_K's does not
            ls = ls.clamp(max=63)
            lm = lm.clamp(max=63)
    packed = pack_scales_k4(ls, lm)
    header = torch.cat([fp16_bytes(d), fp16_bytes(dmin), packed], dim=1)

    # Requantize with the scales as stored (fp16 super-scales times 6-bit codes). Sub-blocks
    # whose stored scale is 0 keep the search's codes, as ggml's `if (!d) continue;`.
    sc, m = unpack_scales_k4(packed)
    dd = fp16_round(d)[:, None] * sc.to(torch.float32)  # (blocks, 8)
    dm = fp16_round(dmin)[:, None] * m.to(torch.float32)
    v = x.reshape(nb, N_SUB, 32) + dm[:, :, None]
    v /= dd[:, :, None]
    L = nearest_int(v).clamp_(0, nmax).to(torch.uint8)  # (blocks, 8, 32)
    keep = (dd == 0)[:, :, None]
    if bool(keep.any()):
        torch.where(keep, Lt.t().reshape(nb, N_SUB, 32), L, out=L)
    return header, L.view(nb, QK_K)


def _dequantize_k4(q: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """d*sc * code - dmin*m per sub-block: q (blocks, bytes) uint8, codes (blocks, 8, 32) uint8 -> (blocks, 256)."""
    nb = q.shape[0]
    d = fp16_field(q, _Q4K.offset("d"))
    dmin = fp16_field(q, _Q4K.offset("dmin"))
    sc, m = unpack_scales_k4(q[:, _Q4K.span("scales")])
    d1 = (d[:, None] * sc.to(torch.float32))[:, :, None]  # (blocks, 8, 1)
    m1 = (dmin[:, None] * m.to(torch.float32))[:, :, None]
    out = codes.to(torch.float32).mul_(d1).sub_(m1)  # two roundings, as ggml's C
    return out.view(nb, QK_K)


def _quantize_q4_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """quantize_row_q4_K_ref / _impl on (blocks, 256) -> (blocks, 144) uint8."""
    nb = x.shape[0]
    header, L = _quantize_k4(x, qw, 15, -1.0, 20, clamp_imatrix=False)
    L = L.view(nb, 4, 2, 32)  # element 64k + 32t + j: low (t=0) or high (t=1) nibble of qs[32k + j]
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).view(nb, 128)
    return torch.cat([header, qs], dim=1)


def _quantize_q5_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """quantize_row_q5_K_ref / _impl on (blocks, 256) -> (blocks, 176) uint8."""
    nb = x.shape[0]
    header, L = _quantize_k4(x, qw, 31, -0.5, 15, clamp_imatrix=True)
    L = L.view(nb, 8, 32)  # sub-block 2k + t holds element 64k + 32t + j
    hi = L >> 4  # 0 or 1
    lo = (L & 0xF).view(nb, 4, 2, 32)
    ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).view(nb, 128)
    shifts = torch.arange(8, device=x.device, dtype=torch.int32)[None, :, None]
    qh = (hi << shifts).sum(dim=1)  # (blocks, 32): bit 2k+t of qh[j]; disjoint bits, so sum == or
    return torch.cat([header, qh.to(torch.uint8), ql], dim=1)


def _dequantize_q4_k(q: torch.Tensor) -> torch.Tensor:
    """dequantize_row_q4_K: (blocks, 144) uint8 -> (blocks, 256) float32."""
    nb = q.shape[0]
    qs = q[:, _Q4K.span("qs")].reshape(nb, 4, 1, 32)
    codes = torch.cat([qs & 0xF, qs >> 4], dim=2).view(nb, N_SUB, 32)  # sub-block 2k: low nibbles
    return _dequantize_k4(q, codes)


def _dequantize_q5_k(q: torch.Tensor) -> torch.Tensor:
    """dequantize_row_q5_K: (blocks, 176) uint8 -> (blocks, 256) float32."""
    nb = q.shape[0]
    qh = q[:, _Q5K.span("qh")].reshape(nb, 1, 32)
    qs = q[:, _Q5K.span("qs")].reshape(nb, 4, 1, 32)
    lo = torch.cat([qs & 0xF, qs >> 4], dim=2).view(nb, N_SUB, 32)
    shifts = torch.arange(8, device=q.device, dtype=torch.uint8)[None, :, None]
    hi = ((qh >> shifts) & 1) << 4  # (blocks, 8, 32): bit 2k+t of qh[j] adds 16 to sub-block 2k+t
    return _dequantize_k4(q, lo | hi)


class Q4K(BlockFormat):
    """Q4_K: 4-bit codes, 144 bytes per 256 values (4.5 bits per weight)."""

    name = "Q4_K"
    vec_dot_type = "Q8_K"

    # Mirrors quantize_row_q4_K_ref (no imatrix) and quantize_row_q4_K_impl (imatrix).
    def quantize_blocks(self, x: torch.Tensor, quant_weights: torch.Tensor | None) -> torch.Tensor:
        """(blocks, 256) float32 [+ (blocks, 256) importance] -> (blocks, 144) uint8."""
        return split_over_threads(_quantize_q4_k, x, quant_weights)

    # Mirrors dequantize_row_q4_K.
    def dequantize_blocks(self, q: torch.Tensor) -> torch.Tensor:
        """(blocks, 144) uint8 -> (blocks, 256) float32."""
        return split_over_threads(_dequantize_q4_k, q, split=False)


class Q5K(BlockFormat):
    """Q5_K: 5-bit codes, 176 bytes per 256 values (5.5 bits per weight)."""

    name = "Q5_K"
    vec_dot_type = "Q8_K"

    # Mirrors quantize_row_q5_K_ref (no imatrix) and quantize_row_q5_K_impl (imatrix).
    def quantize_blocks(self, x: torch.Tensor, quant_weights: torch.Tensor | None) -> torch.Tensor:
        """(blocks, 256) float32 [+ (blocks, 256) importance] -> (blocks, 176) uint8."""
        return split_over_threads(_quantize_q5_k, x, quant_weights)

    # Mirrors dequantize_row_q5_K.
    def dequantize_blocks(self, q: torch.Tensor) -> torch.Tensor:
        """(blocks, 176) uint8 -> (blocks, 256) float32."""
        return split_over_threads(_dequantize_q5_k, q, split=False)
