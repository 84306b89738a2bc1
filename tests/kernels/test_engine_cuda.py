"""llama.cpp's CUDA arithmetic (MMQ/MMVQ integer dots, the F16 cuBLAS fallback) against float64 models.

Each float64 model follows the documented algorithm (kernels/engine/cuda_q8_1.py, hgemm.py) with
its own code: weight codes come from gguf-py's dequantizer (llama.cpp's own Python package) run on
block bytes whose fp16 scales are patched, activations are quantized with numpy. The emulation may
only differ from the model by float32 rounding, bounded by the standard summation bound
(:data:`U32` times the number of float operations times the sum of the magnitudes of the terms).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from moetrace.kernels import quantize
from moetrace.kernels.engine import cuda_q8_1
from moetrace.kernels.engine.hgemm import K_STEP, hgemm

U32 = 2.0 ** -24  # float32 unit roundoff
U16 = 2.0 ** -11  # float16 unit roundoff
# byte offsets of the fp16 fields and the code bytes (ggml's block structs)
FIELDS = {"Q8_0": {"d": 0}, "Q6_K": {"d": 208}, "Q4_K": {"d": 0, "dmin": 2}, "Q5_K": {"d": 0, "dmin": 2}}
BLOCK = {"Q8_0": (32, 34), "Q6_K": (256, 210), "Q4_K": (256, 144), "Q5_K": (256, 176)}


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


def test_hgemm_equals_the_float64_model_of_f16_accumulation():
    """Equal to the model but for the emulation's fp32 sum of a step before its F16 rounding: a step's
    result can land one F16 ulp apart (2 U16 of the running magnitude), so per step at most that."""
    w, x = _data(5, 1000, 0)  # 1000: the last step is partial
    got = hgemm(x, w).double().numpy()
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


def _q8_1_model(x: np.ndarray, kernel: str):
    """numpy q8_1: MMVQ d = amax/127 and q = roundf(x/d); MMQ d_inv = 127/amax, q = roundf(x*d_inv), d = 1/d_inv."""
    b = x.astype(np.float32).reshape(x.shape[0], -1, 32)
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
    return q, d.astype(np.float32), b.astype(np.float64).sum(-1)


@pytest.mark.parametrize("kernel,type_name", [("mmvq", "Q4_K"), ("mmq", "Q4_K"), ("mmq", "Q8_0")])
def test_q8_1_activations_are_the_kernels(kernel, type_name):
    _, x = _data(7, 512, 2)
    got = cuda_q8_1.quantize_q8_1(x, kernel, type_name)
    q, d, s = _q8_1_model(x.numpy(), kernel)
    assert np.array_equal(got["qs"].numpy(), q), f"{int((got['qs'].numpy() != q).sum())} codes differ"
    fp16_d = kernel == "mmvq" or type_name in ("Q4_K", "Q5_K")  # half2(d, sum) layouts
    want_d = d.astype(np.float16).astype(np.float32) if fp16_d else d
    assert np.array_equal(got["d"].numpy(), want_d)
    if fp16_d:  # the fp32 tree sum, rounded to fp16: within one fp16 rounding and the fp32 sum's bound
        s16 = got["s"].numpy().astype(np.float64)
        absum = np.abs(x.numpy().astype(np.float64)).reshape(7, -1, 32).sum(-1)
        assert (np.abs(s16 - s) <= U16 * np.abs(s) * 1.01 + 31 * U32 * absum + 2.0 ** -24).all()


# -- integer dots --------------------------------------------------------------------------------


def _patch(q: np.ndarray, type_name: str, **fields) -> np.ndarray:
    elems, size = BLOCK[type_name]
    b = q.reshape(q.shape[0], -1, size).copy()
    for name, value in fields.items():
        if name in FIELDS[type_name]:
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


def _terms64(x: np.ndarray, q: np.ndarray, type_name: str, kernel: str) -> list[np.ndarray]:
    """The per-32-block float terms (tokens, rows, blocks) of the documented formulas, in float64."""
    rows, n = q.shape[0], x.shape[1]
    per = BLOCK[type_name][0] // 32
    a_q, a_d, a_s = _q8_1_model(x, kernel)
    if kernel == "mmvq" or type_name in ("Q4_K", "Q5_K"):
        a_d = a_d.astype(np.float16)
    a_d = a_d.astype(np.float64)[:, None, :]  # (T, 1, nb)
    a_s16 = a_s.astype(np.float16).astype(np.float64)[:, None, :]
    d = np.repeat(_fp16_field(q, type_name, "d"), per, 1)[None]  # (1, R, nb)
    if type_name in ("Q8_0", "Q6_K"):
        c = _gguf_deq(_patch(q, type_name, d=1.0), type_name).reshape(rows, -1, 32)
        dot = np.einsum("tbj,rbj->trb", a_q, c)
        return [dot * d * a_d]
    scq = _gguf_deq(_patch(q, type_name, d=1.0, dmin=0.0), type_name).reshape(rows, -1, 32)
    qs_at = (16, 144) if type_name == "Q4_K" else (48, 176)
    ones = {"qs": (*qs_at, 0x11)} if type_name == "Q4_K" else {"qs": (*qs_at, 0x11), "qh": (16, 48, 0)}
    sc = _gguf_deq(_patch(q, type_name, d=1.0, dmin=0.0, **ones), type_name).reshape(rows, -1, 32)[..., 0]
    m = -_gguf_deq(_patch(q, type_name, d=0.0, dmin=1.0), type_name).reshape(rows, -1, 32)[..., 0]
    dmin = np.repeat(_fp16_field(q, type_name, "dmin"), per, 1)[None]
    dot_sc = np.einsum("tbj,rbj->trb", a_q, scq)  # sc * (q . q_a), an exact integer
    if kernel == "mmq":
        a_dm = (d[0].astype(np.float16) * sc.astype(np.float16)).astype(np.float64)[None]  # formed in half
        a_mm = (-(dmin[0].astype(np.float16) * m.astype(np.float16))).astype(np.float64)[None]
        return [a_dm * a_d * (dot_sc / np.maximum(sc, 1)[None]), a_mm * a_s16]
    s_int = a_q.sum(-1)[:, None, :]
    return [d * a_d * dot_sc, -(dmin * a_d * s_int * m[None])]


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K", "Q8_0"])
@pytest.mark.parametrize("kernel", ["mmq", "mmvq"])
def test_matmul_equals_the_float64_model_of_the_kernel(type_name, kernel):
    """Within the float32 summation bound of the model's terms: (ops per output) U32 sum |term|."""
    w, x = _data(6, 512, 3)
    q = quantize(w, type_name)
    got = cuda_q8_1.matmul(x, q, type_name, 512, kernel).double().numpy()
    terms = _terms64(x.numpy(), q.numpy(), type_name, kernel)
    want = sum(t.sum(-1) for t in terms)
    ops = 4 * len(terms) * (512 // 32) + 4  # products and additions each term takes on its way into the sum
    bound = ops * U32 * sum(np.abs(t).sum(-1) for t in terms)
    err = np.abs(got - want)
    assert (err <= bound).all(), f"worst {float((err / bound).max()):.2f} x bound"


def test_kernels_differ_where_the_source_says():
    """MMQ's Q4_K scales are formed in half and its Q8_0 activation scale stays float32; MMVQ's does not:
    the two kernels give different results on the same data, as llama.cpp's do."""
    w, x = _data(6, 512, 4)
    for t in ("Q4_K", "Q8_0"):
        q = quantize(w, t)
        assert not torch.equal(cuda_q8_1.matmul(x, q, t, 512, "mmq"), cuda_q8_1.matmul(x, q, t, 512, "mmvq")), t


def test_unsupported_type_is_refused_by_name():
    from moetrace.errors import MoetraceError

    w, x = _data(2, 256, 5)
    with pytest.raises(MoetraceError, match="no llamacpp_cuda_mmq emulation for Q3_K; valid types: Q4_K, Q5_K"):
        cuda_q8_1.matmul(x, quantize(w, "Q3_K"), "Q3_K", 256, "mmq")
