"""ggml's generic CPU vec_dot for quantized weights, in torch: the fallback of kernels/csrc/engine_cpu.c.

Same results as the C kernel, bit for bit. The integer parts (code products summed inside a block,
or inside one of the eight lanes of a K-quant super-block) are exact, so they are formed here as
float64 matrix products (exact: every partial sum is an integer far below 2**53). The float32 parts
then follow ggml's generic ``ggml_vec_dot_<type>_q8_<x>_generic`` step by step, one block at a
time, vectorized over (tokens, rows).

The weight codes come from moetrace's own bit-exact dequantizers run on the block bytes with their
fp16 scales replaced: d = 1 and dmin (or m) = 0 gives each element's integer ``scale * code``
(for Q4_0 ``code - 8``, for Q3_K ``(scale - 32) * code``); d = 0 and dmin = 1 gives ``-min``.
MXFP4's scale is an E8M0 byte: e = 128 makes it 1, so the codes come out as ggml's doubled E2M1 kvalues.
"""

from __future__ import annotations

import torch

from moetrace.kernels.base import dequantize
from moetrace.kernels.engine.activations import fields
from moetrace.kernels.layouts import LAYOUTS

K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
LEGACY_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
FP4_TYPES = ("MXFP4",)  # 32-element blocks with Q8_0 activations and an E8M0 scale
_E8M0_ONE = 128  # the E8M0 byte whose halved scale (ggml_e8m0_to_fp32_half) is 1.0
_ONE, _ZERO = 0x3C00, 0x0000  # fp16 bit patterns of 1.0 and 0.0
_ROW_CHUNK_ELEMS = 1 << 24  # bounds the (tokens, rows, blocks, lanes) float64 intermediates


def _patched(q: torch.Tensor, type_name: str, values: dict[str, int]) -> torch.Tensor:
    """Block bytes (rows, blocks * bytes) with the named fp16 fields set to the given bit patterns."""
    lay = LAYOUTS[type_name]
    b = q.reshape(q.shape[0], -1, lay.bytes).clone()
    for name, bits in values.items():
        off = lay.offset(name)
        b[..., off] = bits & 0xFF
        b[..., off + 1] = bits >> 8
    return b.reshape(q.shape)


def _fp16(q: torch.Tensor, type_name: str, name: str) -> torch.Tensor:
    """An fp16 field of every block: (rows, blocks) float32."""
    lay = LAYOUTS[type_name]
    b = q.reshape(q.shape[0], -1, lay.bytes)
    return b[..., lay.span(name)].contiguous().view(torch.float16)[..., 0].float()


def _mxfp4_codes_and_scales(q: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 weight rows -> (rows, n) float32 kvalues and (rows, nb) float32 scales 2**(e - 128)."""
    from moetrace.kernels.formats_mxfp4 import e8m0_to_fp32_half

    lay = LAYOUTS["MXFP4"]
    b = q.reshape(q.shape[0], -1, lay.bytes)  # (rows, nb, 17)
    e = b[..., lay.offset("e")]  # (rows, nb) uint8
    one = b.clone()
    one[..., lay.offset("e")] = _E8M0_ONE
    codes = dequantize(one.reshape(q.shape), "MXFP4", n)  # (rows, n): kvalues[code] * 1.0
    return codes, e8m0_to_fp32_half(e.reshape(-1)).reshape(e.shape)


def matmul(x_q: torch.Tensor, q: torch.Tensor, type_name: str, n: int) -> torch.Tensor:
    """(tokens, rows) float32: ggml's generic vec_dot of each weight row with each token.

    Args:
        x_q: (tokens, activation bytes) uint8, activations already in the vec_dot_type.
        q: (rows, bytes per row) uint8 weight blocks of ``type_name``.
        n: elements per row.
    """
    rows = q.shape[0]
    blk = LAYOUTS[type_name].elems
    step = max(1, _ROW_CHUNK_ELEMS // max(1, x_q.shape[0] * n))
    parts = [_matmul_rows(x_q, q[r:r + step], type_name, n, blk) for r in range(0, rows, step)]
    return torch.cat(parts, 1) if parts else torch.empty(x_q.shape[0], 0)


def _matmul_rows(x_q, q, type_name, n, blk):
    rows, nb = q.shape[0], n // blk
    k = type_name in K_TYPES
    act = fields(x_q, "Q8_K" if k else ("Q8_1" if type_name in ("Q4_1", "Q5_1") else "Q8_0"))
    has_min = "dmin" in dict(LAYOUTS[type_name].fields) or "m" in dict(LAYOUTS[type_name].fields)
    second = "dmin" if k else "m"
    if type_name in FP4_TYPES:
        codes, dx = _mxfp4_codes_and_scales(q, n)
    else:
        codes = dequantize(_patched(q, type_name, {"d": _ONE, **({second: _ZERO} if has_min else {})}), type_name, n)
        dx = _fp16(q, type_name, "d")  # (rows, nb)
    codes = codes.reshape(rows, nb, blk).double()  # (rows, nb, blk) integer scale*code
    y = act["qs"].double()  # (tokens, nb, blk)
    dy = act["d"]  # (tokens, nb)
    t = y.shape[0]
    sumf = torch.zeros(t, rows, dtype=torch.float32)
    if not k:
        sumi = torch.einsum("rbj,tbj->trb", codes, y).float()  # (tokens, rows, nb), exact
        for b in range(nb):
            dxb, dyb, si = dx[None, :, b], dy[:, None, b], sumi[:, :, b]
            if type_name == "Q4_0":
                term = si * dxb * dyb
            elif type_name == "Q8_0":
                term = si * (dxb * dyb)
            elif type_name in ("Q5_0", "MXFP4"):  # MXFP4: d = dy * dx, then d * sumi
                term = (dxb * dyb) * si
            else:  # Q4_1, Q5_1
                term = (dxb * dyb) * si + _fp16(q, type_name, "m")[None, :, b] * act["s"][:, None, b]
            sumf = sumf + term
        return sumf
    lanes = torch.einsum("rbgl,tbgl->trbl", codes.reshape(rows, nb, -1, 8), y.reshape(t, nb, -1, 8)).float()
    if has_min:  # the min of each 16-element group, from d = 0, dmin = 1
        mins = -dequantize(_patched(q, type_name, {"d": _ZERO, "dmin": _ONE}), type_name, n)
        mins = mins.reshape(rows, nb, 16, 16)[..., 0].double()  # (rows, nb, 16)
        summs = torch.einsum("rbg,tbg->trb", mins, act["bsums"].double()).float()  # (tokens, rows, nb)
        dmx = _fp16(q, type_name, "dmin")
    if type_name == "Q2_K":
        isum = lanes.double().sum(-1).float()  # exact integer
        for b in range(nb):
            dall, dmin = dy[:, None, b] * dx[None, :, b], dy[:, None, b] * dmx[None, :, b]
            sumf = sumf + (dall * isum[:, :, b] - dmin * summs[:, :, b])
        return sumf
    sums = torch.zeros(t, rows, 8, dtype=torch.float32)
    for b in range(nb):
        d = dx[None, :, b] * dy[:, None, b]  # (tokens, rows)
        sums = sums + d[..., None] * lanes[:, :, b]
        if has_min:
            sumf = sumf - (dmx[None, :, b] * dy[:, None, b]) * summs[:, :, b]
    for lane in range(8):
        sumf = sumf + sums[..., lane]
    return sumf
