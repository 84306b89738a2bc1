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

Where this simplifies: the products are the kernels' (integer dots times the scales, formed in
half where the kernel forms them so), but they are added in a float32 GEMM's order - one
matmul of the q8_1 activations with the effective weights - instead of the kernels' (MMQ: one
thread's accumulator over k, stream-k's fixup adding partial sums of k ranges; MMVQ: per-thread
partial sums and a warp reduction). The orders only move float32 roundings, within the bound
the tests (tests/kernels/test_engine_cuda.py) assert against a float64 model; the emulation is a
GEMM, as fast as a dense float32 linear plus one dequantization of the weight.

Two implementations: this torch form (any device; Q4_K, Q5_K, Q6_K and Q8_0) and the compiled
kernels (:mod:`.cuda_native`, kernels/csrc/engine_cuda.c: the CPU; also Q4_0, Q4_1, Q5_0, Q5_1,
MXFP4, Q2_K and Q3_K, with the MMQ and MMVQ formulas listed there, and the kernels' own float32
accumulation over blocks). :func:`prepare` picks the compiled kernels for CPU activations, and on
other devices for the types only they emulate (the result returns to the activations' device).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from moetrace.kernels.base import dequantize
from moetrace.kernels.engine.cpu_torch import _fp16, _patched  # the block-field helpers both forms use
from moetrace.kernels.errors import FormatError
from moetrace.kernels.ggml_float import fdiv, fdiv_by, roundf
from moetrace.kernels.layouts import LAYOUTS

MMVQ_MAX_BATCH = 8  # MMVQ_MAX_BATCH_SIZE in ggml-cuda's mmvq.cuh
TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0")  # the torch form's; see supported_types()
# MMQ activation layout half2(d, sum) (DS4; mmq_get_q8_1_ds_layout); the others D4 (float d)
_DS4 = ("Q4_0", "Q4_1", "Q5_1", "Q4_K", "Q5_K")
_ONE, _ZERO = 0x3C00, 0x0000  # fp16 bit patterns of 1.0 and 0.0
_ROW_CHUNK_ELEMS = 1 << 24  # bounds the weight rows unpacked at once


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


def _scale_min_k4(q: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's eight 6-bit scales and mins per super-block, unpacked from its 12 scale bytes (the layout
    ggml's get_scale_min_k4 reads): (R, nb) float32 each."""
    lay = LAYOUTS[type_name]
    s = q.reshape(q.shape[0], -1, lay.bytes)[..., lay.span("scales")].to(torch.int32)  # (R, ns, 12)
    lo_sc, lo_m = s[..., 0:4] & 63, s[..., 4:8] & 63  # sub-blocks 0-3
    hi_sc = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)  # sub-blocks 4-7
    hi_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    sc = torch.cat([lo_sc, hi_sc], -1).reshape(q.shape[0], -1).float()
    m = torch.cat([lo_m, hi_m], -1).reshape(q.shape[0], -1).float()
    return sc, m


# -- the matmul ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """q8_1 activations of T tokens, quantized once for one weight type and kernel by one implementation
    (``c``: the compiled kernels, numpy arrays on the CPU; ``torch``: :func:`activations`, on ``device``).
    Rows are independent: :meth:`rows` equals the activations of those tokens alone."""

    impl: str
    type_name: str
    kernel: str
    data: dict
    device: torch.device

    def rows(self, idx: torch.Tensor) -> Prepared:
        if self.impl == "c":
            sel = idx.cpu().numpy()
            return replace(self, data={k: v[sel] for k, v in self.data.items()})
        return replace(self, data={k: (v[idx] if v is not None else None) for k, v in self.data.items()})


def prepare(x: torch.Tensor, type_name: str, kernel: str, impl: str | None = None) -> Prepared:
    """Activations (T, n) float -> :class:`Prepared` for weights of ``type_name``.

    ``impl``: ``c`` (the compiled kernels; CPU), ``torch`` (any device), or None: the compiled kernels
    for activations on the CPU, and on other devices for the types only they emulate; torch otherwise.
    """
    from moetrace.kernels.engine import cuda_native

    impl = _impl(type_name, kernel, x.device, impl)
    x = x.to(torch.float32)
    data = cuda_native.quantize(x, type_name, kernel) if impl == "c" else activations(x, type_name, kernel)
    return Prepared(impl, type_name, kernel, data, x.device)


def product(a: Prepared, q, n: int) -> torch.Tensor:
    """(T, R) float32 on the activations' device: the kernel's result for weight rows ``q`` (R, bytes per
    row) uint8 (a tensor or numpy array) of ``a``'s type with the prepared activations ``a``."""
    from moetrace.kernels.engine import cuda_native

    if a.impl == "c":
        qn = q.detach().cpu().numpy() if isinstance(q, torch.Tensor) else q
        return cuda_native.matmul(a.data, qn, a.type_name, n, a.kernel).to(a.device)
    qt = torch.as_tensor(q).to(a.device)
    step = max(1, _ROW_CHUNK_ELEMS // (4 * n))  # rows of effective weights held at once
    parts = [apply(a.data, weights(qt[r:r + step], a.type_name, n, a.kernel)) for r in range(0, qt.shape[0], step)]
    return torch.cat(parts, 1) if parts else torch.empty(a.data["x"].shape[0], 0, device=a.device)


def products(acts: list[Prepared], qs: list, n: int) -> list[torch.Tensor]:
    """:func:`product` of each ``acts[i]`` with weight rows ``qs[i]`` (R, bytes per row; the same R and type
    for all): the experts of one MoE block. The torch form forms the effective weights of all of them in one
    unpacking (fewer, larger kernels on a GPU); the compiled form runs them one by one."""
    if not acts or acts[0].impl == "c":
        return [product(a, q, n) for a, q in zip(acts, qs)]
    a0 = acts[0]
    qt = torch.stack([torch.as_tensor(q) for q in qs]).to(a0.device)  # (E, R, bytes)
    rows = qt.shape[1]
    w = weights(qt.reshape(-1, qt.shape[-1]), a0.type_name, n, a0.kernel)  # (E * R, n) and (E * R, n/32)
    return [apply(a.data, {k: (v[i * rows:(i + 1) * rows] if v is not None else None) for k, v in w.items()})
            for i, a in enumerate(acts)]


def matmul(x: torch.Tensor, q: torch.Tensor, type_name: str, n: int, kernel: str,
           impl: str | None = None) -> torch.Tensor:
    """(tokens, rows) float32: the CUDA kernel's result for W x per token.

    Args:
        x: (tokens, n) float activations (taken as float32).
        q: (rows, bytes per row) uint8 weight blocks of ``type_name``.
        kernel: ``mmq`` or ``mmvq`` (see :func:`kernel_for`).
        impl: ``c``, ``torch`` or None (see :func:`prepare`).
    """
    return product(prepare(x, type_name, kernel, impl), q, n)


def supported_types() -> tuple[str, ...]:
    """The weight types emulated: the compiled kernels' where they are built, else the torch form's."""
    from moetrace.kernels.engine import cuda_native

    return cuda_native.TYPES if cuda_native.available() else TYPES


def _impl(type_name: str, kernel: str, device: torch.device, impl: str | None) -> str:
    from moetrace.kernels.engine import cuda_native

    if kernel not in ("mmq", "mmvq"):
        raise FormatError(f"unknown CUDA kernel {kernel!r}; valid: mmq, mmvq")
    if impl not in (None, "c", "torch"):
        raise FormatError(f"unknown implementation {impl!r}; valid: c, torch")
    compiled = cuda_native.available() and type_name in cuda_native.TYPES
    valid = TYPES if impl == "torch" else supported_types()
    if impl is None:
        impl = "c" if compiled and (device.type == "cpu" or type_name not in TYPES) else "torch"
    if impl == "c" and not compiled:
        raise FormatError(f"no compiled llamacpp_cuda_mmq emulation for {type_name} (extension built: "
                          f"{cuda_native.available()}); valid types: {', '.join(cuda_native.TYPES)}")
    if impl == "torch" and type_name not in TYPES:
        raise FormatError(f"no llamacpp_cuda_mmq emulation for {type_name}; valid types: {', '.join(valid)}")
    return impl


def _check(type_name: str, kernel: str) -> None:
    if type_name not in TYPES:
        raise FormatError(f"no torch llamacpp_cuda_mmq emulation for {type_name}; valid types: {', '.join(TYPES)}")
    if kernel not in ("mmq", "mmvq"):
        raise FormatError(f"unknown CUDA kernel {kernel!r}; valid: mmq, mmvq")


# The kernel's sum over 32-blocks of (float scale) x (exact integer dot) is regrouped as one float32
# GEMM of the dequantized q8_1 activations d_a * q_a with the kernel's effective weights (codes times
# the scales it applies to them, formed as it forms them), plus, for Q4_K/Q5_K, a GEMM of the blocks'
# activation sums with the mins. Every product is the kernel's (the effective weights and the
# fp16-scaled activations are exact in float32; D4's float32 d_a rounds once); only the order of the
# float32 additions differs, within the bound the tests assert. Activations and weights are prepared
# separately so that an experts loop quantizes its tokens once and unpacks several experts at a time.


def activations(x: torch.Tensor, type_name: str, kernel: str) -> dict[str, torch.Tensor]:
    """Tokens (T, n) -> ``x`` (T, n) the dequantized q8_1 values, ``s`` (T, n/32) the term the mins multiply
    (MMQ DS4: the fp16 block sums; MMVQ Q4_K/Q5_K: d_a times the sum of the codes, exact; else None).
    Rows are independent: a subset of rows equals the activations of those tokens alone."""
    _check(type_name, kernel)
    a = quantize_q8_1(x.to(torch.float32), kernel, type_name)
    t = x.shape[0]
    out = {"x": (a["qs"] * a["d"][..., None]).reshape(t, -1), "s": None}
    if type_name in _DS4:
        out["s"] = a["s"] if kernel == "mmq" else a["qs"].sum(-1) * a["d"]
    return out


def weights(q: torch.Tensor, type_name: str, n: int, kernel: str) -> dict[str, torch.Tensor]:
    """Weight blocks (R, bytes) -> ``w`` (R, n) the kernel's effective weights and ``m`` (R, n/32) the
    min each block's ``s`` is multiplied with (Q4_K/Q5_K; else None).

    Where the kernel applies the scales in integers or as ggml's float dequantization does (Q8_0
    d*q; Q6_K d*sc*q; Q4_K/Q5_K MMVQ d*sc*q), the effective weights are the bit-exact
    dequantization with the mins left out, exact in float32. MMQ's Q4_K/Q5_K codes are scaled by
    fp16(d*sc), formed in half: here sc*q times fp16(d*sc)/sc, within one float32 rounding of it.
    """
    _check(type_name, kernel)
    rows, nb = q.shape[0], n // 32
    if type_name in ("Q8_0", "Q6_K"):
        return {"w": dequantize(q, type_name, n), "m": None}
    sc, m = _scale_min_k4(q, type_name)  # (R, nb)
    per = LAYOUTS[type_name].elems // 32
    d = _fp16(q, type_name, "d").repeat_interleave(per, dim=1)  # (R, nb)
    dmin = _fp16(q, type_name, "dmin").repeat_interleave(per, dim=1)
    if kernel == "mmvq":  # d*sc*q - dmin*m*(d_a * sum of codes)
        return {"w": dequantize(_patched(q, type_name, {"dmin": _ZERO}), type_name, n), "m": -(dmin * m)}
    scq = dequantize(_patched(q, type_name, {"d": _ONE, "dmin": _ZERO}), type_name, n).reshape(rows, nb, 32)
    a_d = (d.to(torch.float16) * sc.to(torch.float16)).float()  # fp16(d*sc), as load_tiles_q4_K forms it
    eff = scq * (a_d / sc.clamp(min=1))[..., None]  # q * fp16(d*sc); 0 where sc is 0
    return {"w": eff.reshape(rows, n), "m": (-dmin.to(torch.float16) * m.to(torch.float16)).float()}


def apply(a: dict, w: dict) -> torch.Tensor:
    """(T, R) float32 from prepared activations (T tokens) and weights (R rows)."""
    y = a["x"] @ w["w"].T  # (T, R)
    return y if w["m"] is None else y + a["s"] @ w["m"].T
