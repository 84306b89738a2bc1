"""Q3_K and Q6_K: 256-element super-blocks of 16 groups of 16, bit-exact with ggml.

Block layouts (``block_q3_K``, ``block_q6_K`` in ggml-common.h):

- Q3_K, 110 bytes: ``hmask[32]`` (bit 2 of each 3-bit code), ``qs[64]`` (low 2 bits), ``scales[12]`` (16 six-bit
  group scales, offset by 32), ``d`` (fp16). Value: ``d * (scale - 32) * (code - 4)``.
- Q6_K, 210 bytes: ``ql[128]`` (low 4 bits), ``qh[64]`` (high 2 bits), ``scales[16]`` (int8), ``d`` (fp16).
  Value: ``d * scale * (code - 32)``.

Without an importance matrix ggml uses ``quantize_row_q3_K_ref`` / ``quantize_row_q6_K_ref``; with one,
``quantize_row_q3_K_impl`` / ``quantize_row_q6_K_impl``. Both are mirrored here.
"""

from __future__ import annotations

import torch

from moetrace.kernels.base import QK_K, BlockFormat
from moetrace.kernels.block_bytes import bit_fields, dequantize_chunked, fp16_bytes, int8_wrap, quantize_chunked
from moetrace.kernels.ggml_float import GROUP_MAX_EPS, fdiv, first_absmax, nearest_int, seq_sum, sqrtf
from moetrace.kernels.search_qx import make_q3_quants, make_qx_quants
from moetrace.kernels.layouts import LAYOUTS

_Q3, _Q6 = LAYOUTS["Q3_K"], LAYOUTS["Q6_K"]  # field offsets

# Elements per chunk for the searches. make_qx_quants holds (16, 19, groups) candidates, so its chunks
# stay small; make_q3_quants runs ~3000 small ops per chunk whatever its size, so its chunks are large.
QX_CHUNK_ELEMS = 1 << 15
Q3_CHUNK_ELEMS = 1 << 18


def _groups(t: torch.Tensor) -> torch.Tensor:
    """(B, 256) -> (16, B*16): the 16-element groups, element-major (column g = block g//16, group g%16)."""
    return t.reshape(-1, 16, 16).permute(2, 0, 1).reshape(16, -1)


def _ungroup(t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_groups`: (16, B*16) -> (B, 256)."""
    return t.reshape(16, -1, 16).permute(1, 2, 0).reshape(-1, QK_K)


def _requantize(x: torch.Tensor, L: torch.Tensor, dq: torch.Tensor, sc: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Final codes with the stored fp16 ``d`` and integer group scales: ``nearest_int(x / (d*sc))``.

    Groups whose ``d*sc`` is zero keep the codes of the search (ggml's ``if (!d) continue``).

    Args:
        x: (B, 256) float32; L: (B, 256) int32 search codes (offset by -lo).
        dq: (B,) float32 decoded d; sc: (B, 16) int32 group scales.
        lo, hi: the signed code range.

    Returns:
        (B, 256) int32 codes in 0..hi-lo.
    """
    B = x.shape[0]
    dd = dq[:, None] * sc.to(torch.float32)  # (B, 16)
    xg = x.reshape(B, 16, 16)
    new = nearest_int(xg / dd[:, :, None]).clamp_(lo, hi) - lo  # (B, 16, 16)
    return torch.where((dd != 0)[:, :, None], new, L.reshape(B, 16, 16)).reshape(B, QK_K)


def _shift_or(v: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """OR together the slices of ``v`` along ``dim``, slice k shifted left by ``bits*k`` (codes are disjoint bits)."""
    k = v.shape[dim]
    shape = [1] * v.ndim
    shape[dim] = k
    shifts = (torch.arange(k, device=v.device, dtype=torch.int32) * bits).reshape(shape)
    return (v.to(torch.int32) << shifts).sum(dim)


class Q3_K(BlockFormat):
    """3-bit K-quant (``block_q3_K``)."""

    name = "Q3_K"
    vec_dot_type = "Q8_K"

    # Mirrors quantize_row_q3_K_ref (quant_weights None) and quantize_row_q3_K_impl (with weights).
    def quantize_blocks(self, x: torch.Tensor, quant_weights: torch.Tensor | None) -> torch.Tensor:
        chunk = Q3_CHUNK_ELEMS if quant_weights is None else QX_CHUNK_ELEMS
        return quantize_chunked(self._quantize, x, quant_weights, self.type_size, chunk)

    def _quantize(self, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        B = x.shape[0]
        xg = _groups(x)  # (16, G)
        if qw is None:
            scales, L = make_q3_quants(xg, 4)  # (G,), (16, G)
            sc = scales.reshape(B, 16)
            max_scale, _ = first_absmax(sc.T)  # (B,) the signed scale of largest magnitude, first one
            has = max_scale != 0
            iscale = fdiv(-32, max_scale)
            # int8_t l = nearest_int(...); then clamped to -32..31 and offset.
            ls = int8_wrap(nearest_int(iscale[:, None] * sc)).clamp_(-32, 31) + 32  # (B, 16)
            ls = torch.where(has[:, None], ls, 0)
            d = torch.where(has, fdiv(1, iscale), torch.zeros_like(iscale))
        else:
            sumx2 = seq_sum((x * x).T)  # (B,) over all 256 elements, in order
            sigma2 = 2 * sumx2 / QK_K  # QK_K is a power of two: exact as a scalar on every device
            weight = _groups(qw) * sqrtf(sigma2.repeat_interleave(16) + xg * xg)  # (16, G)
            sw = seq_sum(weight)  # (G,)
            scales, L = make_qx_quants(xg, 4, weight)
            d, ls = make_qx_quants(scales.reshape(B, 16).T, 32, sw.reshape(B, 16).T)  # (B,), (16, B) in 0..63
            ls = ls.T
        d16 = fp16_bytes(d)  # (B, 2)
        dq = d16.view(torch.float16)[:, 0].to(torch.float32)
        codes = _requantize(x, _ungroup(L), dq, ls - 32, -4, 3)  # (B, 256) in 0..7

        high = codes > 3
        hmask = _shift_or(high.reshape(B, 8, 32), 1, 1)  # (B, 32): bit k of byte m is code 32k+m's bit 2
        low = torch.where(high, codes - 4, codes)
        qs = _shift_or(low.reshape(B, 2, 4, 32), 2, 2).reshape(B, 64)
        scl = torch.cat([(ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4), _shift_or((ls >> 4).reshape(B, 4, 4), 1, 2)], 1)
        return torch.cat([hmask.to(torch.uint8), qs.to(torch.uint8), scl.to(torch.uint8), d16], 1)

    # Mirrors dequantize_row_q3_K: (d * (scale - 32)) * (code - 4).
    def dequantize_blocks(self, q: torch.Tensor) -> torch.Tensor:
        return dequantize_chunked(self._fill, q, QK_K)

    @staticmethod
    def _fill(q: torch.Tensor, out: torch.Tensor) -> None:
        b = q.shape[0]
        d = q[:, _Q3.span("d")].view(torch.float16).to(torch.float32)  # (b, 1)
        sb = q[:, _Q3.span("scales")]
        low = bit_fields(sb[:, :8], 4, 2).reshape(b, 16)  # group j: low nibble of byte j, group j+8: high
        high = bit_fields(sb[:, 8:], 2, 4).reshape(b, 16)  # group 4t+k: bits 2t of byte 8+k
        dl = d * ((low | (high << 4)).view(torch.int8) - 32).to(torch.float32)  # (b, 16)
        code = bit_fields(q[:, _Q3.span("qs")].reshape(2 * b, 32), 2, 4)  # (2b, 4, 32): half, shift, l
        hb = bit_fields(q[:, _Q3.span("hmask")], 1, 8)  # (b, 8, 32): bit 4*half+shift of hmask[l]
        code = code.reshape(b, 16, 16) | (hb.reshape(b, 16, 16) << 2)  # 0..7 = value + 4
        torch.mul(dl[:, :, None], code.sub_(4).view(torch.int8), out=out.view(b, 16, 16))


class Q6_K(BlockFormat):
    """6-bit K-quant (``block_q6_K``)."""

    name = "Q6_K"
    vec_dot_type = "Q8_K"

    # Mirrors quantize_row_q6_K_ref (quant_weights None) and quantize_row_q6_K_impl (with weights).
    def quantize_blocks(self, x: torch.Tensor, quant_weights: torch.Tensor | None) -> torch.Tensor:
        return quantize_chunked(self._quantize, x, quant_weights, self.type_size, QX_CHUNK_ELEMS)

    def _quantize(self, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        B = x.shape[0]
        # The impl path passes the raw importance weights (its sigma2 weighting is commented out in ggml).
        scales, L = make_qx_quants(_groups(x), 32, None if qw is None else _groups(qw))
        sc = scales.reshape(B, 16)
        max_scale, max_abs = first_absmax(sc.T)  # (B,)
        empty = max_abs < GROUP_MAX_EPS  # ggml zeroes the whole block
        iscale = fdiv(-128, max_scale)
        d16 = fp16_bytes(fdiv(1, iscale))
        dq = d16.view(torch.float16)[:, 0].to(torch.float32)
        ls = int8_wrap(torch.clamp(nearest_int(iscale[:, None] * sc), max=127))  # (B, 16) int8 values
        codes = _requantize(x, _ungroup(L), dq, ls, -32, 31)  # (B, 256) in 0..63

        cv = codes.reshape(B, 2, 4, 32)  # (half, quarter, l)
        lo4 = cv & 0xF
        ql = (lo4[:, :, :2] | (lo4[:, :, 2:] << 4)).reshape(B, 128)
        qh = _shift_or(cv >> 4, 2, 2).reshape(B, 64)
        out = torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), (ls & 0xFF).to(torch.uint8), d16], 1)
        return torch.where(empty[:, None], torch.zeros_like(out), out)

    # Mirrors dequantize_row_q6_K: (d * scale) * (code - 32).
    def dequantize_blocks(self, q: torch.Tensor) -> torch.Tensor:
        return dequantize_chunked(self._fill, q, QK_K)

    @staticmethod
    def _fill(q: torch.Tensor, out: torch.Tensor) -> None:
        b = q.shape[0]
        d = q[:, _Q6.span("d")].view(torch.float16).to(torch.float32)  # (b, 1)
        ds = d * q[:, _Q6.span("scales")].view(torch.int8).to(torch.float32)  # (b, 16): (d * sc) first, as ggml
        lo = bit_fields(q[:, _Q6.span("ql")].reshape(2 * b, 64), 4, 2)  # (2b, nibble, 64): quarter k = 2*nibble + k%2
        hi = bit_fields(q[:, _Q6.span("qh")].reshape(2 * b, 32), 2, 4)  # (2b, 4, 32): quarter, l
        code = lo.reshape(b, 16, 16) | (hi.reshape(b, 16, 16) << 4)  # 0..63 = value + 32
        torch.mul(ds[:, :, None], code.sub_(32).view(torch.int8), out=out.view(b, 16, 16))
