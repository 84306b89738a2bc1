"""Byte-level helpers shared by the block formats: fp16 fields, nibble and bit packing, C integer casts.

Everything here is exact integer or bit manipulation (no rounding choices), so it can be shared
freely between formats without affecting bit-exactness. Tensors are little-endian, as ggml's
blocks are on every platform it runs on.
"""

from __future__ import annotations

import torch


def fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 values -> their IEEE half bytes, rounded like ``GGML_FP32_TO_FP16`` (nearest even).

    Args:
        v: (n,) float32.

    Returns:
        (n, 2) uint8, little-endian.
    """
    return v.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def fp16_field(q: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte ``offset`` of every block, as float32 (``GGML_FP16_TO_FP32``, exact).

    Args:
        q: (n_blocks, type_size) uint8.
        offset: byte offset of the field inside a block.

    Returns:
        (n_blocks,) float32.
    """
    if q.shape[1] % 2 == 0 and offset % 2 == 0 and q.is_contiguous():
        # A whole-row view avoids copying the field out first.
        return q.view(torch.float16)[:, offset // 2].to(torch.float32)
    return q[:, offset:offset + 2].contiguous().view(torch.float16)[:, 0].to(torch.float32)


def int8_wrap(v: torch.Tensor) -> torch.Tensor:
    """C's conversion of an int to ``int8_t`` (two's complement wrap), kept as int32."""
    return ((v + 128) & 0xFF) - 128


def c_float_to_int(v: torch.Tensor) -> torch.Tensor:
    """C's float -> int conversion (truncation toward zero) for values inside int32's range.

    ``Tensor.to(int32)`` is that C cast (and, like x86's cvttss2si, gives INT_MIN outside the
    range, where C leaves the result undefined); ``torch.trunc`` is several times slower on CPU.
    """
    return v.to(torch.int32)


def pack_nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``lo | hi << 4`` as uint8; ``lo`` and ``hi`` are integer tensors of the same shape, values 0..15."""
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_nibbles(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 bytes -> (low nibbles, high nibbles), both uint8 of b's shape."""
    return b & 0x0F, b >> 4


def bits_to_bytes(bits: torch.Tensor) -> torch.Tensor:
    """Pack bits little-endian: bit ``k`` of the result's byte ``k // 8`` is ``bits[..., k]``.

    Args:
        bits: (..., 8 * m) integer tensor of 0/1.

    Returns:
        (..., m) uint8.
    """
    b = bits.to(torch.int32).reshape(*bits.shape[:-1], -1, 8)  # (..., m, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32, device=bits.device)
    return (b * weights).sum(-1).to(torch.uint8)


def bytes_to_bits(b: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`bits_to_bytes`: (..., m) uint8 -> (..., 8 * m) uint8 of 0/1."""
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
    return ((b.unsqueeze(-1) >> shifts) & 1).reshape(*b.shape[:-1], -1)


def bit_fields(b: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Split every byte into ``count`` fields of ``width`` bits, lowest first.

    Works four bytes at a time on an int32 view (a per-byte mask keeps each field inside its
    byte), which is several times faster than broadcasting shifts over uint8 on the CPU.

    Args:
        b: (n, m) uint8 with m a multiple of 4.

    Returns:
        (n, count, m) uint8: ``out[:, k, j] = (b[:, j] >> (width * k)) & (2**width - 1)``.
    """
    if b.storage_offset() % 4 or b.stride(-1) != 1 or b.stride(0) != b.shape[-1]:
        # A row-packed copy: .contiguous() alone keeps a one-row slice's odd stride and offset.
        b = torch.empty(b.shape, dtype=b.dtype, device=b.device).copy_(b)
    v = b.view(torch.int32)  # (n, m/4)
    mask = ((1 << width) - 1) * 0x01010101
    fields = [v & mask] + [(v >> (width * k)) & mask for k in range(1, count)]
    return torch.stack(fields, 1).view(torch.uint8)


# Elements per chunk on the CPU: intermediates of about a MiB stay near the caches and come from
# the allocator's reused memory instead of fresh pages; fewer, larger launches suit GPUs.
CPU_CHUNK_ELEMS = 1 << 18
GPU_CHUNK_ELEMS = 1 << 26


def chunk_blocks(q: torch.Tensor, block_size: int, cpu_elems: int = CPU_CHUNK_ELEMS) -> int:
    """How many blocks of ``block_size`` elements to process at a time on ``q``'s device.

    On a GPU, chunks are 64 times the CPU's (at most GPU_CHUNK_ELEMS): the searches hold ~40
    intermediates per element, which must fit in device memory for any tensor size.
    """
    elems = cpu_elems if q.device.type == "cpu" else min(GPU_CHUNK_ELEMS, 64 * cpu_elems)
    return max(1, elems // block_size)


def dequantize_chunked(fill, q: torch.Tensor, block_size: int) -> torch.Tensor:
    """Run ``fill(q_chunk, out_chunk)`` over chunks of blocks, writing one preallocated float32 output.

    Args:
        fill: writes the (b, block_size) float32 values of (b, type_size) uint8 blocks into its second argument.
        q: (n_blocks, type_size) uint8.

    Returns:
        (n_blocks, block_size) float32.
    """
    q = q.contiguous()
    out = torch.empty(q.shape[0], block_size, dtype=torch.float32, device=q.device)
    step = chunk_blocks(q, block_size, GPU_CHUNK_ELEMS if q.device.type != "cpu" else CPU_CHUNK_ELEMS)
    for i in range(0, q.shape[0], step):
        fill(q[i:i + step], out[i:i + step])
    return out


def quantize_chunked(fn, x: torch.Tensor, qw: torch.Tensor | None, type_size: int, cpu_elems: int = CPU_CHUNK_ELEMS):
    """Run ``fn(x_chunk, qw_chunk) -> bytes`` over chunks of blocks into one (n_blocks, type_size) uint8 output."""
    step = chunk_blocks(x, x.shape[1], cpu_elems)
    if x.shape[0] <= step:
        return fn(x, qw)
    out = torch.empty(x.shape[0], type_size, dtype=torch.uint8, device=x.device)
    for i in range(0, x.shape[0], step):
        out[i:i + step] = fn(x[i:i + step], None if qw is None else qw[i:i + step])
    return out
