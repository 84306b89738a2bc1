"""MXFP4 (ggml type 39) against ggml's golden vectors, gguf-py and a float64 statement of the algorithm.

Both paths run: the compiled kernel (kernels/csrc/quant_mxfp4.c) and the torch one (inside
``native.disabled()``). Every comparison is on bits; a mismatch names how many blocks differ and the
first and worst rows.
"""

from __future__ import annotations

import contextlib
import os

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drawn import weight_rows
from moetrace.kernels import dequantize, get_format, native, quantize
from moetrace.kernels.formats_mxfp4 import KVALUES
from tolerances import LEVELS, nmse, worst_excess

T = "MXFP4"
BLOCK, BYTES = 32, 17
BACKENDS = ["native", "torch"]
DRAWN = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def golden(ggml_vectors):
    with np.load(ggml_vectors / "MXFP4.npz") as z:
        return {k: z[k] for k in z.files}


def _backend(name: str):
    if name == "native":
        if not native.has_quantize(T) or os.environ.get("MOETRACE_NATIVE") == "0":
            pytest.skip("the compiled MXFP4 kernel is not built or switched off")
        return contextlib.nullcontext()
    return native.disabled()


def _report(label: str, got: np.ndarray, want: np.ndarray, per_block: int, rows_label=None) -> str:
    """'' when equal bit for bit, else how many blocks differ, the first and the worst row."""
    if got.dtype == np.float32:
        got, want = got.view(np.uint32), want.astype(np.float32).view(np.uint32)
    rows = got.shape[0]
    diff = got.reshape(rows, -1, per_block) != want.reshape(rows, -1, per_block)
    bad = diff.any(-1)  # (rows, blocks)
    if not bad.any():
        return ""
    first, worst = int(np.argmax(bad.any(1))), int(np.argmax(bad.sum(1)))
    name = (lambda r: f" ({rows_label[r]})") if rows_label is not None else (lambda r: "")
    return (f"{label}: {int(bad.sum())} of {bad.size} blocks differ in {int(bad.any(1).sum())} of {rows} rows; "
            f"first row {first}{name(first)}, worst row {worst}{name(worst)} with {int(bad[worst].sum())} blocks")


# -- an independent statement of the algorithm: numpy, float64 -----------------------------------


def float64_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_mxfp4_ref and dequantize_row_mxfp4 in float64 numpy, one expression per step.

    e = floor(log2f(amax)) + 125 with log2f the float32 rounding of the true log2 (0 for amax = 0;
    modulo 256 below 2**-125, as ggml's x86 builds convert); d = 2**(e - 128); each element takes the
    first code of least |kvalues[c] * d - x| (exact in float64; the float32 errors ggml compares rank
    the nearest candidates the same, as their differences are exact).

    Args:
        x: (rows, n) float32.

    Returns:
        ((rows, n / 32 * 17) uint8 bytes, (rows, n) float32 values).
    """
    rows = x.shape[0]
    b = x.reshape(-1, BLOCK).astype(np.float64)  # (B, 32)
    amax = np.abs(b).max(1)
    with np.errstate(divide="ignore"):
        lg = np.floor(np.log2(amax).astype(np.float32).astype(np.float64))
    e = np.where(amax > 0, (np.where(amax > 0, lg, 0).astype(np.int64) + 125) % 256, 0)  # (B,)
    d = np.ldexp(1.0, e - 128)  # (B,)
    kv = np.array(KVALUES, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        codes = np.argmin(np.abs(kv[None, None, :] * d[:, None, None] - b[:, :, None]), -1)  # (B, 32)
    qs = (codes[:, :16] | (codes[:, 16:] << 4)).astype(np.uint8)
    q = np.concatenate([e.astype(np.uint8)[:, None], qs], 1).reshape(rows, -1)
    with np.errstate(over="ignore"):
        y = (kv[codes] * d[:, None]).astype(np.float32).reshape(x.shape)
    return q, y


# -- golden vectors -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["ref", "imat"])
def test_quantize_matches_ggml(golden, path, backend):
    """All 88 rows; with the importance matrix too, which ggml ignores for MXFP4 (q_imat = q_ref)."""
    imatrix = torch.from_numpy(golden["imatrix"]) if path == "imat" else None
    with _backend(backend):
        got = quantize(torch.from_numpy(golden["x"]), T, imatrix).numpy()
    want = golden[f"q_{path}"]
    assert got.shape == want.shape == (88, 512 // BLOCK * BYTES)
    assert np.array_equal(got, want), _report(f"{path} {backend}", got, want, BYTES, golden["dist"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dequantize_matches_ggml_and_gguf_py(golden, backend):
    q = golden["q_ref"]
    with _backend(backend):
        got = dequantize(torch.from_numpy(q), T, 512).numpy()
    for who, want in (("ggml", golden["deq_ref"]), ("gguf-py", gguf.quants.dequantize(q, gguf.GGMLQuantizationType.MXFP4))):
        report = _report(f"{backend} vs {who}", got, want, BLOCK, golden["dist"])
        assert not report, report


def test_float64_reference_matches_ggml(golden):
    """The reference the drawn inputs are checked against reproduces ggml itself."""
    q, y = float64_reference(golden["x"])
    assert np.array_equal(q, golden["q_ref"]), _report("float64 ref", q, golden["q_ref"], BYTES, golden["dist"])
    assert not _report("float64 deq", y, golden["deq_ref"], BLOCK)


def test_gguf_py_quantizer_matches_ggml(golden):
    """gguf-py's numpy MXFP4 quantizer agrees on the golden rows (it serves as a second reference below)."""
    theirs = gguf.quants.quantize(golden["x"], gguf.GGMLQuantizationType.MXFP4)
    assert np.array_equal(theirs, golden["q_ref"]), _report("gguf-py", theirs, golden["q_ref"], BYTES, golden["dist"])


# -- drawn inputs ---------------------------------------------------------------------------------


@DRAWN
@given(case=weight_rows(BLOCK, max_rows=4))
def test_drawn_inputs_bit_exact(case):
    """Compiled and torch bytes and values equal each other and the float64 reference, on every kind of input
    (subnormals, the float32 edge, zeros, constants, outliers ...), and gguf-py's where its numpy code is
    defined (it converts negative exponents to uint8 in an unspecified way: rows with amax < 2**-125 are left
    out of that comparison)."""
    kind, x, imatrix = case
    xt = torch.from_numpy(x)
    want_q, want_y = float64_reference(x)
    for backend in BACKENDS:
        if backend == "native" and not native.has_quantize(T):
            continue
        with _backend(backend):
            q = quantize(xt, T, None if imatrix is None else torch.from_numpy(imatrix)).numpy()
            y = dequantize(torch.from_numpy(q), T, x.shape[1]).numpy()
        assert np.array_equal(q, want_q), _report(f"{kind} {backend} bytes", q, want_q, BYTES)
        assert not _report(f"{kind} {backend} values", y, want_y, BLOCK)
    amax = np.abs(x.reshape(-1, BLOCK)).max(1)
    ok = ~((amax > 0) & (amax < 2.0**-125)).reshape(x.shape[0], -1).any(1)  # rows gguf-py defines
    if ok.any():
        with np.errstate(all="ignore"):
            theirs = gguf.quants.quantize(x[ok], gguf.GGMLQuantizationType.MXFP4)
        assert np.array_equal(want_q[ok], theirs), _report(f"{kind} gguf-py", want_q[ok], theirs, BYTES)


def test_amax_next_to_every_power_of_two():
    """The exponent is floorf(log2f(amax)): just below 2**k the float32 log2 rounds up to k (for up to ~44
    float32 steps when |k| is large), so the byte depends on that rounding. amax from 64 steps below to 64
    above every power of two from 2**-149 to 2**127: the compiled kernel's bytes and the torch exponent
    against the float64 statement."""
    from moetrace.kernels.formats_mxfp4 import shared_exponent

    bits = np.ldexp(np.float32(1), np.arange(-149, 128)).astype(np.float32).view(np.uint32).astype(np.int64)
    near = (bits[:, None] + np.arange(-64, 65)[None, :]).reshape(-1)  # float32 steps around each power
    amax = near[(near > 0) & (near < 0x7F800000)].astype(np.uint32).view(np.float32)  # (n,)
    with np.errstate(divide="ignore"):
        want = (np.floor(np.log2(amax.astype(np.float64)).astype(np.float32)).astype(np.int64) + 125) % 256
    got = shared_exponent(torch.from_numpy(amax)).numpy()
    assert np.array_equal(got, want), f"torch: {int((got != want).sum())} of {len(want)} exponents differ"
    if native.has_quantize(T):
        x = np.repeat((amax / np.float32(3))[:, None], BLOCK, 1)
        x[:, 7] = amax
        x[::2, 7] = -amax[::2]
        q = quantize(torch.from_numpy(x), T).numpy()
        assert np.array_equal(q[:, 0], want), f"native: {int((q[:, 0] != want).sum())} of {len(want)} differ"


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_code_decodes_as_gguf_py(backend):
    """All 256 exponent bytes with every code in both nibbles decode as gguf-py decodes them."""
    q = np.zeros((256, BYTES), np.uint8)
    q[:, 0] = np.arange(256)
    q[:, 1:] = (np.arange(16) | (np.arange(15, -1, -1) << 4)).astype(np.uint8)
    with _backend(backend):
        got = dequantize(torch.from_numpy(q), T, BLOCK).numpy()
    with np.errstate(over="ignore"):
        theirs = gguf.quants.dequantize(q.reshape(1, -1), gguf.GGMLQuantizationType.MXFP4).reshape(256, BLOCK)
    assert not _report(f"{backend} codes", got, theirs, BLOCK)


# -- error level ----------------------------------------------------------------------------------


def test_gaussian_error_within_level():
    x = torch.randn(8, 2048, generator=torch.Generator().manual_seed(7))
    y = dequantize(quantize(x, T), T, x.shape[1])
    assert nmse(x, y) <= LEVELS[T].nmse, f"nmse {nmse(x, y):.4g} > level {LEVELS[T].nmse}"


@DRAWN
@given(case=weight_rows(BLOCK, max_rows=3))
def test_round_trip_within_level(case):
    kind, x, _ = case
    xt = torch.from_numpy(x)
    y = dequantize(quantize(xt, T), T, x.shape[1])
    assert torch.isfinite(y).all(), f"{kind}: non-finite values from finite input"
    excess, i = worst_excess(xt, y, LEVELS[T])
    assert excess <= 0, f"{kind}: element {i} x={x.reshape(-1)[i]!r} y={y.reshape(-1)[i].item()!r} {excess:.3g} past"


@pytest.mark.skipif(os.environ.get("MOETRACE_NATIVE") == "0", reason="MOETRACE_NATIVE=0: the compiled kernels are off")
def test_compiled_kernels_built():
    assert native.has_quantize(T) and native.has_dequantize(T), f"no compiled MXFP4 kernels: {native._KERNELS}"


def test_format_registered_with_its_vec_dot_type():
    fmt = get_format("mxfp4")
    assert (fmt.name, fmt.block_size, fmt.type_size, fmt.vec_dot_type) == (T, BLOCK, BYTES, "Q8_0")
    assert fmt.ggml_type == gguf.GGMLQuantizationType.MXFP4 == 39


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_refused(backend):
    from moetrace.kernels import FormatError

    x = torch.randn(4, 64)
    x[3, 63] = float("nan")
    with _backend(backend), pytest.raises(FormatError, match="MXFP4: the tensor holds NaN or Inf"):
        quantize(x, T)


def test_ocp_layout_of_gpt_oss_checkpoints_dequantizes_as_transformers_does():
    """from_ocp repacks GPT-OSS's *_blocks/*_scales into ggml blocks; they dequantize exactly to transformers'
    own conversion (integrations/mxfp4.py, float32), scales 0..254 and every code. The one difference is
    the sign of a zero: code 8 is -0.0 in transformers' table, +0 (the integer kvalue 0) in ggml's."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from moetrace.kernels.formats_mxfp4 import from_ocp

    g = torch.Generator().manual_seed(0)
    experts, rows, groups = 3, 85, 4  # 3 * 85 * 4 = 1020 blocks: every scale 0..254 four times
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), dtype=torch.uint8, generator=g)
    scales = (torch.arange(experts * rows * groups) % 255).to(torch.uint8).reshape(experts, rows, groups)
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)  # (E, rows, 128)
    q = from_ocp(blocks, scales)  # (E, rows, 4 * 17)
    got = dequantize(q.reshape(-1, groups * BYTES), T, groups * BLOCK).reshape(experts, rows, -1)
    want = want.contiguous()
    assert torch.equal(got, want)  # as values
    bits_differ = got.view(torch.int32) != want.view(torch.int32)
    assert bits_differ.any() and (want[bits_differ] == 0).all() and (got[bits_differ].view(torch.int32) == 0).all()
