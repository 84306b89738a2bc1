"""The compiled (C) kernels: bit-exact with ggml's golden vectors, gguf-py, and moetrace's torch kernels.

moetrace.kernels.quantize/dequantize run the C kernels for CPU tensors whenever they were built;
these tests check both paths against ggml's own bytes (the torch path inside native.disabled()),
then draw inputs the golden vectors do not cover (fp16-edge scales, subnormals, constants, zeros,
sparse rows, outliers, several shapes) and require the two paths to agree byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drawn import weight_rows
from moetrace.kernels import BLOCK_SIZES, dequantize, native, quantize

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
PATHS = ["ref", "imat"]

pytestmark = pytest.mark.skipif(
    os.environ.get("MOETRACE_NATIVE") == "0", reason="MOETRACE_NATIVE=0: the compiled kernels are switched off"
)


def _golden(ggml_vectors, type_name):
    with np.load(ggml_vectors / f"{type_name}.npz") as f:
        return {k: f[k] for k in f.files}


def _where(got: np.ndarray, want: np.ndarray) -> str:
    bad = np.argwhere(got != want)
    r, c = bad[0]
    return f"{len(bad)} of {got.size} entries differ; first at row {r} col {c}: got {got[r, c]!r}, want {want[r, c]!r}"


def test_extension_built_with_every_kernel():
    assert native.built(), "moetrace.kernels._ckernels is not built (pip install -e . needs a C compiler)"
    missing = [t for t in TYPES if not (native.has_quantize(t) and native.has_dequantize(t))]
    assert not missing, f"no compiled kernels for {missing}: {native._KERNELS}"


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_matches_ggml(ggml_vectors, type_name, path, backend):
    g = _golden(ggml_vectors, type_name)
    imatrix = torch.from_numpy(g["imatrix"]) if path == "imat" else None
    x = torch.from_numpy(g["x"])
    if backend == "native":
        assert native.has_quantize(type_name)
        got = quantize(x, type_name, imatrix).numpy()
    else:
        with native.disabled():
            got = quantize(x, type_name, imatrix).numpy()
    want = g[f"q_{path}"]
    assert got.shape == want.shape
    assert np.array_equal(got, want), f"{type_name} {path} {backend}: " + _where(got, want)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_matches_ggml_and_gguf(ggml_vectors, type_name, path):
    assert native.has_dequantize(type_name)
    g = _golden(ggml_vectors, type_name)
    q = g[f"q_{path}"]
    ours = dequantize(torch.from_numpy(q), type_name, g["x"].shape[1]).numpy()
    for name, want in (("ggml", g[f"deq_{path}"]), ("gguf-py", gguf.quants.dequantize(q, gguf.GGMLQuantizationType[type_name]))):
        assert np.array_equal(ours.view(np.uint32), want.astype(np.float32).view(np.uint32)), (
            f"{type_name} {path} vs {name}: " + _where(ours.view(np.uint32), want.astype(np.float32).view(np.uint32))
        )


@pytest.mark.parametrize("type_name", TYPES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_native_equals_torch_on_drawn_inputs(type_name, data):
    """Same bytes from both paths, and the same floats back, on inputs across the float range."""
    block = BLOCK_SIZES[type_name][0]
    kind, x, imatrix = data.draw(weight_rows(block, max_rows=5, zero_weights=True))
    xt = torch.from_numpy(x)
    it = None if imatrix is None else torch.from_numpy(imatrix)
    got = quantize(xt, type_name, it)
    with native.disabled():
        want = quantize(xt, type_name, it)
    assert np.array_equal(got.numpy(), want.numpy()), f"{type_name} {kind} imatrix={imatrix is not None}: " + _where(
        got.numpy(), want.numpy()
    )
    deq = dequantize(got, type_name, x.shape[1]).numpy()
    with native.disabled():
        deq_t = dequantize(got, type_name, x.shape[1]).numpy()
    # Same bits, except that a NaN (an Inf scale times a zero code) may carry another payload:
    # the C kernels give x86's default NaN, as ggml's C does; torch's vector code another one.
    nan = np.isnan(deq) & np.isnan(deq_t)
    assert np.array_equal(np.isnan(deq), np.isnan(deq_t)), f"{type_name} {kind} dequantize: NaNs in different places"
    a, b = deq.view(np.uint32).copy(), deq_t.view(np.uint32).copy()
    a[nan] = b[nan] = 0
    assert np.array_equal(a, b), f"{type_name} {kind} dequantize: " + _where(a, b)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K"])
def test_threaded_split_equals_one_call(type_name):
    """Rows split over the thread pool give the same bytes as one call over all rows."""
    x = torch.randn(333, 512, generator=torch.Generator().manual_seed(3))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = quantize(x, type_name)
        torch.set_num_threads(3)
        many = quantize(x, type_name)
    finally:
        torch.set_num_threads(old)
    assert np.array_equal(one.numpy(), many.numpy())


def test_disabled_switches_to_torch_in_this_thread_only():
    with native.disabled():
        assert not native.has_quantize("Q8_0")
    assert native.has_quantize("Q8_0") == native.built()


# Which build each compiled search runs, as the module reports it (module.c reads MOETRACE_NO_AVX2 once, at load).
SEARCHES = {"qkx", "qx", "qkx3", "legacy_ref"}
PORTABLE = "sse2" if platform.machine() in ("x86_64", "AMD64") else "generic"


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx2" in line for line in f)
    except OSError:
        return False


_GOLDEN_IN_FRESH_PROCESS = (
    "import json, sys, numpy as np, torch\n"
    "from moetrace.kernels import native, quantize\n"
    "from moetrace.kernels._ckernels import search_impl\n"
    "types, folder = sys.argv[1].split(','), sys.argv[2]\n"
    "bad = []\n"
    "for t in types:\n"
    "    g = np.load(folder + '/' + t + '.npz')\n"
    "    assert native.has_quantize(t), t\n"
    "    for path, im in (('ref', None), ('imat', torch.from_numpy(g['imatrix']))):\n"
    "        got = quantize(torch.from_numpy(g['x']), t, im).numpy()\n"
    "        if not np.array_equal(got, g['q_' + path]): bad.append(t + ' ' + path)\n"
    "print(json.dumps({'impl': search_impl(), 'bad': bad}))\n"
)


def _run_golden(ggml_vectors, no_avx2: bool) -> dict:
    """Quantize every golden vector in a fresh process (the build choice is made when the module loads)."""
    env = {k: v for k, v in os.environ.items() if k != "MOETRACE_NO_AVX2"}
    if no_avx2:
        env["MOETRACE_NO_AVX2"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", _GOLDEN_IN_FRESH_PROCESS, ",".join(TYPES), str(ggml_vectors)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_no_avx2_runs_every_search_portably_and_matches_ggml(ggml_vectors):
    """MOETRACE_NO_AVX2=1 puts every compiled search (Q2_K/Q4_K/Q5_K's qkx included) on its portable build, and
    that build gives ggml's golden bytes."""
    res = _run_golden(ggml_vectors, no_avx2=True)
    assert set(res["impl"]) == SEARCHES
    assert res["impl"] == {name: PORTABLE for name in SEARCHES}, res["impl"]
    assert not res["bad"], f"portable build differs from ggml on {res['bad']}"


def test_avx2_build_selected_on_avx2_cpus_and_matches_ggml(ggml_vectors):
    """Without the switch, an AVX2 CPU runs every search's AVX2 build (gcc on x86-64), with ggml's golden bytes."""
    if not _cpu_has_avx2():
        pytest.skip("this CPU has no AVX2: only the portable builds can run here")
    res = _run_golden(ggml_vectors, no_avx2=False)
    assert res["impl"] == {name: "avx2" for name in SEARCHES}, res["impl"]
    assert not res["bad"], f"AVX2 build differs from ggml on {res['bad']}"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_nan_or_inf_refused_by_both_paths(bad, backend):
    """One non-finite value anywhere (here in the last row, which another thread quantizes) is refused."""
    from moetrace.kernels import FormatError

    x = torch.randn(600, 512, generator=torch.Generator().manual_seed(5))
    x[-1, -1] = bad
    ctx = native.disabled() if backend == "torch" else contextlib.nullcontext()
    with ctx, pytest.raises(FormatError, match="Q4_K: the tensor holds NaN or Inf"):
        quantize(x, "Q4_K")
