"""Weights a published checkpoint stores quantized, read back exactly (GPT-OSS's MXFP4 experts).

OpenAI's GPT-OSS checkpoints store each expert tensor ``X`` as ``X_blocks`` (uint8, (E, rows,
cols/32, 16): two 4-bit E2M1 codes per byte, element 2j in the low nibble and 2j+1 in the high
one) and ``X_scales`` (uint8, (E, rows, cols/32): the E8M0 exponent of each 32-element block,
value 2**(scale - 127)), with ``quantization_config.quant_method = "mxfp4"`` in config.json.
Rows and columns are the [out, in] layout of the matrix (the transpose of what transformers'
GptOssExperts holds; the family's ``transposed`` says so).

Every MXFP4 value is a code in {0, 0.5, 1, 1.5, 2, 3, 4, 6} (and negatives) times a power of
two, so it is exactly representable in float32 (and in bfloat16): the dequantized tensor *is* the
checkpoint's weight, with no rounding. That exact tensor is the reference moetrace traces.
transformers' own ``integrations/mxfp4.py`` (``convert_moe_packed_tensors``) reads the same bytes;
tests/tracer/test_packed.py checks the two agree bit for bit.
"""

from __future__ import annotations

import torch

from moetrace.errors import MoetraceError

# E2M1 code -> value (sign bit 3, exponent bits 2-1, mantissa bit 0), as the OCP MX spec defines it.
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FORMATS = ("mxfp4",)
BLOCK = 32  # elements per E8M0 scale


def packed_names(key: str, fmt: str) -> tuple[str, ...]:
    """The checkpoint keys that hold ``key`` packed in format ``fmt``."""
    if fmt not in FORMATS:
        raise MoetraceError(f"packed format {fmt!r} is unknown; supported: {', '.join(FORMATS)}")
    return f"{key}_blocks", f"{key}_scales"


def unpack_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, name: str = "", dtype=torch.float32) -> torch.Tensor:
    """Dequantize MXFP4 blocks exactly.

    Args:
        blocks: uint8 (..., rows, cols/32, 16).
        scales: uint8 (..., rows, cols/32), E8M0 exponents biased by 127.
        name: the tensor, for messages.
        dtype: the result's dtype: float32, or bfloat16, which holds every MXFP4 value as exactly
            (same exponent range, and a code has at most two significant bits) in half the memory.

    Returns:
        (..., rows, cols) in ``dtype``; filled a bounded number of rows at a time, so the index
        and float32 temporaries stay small whatever the tensor's size.

    Raises:
        MoetraceError: shapes that do not pair up, or non-uint8 data.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise MoetraceError(f"MXFP4 tensor {name}: blocks and scales must be uint8, got {blocks.dtype} and "
                            f"{scales.dtype}")
    if blocks.ndim < 2 or blocks.shape[-1] != BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise MoetraceError(f"MXFP4 tensor {name}: blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do "
                            f"not pair up; expected blocks (..., rows, cols/32, 16) and scales (..., rows, cols/32)")
    lut = torch.tensor(E2M1, dtype=torch.float32)
    nb = scales.shape[-1]
    b = blocks.reshape(-1, nb, BLOCK // 2)  # (rows, nb, 16)
    sc = scales.reshape(-1, nb)  # (rows, nb)
    out = torch.empty(b.shape[0], nb * BLOCK, dtype=dtype)  # (rows, cols)
    step = max(1, (1 << 22) // (nb * BLOCK))
    for r0 in range(0, b.shape[0], step):
        blk = b[r0:r0 + step]
        codes = torch.stack((blk & 0x0F, blk >> 4), dim=-1).long()  # (n, nb, 16, 2): low nibble first
        vals = lut[codes].flatten(-2)  # (n, nb, 32)
        out[r0:r0 + step] = (vals * e8m0(sc[r0:r0 + step]).unsqueeze(-1)).flatten(-2)  # every product exact
    return out.reshape(*scales.shape[:-1], nb * BLOCK)


def e8m0(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 exponents (uint8) -> float32 2**(e - 127), exactly: the float32 bit pattern e << 23
    (e = 0 is the subnormal 2**-127; 255, NaN in the MX spec, comes out as infinity)."""
    e = scales.to(torch.int32)
    bits = torch.where(e > 0, e << 23, torch.full_like(e, 1 << 22))
    return bits.view(torch.float32)


def read_packed(fmt: str, parts: list[torch.Tensor], name: str = "", dtype=torch.float32) -> torch.Tensor:
    """The dequantized [out, in] tensor from the checkpoint tensors :func:`packed_names` lists, in order."""
    if fmt == "mxfp4":
        return unpack_mxfp4(parts[0], parts[1], name, dtype)
    raise MoetraceError(f"packed format {fmt!r} is unknown; supported: {', '.join(FORMATS)}")


def pack_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` (..., rows, cols) to MXFP4 in the checkpoint layout (to write built-in checkpoints).

    Each 32-element block takes the smallest power of two 2**s with max |x| / 2**s <= 6 and every
    value the nearest E2M1 code (ties toward the smaller magnitude). Any valid encoding is a
    faithful checkpoint; this is not ggml's quantizer (kernels' MXFP4 is) and need not match it.

    Returns:
        (blocks uint8 (..., rows, cols/32, 16), scales uint8 (..., rows, cols/32)).
    """
    if w.shape[-1] % BLOCK:
        raise MoetraceError(f"MXFP4 needs rows of a multiple of {BLOCK} elements, got {w.shape[-1]}")
    lead = w.shape[:-1]
    flat = w.reshape(-1, w.shape[-1])  # (rows, cols)
    blocks = torch.empty(flat.shape[0], flat.shape[1] // BLOCK, BLOCK // 2, dtype=torch.uint8)
    scales = torch.empty(flat.shape[0], flat.shape[1] // BLOCK, dtype=torch.uint8)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # between the E2M1 magnitudes
    step = max(1, (1 << 22) // flat.shape[1])  # bounds the temporaries
    for r0 in range(0, flat.shape[0], step):
        x = flat[r0:r0 + step].float().reshape(-1, flat.shape[1] // BLOCK, BLOCK)  # (n, nb, 32)
        m, k = torch.frexp(x.abs().amax(-1) / 6.0)  # amax/6 = m * 2**k, m in [0.5, 1)
        s = torch.where(m == 0.5, k - 1, k)  # ceil(log2(amax / 6))
        s = torch.where(m == 0, torch.full_like(s, -127), s).clamp(-127, 127)  # (n, nb)
        y = x * e8m0((s + 127).to(torch.uint8)).reciprocal().unsqueeze(-1)  # |y| <= 6
        code = torch.bucketize(y.abs(), mids).to(torch.uint8) | ((y < 0).to(torch.uint8) << 3)  # (n, nb, 32)
        blocks[r0:r0 + step] = code[..., 0::2] | (code[..., 1::2] << 4)
        scales[r0:r0 + step] = (s + 127).to(torch.uint8)
    return blocks.reshape(*lead, -1, BLOCK // 2), scales.reshape(*lead, -1)


def pack(fmt: str, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``w`` [out, in] in the checkpoint tensors :func:`packed_names` lists, in order, as numpy arrays."""
    if fmt == "mxfp4":
        return tuple(t.numpy() for t in pack_mxfp4(w))
    raise MoetraceError(f"packed format {fmt!r} is unknown; supported: {', '.join(FORMATS)}")
