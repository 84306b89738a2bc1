"""llama.cpp's CUDA arithmetic (MMQ/MMVQ integer dots, the F16 cuBLAS fallback) against float64 models.

Each float64 model follows the documented algorithm (kernels/engine/cuda_q8_1.py, engine_cuda.c,
hgemm.py) with its own code: weight codes come from gguf-py's dequantizer (llama.cpp's own Python
package) run on block bytes whose scales are patched, activations are quantized with numpy. The
MMQ/MMVQ arithmetic has two implementations (``torch``: any device, four types; ``c``: the compiled
kernels on the CPU, all types); each may only differ from the model by float32 rounding, bounded
by the standard summation bound (:data:`U32` times the number of float operations times the sum
of the magnitudes of the terms).
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch

from moetrace.kernels import quantize
from moetrace.kernels.engine import cuda_native, cuda_q8_1
from moetrace.kernels.engine.hgemm import K_STEP, hgemm, hgemm_batched

U32 = 2.0 ** -24  # float32 unit roundoff
U16 = 2.0 ** -11  # float16 unit roundoff
# byte offsets of the fp16 fields and the code bytes (ggml's block structs)
FIELDS = {"Q8_0": {"d": 0}, "Q6_K": {"d": 208}, "Q4_K": {"d": 0, "dmin": 2}, "Q5_K": {"d": 0, "dmin": 2},
          "Q4_0": {"d": 0}, "Q5_0": {"d": 0}, "Q4_1": {"d": 0, "m": 2}, "Q5_1": {"d": 0, "m": 2}, "Q3_K": {"d": 108},
          "Q2_K": {"d": 80, "dmin": 82}}
BLOCK = {"Q8_0": (32, 34), "Q6_K": (256, 210), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q4_0": (32, 18),
         "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "MXFP4": (32, 17), "Q3_K": (256, 110),
         "Q2_K": (256, 84)}
DS4 = ("Q4_0", "Q4_1", "Q5_1", "Q4_K", "Q5_K")  # MMQ keeps half2(d, sum) per 32 activations for these
TORCH_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0")
C_ONLY_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4", "Q2_K", "Q3_K")
IMPLS = ("torch", "c")


# The compiled form is skipped only where the user switched the compiled kernels off; an install whose
# extension failed to build fails these tests instead of passing them unchecked.
NATIVE_OFF = os.environ.get("MOETRACE_NATIVE") == "0"


def _need(impl: str) -> None:
    if impl == "c" and NATIVE_OFF:
        pytest.skip("MOETRACE_NATIVE=0: the compiled kernels are switched off")
    if impl == "c":
        assert cuda_native.available(), "the compiled kernels are not built in this install (make install)"


def _data(tokens: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, n, generator=g) * torch.exp(0.5 * torch.randn(24, 1, generator=g))
    x = torch.randn(tokens, n, generator=g) * torch.exp(torch.randn(1, n, generator=g))  # outlier channels
    x[0, :32] = 0  # an all-zero activation block
    return w, x


# -- F16 GEMM ------------------------------------------------------------------------------------


def _hgemm64(x: np.ndarray, w: np.ndarray):
    """Float64 model: F16 inputs, each 16-input step summed exactly, the accumulator rounded to F16 after each."""
    x16, w16 = x.astype(np.float16).astype(np.float64), w.astype(np.float16).astype(np.float64)
    n = x.shape[1]
    acc = np.zeros((x.shape[0], w.shape[0]))
    peak = np.zeros_like(acc)
    for s in range(0, n, K_STEP):
        acc = (acc + x16[:, s:s + K_STEP] @ w16[:, s:s + K_STEP].T).astype(np.float16).astype(np.float64)
        peak = np.maximum(peak, np.abs(acc))
    return acc, peak


@pytest.mark.parametrize("batched", [False, True], ids=["hgemm", "hgemm_batched"])
def test_hgemm_equals_the_float64_model_of_f16_accumulation(batched):
    """Equal to the model but for the emulation's fp32 sum of a step before its F16 rounding: a step's
    result can land one F16 ulp apart (2 U16 of the running magnitude), so per step at most that.
    The batched form (the experts' GEMMs) is held to the same model."""
    w, x = _data(5, 1000, 0)  # 1000: the last step is partial
    got = (hgemm_batched(x[None], w[None])[0] if batched else hgemm(x, w)).double().numpy()
    want, peak = _hgemm64(x.numpy(), w.numpy())
    steps = -(-1000 // K_STEP)
    bound = steps * 2 * U16 * peak
    assert (np.abs(got - want) <= bound).all(), f"worst {float((np.abs(got - want) / bound).max()):.2f} x bound"
    assert np.mean(got == want) > 0.9  # the model, not just something within the bound


def test_hgemm_error_is_that_of_an_f16_accumulator():
    """The F16 accumulator is what cuBLAS's COMPUTE_16F adds: over n = 2048 inputs its error is several
    times that of one F16 rounding of the exact result (fp32 accumulation with an F16 output)."""
    w, x = _data(4, 2048, 1)
    exact = x.half().double() @ w.half().double().T
    acc16 = (hgemm(x, w).double() - exact).abs().mean()
    out16 = (exact.half().double() - exact).abs().mean()
    assert acc16 > 3 * out16, f"F16 accumulation error {acc16:.3g} vs output rounding {out16:.3g}"


# -- q8_1 activations ----------------------------------------------------------------------------


def _roundf(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)  # exact: a float32 value plus 0.5 needs at most 25 bits
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def _tree_sum32(b: np.ndarray, per_thread: int) -> np.ndarray:
    """Sums over the last axis as the kernels reduce them, in float32: ``per_thread`` values added in order by
    each thread, then lane 0 of an xor-shuffle sum over the threads (MMVQ: 1 value, 32 lanes; MMQ DS4: 4 values,
    8 lanes; D2S6: 4 values, 4 lanes)."""
    v = b.astype(np.float32)
    if per_thread == 4:
        v = ((v[..., 0::4] + v[..., 1::4]) + v[..., 2::4]) + v[..., 3::4]
    lanes = v.shape[-1]
    while lanes > 1:  # lane i adds lane i ^ off; lane 0 needs the lower half only
        lanes //= 2
        v = v[..., :lanes] + v[..., lanes:2 * lanes]
    return v[..., 0]


def _q8_1_model(x: np.ndarray, kernel: str, type_name: str = "Q4_K"):
    """numpy q8_1: MMVQ d = amax/127 and q = roundf(x/d); MMQ d_inv = 127/amax, q = roundf(x*d_inv), d = 1/d_inv.

    Returns codes (T, nb, 32), d (T, nb) float32 as the dots read it (fp16-rounded for MMVQ and the half
    layouts) and the fp16-rounded sums s float64: (T, nb), zeros for MMQ's D4 layout; for Q2_K's MMQ
    (layout D2S6: a scale per 64 values, repeated per 32 here) (T, n/16), the first 96 of every 128."""
    d2s6 = kernel == "mmq" and type_name == "Q2_K"
    t = x.shape[0]
    b = x.astype(np.float32).reshape(t, -1, 64 if d2s6 else 32)
    amax = np.abs(b).max(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        if kernel == "mmvq":
            d = amax / np.float32(127)
            q = _roundf(b / d[..., None])
        else:
            d_inv = np.float32(127) / amax
            q = _roundf(b * d_inv[..., None])
            d = np.float32(1) / d_inv
    q[amax == 0] = 0
    d[amax == 0] = 0
    if d2s6:
        s = _tree_sum32(b.reshape(t, -1, 16), 4).astype(np.float16).astype(np.float64)  # (T, n/16)
        s[:, np.arange(s.shape[1]) % 8 >= 6] = 0
        return q.reshape(t, -1, 32), np.repeat(d.astype(np.float16).astype(np.float32), 2, 1), s
    half2 = kernel == "mmvq" or type_name in DS4
    s = _tree_sum32(b, 1 if kernel == "mmvq" else 4).astype(np.float16).astype(np.float64) if half2 \
        else np.zeros(d.shape)
    d = d.astype(np.float16).astype(np.float32) if half2 else d.astype(np.float32)
    return q, d, s


@pytest.mark.parametrize("kernel,type_name,impl", [
    (k, t, i) for k, t in [("mmvq", "Q4_K"), ("mmq", "Q4_K"), ("mmq", "Q8_0"), ("mmq", "Q4_0"), ("mmq", "Q5_0"),
                           ("mmvq", "Q5_1"), ("mmq", "Q2_K")]
    for i in IMPLS if i == "c" or t != "Q2_K"  # the torch form has no Q2_K (the C form computes it on CUDA runs)
])
def test_q8_1_activations_are_the_kernels(kernel, type_name, impl):
    """Codes, scales and block sums bit for bit as the model (the sums in the kernels' shuffle order)."""
    _need(impl)
    if impl == "torch":
        got = {k: v.numpy() for k, v in cuda_q8_1.quantize_q8_1(_data(7, 512, 2)[1], kernel, type_name).items()}
    else:
        got = cuda_native.quantize(_data(7, 512, 2)[1], type_name, kernel)
    q, d, s = _q8_1_model(_data(7, 512, 2)[1].numpy(), kernel, type_name)
    codes = got["qs"].reshape(q.shape).astype(np.float64)
    assert np.array_equal(codes, q), f"{int((codes != q).sum())} codes differ"
    assert np.array_equal(got["d"], d)
    assert np.array_equal(got["s"].astype(np.float64), s), f"{int((got['s'] != s).sum())} block sums differ"


# -- integer dots --------------------------------------------------------------------------------


def _patch(q: np.ndarray, type_name: str, **fields) -> np.ndarray:
    elems, size = BLOCK[type_name]
    b = q.reshape(q.shape[0], -1, size).copy()
    for name, value in fields.items():
        if name in FIELDS.get(type_name, {}):
            off = FIELDS[type_name][name]
            b[..., off:off + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
        else:  # a byte range: (start, stop, byte)
            start, stop, byte = value
            b[..., start:stop] = byte
    return b.reshape(q.shape)


def _gguf_deq(q: np.ndarray, type_name: str) -> np.ndarray:
    return gguf.quants.dequantize(q, gguf.GGMLQuantizationType[type_name]).astype(np.float64)


def _fp16_field(q: np.ndarray, type_name: str, name: str) -> np.ndarray:
    elems, size = BLOCK[type_name]
    off = FIELDS[type_name][name]
    b = q.reshape(q.shape[0], -1, size)
    return np.ascontiguousarray(b[..., off:off + 2]).view(np.float16)[..., 0].astype(np.float64)


def _h(v: np.ndarray) -> np.ndarray:
    """fp16 rounding (__hmul2's product of two halves: exact in float64, rounded once)."""
    return v.astype(np.float16).astype(np.float64)


def _mxfp4_codes_and_scale(q: np.ndarray):
    """MXFP4 (R, n) doubled E2M1 codes (gguf-py's values with the E8M0 byte set to 127, times 2) and (R, nb)
    scales 2**(e - 128)."""
    e = q.reshape(q.shape[0], -1, 17)[..., 0].astype(np.float64)
    codes = 2 * _gguf_deq(_patch(q, "MXFP4", e=(0, 1, 127)), "MXFP4")
    return codes, 2.0 ** (e - 128)


def _terms64(x: np.ndarray, q: np.ndarray, type_name: str, kernel: str, absolute: bool = False) -> list[np.ndarray]:
    """The per-32-block float terms (tokens, rows, blocks) of the documented formulas, in float64;
    ``absolute``: the same with every code, scale and sum taken by magnitude (sum |product| per block)."""
    ab = np.abs if absolute else (lambda v: v)
    rows, n = q.shape[0], x.shape[1]
    per = BLOCK[type_name][0] // 32
    a_q, a_d, a_s16 = _q8_1_model(x, type_name=type_name, kernel=kernel)
    a_d = a_d.astype(np.float64)[:, None, :]  # (T, 1, nb)
    a_s16 = a_s16[:, None, :]

    def dot(codes):  # (T, R, nb): sum over each block of codes times activation codes, exact
        return np.einsum("tbj,rbj->trb", ab(a_q), ab(codes.reshape(rows, -1, 32)))

    if type_name == "MXFP4":
        codes, dx = _mxfp4_codes_and_scale(q)
        return [dot(codes) * dx[None] * a_d]
    if type_name == "Q2_K":
        return _q2k_terms64(q, a_q, a_d, a_s16, kernel, ab)
    d = np.repeat(_fp16_field(q, type_name, "d"), per, 1)[None]  # (1, R, nb)
    if type_name in ("Q8_0", "Q6_K", "Q3_K"):  # codes times their integer scales; d and d_a outside
        return [dot(_gguf_deq(_patch(q, type_name, d=1.0), type_name)) * ab(d) * a_d]
    if type_name in ("Q4_0", "Q5_0"):
        signed = _gguf_deq(_patch(q, type_name, d=1.0), type_name)  # q - 8 (q - 16)
        if kernel == "mmq":  # signed codes
            return [dot(signed) * ab(d) * a_d]
        off = 8 if type_name == "Q4_0" else 16  # unsigned codes, the offset through the block sum
        return [ab(d) * a_d * dot(signed + off), -off * ab(d) * ab(a_s16)]
    if type_name in ("Q4_1", "Q5_1"):
        m = _fp16_field(q, type_name, "m")[None]
        u = dot(_gguf_deq(_patch(q, type_name, d=1.0, m=0.0), type_name))
        if kernel == "mmq":
            return [ab(d) * a_d * u, ab(m) * ab(a_s16)]
        return [u * ab(_h(d * a_d)), ab(_h(m * a_s16))]
    scq = _gguf_deq(_patch(q, type_name, d=1.0, dmin=0.0), type_name).reshape(rows, -1, 32)
    qs_at = (16, 144) if type_name == "Q4_K" else (48, 176)
    ones = {"qs": (*qs_at, 0x11)} if type_name == "Q4_K" else {"qs": (*qs_at, 0x11), "qh": (16, 48, 0)}
    sc = _gguf_deq(_patch(q, type_name, d=1.0, dmin=0.0, **ones), type_name).reshape(rows, -1, 32)[..., 0]
    m = -_gguf_deq(_patch(q, type_name, d=0.0, dmin=1.0), type_name).reshape(rows, -1, 32)[..., 0]
    dmin = np.repeat(_fp16_field(q, type_name, "dmin"), per, 1)[None]
    dot_sc = dot(scq)  # sc * (q . q_a), an exact integer
    if kernel == "mmq":
        a_dm = (d[0].astype(np.float16) * sc.astype(np.float16)).astype(np.float64)[None]  # formed in half
        a_mm = (-(dmin[0].astype(np.float16) * m.astype(np.float16))).astype(np.float64)[None]
        return [a_dm * a_d * (dot_sc / np.maximum(sc, 1)[None]), ab(a_mm) * ab(a_s16)]
    s_int = ab(a_q.sum(-1))[:, None, :]
    return [d * a_d * dot_sc, -(dmin * a_d * s_int * m[None])]


def _q2k_terms64(q, a_q, a_d, a_s16, kernel, ab) -> list[np.ndarray]:
    """Q2_K per 16-value group g of each block: codes times sc_g (gguf-py with d = 1, dmin = 0), sc_g (all codes
    set to 1), m_g (d = 0, dmin = 1); MMVQ d*d_a*sc*C - dmin*d_a*m*S; MMQ d_a*h(d*sc)*C, and the mins
    h(dmin*m) times d_a*S in the last block of every 128 values, times the fp16 sums s_g elsewhere."""
    rows = q.shape[0]
    deq = lambda **f: _gguf_deq(_patch(q, "Q2_K", **f), "Q2_K").reshape(rows, -1, 2, 16)  # noqa: E731
    scq, sc, m = deq(d=1.0, dmin=0.0), deq(d=1.0, dmin=0.0, qs=(16, 80, 0x55))[..., 0], -deq(d=0.0, dmin=1.0)[..., 0]
    d = np.repeat(_fp16_field(q, "Q2_K", "d"), 8, 1)[None, :, :, None]  # (1, R, nb, 1)
    dmin = np.repeat(_fp16_field(q, "Q2_K", "dmin"), 8, 1)[None, :, :, None]
    aq = a_q.reshape(a_q.shape[0], -1, 2, 16)
    dot_sc = np.einsum("tbgj,rbgj->trbg", ab(aq), ab(scq))  # sc * (codes . activation codes), exact
    s_int = ab(aq.sum(-1))[:, None]  # (T, 1, nb, 2)
    a_d = a_d[..., None]  # (T, 1, nb, 1)
    if kernel == "mmvq":
        return [(d * a_d * dot_sc).sum(-1), -(dmin * a_d * s_int * m[None]).sum(-1)]
    h_sc, h_m = _h(d * sc[None]), _h(dmin * m[None])  # (1, R, nb, 2), formed in half
    last = (np.arange(sc.shape[1]) % 4 == 3)[None, None, :, None]
    s16 = a_s16.reshape(a_s16.shape[0], 1, -1, 2)
    mins = np.where(last, a_d * ab(h_m) * s_int, ab(h_m) * ab(s16))
    return [(a_d * h_sc * (dot_sc / np.maximum(sc, 1)[None])).sum(-1), -mins.sum(-1)]


def _bound(x: torch.Tensor, q: torch.Tensor, type_name: str, kernel: str) -> np.ndarray:
    """(T, R): the float32 summation bound around the model: (ops per output) U32 sum |product|, where ops
    counts the n + n/32 additions of the two GEMMs the torch form regroups the kernel's sum into (the
    compiled form's accumulator takes at most two additions per block), plus a few roundings of scales."""
    n = x.shape[1]
    ops = n + n // 32 + 4
    return ops * U32 * sum(np.abs(t).sum(-1) for t in _terms64(x.numpy(), q.numpy(), type_name, kernel, True))


@pytest.mark.parametrize("type_name,impl", [(t, i) for t in TORCH_TYPES for i in IMPLS]
                         + [(t, "c") for t in C_ONLY_TYPES])
@pytest.mark.parametrize("kernel", ["mmq", "mmvq"])
def test_matmul_equals_the_float64_model_of_the_kernel(type_name, kernel, impl):
    """Within the float32 summation bound of the model's products (:func:`_bound`); the kernel's own order has
    the same bound."""
    _need(impl)
    w, x = _data(6, 512, 3)
    q = quantize(w, type_name)
    got = cuda_q8_1.matmul(x, q, type_name, 512, kernel, impl=impl).double().numpy()
    want = sum(t.sum(-1) for t in _terms64(x.numpy(), q.numpy(), type_name, kernel))
    err, bound = np.abs(got - want), _bound(x, q, type_name, kernel)
    assert (err <= bound).all(), f"worst {float((err / bound).max()):.2f} x bound"


@pytest.mark.skipif(NATIVE_OFF, reason="MOETRACE_NATIVE=0: the compiled kernels are switched off")
@pytest.mark.parametrize("type_name", TORCH_TYPES)
def test_compiled_and_torch_forms_differ_by_summation_order_only(type_name):
    """Both form the kernel's products; the torch form adds them in a GEMM's order, the compiled one in the
    kernel's order over blocks: each is within its bound around the model, so they agree within the sum of
    the two bounds, not bit for bit (float32 addition is not associative)."""
    w, x = _data(6, 512, 6)
    q = quantize(w, type_name)
    for kernel in ("mmq", "mmvq"):
        a = cuda_q8_1.matmul(x, q, type_name, 512, kernel, impl="c").double().numpy()
        b = cuda_q8_1.matmul(x, q, type_name, 512, kernel, impl="torch").double().numpy()
        assert (np.abs(a - b) <= 2 * _bound(x, q, type_name, kernel)).all(), kernel


@pytest.mark.parametrize("impl", IMPLS)
def test_kernels_differ_where_the_source_says(impl):
    """MMQ's Q4_K scales are formed in half and its Q8_0 activation scale stays float32; MMVQ's does not:
    the two kernels give different results on the same data, as llama.cpp's do."""
    _need(impl)
    w, x = _data(6, 512, 4)
    for t in ("Q4_K", "Q8_0"):
        q = quantize(w, t)
        mmq = cuda_q8_1.matmul(x, q, t, 512, "mmq", impl=impl)
        assert not torch.equal(mmq, cuda_q8_1.matmul(x, q, t, 512, "mmvq", impl=impl)), t


# The experts' down projection re-quantizes its input to q8_1: where the gate and up outputs of the two forms
# differ in their last bits, a code may round the other way (one step in 127 of its block's maximum), so the
# outputs agree to about that, not to the float32 summation bound.
EXPERTS_FORMS_REL_L2 = 1e-3


@pytest.mark.skipif(NATIVE_OFF, reason="MOETRACE_NATIVE=0: the compiled kernels are switched off")
def test_experts_forward_is_the_same_in_both_forms():
    """The compute path's experts forward (token routing, gate and up, down, slot sums) through the compiled
    kernels and through the torch form (what a CUDA device runs, here on the CPU): the same to EXPERTS_FORMS_REL_L2."""
    import types

    from moetrace.kernels import native
    from moetrace.kernels.compute import BlockWeight
    from moetrace.kernels.compute import llamacpp_cuda_mmq as path

    g = torch.Generator().manual_seed(8)
    experts, hidden, inter, t = 6, 256, 256, 24

    def blocks(rows, cols, type_name):
        w = torch.randn(experts * rows, cols, generator=g)
        return BlockWeight(quantize(w, type_name).numpy().reshape(experts, rows, -1), type_name, (experts, rows, cols))

    mod = types.SimpleNamespace(act_fn=torch.nn.functional.silu, _moetrace_blocks={
        "gate_up_proj": (blocks(inter, hidden, "Q4_K"), blocks(inter, hidden, "Q4_K")),
        "down_proj": blocks(hidden, inter, "Q6_K")})
    x = torch.randn(t, hidden, generator=g)
    idx = torch.stack([torch.randperm(experts, generator=g)[:2] for _ in range(t)])
    wts = torch.rand(t, 2, generator=g)
    compiled = path._experts_forward(mod, x, idx, wts)
    with native.disabled():
        plain = path._experts_forward(mod, x, idx, wts)
    rel = float((compiled - plain).norm() / plain.norm())
    assert rel < EXPERTS_FORMS_REL_L2, rel
    assert plain.abs().sum() > 0


def test_unsupported_type_is_refused_by_name():
    """F16 weights take cuBLAS or MMF in llama.cpp, not the integer kernels; the torch form has four types."""
    from moetrace.errors import MoetraceError

    w, x = _data(2, 256, 5)
    with pytest.raises(MoetraceError, match="no llamacpp_cuda_mmq emulation for F16; valid types: Q4_"):
        cuda_q8_1.matmul(x, torch.zeros(2, 512, dtype=torch.uint8), "F16", 256, "mmq")
    with pytest.raises(MoetraceError, match="no llamacpp_cuda_mmq emulation for Q3_K; valid types: Q4_K, Q5_K"):
        cuda_q8_1.matmul(x, quantize(w, "Q3_K"), "Q3_K", 256, "mmq", impl="torch")
