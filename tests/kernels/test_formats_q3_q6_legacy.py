"""Bit-exactness of Q3_K, Q6_K, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 against ggml's golden vectors and gguf-py.

The vectors (``../shared/ggml-vectors/TYPE.npz``) hold 88 rows of 512 values from 11 distributions and
ggml's own bytes and values, with and without an importance matrix. Every comparison is on bits; a
mismatch names how many blocks differ, the first and the worst row and their distributions.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from moetrace.errors import InternalError
from moetrace.kernels import dequantize, get_format, quantize

TYPES = ["Q3_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
PATHS = ["ref", "imat"]


@pytest.fixture(scope="module")
def vectors(ggml_vectors):
    cache: dict[str, dict[str, np.ndarray]] = {}

    def load(type_name: str) -> dict[str, np.ndarray]:
        if type_name not in cache:
            with np.load(ggml_vectors / f"{type_name}.npz") as z:
                cache[type_name] = {k: z[k] for k in z.files}
        return cache[type_name]

    return load


def mismatch_report(label: str, got: np.ndarray, want: np.ndarray, dist: np.ndarray, per_block: int) -> str:
    """'' when ``got`` equals ``want`` bit for bit, else a sentence naming the differing blocks.

    Args:
        got, want: (rows, k * per_block) arrays (bytes, or float32 compared as bits).
        dist: (rows,) distribution label of each row.
        per_block: entries per block (bytes per block, or elements per block).
    """
    if got.dtype == np.float32:
        got, want = got.view(np.uint32), want.view(np.uint32)
    rows = got.shape[0]
    diff = got.reshape(rows, -1, per_block) != want.reshape(rows, -1, per_block)  # (rows, blocks, per_block)
    bad_blocks = diff.any(-1)  # (rows, blocks)
    if not bad_blocks.any():
        return ""
    per_row = diff.sum((1, 2))
    first = int(np.argmax(bad_blocks.any(1)))
    worst = int(np.argmax(per_row))
    return (
        f"{label}: {int(bad_blocks.sum())} of {bad_blocks.size} blocks differ, in {int(bad_blocks.any(1).sum())} "
        f"of {rows} rows; first row {first} ({dist[first]}), worst row {worst} ({dist[worst]}, "
        f"{int(per_row[worst])} entries differ in {int(bad_blocks[worst].sum())} blocks)"
    )


def quantize_rows(x: torch.Tensor, type_name: str, imatrix: torch.Tensor | None) -> torch.Tensor:
    """``kernels.quantize``, passing the row length to formats whose imatrix path needs it.

    The legacy imatrix paths use a per-row statistic; until ``base.quantize`` passes the row length
    (see test_public_quantize_legacy_imatrix), call the format the way base.quantize would.
    """
    fmt = get_format(type_name)
    if imatrix is None or not getattr(fmt, "needs_row_length", False):
        return quantize(x, type_name, imatrix)
    rows, n = x.shape
    qw = imatrix.reshape(1, n).expand(rows, n).reshape(-1, fmt.block_size)
    q = fmt.quantize_blocks(x.reshape(-1, fmt.block_size), qw, n_per_row=n)
    return q.reshape(rows, -1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_matches_ggml(vectors, type_name, path):
    v = vectors(type_name)
    imatrix = torch.from_numpy(v["imatrix"]) if path == "imat" else None
    got = quantize_rows(torch.from_numpy(v["x"]), type_name, imatrix).numpy()
    want = v[f"q_{path}"]
    assert got.shape == want.shape
    fmt = get_format(type_name)
    report = mismatch_report(f"{type_name} {path} bytes", got, want, v["dist"], fmt.type_size)
    assert not report, report


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_matches_ggml_and_gguf_py(vectors, type_name, path):
    v = vectors(type_name)
    q = v[f"q_{path}"]
    got = dequantize(torch.from_numpy(q), type_name, v["x"].shape[1]).numpy()
    block = get_format(type_name).block_size
    report = mismatch_report(f"{type_name} {path} values vs ggml", got, v[f"deq_{path}"], v["dist"], block)
    assert not report, report
    theirs = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[type_name]).astype(np.float32)
    report = mismatch_report(f"{type_name} {path} values vs gguf-py", got, theirs, v["dist"], block)
    assert not report, report


def _fp16_fields(type_name: str) -> list[int]:
    """Byte offsets of the fp16 scale fields (d, and m where there is one) in a legacy block."""
    return [0, 2] if type_name in ("Q4_1", "Q5_1") else [0]


@pytest.mark.parametrize("type_name", LEGACY)
def test_quantize_matches_gguf_py(vectors, type_name):
    """gguf-py's numpy quantizers agree with ours except on signed zeros, where ours follow ggml.

    gguf-py picks max/min with numpy reductions, so a block of +-0.0 (or one whose minimum is
    zero) can get d or m of the other zero sign than ggml's first-element-wins loops.
    """
    v = vectors(type_name)
    fmt = get_format(type_name)
    ours = quantize(torch.from_numpy(v["x"]), type_name).numpy().reshape(-1, fmt.type_size)
    theirs = gguf.quants.quantize(v["x"], gguf.GGMLQuantizationType[type_name]).reshape(-1, fmt.type_size)
    ggml = v["q_ref"].reshape(-1, fmt.type_size)
    differ = (ours != theirs).any(1)
    assert not (differ & (theirs == ggml).all(1)).any(), "ours differs from gguf-py where gguf-py matches ggml"
    zero_sign_only = np.zeros_like(differ)
    for off in _fp16_fields(type_name):
        field_o = ours[:, off:off + 2].copy().view(np.uint16)[:, 0]
        field_t = theirs[:, off:off + 2].copy().view(np.uint16)[:, 0]
        zero_sign_only |= (field_o | field_t) == 0x8000  # one is +0.0, the other -0.0
    rest = np.ones(fmt.type_size, dtype=bool)
    for off in _fp16_fields(type_name):
        rest[off:off + 2] = False
    unexplained = differ & ~(zero_sign_only & (ours[:, rest] == theirs[:, rest]).all(1))
    assert not unexplained.any(), f"{int(unexplained.sum())} blocks differ from gguf-py beyond a zero's sign"


@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_1"])
def test_public_quantize_legacy_imatrix(vectors, type_name):
    v = vectors(type_name)
    got = quantize(torch.from_numpy(v["x"]), type_name, torch.from_numpy(v["imatrix"])).numpy()
    report = mismatch_report(f"{type_name} imat bytes", got, v["q_imat"], v["dist"], get_format(type_name).type_size)
    assert not report, report


def test_q8_0_ignores_imatrix(vectors):
    v = vectors("Q8_0")
    x = torch.from_numpy(v["x"])
    assert torch.equal(quantize(x, "Q8_0", torch.from_numpy(v["imatrix"])), quantize(x, "Q8_0"))


@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_random_bytes_matches_gguf_py(type_name):
    """Every bit pattern of codes and scales decodes as gguf-py decodes it (fp16 fields kept finite)."""
    fmt = get_format(type_name)
    rng = np.random.default_rng(7)
    q = rng.integers(0, 256, size=(64, fmt.type_size), dtype=np.uint8)
    halves = (rng.standard_normal(64 * 2) * 0.01).astype(np.float16).view(np.uint8).reshape(64, 2, 2)
    offsets = {"Q3_K": [108], "Q6_K": [208], "Q4_1": [0, 2], "Q5_1": [0, 2]}.get(type_name, [0])
    for i, off in enumerate(offsets):
        q[:, off:off + 2] = halves[:, i]
    got = fmt.dequantize_blocks(torch.from_numpy(q)).numpy()
    theirs = gguf.quants.dequantize(q.reshape(1, -1), gguf.GGMLQuantizationType[type_name]).reshape(64, -1)
    assert np.array_equal(got.view(np.uint32), theirs.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("type_name", TYPES)
def test_non_contiguous_and_cast_inputs(vectors, type_name):
    """A strided view and a float64 copy quantize exactly like the contiguous float32 rows."""
    v = vectors(type_name)
    x = torch.from_numpy(v["x"][:8])
    wide = torch.zeros(8, 2 * x.shape[1], dtype=torch.float64)
    wide[:, ::2] = x.double()
    assert torch.equal(quantize(wide[:, ::2], type_name), quantize(x, type_name))
