"""The legacy 32-element formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the activation format Q8_1, bit-exact with ggml.

Block layouts (ggml-common.h; d, m, s are fp16):

| type | bytes | layout | value |
|---|---|---|---|
| Q4_0 | 18 | d, qs[16] (element j in the low nibble of qs[j], j+16 in the high) | (q - 8) * d |
| Q4_1 | 20 | d, m, qs[16] | q * d + m |
| Q5_0 | 22 | d, qh (uint32, bit j = bit 4 of element j), qs[16] | (q - 16) * d |
| Q5_1 | 24 | d, m, qh, qs[16] | q * d + m |
| Q8_0 | 34 | d, qs[32] int8 | q * d |
| Q8_1 | 36 | d, s = fp16(d * sum(q)), qs[32] int8 | q * d |

With an importance matrix ``ggml_quantize_chunk`` calls ``quantize_row_q4_0_impl`` etc. (Q8_0 ignores the
matrix). Those paths weight each element by ``qw * sqrt(sigma2 + x^2)`` where ``sigma2`` is the mean square of
the *whole row*, so they need the row length: the formats set ``needs_row_length`` and take ``n_per_row``.
"""

from __future__ import annotations

import torch

from moetrace.errors import InternalError
from moetrace.kernels.errors import FormatError
from moetrace.kernels.base import BlockFormat
from moetrace.kernels.block_bytes import (
    bit_fields,
    bits_to_bytes,
    c_float_to_int,
    dequantize_chunked,
    fp16_bytes,
    int8_wrap,
    quantize_chunked,
)
from moetrace.kernels.ggml_float import fdiv, fdiv_by, first_absmax, first_extreme, roundf, seq_sum, sqrtf
from moetrace.kernels.search_qkx import make_qkx3_quants
from moetrace.kernels.search_qx import make_qx_quants
from moetrace.kernels.layouts import LAYOUTS as _LAY  # field offsets; d is at 0 in every legacy block

QK = 32
# Elements per chunk for the imatrix paths: make_qx_quants holds (32, 19, blocks) candidates;
# make_qkx3_quants runs its 37 steps one after the other, so larger chunks amortize them.
QX_CHUNK_ELEMS = 1 << 15
QKX3_CHUNK_ELEMS = 1 << 17


def _pack4(q: torch.Tensor) -> torch.Tensor:
    """(B, 32) codes -> (B, 16) uint8: element j in the low nibble of byte j, element j+16 in the high."""
    return ((q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)).to(torch.uint8)


def _fp16_col(q: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte ``offset`` of (b, type_size) uint8 blocks as (b, 1) float32 (exact)."""
    return q[:, offset:offset + 2].view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor, high: torch.Tensor | None = None) -> torch.Tensor:
    """(b, 16) uint8 packed nibbles (and (b, 4) qh bytes for 5-bit types) -> (b, 32) uint8 codes, element order."""
    codes = bit_fields(qs, 4, 2).reshape(-1, QK)  # (b, 2, 16): low nibbles are elements 0-15, high 16-31
    if high is not None:
        # Bit k of qh byte j is bit 4 of element 8j+k: one table lookup per byte gives its 8 elements.
        codes |= _bit4_table(qs.device)[high.long()].view(torch.uint8).reshape(-1, QK)
    return codes


_BIT4_TABLES: dict[torch.device, torch.Tensor] = {}


def _bit4_table(device: torch.device) -> torch.Tensor:
    """(256,) int64: for each byte value, the 8 little-endian bytes ``0x10 * bit k`` (cached per device)."""
    if device not in _BIT4_TABLES:
        v = torch.arange(256, dtype=torch.int64)
        t = sum(((v >> k) & 1) << (8 * k + 4) for k in range(8))
        _BIT4_TABLES[device] = t.to(device)
    return _BIT4_TABLES[device]


def _qh_bytes(q: torch.Tensor) -> torch.Tensor:
    """(B, 32) 5-bit codes -> (B, 4) uint8: the little-endian uint32 whose bit j is bit 4 of element j."""
    return bits_to_bytes((q >> 4) & 1)


def _weights(x: torch.Tensor, qw: torch.Tensor, n_per_row: int | None, name: str) -> torch.Tensor:
    """ggml's per-element weights of the legacy imatrix paths: ``qw * sqrtf(sigma2 + x*x)``.

    ``sigma2 = sum_x2 / n_per_row`` with ``sum_x2`` accumulated over the whole row in order.

    Args:
        x: (B, 32) float32 blocks, rows of ``n_per_row`` elements laid end to end.
        qw: (B, 32) float32 importance weights.

    Returns:
        (B, 32) float32.
    """
    if n_per_row is None:
        raise InternalError(
            f"{name} with an importance matrix needs the row length (ggml's sigma2 is a per-row mean); "
            "call quantize_blocks(..., n_per_row=N)"
        )
    if n_per_row <= 0 or n_per_row % QK or x.numel() % n_per_row:
        raise FormatError(
            f"n_per_row={n_per_row} must be a positive multiple of {QK} that divides the {x.numel()} elements"
        )
    rows = x.numel() // n_per_row
    xr = x.reshape(rows, n_per_row)
    sigma2 = fdiv_by(seq_sum((xr * xr).T), n_per_row)  # (rows,)
    sig = sigma2.repeat_interleave(n_per_row // QK)[:, None]  # (B, 1)
    return qw * sqrtf(sig + x * x)


class _Legacy(BlockFormat):
    """Shared plumbing: the imatrix paths need the row length (see the module docstring)."""

    needs_row_length = True
    _impl_chunk = QX_CHUNK_ELEMS

    def quantize_blocks(
        self, x: torch.Tensor, quant_weights: torch.Tensor | None, n_per_row: int | None = None
    ) -> torch.Tensor:
        """Quantize (B, 32) float32 blocks to (B, type_size) uint8; ``n_per_row`` is needed with weights."""
        if quant_weights is None:
            return quantize_chunked(self._ref, x, None, self.type_size)
        w = _weights(x, quant_weights, n_per_row, self.name)
        return quantize_chunked(self._impl_em, x, w, self.type_size, self._impl_chunk)

    def _impl_em(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # The searches run element-major: (32, b) so each element index is one contiguous vector.
        return self._impl(x.T.contiguous(), w.T.contiguous())

    def _ref(self, x: torch.Tensor, _=None) -> torch.Tensor:
        """(b, 32) float32 -> (b, type_size) uint8 without weights."""
        raise NotImplementedError

    def _impl(self, xt: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        """(32, b) element-major values and weights -> (b, type_size) uint8."""
        raise NotImplementedError


def _symmetric_ref(x: torch.Tensor, nlev: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared by quantize_row_q4_0_ref (nlev 8) and quantize_row_q5_0_ref (nlev 16).

    Returns:
        d: (B,) float32 (before fp16 rounding); q: (B, 32) int32 codes in 0..2*nlev-1.
    """
    mx, _ = first_absmax(x, dim=1)
    d = fdiv_by(mx, -nlev)
    idv = torch.where(d != 0, fdiv(1, d), torch.zeros_like(d))
    # (int8_t)(x*id + 8.5f), then MIN(15, .): truncation toward zero, as C's conversion.
    q = int8_wrap(c_float_to_int(x * idv[:, None] + (nlev + 0.5)))
    return d, q.clamp(max=2 * nlev - 1)


def _affine_ref(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared by quantize_row_q4_1_ref (nmax 15) and quantize_row_q5_1_ref (nmax 31).

    Returns:
        d: (B,), mn: (B,) float32; q: (B, 32) int32 codes before the format's final clamp.
    """
    mn = first_extreme(x, largest=False, dim=1)
    mx = first_extreme(x, largest=True, dim=1)
    d = fdiv_by(mx - mn, nmax)
    idv = torch.where(d != 0, fdiv(1, d), torch.zeros_like(d))
    return d, mn, c_float_to_int((x - mn[:, None]) * idv[:, None] + 0.5)


class Q4_0(_Legacy):
    """4-bit, symmetric, 32 per block (``block_q4_0``)."""

    name = "Q4_0"
    vec_dot_type = "Q8_0"

    # Mirrors quantize_row_q4_0_ref.
    def _ref(self, x, _=None):
        d, q = _symmetric_ref(x, 8)
        return torch.cat([fp16_bytes(d), _pack4(q)], 1)

    # Mirrors quantize_row_q4_0_impl: make_qx_quants(32, 8, x, L, 1, weight).
    def _impl(self, x, w):
        d, L = make_qx_quants(x, 8, w)
        return torch.cat([fp16_bytes(d), _pack4(L.T)], 1)

    # Mirrors dequantize_row_q4_0: (q - 8) * d.
    def dequantize_blocks(self, q):
        return dequantize_chunked(self._fill, q, QK)

    @staticmethod
    def _fill(q, out):
        v = _nibbles(q[:, _LAY["Q4_0"].span("qs")]).sub_(8).view(torch.int8)  # wraps to -8..7
        torch.mul(v, _fp16_col(q, 0), out=out)


class Q4_1(_Legacy):
    """4-bit with a minimum, 32 per block (``block_q4_1``)."""

    name = "Q4_1"
    vec_dot_type = "Q8_1"
    _impl_chunk = QKX3_CHUNK_ELEMS

    # Mirrors quantize_row_q4_1_ref.
    def _ref(self, x, _=None):
        d, mn, q = _affine_ref(x, 15)
        q = int8_wrap(q).clamp(max=15)  # MIN(15, (int8_t)(...))
        return torch.cat([fp16_bytes(d), fp16_bytes(mn), _pack4(q)], 1)

    # Mirrors quantize_row_q4_1_impl: make_qkx3_quants(32, 15, x, weight, ..., -0.9f, 0.05f, 36, false).
    def _impl(self, x, w):
        scale, the_min, L = make_qkx3_quants(x, 15, w, -0.9, 0.05, 36)
        return torch.cat([fp16_bytes(scale), fp16_bytes(-the_min), _pack4(L.T)], 1)

    # Mirrors dequantize_row_q4_1: q * d + m (two roundings, no fused multiply-add).
    def dequantize_blocks(self, q):
        return dequantize_chunked(self._fill, q, QK)

    @staticmethod
    def _fill(q, out):
        torch.mul(_nibbles(q[:, _LAY["Q4_1"].span("qs")]), _fp16_col(q, 0), out=out)
        out.add_(_fp16_col(q, _LAY["Q4_1"].offset("m")))


class Q5_0(_Legacy):
    """5-bit, symmetric, 32 per block (``block_q5_0``)."""

    name = "Q5_0"
    vec_dot_type = "Q8_0"

    # Mirrors quantize_row_q5_0_ref.
    def _ref(self, x, _=None):
        d, q = _symmetric_ref(x, 16)
        return torch.cat([fp16_bytes(d), _qh_bytes(q), _pack4(q)], 1)

    # Mirrors quantize_row_q5_0_impl: make_qx_quants(32, 16, x, L, 1, weight).
    def _impl(self, x, w):
        d, L = make_qx_quants(x, 16, w)
        L = L.T
        return torch.cat([fp16_bytes(d), _qh_bytes(L), _pack4(L)], 1)

    # Mirrors dequantize_row_q5_0: (q - 16) * d.
    def dequantize_blocks(self, q):
        return dequantize_chunked(self._fill, q, QK)

    @staticmethod
    def _fill(q, out):
        v = _nibbles(q[:, _LAY["Q5_0"].span("qs")], q[:, _LAY["Q5_0"].span("qh")]).sub_(16).view(torch.int8)
        torch.mul(v, _fp16_col(q, 0), out=out)


class Q5_1(_Legacy):
    """5-bit with a minimum, 32 per block (``block_q5_1``)."""

    name = "Q5_1"
    vec_dot_type = "Q8_1"
    _impl_chunk = QKX3_CHUNK_ELEMS

    # Mirrors quantize_row_q5_1_ref.
    def _ref(self, x, _=None):
        d, mn, q = _affine_ref(x, 31)
        q = q & 0xFF  # (uint8_t)(x0 + 0.5f): no clamp in ggml
        return torch.cat([fp16_bytes(d), fp16_bytes(mn), _qh_bytes(q), _pack4(q)], 1)

    # Mirrors quantize_row_q5_1_impl: make_qkx3_quants(32, 31, x, weight, ..., -0.9f, 0.05f, 36, false).
    def _impl(self, x, w):
        scale, the_min, L = make_qkx3_quants(x, 31, w, -0.9, 0.05, 36)
        L = L.T
        return torch.cat([fp16_bytes(scale), fp16_bytes(-the_min), _qh_bytes(L), _pack4(L)], 1)

    # Mirrors dequantize_row_q5_1: q * d + m.
    def dequantize_blocks(self, q):
        return dequantize_chunked(self._fill, q, QK)

    @staticmethod
    def _fill(q, out):
        torch.mul(_nibbles(q[:, _LAY["Q5_1"].span("qs")], q[:, _LAY["Q5_1"].span("qh")]), _fp16_col(q, 0), out=out)
        out.add_(_fp16_col(q, _LAY["Q5_1"].offset("m")))


def _q8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared by quantize_row_q8_0_ref and quantize_row_q8_1_ref: d = amax/127, q = roundf(x/d).

    Returns:
        d: (B,) float32 (before fp16 rounding); q: (B, 32) int32 in -127..127.
    """
    amax = x.abs().amax(1)
    d = fdiv_by(amax, 127)
    idv = torch.where(d != 0, fdiv(1, d), torch.zeros_like(d))
    return d, roundf(x * idv[:, None]).to(torch.int32)


class Q8_0(BlockFormat):
    """8-bit, symmetric, 32 per block (``block_q8_0``)."""

    name = "Q8_0"
    vec_dot_type = "Q8_0"

    # Mirrors quantize_row_q8_0_ref; quantize_q8_0 ignores the importance matrix.
    def quantize_blocks(self, x, quant_weights, n_per_row=None):
        return quantize_chunked(self._ref, x, None, self.type_size)

    @staticmethod
    def _ref(x, _):
        d, q = _q8_ref(x)
        return torch.cat([fp16_bytes(d), q.to(torch.int8).view(torch.uint8)], 1)

    # Mirrors dequantize_row_q8_0: q * d.
    def dequantize_blocks(self, q):
        return dequantize_chunked(self._fill, q, QK)

    @staticmethod
    def _fill(q, out):
        torch.mul(q[:, _LAY["Q8_0"].span("qs")].view(torch.int8), _fp16_col(q, 0), out=out)


class Q8_1(BlockFormat):
    """8-bit with the block sum, 32 per block (``block_q8_1``): the activation type of Q4_1/Q5_1 dots."""

    name = "Q8_1"
    vec_dot_type = "Q8_1"

    @property
    def type_size(self) -> int:
        # ggml-common.h: two fp16 fields and 32 int8, static_assert'ed to 36 bytes. gguf-py's
        # GGML_QUANT_SIZES still says 40 (the layout before d and s became fp16).
        return 36

    # Mirrors quantize_row_q8_1_ref (there is no imatrix path).
    def quantize_blocks(self, x, quant_weights, n_per_row=None):
        return quantize_chunked(self._ref, x, None, self.type_size)

    @staticmethod
    def _ref(x, _):
        d, q = _q8_ref(x)
        s = q.sum(1).to(torch.float32) * d  # (float)sum * d; the integer sum is exact in any order
        return torch.cat([fp16_bytes(d), fp16_bytes(s), q.to(torch.int8).view(torch.uint8)], 1)

    # ggml has no dequantize_row_q8_1; the value is qs * d, as its dot products use it.
    def dequantize_blocks(self, q):
        return dequantize_chunked(self._fill, q, QK)

    @staticmethod
    def _fill(q, out):
        torch.mul(q[:, _LAY["Q8_1"].span("qs")].view(torch.int8), _fp16_col(q, 0), out=out)
