"""moetrace.kernels.matmul (llama.cpp CPU backend) against ggml's own CPU results, a float64 model of
the documented algorithm, and float32 numpy references of the activation quantizers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrace.kernels import dequantize, matmul, native, quantize
from moetrace.kernels.engine import activations
from moetrace.kernels.errors import FormatError

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "MXFP4"]
VECTORS = Path(os.environ.get("MOETRACE_SHARED", Path(__file__).parents[3] / "shared")) / "ggml-vectors"
U = 2.0 ** -24  # float32 unit roundoff

# ggml's golden y came from a SIMD build (AVX2 vec_dot): the same integer block products and float32
# terms, summed in another order (8-lane vectors, fused multiply-adds). Both orders sum at most
# nb + 8 = 10 float32 terms for rows of 512, so they differ by <= ~10 * 2**-24 * sum|terms| each;
# relative to the largest |y| of the matrix that is below 1e-6 for these inputs (measured: <= 4.3e-7).
SUM_ORDER_REL = 1e-6


def _golden(t):
    f = VECTORS / f"matmul_{t}.npz"
    if not f.exists():
        pytest.skip(f"ggml golden vectors not found at {VECTORS} (set MOETRACE_SHARED)")
    return np.load(f)


@pytest.mark.parametrize("t", TYPES)
def test_matches_ggml_cpu_result(t):
    d = _golden(t)
    assert activations.quantize  # noqa: the vec_dot_type the golden file used is the one we quantize to
    q = quantize(torch.from_numpy(d["w"]), t)
    y = matmul(torch.from_numpy(d["x"]), q, t, 512).numpy()
    err = np.abs(y - d["y"]).max() / np.abs(d["y"]).max()
    assert err <= SUM_ORDER_REL, f"{t}: max |y - ggml| / max |ggml| = {err:.3e} > {SUM_ORDER_REL}"


@pytest.mark.parametrize("t", TYPES)
def test_compiled_and_torch_kernels_agree_bit_for_bit(t):
    if not activations.compiled():
        pytest.skip("compiled engine kernels not built")
    d = _golden(t)
    q = quantize(torch.from_numpy(d["w"]), t)
    x = torch.from_numpy(d["x"])
    a = matmul(x, q, t, 512).numpy()
    with native.disabled():
        b = matmul(x, q, t, 512).numpy()
    diff = a.view(np.uint32) != b.view(np.uint32)
    assert not diff.any(), f"{t}: {int(diff.sum())} of {diff.size} results differ; worst {np.abs(a - b).max()}"


def _act_dequant(xq: torch.Tensor, vdt: str) -> np.ndarray:
    """Activation blocks -> float64 values d * q (exact in float64)."""
    f = activations.fields(xq, vdt)
    return (f["d"].double()[..., None] * f["qs"].double()).reshape(xq.shape[0], -1).numpy()


@settings(max_examples=25, deadline=None)
@given(t=st.sampled_from(TYPES), seed=st.integers(0, 2**31 - 1), tokens=st.integers(1, 5),
       rows=st.integers(1, 6), nsb=st.integers(1, 3), scale=st.sampled_from([1e-3, 1.0, 30.0]))
def test_against_float64_model(t, seed, tokens, rows, nsb, scale):
    """y = sum_j w_j * x^_j in float64, with w ggml's dequantized weight and x^ the dequantized
    activation codes. Bound: the float32 dot rounds each of its <= nb + 9 terms and partial sums once
    or twice, and the dequantized w_j = d*sc*q - dmin*m carries <= 3 roundings relative to the block's
    largest |d*sc*q| + |dmin*m| (<= 2 max|w| of the block), so
    |y - y64| <= (nb + 16) * 2**-24 * sum_j 2 * max_block|w| * |x^_j|."""
    g = torch.Generator().manual_seed(seed)
    n = 256 * nsb
    w = torch.randn(rows, n, generator=g) * scale
    x = torch.randn(tokens, n, generator=g) * torch.exp(torch.randn(1, n, generator=g))  # uneven channels
    q = quantize(w, t)
    y = matmul(x, q, t, n).numpy().astype(np.float64)
    vdt = {"Q4_1": "Q8_1", "Q5_1": "Q8_1"}.get(t, "Q8_K" if t.endswith("_K") else "Q8_0")
    xh = _act_dequant(activations.quantize(x, vdt), vdt)  # (tokens, n)
    wd = dequantize(q, t, n).double().numpy()  # (rows, n)
    y64 = xh @ wd.T
    if vdt == "Q8_1":
        # The documented algorithm applies each block's min m through the activation block's stored
        # s = fp16(d * sum(q)), not through the codes: sum_j (w_j - m) x^_j + m * s.
        m = dequantize(_patched_m_only(q, t), t, n).double().numpy()[:, ::32]  # (rows, nb) = m
        s = activations.fields(activations.quantize(x, vdt), vdt)["s"].double().numpy()  # (tokens, nb)
        y64 = xh @ (wd - np.repeat(m, 32, axis=1)).T + s @ m.T
    blk = 256 if t.endswith("_K") else 32
    wmax = np.repeat(np.abs(wd).reshape(rows, -1, blk).max(-1), blk, axis=1)  # (rows, n)
    tol = (n // 32 + 16) * U * (np.abs(xh) @ (2 * wmax).T) + 1e-30
    assert (np.abs(y - y64) <= tol).all(), f"{t}: worst excess {(np.abs(y - y64) / tol).max():.2f} x tol"


def _patched_m_only(q: torch.Tensor, t: str) -> torch.Tensor:
    """Q4_1/Q5_1 bytes with d = 0: they dequantize to each block's m."""
    b = q.reshape(q.shape[0], -1, {"Q4_1": 20, "Q5_1": 24}[t]).clone()
    b[..., 0:2] = 0
    return b.reshape(q.shape)


@settings(max_examples=15, deadline=None)
@given(t=st.sampled_from(TYPES), seed=st.integers(0, 2**31 - 1))
def test_compiled_and_torch_agree_on_drawn_inputs(t, seed):
    if not activations.compiled():
        pytest.skip("compiled engine kernels not built")
    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(5, 512, generator=g), torch.randn(3, 512, generator=g) * 10
    x[:, 7] = 0.0
    q = quantize(w, t)
    a = matmul(x, q, t, 512)
    with native.disabled():
        b = matmul(x, q, t, 512)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


# -- activation quantizers: float32 numpy references of ggml-quants.c -------------------------


def _np_roundf(v):
    return np.where(v >= 0, np.floor(v + np.float32(0.5)), -np.floor(-v + np.float32(0.5))).astype(np.float32)


def np_q8_1(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_1_ref in float32 numpy, one block at a time."""
    out = []
    for b in x.reshape(-1, 32).astype(np.float32):
        amax = np.float32(np.abs(b).max())
        d = np.float32(amax / np.float32(127))
        idv = np.float32(np.float32(1) / d) if d != 0 else np.float32(0)
        qs = _np_roundf((b * idv).astype(np.float32)).astype(np.int8)
        s = np.float32(np.float32(int(qs.astype(np.int32).sum())) * d)
        out.append(np.concatenate([np.array([d, s], np.float16).view(np.uint8), qs.view(np.uint8)]))
    return np.stack(out)


def np_q8_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_K_ref in float32 numpy, one block at a time (bsums zero for an all-zero block)."""
    out = []
    for b in x.reshape(-1, 256).astype(np.float32):
        i = int(np.argmax(np.abs(b)))  # first index of the largest magnitude, as ggml's strict '>'
        amax, mx = np.abs(b[i]), b[i]
        if amax == 0:
            d, qs = np.float32(0), np.zeros(256, np.int8)
        else:
            iscale = np.float32(np.float32(-127) / mx)
            qs = np.minimum(127, np.rint((iscale * b).astype(np.float32))).astype(np.int8)  # nearest_int: half even
            d = np.float32(np.float32(1) / iscale)
        bs = qs.astype(np.int32).reshape(16, 16).sum(1).astype(np.int16)
        out.append(np.concatenate([np.array([d], np.float32).view(np.uint8), qs.view(np.uint8), bs.view(np.uint8)]))
    return np.stack(out)


def _blocks_equal(got: np.ndarray, want: np.ndarray, what: str):
    bad = (got != want).any(1)
    assert not bad.any(), f"{what}: {int(bad.sum())} of {len(bad)} blocks differ; first {int(np.argmax(bad))}"


def _inputs(seed: int) -> np.ndarray:
    r = np.random.default_rng(seed)
    x = (r.standard_normal((4, 512)) * np.exp(r.standard_normal((1, 512)))).astype(np.float32)
    x[1, :256] = 0.0  # an all-zero block
    x[2, 32:64] = -np.abs(x[2, 32:64])  # a negative max
    x[3, 5] = x[3, 6] = 3.0  # ties
    return x


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("vdt,ref", [("Q8_1", np_q8_1), ("Q8_K", np_q8_k)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_activation_quantizers_bit_exact(vdt, ref, seed, compiled):
    if compiled and not activations.compiled():
        pytest.skip("compiled engine kernels not built")
    x = _inputs(seed)
    want = ref(x)
    if compiled:
        got = activations.quantize(torch.from_numpy(x), vdt).numpy()
    else:
        with native.disabled():
            got = activations.quantize(torch.from_numpy(x), vdt).numpy()
    _blocks_equal(got.reshape(want.shape), want, vdt)


@pytest.mark.parametrize("compiled", [True, False])
def test_q8_0_activations_match_ggml(compiled):
    f = VECTORS / "Q8_0.npz"
    if not f.exists():
        pytest.skip(f"ggml golden vectors not found at {VECTORS} (set MOETRACE_SHARED)")
    d = np.load(f)
    if compiled and not activations.compiled():
        pytest.skip("compiled engine kernels not built")
    x = torch.from_numpy(d["x"])
    if compiled:
        got = activations.quantize(x, "Q8_0").numpy()
    else:
        with native.disabled():
            got = activations.quantize(x, "Q8_0").numpy()
    _blocks_equal(got.reshape(-1, 34), d["q_ref"].reshape(-1, 34), "Q8_0")


@pytest.mark.parametrize("t,dt", [("F16", torch.float16), ("BF16", torch.bfloat16), ("F32", torch.float32)])
def test_float_weights_dot_in_their_own_type(t, dt):
    """ggml converts x to the weight's type for F16/BF16 and sums exact products in double."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(7, 64, generator=g).to(dt), torch.randn(3, 64, generator=g)
    q = w.contiguous().view(torch.uint8).reshape(7, -1)
    y = matmul(x, q, t, 64)
    if t == "F32":
        want = (x[:, None, :] * w[None]).double().sum(-1).float()
    else:
        want = (x.to(dt).double() @ w.double().T).float()
    assert torch.equal(y, want)
    assert t == "F32" or not torch.equal(y, (x @ w.float().T))  # the rounding of x to the weight type shows


def test_errors_are_one_line():
    q = quantize(torch.randn(2, 256), "Q4_K")
    with pytest.raises(FormatError, match="unknown engine path 'gpu'; valid paths: llamacpp_cpu"):
        matmul(torch.randn(1, 256), q, "Q4_K", 256, path="gpu")
    with pytest.raises(FormatError, match=r"matmul takes x of shape \(tokens, 256\)"):
        matmul(torch.randn(1, 128), q, "Q4_K", 256)
    with pytest.raises(FormatError, match="Q4_K rows of 256 elements are 144 bytes"):
        matmul(torch.randn(1, 256), q[:, :100], "Q4_K", 256)
