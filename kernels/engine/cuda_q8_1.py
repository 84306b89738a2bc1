"""llama.cpp's CUDA integer matmuls (MMQ and MMVQ) emulated in torch: q8_1 activations, int8 dots, fp32 sums.

Read at ggml-org/llama.cpp (commits 000f4625 quantize.cu, 027ef876 vecdotq.cuh, 00cd2085 mmq.cuh):

- **Which kernel.** ``ggml_cuda_mul_mat`` takes MMVQ (``mul_mat_vec_q``) for a batch of at most
  :data:`MMVQ_MAX_BATCH` tokens and MMQ (``mul_mat_q``, int8 tensor cores on Turing and newer)
  above; for experts (``mul_mat_id``) the batch is the MoE block's token count.
- **Activations.** Every 32 values become one q8_1 block. MMVQ (``quantize_q8_1``): ``d = amax/127``,
  ``q = roundf(x/d)``, and the block keeps ``half2(d, sum(x))`` (the float sum, reduced over the
  warp by xor shuffles). MMQ (``quantize_mmq_q8_1``): ``d_inv = 127/amax``, ``q = roundf(x*d_inv)``,
  ``d = 1/d_inv``; the scale layout depends on the weight type: D4 (float d; Q8_0, Q6_K) or
  DS4 (``half2(d, sum)``, the sum of 4 values per thread then 3 xor shuffles; Q4_K, Q5_K).
- **Dots.** Per 32-value block, an exact integer dot ``C`` of weight codes and activation codes,
  scaled and added in float32:

  ========  ===========================================  ==============================================
  type      MMQ (tensor cores) per 32-block              MMVQ per 32-block
  ========  ===========================================  ==============================================
  Q8_0      ``(C*d_w)*d_a``                               ``d_w*d_a*C`` (fp16 ``d_a``)
  Q4_K/Q5_K ``(A_d*d_a)*C + A_m*s_a`` with ``A_d`` =      ``d*(d_a*(sc*C)) - dmin*(d_a*(m*S))``
            fp16(d*sc), ``A_m`` = fp16(-dmin*m)           (``S`` = sum of the activation codes)
            formed in half (``load_tiles_q4_K``)
  Q6_K      ``d*(d_a*C)``, C = sum of sc*(q-32)*q_a       ``d*(d_a*C)``, likewise
  ========  ===========================================  ==============================================

Where this simplifies: MMQ's terms are added in k order into one float32 accumulator (one
thread's register holds a whole output's sum over a tile's k loop; stream-k's fixup, which adds
partial sums of k ranges, is not modelled); MMVQ's per-thread partial sums and warp reduction are
modelled by torch's float32 sum over the blocks. Both orders only move float32 roundings, within
the bound the tests (tests/kernels/test_engine_cuda.py) assert against a float64 model. Types other
than Q4_K, Q5_K, Q6_K and Q8_0 are refused by name (the MMQ tile formulas of the others differ
and are not emulated yet).
"""

from __future__ import annotations

import torch

from moetrace.kernels.base import dequantize
from moetrace.kernels.errors import FormatError
from moetrace.kernels.ggml_float import fdiv, fdiv_by, roundf
from moetrace.kernels.layouts import LAYOUTS

MMVQ_MAX_BATCH = 8  # MMVQ_MAX_BATCH_SIZE in ggml-cuda's mmvq.cuh
TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0")
_DS4 = ("Q4_K", "Q5_K")  # MMQ activation layout half2(d, sum); the others D4 (float d)
_ONE, _ZERO = 0x3C00, 0x0000  # fp16 bit patterns of 1.0 and 0.0
_ROW_CHUNK_ELEMS = 1 << 24  # bounds the (tokens, rows, blocks) intermediates


def kernel_for(batch: int) -> str:
    """``mmvq`` for a batch of at most :data:`MMVQ_MAX_BATCH` tokens, else ``mmq``."""
    return "mmvq" if batch <= MMVQ_MAX_BATCH else "mmq"


# -- activations ---------------------------------------------------------------------------


def _xor_reduce(v: torch.Tensor, offsets) -> torch.Tensor:
    """A warp's ``v += __shfl_xor_sync(v, off)`` for each offset, over the last dim; lane 0's value."""
    idx = torch.arange(v.shape[-1], device=v.device)
    for off in offsets:
        v = v + v[..., idx ^ off]
    return v[..., 0]


def quantize_q8_1(x: torch.Tensor, kernel: str, type_name: str) -> dict[str, torch.Tensor]:
    """Activations (tokens, n) float32 -> q8_1 blocks as the kernel stores them.

    Returns:
        ``qs`` (tokens, n/32, 32) float32 holding the int8 codes, ``d`` (tokens, n/32) the scale
        as the dot reads it (fp16-rounded for MMVQ and DS4, float32 for D4), ``s`` (tokens, n/32)
        the fp16-rounded sum of the block's inputs (MMVQ and DS4; zeros for D4).
    """
    t, n = x.shape
    b = x.to(torch.float32).reshape(t, n // 32, 32)
    amax = b.abs().amax(-1)  # (t, nb) exact in any order
    zero = amax == 0
    if kernel == "mmvq":
        d = fdiv_by(amax, 127.0)  # d = amax / 127.0f, one IEEE division
        q = roundf(b / torch.where(zero, torch.ones_like(d), d)[..., None])
        q = torch.where(zero[..., None], torch.zeros_like(q), q)
        s = _xor_reduce(b, (16, 8, 4, 2, 1))  # warp_reduce_sum over the 32 lanes
        return {"qs": q, "d": d.to(torch.float16).float(), "s": s.to(torch.float16).float()}
    d_inv = fdiv(127.0, torch.where(zero, torch.ones_like(amax), amax))
    q = roundf(b * d_inv[..., None])
    q = torch.where(zero[..., None], torch.zeros_like(q), q)  # 0 * inf is NaN, which the int8 cast makes 0
    d = torch.where(zero, torch.zeros_like(amax), fdiv(1.0, d_inv))
    if type_name not in _DS4:
        return {"qs": q, "d": d, "s": torch.zeros_like(d)}
    quad = b.reshape(t, n // 32, 8, 4)  # each thread loads 4 values (a float4)
    per_thread = ((quad[..., 0] + quad[..., 1]) + quad[..., 2]) + quad[..., 3]  # (t, nb, 8)
    s = _xor_reduce(per_thread, (4, 2, 1))
    return {"qs": q, "d": d.to(torch.float16).float(), "s": s.to(torch.float16).float()}


# -- weights -------------------------------------------------------------------------------


def _patched(q: torch.Tensor, type_name: str, values: dict[str, int], fill: dict[str, int] | None = None):
    """Block bytes (rows, bytes) with fp16 fields set to bit patterns and byte fields filled with a value."""
    lay = LAYOUTS[type_name]
    b = q.reshape(q.shape[0], -1, lay.bytes).clone()
    for name, bits in values.items():
        off = lay.offset(name)
        b[..., off] = bits & 0xFF
        b[..., off + 1] = bits >> 8
    for name, byte in (fill or {}).items():
        b[..., lay.span(name)] = byte
    return b.reshape(q.shape)


def _fp16(q: torch.Tensor, type_name: str, name: str) -> torch.Tensor:
    lay = LAYOUTS[type_name]
    b = q.reshape(q.shape[0], -1, lay.bytes)
    return b[..., lay.span(name)].contiguous().view(torch.float16)[..., 0].float()  # (rows, blocks)


def weight_parts(q: torch.Tensor, type_name: str, n: int) -> dict[str, torch.Tensor]:
    """The integer codes and scales of weight blocks, from moetrace's bit-exact dequantizers.

    Returns (rows R, 32-blocks nb = n/32, super-blocks ns):
        ``c`` (R, nb, 32): the integer each code enters the dot with (Q8_0 q; Q4_K/Q5_K q;
        Q6_K sc*(q-32)); ``d`` (R, nb) the fp16 d of each 32-block's (super-)block; for Q4_K and
        Q5_K ``sc``, ``m`` (R, nb) the 6-bit scale and min and ``dmin`` (R, nb).
    """
    rows, nb = q.shape[0], n // 32
    per = LAYOUTS[type_name].elems // 32  # 32-blocks per (super-)block

    def expand(v):  # (R, ns) -> (R, nb)
        return v.repeat_interleave(per, dim=1)

    d = expand(_fp16(q, type_name, "d"))
    if type_name in ("Q8_0", "Q6_K"):
        c = dequantize(_patched(q, type_name, {"d": _ONE}), type_name, n).reshape(rows, nb, 32)
        return {"c": c, "d": d}
    scq = dequantize(_patched(q, type_name, {"d": _ONE, "dmin": _ZERO}), type_name, n).reshape(rows, nb, 32)
    ones = {"qs": 0x11} if type_name == "Q4_K" else {"qs": 0x11, "qh": 0x00}  # every code 1: the scale itself
    sc = dequantize(_patched(q, type_name, {"d": _ONE, "dmin": _ZERO}, ones), type_name, n).reshape(rows, nb, 32)[..., 0]
    m = -dequantize(_patched(q, type_name, {"d": _ZERO, "dmin": _ONE}), type_name, n).reshape(rows, nb, 32)[..., 0]
    c = torch.where(sc[..., None] > 0, scq / sc.clamp(min=1)[..., None], torch.zeros_like(scq))  # exact integers
    return {"c": c, "d": d, "dmin": expand(_fp16(q, type_name, "dmin")), "sc": sc, "m": m}


# -- the matmul ------------------------------------------------------------------------------


def matmul(x: torch.Tensor, q: torch.Tensor, type_name: str, n: int, kernel: str) -> torch.Tensor:
    """(tokens, rows) float32: the CUDA kernel's result for W x per token.

    Args:
        x: (tokens, n) float activations (taken as float32).
        q: (rows, bytes per row) uint8 weight blocks of ``type_name``.
        kernel: ``mmq`` or ``mmvq`` (see :func:`kernel_for`).
    """
    if type_name not in TYPES:
        raise FormatError(f"no llamacpp_cuda_mmq emulation for {type_name}; valid types: {', '.join(TYPES)}")
    if kernel not in ("mmq", "mmvq"):
        raise FormatError(f"unknown CUDA kernel {kernel!r}; valid: mmq, mmvq")
    a = quantize_q8_1(x.to(torch.float32), kernel, type_name)
    rows, tokens, nb = q.shape[0], x.shape[0], n // 32
    step = max(1, min(_ROW_CHUNK_ELEMS // max(1, tokens * nb * 2), _ROW_CHUNK_ELEMS // (4 * n)))
    parts = [_dot(weight_parts(q[r:r + step], type_name, n), a, type_name, kernel) for r in range(0, rows, step)]
    return torch.cat(parts, 1) if parts else torch.empty(tokens, 0, device=x.device)


def _dot(w: dict, a: dict, type_name: str, kernel: str) -> torch.Tensor:
    # Exact integer dots per 32-block as a float32 batched matmul: every partial sum is an integer
    # below 2**24 (Q6_K's worst: 32 * 128 * 32 * 127 < 2**24), so no rounding happens.
    c = torch.bmm(a["qs"].transpose(0, 1), w["c"].permute(1, 2, 0)).permute(1, 2, 0)  # (T, R, nb)
    da, sa = a["d"][:, None, :], a["s"][:, None, :]  # (T, 1, nb)
    dw = w["d"][None]  # (1, R, nb)
    if type_name == "Q8_0":
        terms = [(c * dw) * da] if kernel == "mmq" else [(dw * da) * c]
    elif type_name == "Q6_K":
        terms = [dw * (da * c)]
    elif kernel == "mmq":  # Q4_K, Q5_K on tensor cores: half2 scales formed in half
        a_d = (w["d"].to(torch.float16) * w["sc"].to(torch.float16)).float()[None]  # (1, R, nb)
        a_m = (-w["dmin"].to(torch.float16) * w["m"].to(torch.float16)).float()[None]
        terms = [(a_d * da) * c, a_m * sa]
    else:  # Q4_K, Q5_K MMVQ
        s_int = a["qs"].sum(-1)[:, None, :]  # (T, 1, nb) exact integer sum of the codes
        terms = [w["d"][None] * (da * (w["sc"][None] * c)), -(w["dmin"][None] * (da * (s_int * w["m"][None])))]
    if kernel == "mmvq":
        return sum(terms).sum(-1) if len(terms) > 1 else terms[0].sum(-1)  # the warp reduction's order aside
    acc = torch.zeros(c.shape[:2], dtype=torch.float32, device=c.device)
    for j in range(c.shape[-1]):  # one thread's float32 accumulator, in k order
        for t in terms:
            acc = acc + t[..., j]
    return acc
