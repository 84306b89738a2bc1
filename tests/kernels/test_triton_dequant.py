"""Triton dequantization kernels against gguf-py's numpy dequantize, bit for bit.

On the CPU the kernels run in Triton's interpreter. ``triton.jit`` picks the interpreter when a
kernel is *defined* and reads TRITON_INTERPRET at that moment, so this module loads a private copy
of ``moetrace.kernels.triton_dequant`` with TRITON_INTERPRET=1 set only while that copy is
executed: other tests (and the real module, which GPU tests use) are unaffected.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
import gguf  # noqa: E402

from moetrace.errors import MoetraceError  # noqa: E402
from moetrace.kernels import FormatError  # noqa: E402

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "MXFP4"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _load_interpreted():
    origin = importlib.util.find_spec("moetrace.kernels.triton_dequant").origin
    spec = importlib.util.spec_from_file_location("moetrace.kernels._triton_dequant_interpreted", origin)
    mod = importlib.util.module_from_spec(spec)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec.loader.exec_module(mod)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return mod


@pytest.fixture(scope="module")
def td():
    """The kernels module with every kernel defined for the interpreter (CPU tensors)."""
    return _load_interpreted()


def _reference(q: np.ndarray, type_name: str, dtype) -> torch.Tensor:
    ref = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[type_name])  # float32, the independent reference
    return torch.from_numpy(np.ascontiguousarray(ref)).to(dtype)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, block: int, what: str):
    """Bit-exact, NaN matching NaN; on a mismatch say how many blocks differ and show the worst."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    g, w = got.float(), want.float()
    same = (got.view(_BITS[got.dtype]) == want.view(_BITS[want.dtype])) | (torch.isnan(g) & torch.isnan(w))
    if bool(same.all()):
        return
    bad = (~same).reshape(-1, block).any(dim=1)
    err = (g - w).abs().nan_to_num(float("inf")).reshape(-1, block).amax(dim=1)
    worst = int(err.argmax())
    gw, ww = g.reshape(-1, block)[worst], w.reshape(-1, block)[worst]
    i = int((gw - ww).abs().nan_to_num(float("inf")).argmax())
    raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} blocks differ; worst block {worst}, "
                         f"element {i}: got {gw[i].item()!r}, want {ww[i].item()!r}")


def _golden(ggml_vectors, type_name, key="q_ref", rows=None):
    q = np.load(ggml_vectors / f"{type_name}.npz")[key]  # (88, bytes per row of 512)
    return np.ascontiguousarray(q if rows is None else q[:rows])


@pytest.mark.parametrize("type_name", TYPES)
def test_golden_blocks_float32(td, ggml_vectors, type_name):
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]
    for key in ("q_ref", "q_imat"):
        q = _golden(ggml_vectors, type_name, key)
        got = td.dequantize_triton(torch.from_numpy(q), type_name, 512)
        assert_bits_equal(got, _reference(q, type_name, torch.float32), block, f"{type_name} {key}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("type_name", TYPES)
def test_golden_blocks_half(td, ggml_vectors, type_name, dtype):
    # 16 rows: every distribution of the golden set appears in the first rows of at least one type.
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]
    q = _golden(ggml_vectors, type_name, rows=16)
    got = td.dequantize_triton(torch.from_numpy(q), type_name, 512, dtype)
    assert_bits_equal(got, _reference(q, type_name, dtype), block, f"{type_name} {dtype}")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN/Inf scales, on purpose
@pytest.mark.parametrize("type_name", TYPES)
def test_random_bytes_with_tail_and_3d(td, type_name):
    # Arbitrary block bytes (fp16 fields may be Inf/NaN), a 3-D (experts, rows, bytes) shape and a
    # block count that leaves the last program partly masked.
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    n_per_row = 2 * 256
    rng = np.random.default_rng(list(gguf.GGMLQuantizationType).index(gguf.GGMLQuantizationType[type_name]))
    q = rng.integers(0, 256, (3, 1, n_per_row // block * size), dtype=np.uint8)
    for dtype in (torch.float32, torch.bfloat16):
        got = td.dequantize_triton(torch.from_numpy(q), type_name, n_per_row, dtype, blocks_per_program=4)
        want = _reference(q.reshape(3, -1), type_name, dtype).reshape(3, 1, n_per_row)
        assert_bits_equal(got, want, block, f"{type_name} random {dtype}")


@pytest.mark.parametrize("type_name", TYPES)
def test_kernels_take_every_offset_from_the_layout(td, ggml_vectors, type_name):
    # The kernels read block sizes and field offsets only from their constexpr arguments (which the
    # wrapper computes from kernels/layouts.py): repack golden blocks with the fields in reverse order,
    # launch with that layout's offsets, and the values must not change. A literal offset left in a
    # kernel would read the wrong bytes here.
    from moetrace.kernels.layouts import LAYOUTS

    lay = LAYOUTS[type_name]
    kernel, _, args = td._KERNELS[type_name]
    assert kernel.arg_names[5:] == list(args), f"{type_name} kernel parameters vs the table: {kernel.arg_names}"
    q = _golden(ggml_vectors, type_name, rows=8)
    blocks = q.reshape(-1, lay.bytes)
    rev = [name for name, _ in reversed(lay.fields)]
    packed = np.ascontiguousarray(np.concatenate([blocks[:, lay.span(name)] for name in rev], axis=1))
    alt = dict(args)
    off = 0
    for name in rev:
        alt[f"O_{name.upper()}"] = off
        off += lay.size(name)
    moved = [k for k in args if k.startswith("O_") and alt[k] == args[k]]
    assert not moved, f"reversing {type_name}'s fields leaves {moved} in place; the test would not see them"
    n_blocks = blocks.shape[0]
    out = torch.empty(n_blocks * lay.elems, dtype=torch.float32)
    kernel[(n_blocks // 4,)](torch.from_numpy(packed), out, n_blocks, BLOCKS=4, OUT=0, **alt)
    assert_bits_equal(out.reshape(q.shape[0], -1), _reference(q, type_name, torch.float32), lay.elems,
                      f"{type_name} fields reversed")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_bf16_rounding_ties_and_nan(td):
    # Q8_0 values q * d chosen to land exactly halfway between bf16 numbers, plus NaN and Inf scales.
    d = np.float16([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, np.inf, np.nan]).view(np.uint8).reshape(4, 2)
    qs = np.tile(np.arange(-16, 16, dtype=np.int8).view(np.uint8), (4, 1))
    q = np.ascontiguousarray(np.concatenate([d, qs], axis=1))  # 4 blocks of 34 bytes
    got = td.dequantize_triton(torch.from_numpy(q), "Q8_0", 32, torch.bfloat16)
    assert_bits_equal(got, _reference(q, "Q8_0", torch.bfloat16), 32, "Q8_0 ties")
    assert got.view(torch.int16)[3, 0].item() == 0x7FC0  # NaN -> canonical quiet NaN, as torch writes it


def test_empty_input(td):
    out = td.dequantize_triton(torch.empty(0, 144, dtype=torch.uint8), "Q4_K", 256, torch.bfloat16)
    assert out.shape == (0, 256) and out.dtype == torch.bfloat16


def test_errors(td):
    q = torch.zeros(2, 144, dtype=torch.uint8)
    with pytest.raises(FormatError, match="no Triton kernel for GGML type 'IQ4_NL'; valid types: Q4_0"):
        td.dequantize_triton(q, "IQ4_NL", 256)
    with pytest.raises(FormatError, match="144 uint8 bytes; got a torch.uint8 tensor of shape \\(2, 143\\)"):
        td.dequantize_triton(q[:, :143], "Q4_K", 256)
    with pytest.raises(FormatError, match="got a torch.int8"):
        td.dequantize_triton(q.view(torch.int8), "Q4_K", 256)
    with pytest.raises(FormatError, match="does not split into Q4_K blocks"):
        td.dequantize_triton(q, "Q4_K", 100)
    with pytest.raises(MoetraceError, match="float32, float16 or bfloat16"):
        td.dequantize_triton(q, "Q4_K", 256, torch.float64)
    with pytest.raises(MoetraceError, match="power of two"):
        td.dequantize_triton(q, "Q4_K", 256, blocks_per_program=3)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the compiled module is interpreted here")
def test_compiled_module_wants_cuda():
    from moetrace.kernels import triton_dequant

    with pytest.raises(MoetraceError, match="needs a CUDA tensor, q is on cpu.*TRITON_INTERPRET=1"):
        triton_dequant.dequantize_triton(torch.zeros(1, 144, dtype=torch.uint8), "Q4_K", 256)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("type_name", TYPES)
def test_gpu_golden_all_dtypes(ggml_vectors, type_name):
    from moetrace.kernels import triton_dequant

    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]
    for key in ("q_ref", "q_imat"):
        q = _golden(ggml_vectors, type_name, key)
        for dtype in DTYPES:
            got = triton_dequant.dequantize_triton(torch.from_numpy(q).cuda(), type_name, 512, dtype).cpu()
            assert_bits_equal(got, _reference(q, type_name, dtype), block, f"GPU {type_name} {key} {dtype}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("type_name", TYPES)
def test_gpu_large_random(type_name):
    # 4 M elements of arbitrary block bytes: many programs, large offsets, NaN/Inf scales.
    from moetrace.kernels import triton_dequant

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    rows, n = 1024, 4096
    q = np.random.default_rng(1).integers(0, 256, (rows, n // block * size), dtype=np.uint8)
    for dtype in DTYPES:
        got = triton_dequant.dequantize_triton(torch.from_numpy(q).cuda(), type_name, n, dtype).cpu()
        assert_bits_equal(got, _reference(q, type_name, dtype), block, f"GPU {type_name} random {dtype}")
