"""Triton kernels that dequantize raw GGUF block bytes, bit-exact with ggml's ``dequantize_row_*``.

One private ``@triton.jit`` kernel per type reads whole blocks straight from the GGUF bytes
(a ``(BLOCKS, QK)`` tile per program: block index by element index) and writes float32,
float16 or bfloat16. Every value is computed in float32 in the same operation order as ggml
and gguf-py (``d * q``, ``d * q + m``, ``(d * sc) * q - dmin * m``), launched with
``enable_fp_fusion=False`` so the GPU compiler cannot contract a multiply-add into an FMA
(which would change the last bit). The float32 -> bf16/fp16 casts round to nearest even, as
``torch.Tensor.to`` does.

bfloat16 is written as its bit pattern into an int16 view of the output: Triton's CPU
interpreter (``TRITON_INTERPRET=1``, used by the tests) cannot handle bf16 tensors, and one
code path for both keeps the tested path the one that runs on the GPU.

Block sizes and field offsets are not written here: each kernel takes them as CAPS
``tl.constexpr`` arguments (``QK`` elements, ``TS`` bytes per block, ``O_<FIELD>`` byte offset of
each field) that :func:`dequantize_triton` computes from the layout table, ``kernels/layouts.py``,
the one the torch formats and the C kernels read. What stays in the kernels is how bits are packed
inside a field (nibble halves, 2-bit fields, the 6-bit scale packing), as in ggml's C.

The reference the tests compare against is gguf-py's ``gguf.quants.dequantize`` (numpy).
"""

from __future__ import annotations

import os

import torch

from moetrace.errors import MoetraceError
from moetrace.kernels.base import row_bytes
from moetrace.kernels.errors import FormatError
from moetrace.kernels.layouts import LAYOUTS

try:
    import triton
    import triton.language as tl
except ImportError as e:  # triton is the optional "gpu" extra
    raise ImportError("moetrace.kernels.triton_dequant needs triton: pip install 'moetrace[gpu]'") from e

# triton.jit decides at decoration time whether kernels run compiled or in the interpreter.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Output kinds (constexpr OUT): how the float32 result is stored.
_OUT_F32, _OUT_F16, _OUT_BF16_BITS = 0, 1, 2
_OUT_KIND = {torch.float32: _OUT_F32, torch.float16: _OUT_F16, torch.bfloat16: _OUT_BF16_BITS}


@triton.jit
def _ld_u8(ptr, mask):
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _ld_f16(ptr, mask):
    # An fp16 field of a block (d, dmin, m): two little-endian bytes, bit-cast, widened exactly.
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _store(out_ptr, offs, y, mask, OUT: tl.constexpr):
    if OUT == 0:
        tl.store(out_ptr + offs, y, mask=mask)
    elif OUT == 1:
        tl.store(out_ptr + offs, y.to(tl.float16), mask=mask)
    else:
        # float32 -> bfloat16 bits, round to nearest even; NaN -> 0x7FC0 as torch does.
        b = y.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
        tl.store(out_ptr + offs, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)


@triton.jit
def _tile(n_blocks, BLOCKS: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr):
    # Block indices (BLOCKS, 1) in int64 (large tensors pass 2**31 bytes), elements (1, QK).
    blk = (tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS))[:, None]
    e = tl.arange(0, QK)[None, :]
    mask = blk < n_blocks  # (BLOCKS, 1)
    return blk * TS, blk * QK + e, e, mask


# --- 32-element types -------------------------------------------------------------------------

@triton.jit
def _q4_0_kernel(
    q_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr, OUT: tl.constexpr,
    QK: tl.constexpr, TS: tl.constexpr, O_D: tl.constexpr, O_QS: tl.constexpr,
):
    # dequantize_row_q4_0: d, qs[16]; element j < 16 low nibble of qs[j], j >= 16 high nibble of qs[j-16].
    base, offs, e, mask = _tile(n_blocks, BLOCKS, QK, TS)
    d = _ld_f16(q_ptr + base + O_D, mask)  # (BLOCKS, 1)
    qb = _ld_u8(q_ptr + base + O_QS + e % (QK // 2), mask)  # (BLOCKS, QK)
    q = ((qb >> ((e // (QK // 2)) * 4)) & 0xF) - 8
    _store(out_ptr, offs, d * q.to(tl.float32), mask, OUT)


@triton.jit
def _q4_1_kernel(
    q_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr, OUT: tl.constexpr,
    QK: tl.constexpr, TS: tl.constexpr, O_D: tl.constexpr, O_M: tl.constexpr, O_QS: tl.constexpr,
):
    # dequantize_row_q4_1: d, m, qs[16]; value q * d + m.
    base, offs, e, mask = _tile(n_blocks, BLOCKS, QK, TS)
    d = _ld_f16(q_ptr + base + O_D, mask)
    m = _ld_f16(q_ptr + base + O_M, mask)
    qb = _ld_u8(q_ptr + base + O_QS + e % (QK // 2), mask)
    q = (qb >> ((e // (QK // 2)) * 4)) & 0xF
    _store(out_ptr, offs, d * q.to(tl.float32) + m, mask, OUT)


@triton.jit
def _q5_0_kernel(
    q_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr, OUT: tl.constexpr,
    QK: tl.constexpr, TS: tl.constexpr, O_D: tl.constexpr, O_QH: tl.constexpr, O_QS: tl.constexpr,
):
    # dequantize_row_q5_0: d, qh (32 bits, bit j = 5th bit of element j), qs[16]; value (q - 16) * d.
    base, offs, e, mask = _tile(n_blocks, BLOCKS, QK, TS)
    d = _ld_f16(q_ptr + base + O_D, mask)
    hb = (_ld_u8(q_ptr + base + O_QH + e // 8, mask) >> (e % 8)) & 1
    qb = _ld_u8(q_ptr + base + O_QS + e % (QK // 2), mask)
    q = (((qb >> ((e // (QK // 2)) * 4)) & 0xF) | (hb << 4)) - 16
    _store(out_ptr, offs, d * q.to(tl.float32), mask, OUT)


@triton.jit
def _q5_1_kernel(
    q_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr, OUT: tl.constexpr,
    QK: tl.constexpr, TS: tl.constexpr, O_D: tl.constexpr, O_M: tl.constexpr, O_QH: tl.constexpr, O_QS: tl.constexpr,
):
    # dequantize_row_q5_1: d, m, qh, qs[16]; value q * d + m.
    base, offs, e, mask = _tile(n_blocks, BLOCKS, QK, TS)
    d = _ld_f16(q_ptr + base + O_D, mask)
    m = _ld_f16(q_ptr + base + O_M, mask)
    hb = (_ld_u8(q_ptr + base + O_QH + e // 8, mask) >> (e % 8)) & 1
    qb = _ld_u8(q_ptr + base + O_QS + e % (QK // 2), mask)
    q = ((qb >> ((e // (QK // 2)) * 4)) & 0xF) | (hb << 4)
    _store(out_ptr, offs, d * q.to(tl.float32) + m, mask, OUT)


@triton.jit
def _q8_0_kernel(
    q_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr, OUT: tl.constexpr,
    QK: tl.constexpr, TS: tl.constexpr, O_D: tl.constexpr, O_QS: tl.constexpr,
):
    # dequantize_row_q8_0: d, qs[32] int8; value q * d.
    base, offs, e, mask = _tile(n_blocks, BLOCKS, QK, TS)
    d = _ld_f16(q_ptr + base + O_D, mask)
    q = tl.load(q_ptr + base + O_QS + e, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    _store(out_ptr, offs, q * d, mask, OUT)


@triton.jit
def _mxfp4_kernel(
    q_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr, OUT: tl.constexpr,
    QK: tl.constexpr, TS: tl.constexpr, O_E: tl.constexpr, O_QS: tl.constexpr,
):
    # dequantize_row_mxfp4: e (E8M0), qs[16] nibbles as Q4_0; value kvalues_mxfp4[code] * d with
    # d = ggml_e8m0_to_fp32_half(e) = 2**(e - 128) (subnormal bit patterns 0x00200000 << e for e < 2).
    base, offs, e, mask = _tile(n_blocks, BLOCKS, QK, TS)
    x = _ld_u8(q_ptr + base + O_E, mask)  # (BLOCKS, 1)
    d = tl.where(x < 2, 0x00200000 << x, (x - 1) << 23).to(tl.float32, bitcast=True)
    qb = _ld_u8(q_ptr + base + O_QS + e % (QK // 2), mask)
    c = (qb >> ((e // (QK // 2)) * 4)) & 0xF
    # kvalues (E2M1 doubled) from the code's bits: sign bit 3, exponent bits 2-1, mantissa bit 0;
    # exponent 0 is the subnormal mantissa (0 or 1), else (2 + mantissa) << (exponent - 1).
    m = c & 7
    ex = m >> 1
    mag = tl.where(ex == 0, m & 1, (2 + (m & 1)) << tl.maximum(ex - 1, 0))
    v = tl.where(c >= 8, -mag, mag)
    _store(out_ptr, offs, v.to(tl.float32) * d, mask, OUT)


# --- 256-element K types ----------------------------------------------------------------------

@triton.jit
def _q2_k_kernel(
    q_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr, OUT: tl.constexpr,
    QK: tl.constexpr, TS: tl.constexpr,
    O_SCALES: tl.constexpr, O_QS: tl.constexpr, O_D: tl.constexpr, O_DMIN: tl.constexpr,
):
    # dequantize_row_q2_K: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin.
    # Element e: 2-bit field (e % 128) // 32 of qs[32 * (e // 128) + e % 32]; sub-block e // 16.
    base, offs, e, mask = _tile(n_blocks, BLOCKS, QK, TS)
    d = _ld_f16(q_ptr + base + O_D, mask)
    dmin = _ld_f16(q_ptr + base + O_DMIN, mask)
    sc = _ld_u8(q_ptr + base + O_SCALES + e // 16, mask)
    qb = _ld_u8(q_ptr + base + O_QS + 32 * (e // 128) + e % 32, mask)
    q = (qb >> (2 * ((e % 128) // 32))) & 3
    dl = d * (sc & 0xF).to(tl.float32)
    ml = dmin * (sc >> 4).to(tl.float32)
    _store(out_ptr, offs, dl * q.to(tl.float32) - ml, mask, OUT)


@triton.jit
def _q3_k_kernel(
    q_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr, OUT: tl.constexpr,
    QK: tl.constexpr, TS: tl.constexpr,
    O_HMASK: tl.constexpr, O_QS: tl.constexpr, O_SCALES: tl.constexpr, O_D: tl.constexpr,
):
    # dequantize_row_q3_K: hmask[32], qs[64], scales[12] (16 6-bit scales), d.
    # Low 2 bits as in Q2_K; the high bit is bit e // 32 of hmask[e % 32], and a clear bit means -4.
    base, offs, e, mask = _tile(n_blocks, BLOCKS, QK, TS)
    d = _ld_f16(q_ptr + base + O_D, mask)
    qb = _ld_u8(q_ptr + base + O_QS + 32 * (e // 128) + e % 32, mask)
    ql = (qb >> (2 * ((e % 128) // 32))) & 3
    hb = (_ld_u8(q_ptr + base + O_HMASK + e % 32, mask) >> (e // 32)) & 1
    q = ql - 4 * (1 - hb)
    j = e // 16  # scale j: low 4 bits in nibble j // 8 of scales[j % 8], high 2 bits in scales[8 + j % 4]
    lo = (_ld_u8(q_ptr + base + O_SCALES + j % 8, mask) >> (4 * (j // 8))) & 0xF
    hi = (_ld_u8(q_ptr + base + O_SCALES + 8 + j % 4, mask) >> (2 * (j // 4))) & 3
    dl = d * ((lo | (hi << 4)) - 32).to(tl.float32)
    _store(out_ptr, offs, dl * q.to(tl.float32), mask, OUT)


@triton.jit
def _k_scale_min(q_ptr, base, j, mask, O_SCALES: tl.constexpr):
    # get_scale_min_k4: 8 6-bit (scale, min) pairs packed in scales[12] at byte O_SCALES of the block.
    # Both cases are computed on in-range bytes and the right one chosen, so no load goes negative.
    ja = j % 4
    a = _ld_u8(q_ptr + base + O_SCALES + ja, mask)
    b = _ld_u8(q_ptr + base + O_SCALES + 4 + ja, mask)
    c = _ld_u8(q_ptr + base + O_SCALES + 8 + ja, mask)
    sc = tl.where(j < 4, a & 63, (c & 0xF) | ((a >> 6) << 4))
    mn = tl.where(j < 4, b & 63, (c >> 4) | ((b >> 6) << 4))
    return sc, mn


@triton.jit
def _q4_k_kernel(
    q_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr, OUT: tl.constexpr,
    QK: tl.constexpr, TS: tl.constexpr,
    O_D: tl.constexpr, O_DMIN: tl.constexpr, O_SCALES: tl.constexpr, O_QS: tl.constexpr,
):
    # dequantize_row_q4_K: d, dmin, scales[12], qs[128]; element e: nibble (e // 32) % 2 of
    # qs[32 * (e // 64) + e % 32], sub-block j = e // 32; value (d * sc) * q - dmin * m.
    base, offs, e, mask = _tile(n_blocks, BLOCKS, QK, TS)
    d = _ld_f16(q_ptr + base + O_D, mask)
    dmin = _ld_f16(q_ptr + base + O_DMIN, mask)
    sc, mn = _k_scale_min(q_ptr, base, e // 32, mask, O_SCALES)
    qb = _ld_u8(q_ptr + base + O_QS + 32 * (e // 64) + e % 32, mask)
    q = (qb >> (4 * ((e // 32) % 2))) & 0xF
    d1 = d * sc.to(tl.float32)
    m1 = dmin * mn.to(tl.float32)
    _store(out_ptr, offs, d1 * q.to(tl.float32) - m1, mask, OUT)


@triton.jit
def _q5_k_kernel(
    q_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr, OUT: tl.constexpr,
    QK: tl.constexpr, TS: tl.constexpr,
    O_D: tl.constexpr, O_DMIN: tl.constexpr, O_SCALES: tl.constexpr, O_QH: tl.constexpr, O_QS: tl.constexpr,
):
    # dequantize_row_q5_K: d, dmin, scales[12], qh[32], qs[128]; low 4 bits as Q4_K,
    # the 5th bit is bit e // 32 of qh[e % 32].
    base, offs, e, mask = _tile(n_blocks, BLOCKS, QK, TS)
    d = _ld_f16(q_ptr + base + O_D, mask)
    dmin = _ld_f16(q_ptr + base + O_DMIN, mask)
    sc, mn = _k_scale_min(q_ptr, base, e // 32, mask, O_SCALES)
    hb = (_ld_u8(q_ptr + base + O_QH + e % 32, mask) >> (e // 32)) & 1
    qb = _ld_u8(q_ptr + base + O_QS + 32 * (e // 64) + e % 32, mask)
    q = ((qb >> (4 * ((e // 32) % 2))) & 0xF) | (hb << 4)
    d1 = d * sc.to(tl.float32)
    m1 = dmin * mn.to(tl.float32)
    _store(out_ptr, offs, d1 * q.to(tl.float32) - m1, mask, OUT)


@triton.jit
def _q6_k_kernel(
    q_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr, OUT: tl.constexpr,
    QK: tl.constexpr, TS: tl.constexpr,
    O_QL: tl.constexpr, O_QH: tl.constexpr, O_SCALES: tl.constexpr, O_D: tl.constexpr,
):
    # dequantize_row_q6_K: ql[128], qh[64], scales[16] int8, d. In each 128-element half h:
    # low 4 bits = nibble r // 64 of ql[64h + r % 64], high 2 bits = field r // 32 of qh[32h + r % 32].
    base, offs, e, mask = _tile(n_blocks, BLOCKS, QK, TS)
    d = _ld_f16(q_ptr + base + O_D, mask)
    h = e // 128
    r = e % 128
    lo = (_ld_u8(q_ptr + base + O_QL + 64 * h + r % 64, mask) >> (4 * (r // 64))) & 0xF
    hi = (_ld_u8(q_ptr + base + O_QH + 32 * h + r % 32, mask) >> (2 * (r // 32))) & 3
    q = (lo | (hi << 4)) - 32
    sc = tl.load(q_ptr + base + O_SCALES + e // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    _store(out_ptr, offs, (d * sc) * q.to(tl.float32), mask, OUT)


_TILE_ELEMS = 2048  # elements per program by default: 64 blocks of 32, 8 of 256


def _layout_constexprs(type_name: str) -> dict[str, int]:
    """The layout constexprs of ``type_name``'s kernel, from the table: ``QK`` (elements per block),
    ``TS`` (bytes per block) and ``O_<FIELD>`` (each field's byte offset)."""
    lay = LAYOUTS[type_name]
    args = {"QK": lay.elems, "TS": lay.bytes}
    args.update({f"O_{field.upper()}": lay.offset(field) for field, _ in lay.fields})
    return args


_KERNEL_FNS = {
    "Q4_0": _q4_0_kernel, "Q4_1": _q4_1_kernel, "Q5_0": _q5_0_kernel, "Q5_1": _q5_1_kernel, "Q8_0": _q8_0_kernel,
    "Q2_K": _q2_k_kernel, "Q3_K": _q3_k_kernel, "Q4_K": _q4_k_kernel, "Q5_K": _q5_k_kernel, "Q6_K": _q6_k_kernel,
    "MXFP4": _mxfp4_kernel,
}
# type -> (kernel, default blocks per program, layout constexprs).
_KERNELS = {
    name: (fn, _TILE_ELEMS // LAYOUTS[name].elems, _layout_constexprs(name)) for name, fn in _KERNEL_FNS.items()
}
TRITON_TYPES: tuple[str, ...] = tuple(_KERNELS)
"""GGML types :func:`dequantize_triton` handles."""


def dequantize_triton(
    q: torch.Tensor, type_name: str, n_per_row: int, dtype: torch.dtype = torch.float32,
    *, blocks_per_program: int | None = None,
) -> torch.Tensor:
    """Dequantize GGUF block bytes on the GPU, bit-exact with ggml.

    Args:
        q: ``(..., bytes_per_row)`` uint8 on a CUDA device (or on the CPU when this module was
            imported with ``TRITON_INTERPRET=1``), e.g. ``(E, F, bytes)`` for an expert tensor.
        type_name: one of :data:`TRITON_TYPES` (case-insensitive).
        n_per_row: elements per row.
        dtype: ``torch.float32``, ``torch.float16`` or ``torch.bfloat16``; values are computed in
            float32 and rounded to nearest even.
        blocks_per_program: blocks each program instance handles (a power of two); the default
            makes tiles of 2048 elements.

    Returns:
        ``(..., n_per_row)`` tensor of ``dtype`` on q's device.

    Raises:
        FormatError: an unknown type, a row length the type's blocks do not divide, or a tensor
            whose dtype or last dimension does not match.
        MoetraceError: a tensor on the wrong device or an unsupported output dtype.
    """
    key = type_name.upper()
    if key not in _KERNELS:
        raise FormatError(f"no Triton kernel for GGML type {type_name!r}; valid types: {', '.join(TRITON_TYPES)}")
    kernel, bpp, layout = _KERNELS[key]
    if blocks_per_program is not None:
        if blocks_per_program < 1 or blocks_per_program & (blocks_per_program - 1):
            raise MoetraceError(f"blocks_per_program must be a power of two, got {blocks_per_program}")
        bpp = blocks_per_program
    nb = row_bytes(key, n_per_row)  # raises FormatError when the blocks do not divide the row
    if not isinstance(q, torch.Tensor) or q.dtype != torch.uint8 or q.ndim < 1 or q.shape[-1] != nb:
        got = f"a {q.dtype} tensor of shape {tuple(q.shape)}" if isinstance(q, torch.Tensor) else type(q).__name__
        raise FormatError(f"{key} rows of {n_per_row} elements are {nb} uint8 bytes; got {got}")
    if dtype not in _OUT_KIND:
        raise MoetraceError(f"dequantize_triton writes float32, float16 or bfloat16, not {dtype}")
    if _INTERPRETED:
        if q.device.type != "cpu":
            raise MoetraceError(f"with TRITON_INTERPRET=1 the kernels run on the CPU; q is on {q.device}")
    elif q.device.type != "cuda":
        raise MoetraceError(
            f"dequantize_triton needs a CUDA tensor, q is on {q.device}; import this module with "
            f"TRITON_INTERPRET=1 to run the kernels on the CPU (slowly) in Triton's interpreter"
        )
    lead = tuple(q.shape[:-1])
    out_kind = _OUT_KIND[dtype]
    out = torch.empty(lead + (n_per_row,), dtype=torch.int16 if out_kind == _OUT_BF16_BITS else dtype, device=q.device)
    n_blocks = q.numel() // layout["TS"]
    if n_blocks:
        q = q.contiguous()
        grid = (triton.cdiv(n_blocks, bpp),)
        # No FMA contraction: ggml and gguf-py round the product before adding the min.
        kernel[grid](q, out, n_blocks, BLOCKS=bpp, OUT=out_kind, **layout, enable_fp_fusion=False)
    return out.view(torch.bfloat16) if out_kind == _OUT_BF16_BITS else out
