"""Q2_K, Q4_K, Q5_K: bit-exact with ggml's golden vectors and gguf-py, and round-trip properties.

The golden vectors (``../shared/ggml-vectors/TYPE.npz``) hold ggml's own bytes without and with
an importance matrix and ggml's dequantization of them. Property tests cover inputs the vectors
do not: every scale from fp16-subnormal to fp16-overflowing, constants, zeros, several rows.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from moetrace.kernels import BLOCK_SIZES, dequantize, get_format, quantize
from moetrace.kernels.parallel import MIN_BLOCKS_PER_PART
from drawn import weight_rows
from tolerances import LEVELS, nmse, worst_excess

TYPES = ["Q2_K", "Q4_K", "Q5_K"]
PATHS = ["ref", "imat"]  # ggml's quantize_row_*_ref, and *_impl with the importance matrix

# Data whose fp16 super-block scales cannot overflow: dmin = max_min / 15 (Q2_K) or / 63.
IN_RANGE = {"Q2_K": 65504.0 * 15 / 4, "Q4_K": 65504.0 * 63 / 4, "Q5_K": 65504.0 * 63 / 4}


def _golden(ggml_vectors, type_name):
    with np.load(ggml_vectors / f"{type_name}.npz") as f:
        return {k: f[k] for k in f.files}


def _byte_mismatch(got: np.ndarray, want: np.ndarray, type_size: int, dist: np.ndarray) -> str:
    """Describe where two (rows, row_bytes) uint8 arrays differ: blocks, first and worst row with its label."""
    rows = got.shape[0]
    bad_blocks = (got.reshape(rows, -1, type_size) != want.reshape(rows, -1, type_size)).any(-1)  # (rows, blocks)
    bad_bytes = (got != want).sum(1)
    first = int(np.flatnonzero(bad_bytes)[0])
    worst = int(bad_bytes.argmax())
    col = int(np.flatnonzero(got[first] != want[first])[0])
    return (
        f"{int(bad_blocks.sum())} of {bad_blocks.size} blocks differ in {int((bad_bytes > 0).sum())} rows; "
        f"first row {first} ({dist[first]}) at byte {col}: got {got[first, col]}, want {want[first, col]}; "
        f"worst row {worst} ({dist[worst]}) with {int(bad_bytes[worst])} bytes differing"
    )


def _float_mismatch(got: np.ndarray, want: np.ndarray, dist: np.ndarray | None = None) -> str | None:
    """None when two float32 arrays hold the same bits (NaN matching any NaN), else where they differ."""
    g = got.astype(np.float32).reshape(got.shape[0], -1)
    w = want.astype(np.float32).reshape(got.shape[0], -1)
    both_nan = np.isnan(g) & np.isnan(w)
    bad = (g.view(np.uint32) != w.view(np.uint32)) & ~both_nan
    if not bad.any():
        return None
    per_row = bad.sum(1)
    first, worst = int(np.flatnonzero(per_row)[0]), int(per_row.argmax())
    col = int(np.flatnonzero(bad[first])[0])
    label = (lambda r: f" ({dist[r]})") if dist is not None else (lambda r: "")
    return (
        f"{int(bad.sum())} values differ in {int((per_row > 0).sum())} rows; first row {first}{label(first)} "
        f"col {col}: got {g[first, col]!r}, want {w[first, col]!r}; worst row {worst}{label(worst)} "
        f"with {int(per_row[worst])} differing"
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_matches_ggml(ggml_vectors, type_name, path):
    g = _golden(ggml_vectors, type_name)
    imatrix = torch.from_numpy(g["imatrix"]) if path == "imat" else None
    got = quantize(torch.from_numpy(g["x"]), type_name, imatrix).numpy()
    want = g[f"q_{path}"]
    assert got.shape == want.shape
    if not np.array_equal(got, want):
        pytest.fail(f"{type_name} {path}: " + _byte_mismatch(got, want, BLOCK_SIZES[type_name][1], g["dist"]))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_matches_ggml_and_gguf(ggml_vectors, type_name, path):
    g = _golden(ggml_vectors, type_name)
    q = g[f"q_{path}"]
    ours = dequantize(torch.from_numpy(q), type_name, g["x"].shape[1]).numpy()
    problem = _float_mismatch(ours, g[f"deq_{path}"], g["dist"])
    assert problem is None, f"{type_name} {path} vs ggml: {problem}"
    theirs = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[type_name])
    problem = _float_mismatch(ours, theirs, g["dist"])
    assert problem is None, f"{type_name} {path} vs gguf-py: {problem}"


@pytest.mark.parametrize("type_name", TYPES)
def test_registered_with_q8_k_activations(type_name):
    fmt = get_format(type_name)
    assert fmt.vec_dot_type == "Q8_K"
    assert (fmt.block_size, fmt.type_size) == BLOCK_SIZES[type_name]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("type_name", TYPES)
def test_gaussian_error_within_level(type_name, path):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(8, 2048, generator=gen)
    imatrix = torch.rand(2048, generator=gen) * 9.9 + 0.1 if path == "imat" else None
    y = dequantize(quantize(x, type_name, imatrix), type_name, x.shape[1])
    level = LEVELS[type_name]
    assert nmse(x, y) <= level.nmse, f"{type_name} {path}: nmse {nmse(x, y):.4g} > level {level.nmse}"


# ---- property tests ---------------------------------------------------------------------------

def _gguf_dequantize(q: torch.Tensor, type_name: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # Inf scales of overflowing inputs
        return gguf.quants.dequantize(q.numpy(), gguf.GGMLQuantizationType[type_name])


@pytest.mark.parametrize("type_name", TYPES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=weight_rows())
def test_round_trip_properties(type_name, case):
    kind, x_np, imatrix_np = case
    x = torch.from_numpy(x_np)
    imatrix = None if imatrix_np is None else torch.from_numpy(imatrix_np)
    q = quantize(x, type_name, imatrix)  # must not raise on any finite input
    assert q.dtype == torch.uint8 and tuple(q.shape) == (x.shape[0], x.shape[1] // 256 * BLOCK_SIZES[type_name][1])
    y = dequantize(q, type_name, x.shape[1])

    problem = _float_mismatch(y.numpy(), _gguf_dequantize(q, type_name))
    assert problem is None, f"{type_name} {kind}: ours vs gguf-py dequantize: {problem}"

    if float(x.abs().max()) <= IN_RANGE[type_name]:
        assert torch.isfinite(y).all(), f"{type_name} {kind}: non-finite values from in-range input"
        excess, i = worst_excess(x, y, LEVELS[type_name], imatrix=imatrix is not None)
        assert excess <= 0, (
            f"{type_name} {kind} ({'imatrix' if imatrix is not None else 'ref'}): element {i} "
            f"x={x.reshape(-1)[i].item()!r} y={y.reshape(-1)[i].item()!r} is {excess:.3g} past the level"
        )


@pytest.mark.parametrize("type_name", TYPES)
def test_split_over_threads_gives_the_same_bytes(type_name):
    """Large inputs are quantized in parts on worker threads; the bytes must not depend on it."""
    x = torch.randn(2 * MIN_BLOCKS_PER_PART + 3, 256, generator=torch.Generator().manual_seed(3))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one part, run directly
        want = quantize(x, type_name)
        torch.set_num_threads(2)  # several parts on two worker threads
        got = quantize(x, type_name)
        assert torch.get_num_threads() == 2, "the caller's torch thread count was not restored"
        assert torch.equal(dequantize(got, type_name, 256), dequantize(want, type_name, 256))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, want), _byte_mismatch(got.numpy(), want.numpy(), BLOCK_SIZES[type_name][1],
                                                  np.array(["randn"] * x.shape[0]))


# ---- the exact-arithmetic helpers ---------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("type_name", TYPES)
def test_cuda_bytes_equal_cpu_bytes(ggml_vectors, type_name):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = _golden(ggml_vectors, type_name)
    x = torch.from_numpy(g["x"])
    imatrix = torch.from_numpy(g["imatrix"])
    for im in (None, imatrix):
        want = quantize(x, type_name, im)
        got = quantize(x.cuda(), type_name, None if im is None else im.cuda()).cpu()
        assert torch.equal(got, want), _byte_mismatch(got.numpy(), want.numpy(), BLOCK_SIZES[type_name][1], g["dist"])
        y = dequantize(got.cuda(), type_name, x.shape[1]).cpu().numpy()
        assert _float_mismatch(y, dequantize(want, type_name, x.shape[1]).numpy()) is None
