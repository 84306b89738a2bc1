"""MXFP4 (ggml type 39): the OCP microscaling 4-bit float format, bit-exact with ggml.

Block layout (ggml-common.h ``block_mxfp4``, 32 elements, 17 bytes):

| field | bytes | what |
|---|---|---|
| e | 1 | the block's shared scale, an E8M0 exponent byte (bias 127) |
| qs | 16 | 4-bit E2M1 codes: element j in the low nibble of qs[j], element j+16 in the high |

A code indexes ggml's ``kvalues_mxfp4`` = 2 * E2M1: (0, 1, 2, 3, 4, 6, 8, 12, then the same negated;
code 8 is -0). ggml keeps the doubled integers and halves the scale instead
(``ggml_e8m0_to_fp32_half(e)`` = 2**(e - 128), with subnormal bit patterns for e < 2), so an element's
value is the exact float32 product ``kvalues[code] * 2**(e - 128)``.

Quantizing (``quantize_row_mxfp4_ref``; ``quantize_mxfp4`` ignores an importance matrix):
``e = (uint8_t)(floorf(log2f(amax)) - 2 + 127)`` (0 for an all-zero block), then each element takes the
first code with the smallest ``fabsf(kvalues[i] * d - x)`` in float32. For amax below 2**-125 the
exponent expression is negative and C's conversion to uint8_t is undefined; x86 builds of ggml convert
through int32 and keep the low byte (the value wraps modulo 256, a huge scale, all codes 0), which is
what moetrace does everywhere.
"""

from __future__ import annotations

import torch

from moetrace.kernels.base import BlockFormat
from moetrace.kernels.block_bytes import dequantize_chunked, quantize_chunked
from moetrace.kernels.layouts import LAYOUTS as _LAY

QK = 32
# ggml's kvalues_mxfp4 (ggml-common.h kvalues_fp4): E2M1 values times two, codes 0-15.
KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
# The quantizer holds (blocks, 32, 16) float32 candidate errors: 2**16 elements per chunk is 4 MiB.
QUANT_CHUNK_ELEMS = 1 << 16

_KV: dict[torch.device, torch.Tensor] = {}


def _kvalues(device: torch.device) -> torch.Tensor:
    """(16,) float32 kvalues on ``device`` (cached)."""
    if device not in _KV:
        _KV[device] = torch.tensor(KVALUES, dtype=torch.float32, device=device)
    return _KV[device]


def e8m0_to_fp32_half(e: torch.Tensor) -> torch.Tensor:
    """ggml_e8m0_to_fp32_half: (n,) exponent bytes (any integer dtype) -> (n,) float32 2**(e - 128), exact.

    e >= 2 is the normal float with biased exponent e - 1; e = 0 and 1 are the subnormals 2**-128 and
    2**-127 (bit patterns 0x00200000 << e).
    """
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.bitwise_left_shift(torch.full_like(e, 0x00200000), e), (e - 1) << 23)
    return bits.view(torch.float32)


def shared_exponent(amax: torch.Tensor) -> torch.Tensor:
    """quantize_row_mxfp4_ref's exponent byte from each block's largest magnitude.

    ``floorf(log2f(amax)) - 2 + 127`` as uint8 (0 where amax is 0). ``log2f`` is taken as the float32
    rounding of the float64 log2, which is what glibc's log2f returns (it evaluates in double and
    rounds once); near a power of two that rounding decides the floor, so it must be float32's.

    Args:
        amax: (n,) float32, >= 0 and finite.

    Returns:
        (n,) int32 in 0..255.
    """
    lg = torch.log2(amax.double()).float().floor()  # (n,): -inf where amax is 0, masked below
    e = torch.where(amax > 0, lg, torch.zeros_like(lg)).to(torch.int32) + 125
    return torch.where(amax > 0, e & 0xFF, torch.zeros_like(e))  # x86's (uint8_t)(int)(v): modulo 256


def from_ocp(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 weights in the OCP MX layout of GPT-OSS checkpoints -> ggml ``block_mxfp4`` bytes.

    OpenAI's checkpoints (and transformers' ``convert_moe_packed_tensors``) store each projection as
    ``*_blocks``, 16 bytes per 32 values with element 2j in the low nibble of byte j and element 2j+1
    in the high one, and ``*_scales``, one E8M0 byte per 32 values: value = E2M1(code) * 2**(scale - 127).
    ggml's block packs element j with element j + 16 instead, and its doubled kvalues with the halved
    scale 2**(e - 128) give the same values for e = scale, so only the nibbles move. (A scale of 255 is
    NaN in the OCP spec; ggml reads it as 2**127.)

    Args:
        blocks: (..., G, 16) uint8, G groups of 32 values per row.
        scales: (..., G) uint8.

    Returns:
        (..., G * 17) uint8: rows of ggml blocks, for ``kernels.dequantize(q, "MXFP4", G * 32)``.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[-1] != QK // 2 \
            or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        from moetrace.kernels.errors import FormatError

        raise FormatError(f"OCP MXFP4 takes uint8 blocks (..., G, 16) and scales (..., G); got {blocks.dtype} "
                          f"{tuple(blocks.shape)} and {scales.dtype} {tuple(scales.shape)}")
    codes = torch.stack([blocks & 0xF, blocks >> 4], -1).reshape(*blocks.shape[:-1], QK)  # (..., G, 32) in order
    qs = codes[..., :QK // 2] | (codes[..., QK // 2:] << 4)  # (..., G, 16): ggml's j, j + 16 pairs
    return torch.cat([scales[..., None], qs], -1).reshape(*scales.shape[:-1], -1)


class MXFP4(BlockFormat):
    """4-bit E2M1 codes with a shared E8M0 exponent, 32 per block (``block_mxfp4``)."""

    name = "MXFP4"
    vec_dot_type = "Q8_0"

    # Mirrors quantize_row_mxfp4_ref; quantize_mxfp4 ignores the importance matrix.
    def quantize_blocks(self, x, quant_weights, n_per_row=None):
        return quantize_chunked(self._ref, x, None, self.type_size, QUANT_CHUNK_ELEMS)

    @staticmethod
    def _ref(x: torch.Tensor, _=None) -> torch.Tensor:
        """(b, 32) float32 -> (b, 17) uint8."""
        e = shared_exponent(x.abs().amax(1))  # (b,)
        d = e8m0_to_fp32_half(e)  # (b,)
        cand = _kvalues(x.device)[None, :] * d[:, None]  # (b, 16): kvalues[i] * d, exact
        err = (cand[:, None, :] - x[:, :, None]).abs_()  # (b, 32, 16): fabsf(kvalues[i]*d - x) in float32
        code = err.argmin(-1)  # (b, 32): the first index of the smallest error, as ggml's strict '<'
        qs = (code[:, :QK // 2] | (code[:, QK // 2:] << 4)).to(torch.uint8)  # (b, 16)
        return torch.cat([e.to(torch.uint8)[:, None], qs], 1)

    # Mirrors dequantize_row_mxfp4: kvalues[code] * d.
    def dequantize_blocks(self, q):
        return dequantize_chunked(self._fill, q, QK)

    @staticmethod
    def _fill(q: torch.Tensor, out: torch.Tensor) -> None:
        lay = _LAY["MXFP4"]
        d = e8m0_to_fp32_half(q[:, lay.offset("e")])  # (b,)
        qs = q[:, lay.span("qs")].long()  # (b, 16)
        codes = torch.cat([qs & 0xF, qs >> 4], 1)  # (b, 32): element order
        torch.mul(_kvalues(q.device)[codes], d[:, None], out=out)
