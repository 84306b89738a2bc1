"""Kernel throughput against ggml's own kernels, and the cost of a weight audit, in one run.

Run::

    .venv/bin/python benchmarks/bench_kernels.py [--ggml-lib PATH] [--repeat 3] [--layer-repeat 3]
        [--experts 128] [--types Q4_0,...,Q6_K] [--with-torch-path] [--skip-layer]

Every figure is the median of ``--repeat`` runs (``--layer-repeat`` for the audit), in M params/s,
on a (768, 2048) Student-t matrix. "Nt" is ``torch.get_num_threads()`` threads (printed; moetrace's
compiled kernels split rows over that many threads), "1t" is one thread. It prints:

1. quantize throughput per type (all ten block types by default): moetrace with its default path
   (the compiled C kernel where one is built and registered for the type, else the torch kernel;
   each row says which) at Nt and at 1t, the torch kernel under ``native.disabled()`` when
   ``--with-torch-path`` is given (slow), ggml's ``ggml_quantize_chunk`` (single thread, its
   reference path, no importance matrix) measured in this run, and the ratios ours/ggml;
2. dequantize throughput: moetrace's default path at Nt and 1t, gguf-py's numpy dequantization and
   ggml's ``to_float`` (from ``ggml_get_type_traits``, single thread) of the same bytes, and the
   ratios ours/gguf-py and ours/ggml;
3. the time to audit one decoder layer at Qwen3-30B-A3B's widths (128 experts x gate/up
   768x2048 and down 2048x768, plus attention and router), as ``moetrace audit`` does it for
   layer 7 of 48 under q4_k_m (every expert tensor Q4_K there): cold (quantize, write the
   cache, dequantize, metrics) and warm (cache hit: dequantize and metrics). Weights are
   generated in memory as BF16, nothing is written but the temporary quantized-weight cache.
   ``--skip-layer`` leaves it out (minutes at full width).

Every run also checks bit-exactness on this large matrix: each quantize path's bytes against ggml's,
and the dequantized floats against ggml's and gguf-py's; with ggml, the types of ``--edge-types``
(MXFP4 by default) are also checked on 104 rows drawn to stress a quantizer (subnormals, the
float32 edge, zeros, blocks whose largest magnitude sits a few float32 steps from a power of two). A mismatch is printed as a line starting
with ``MISMATCH`` (type, path, how many rows differ) and the script then exits with status 1
(floats that are equal in value but differ in the sign of a zero are reported as a ``NOTE``).

ggml is measured through ``ctypes`` from its base library, ``libggml-base.so`` (it holds
``ggml_quantize_chunk`` and the type traits), given by ``--ggml-lib PATH`` or the environment
variable ``MOETRACE_GGML_LIB``: the file itself, or a folder holding it (a ggml build folder works:
the script also looks in its ``src/``, ``lib/`` and ``bin/``). Nothing of ggml ships with moetrace;
to build it, take a checkout of https://github.com/ggml-org/ggml somewhere outside this repository,
configure it with CMake in Release mode as shared libraries with tests and examples off
(``cmake -S <ggml checkout> -B <build folder> -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON
-DBUILD_SHARED_LIBS=ON -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF``), build at least the
``ggml-base`` target (``cmake --build <build folder> --target ggml-base``), and pass
``--ggml-lib <build folder>/src``. ``ggml_quantize_chunk`` runs ggml's portable reference C quantizers
(what llama-quantize calls; ggml-base is compiled without CPU-specific flags), one thread per call.
The script reads ``struct ggml_type_traits`` with the layout of ggml's ``include/ggml.h`` (as of
ggml 0.21.0, commit d99724f2: type_name, blck_size, blck_size_interleave, type_size, is_quantized,
to_float, from_float_ref) and checks it at run time against ``ggml_type_name``, ``ggml_blck_size``
and ``ggml_type_size`` and against moetrace's block sizes; it stops with a message if the library
does not match. Without a library it falls back to ggml's single-thread quantize rates copied from
documentation (Q4_K 21, Q6_K 41, Q8_0 360 M params/s, NOT measured here) and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# ggml's single-thread quantize rates on a 2-core machine of this kind, M params/s: constants
# copied from documentation, used only when no ggml library is given.
GGML_QUANTIZE_REF = {"Q4_K": 21.0, "Q6_K": 41.0, "Q8_0": 360.0}
DEFAULT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "MXFP4")
GGML_LIB_ENV = "MOETRACE_GGML_LIB"
# enum ggml_type values (include/ggml.h); each is checked at run time against ggml_type_name.
GGML_TYPE_IDS = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
                 "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "MXFP4": 39}
ROWS, COLS = 768, 2048

_MISMATCHES: list[str] = []


def _median(fn, repeat: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def _student_t(shape, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    chi = torch.randn((*shape[:-1], 5), generator=g).pow(2).mean(-1, keepdim=True)  # heavy tails per row group
    return (z / chi.sqrt() * scale).to(torch.bfloat16)


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _mismatch(what: str, ours: np.ndarray, ref: np.ndarray, ref_name: str) -> bool:
    """Record and print a mismatch between two (rows, ...) arrays; True when they are equal."""
    if ours.shape == ref.shape and np.array_equal(ours, ref):
        if ours.dtype == np.float32 and ref.dtype == np.float32:
            bits = int(np.count_nonzero(ours.view(np.uint32) != ref.view(np.uint32)))
            if bits:  # equal values, other bits: only the sign of zero can do that
                print(f"  NOTE {what}: values equal {ref_name}'s, but {bits} zeros differ in sign")
        return True
    if ours.shape != ref.shape:
        msg = f"MISMATCH {what}: shape {ours.shape} vs {ref_name}'s {ref.shape}"
    else:
        rows = np.flatnonzero((ours != ref).reshape(ours.shape[0], -1).any(axis=1))
        r = int(rows[0])
        col = int(np.flatnonzero(ours[r] != ref[r])[0])
        msg = (f"MISMATCH {what}: {len(rows)} of {ours.shape[0]} rows differ from {ref_name}'s "
               f"(first at row {r}, element {col}: ours {ours[r, col].item()!r}, {ref_name} {ref[r, col].item()!r})")
    print("  " + msg)
    _MISMATCHES.append(msg)
    return False


# ---------------------------------------------------------------- ggml through ctypes

class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits, include/ggml.h
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def _find_ggml_lib(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_file():
        return p
    names = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")
    for sub in ("", "src", "lib", "bin"):
        for name in names:
            if (p / sub / name).is_file():
                return p / sub / name
    raise SystemExit(f"--ggml-lib {path}: no libggml-base.so there (nor in its src/, lib/ or bin/); see the "
                     f"docstring (--help) for how to build it")


class Ggml:
    """ggml's reference quantize (ggml_quantize_chunk) and to_float, one thread, from libggml-base."""

    def __init__(self, path: str):
        from moetrace.kernels import BLOCK_SIZES

        self.path = _find_ggml_lib(path)
        try:
            lib = ctypes.CDLL(str(self.path))
        except OSError as e:
            raise SystemExit(f"--ggml-lib: cannot load {self.path}: {e}") from None
        self.lib = lib
        for name, res, args in [
            ("ggml_version", ctypes.c_char_p, []),
            ("ggml_commit", ctypes.c_char_p, []),
            ("ggml_type_name", ctypes.c_char_p, [ctypes.c_int]),
            ("ggml_blck_size", ctypes.c_int64, [ctypes.c_int]),
            ("ggml_type_size", ctypes.c_size_t, [ctypes.c_int]),
            ("ggml_row_size", ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]),
            ("ggml_get_type_traits", ctypes.POINTER(_TypeTraits), [ctypes.c_int]),
            ("ggml_quantize_init", None, [ctypes.c_int]),
            ("ggml_quantize_free", None, []),
            ("ggml_quantize_requires_imatrix", ctypes.c_bool, [ctypes.c_int]),
            ("ggml_quantize_chunk", ctypes.c_size_t,
             [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
              ctypes.c_void_p]),
        ]:
            try:
                fn = getattr(lib, name)
            except AttributeError:
                raise SystemExit(f"--ggml-lib: {self.path} has no {name}; is it libggml-base?") from None
            fn.restype, fn.argtypes = res, args
        self.version = lib.ggml_version().decode()
        self.commit = lib.ggml_commit().decode()
        self._to_float: dict[str, _TO_FLOAT] = {}
        for t, tid in GGML_TYPE_IDS.items():
            want = t.lower() if t == "MXFP4" else t[0].lower() + t[1:]  # ggml spells them "q4_0", "q4_K", "mxfp4"
            tr = lib.ggml_get_type_traits(tid).contents
            got = (tr.type_name or b"").decode(errors="replace")
            block, size = BLOCK_SIZES[t]
            checks = [
                (lib.ggml_type_name(tid).decode() == want, f"ggml_type_name({tid}) is not {want!r}"),
                (got == want, f"traits.type_name reads {got!r}, not {want!r}: struct ggml_type_traits layout "
                              f"differs from this script's"),
                (tr.blck_size == lib.ggml_blck_size(tid) == block, f"block size {tr.blck_size}, moetrace's {block}"),
                (tr.type_size == lib.ggml_type_size(tid) == size, f"type size {tr.type_size}, moetrace's {size}"),
                (tr.is_quantized and bool(tr.to_float), "not quantized, or no to_float"),
                (not lib.ggml_quantize_requires_imatrix(tid), "needs an importance matrix"),
            ]
            for ok, why in checks:
                if not ok:
                    raise SystemExit(f"--ggml-lib {self.path} ({self.version}, {self.commit}): {t}: {why}")
            self._to_float[t] = _TO_FLOAT(tr.to_float)

    def quantize(self, x: np.ndarray, t: str, out: np.ndarray) -> None:
        rows, n = x.shape
        got = self.lib.ggml_quantize_chunk(GGML_TYPE_IDS[t], x.ctypes.data, out.ctypes.data, 0, rows, n, None)
        assert got == out.nbytes, (t, got, out.nbytes)

    def to_float(self, q: np.ndarray, t: str, out: np.ndarray) -> None:
        self._to_float[t](q.ctypes.data, out.ctypes.data, out.size)

    def quantize_init(self, t: str) -> None:
        self.lib.ggml_quantize_init(GGML_TYPE_IDS[t])  # ggml_quantize_chunk calls it too; keep it out of the timing


# ---------------------------------------------------------------- benchmarks

def _path_name(has_native: bool) -> str:
    return "C" if has_native else "torch"


def _ratio(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None else f"{a / b:.2f}x"


def _rate(r: float | None) -> str:
    return "" if r is None else f"{r:.1f}"


def bench_quantize(types, repeat, ggml: Ggml | None, with_torch_path: bool):
    from moetrace.kernels import native, quantize, row_bytes

    x = _student_t((ROWS, COLS), 1 / 45.0, 0).float()
    xn = np.ascontiguousarray(x.numpy())
    n = x.numel() / 1e6
    nt = torch.get_num_threads()
    print(f"Quantize: a ({ROWS}, {COLS}) matrix ({n:.2f} M params), M params/s, median of {repeat}; "
          f"Nt = {nt} threads, 1t = 1 thread")
    if ggml is None:
        print("  ggml: no --ggml-lib (nor $" + GGML_LIB_ENV + "): its column holds documented constants, "
              "not measured")
    else:
        print(f"  ggml: ggml_quantize_chunk (reference path, no imatrix, 1 thread) measured in this run, "
              f"{ggml.path}")
    ggml_head = "ggml 1t" if ggml is not None else "ggml 1t*"
    head = f"  {'type':5} {'path':>5} {'ours Nt':>8} {'ours 1t':>8}"
    if with_torch_path:
        head += f" {'torch Nt':>9}"
    head += f" {ggml_head:>9} {'1t/ggml':>8} {'Nt/ggml':>8}  {'bytes':>5}"
    print(head)
    out = {}
    for t in types:
        nat = native.has_quantize(t)
        quantize(x[:64], t)  # warm-up
        med, _ = _median(lambda: quantize(x, t), repeat)
        q_nt = quantize(x, t).numpy()
        if nt > 1:
            with _threads(1):
                quantize(x[:64], t)
                med1, _ = _median(lambda: quantize(x, t), repeat)
                q_1t = quantize(x, t).numpy()
        else:
            med1, q_1t = med, q_nt
        rate, rate1 = n / med, n / med1
        rate_torch = q_torch = None
        if with_torch_path:
            if nat:
                with native.disabled():
                    quantize(x[:64], t)
                    medt, _ = _median(lambda: quantize(x, t), repeat)
                    q_torch = quantize(x, t).numpy()
                rate_torch = n / medt
            else:
                rate_torch = rate  # the default path already is the torch kernel
        if ggml is not None:
            qg = np.empty((ROWS, row_bytes(t, COLS)), dtype=np.uint8)
            ggml.quantize_init(t)
            ggml.quantize(xn[:64], t, qg[:64])  # warm-up
            medg, _ = _median(lambda: ggml.quantize(xn, t, qg), repeat)
            ref = n / medg
            ok = _mismatch(f"quantize {t} ({_path_name(nat)} path, {nt} threads)", q_nt, qg, "ggml")
            if nt > 1:
                ok &= _mismatch(f"quantize {t} ({_path_name(nat)} path, 1 thread)", q_1t, qg, "ggml")
            if q_torch is not None:
                ok &= _mismatch(f"quantize {t} (torch path, native.disabled())", q_torch, qg, "ggml")
            same = "=ggml" if ok else "DIFF"
        else:
            ref = GGML_QUANTIZE_REF.get(t)
            same = ""
        out[t] = {"path": _path_name(nat), "ours": rate, "ours_1t": rate1, "torch": rate_torch, "ggml": ref}
        line = f"  {t:5} {_path_name(nat):>5} {rate:8.1f} {rate1:8.1f}"
        if with_torch_path:
            line += f" {_rate(rate_torch) + ('' if nat else '=')  :>9}"
        line += f" {_rate(ref):>9} {_ratio(rate1, ref):>8} {_ratio(rate, ref):>8}  {same:>5}"
        print(line)
    print("  path: the kernel moetrace's default path ran for the type (C = compiled kernel, torch = torch kernel, "
          "used where no C kernel is registered).")
    if with_torch_path:
        print("  torch Nt: the torch kernel under native.disabled(); '=' marks the default path's own figure "
              "(it already is the torch kernel).")
    if ggml is None:
        print("  * ggml's single-thread rates are constants copied from documentation, NOT measured in this "
              "run (pass --ggml-lib to measure them).")
    else:
        print("  bytes: '=ggml' when every path's bytes equal ggml's (np.array_equal on the whole matrix).")
    return out


def bench_dequantize(types, repeat, ggml: Ggml | None):
    import gguf

    from moetrace.kernels import dequantize, native, quantize

    x = _student_t((ROWS, COLS), 1 / 45.0, 1).float()
    reps = 4  # 6.3 M params per call
    n = reps * x.numel() / 1e6
    nt = torch.get_num_threads()
    print(f"\nDequantize: {n:.2f} M params ({reps} x a ({ROWS}, {COLS}) matrix's bytes), M params/s, median of "
          f"{repeat}; Nt = {nt} threads; gguf-py numpy" + (" and ggml to_float (1 thread)" if ggml else "")
          + " measured in this run on the same bytes")
    if ggml is None:
        print("  ggml: no --ggml-lib, not measured")
    print(f"  {'type':5} {'path':>5} {'ours Nt':>8} {'ours 1t':>8} {'gguf-py':>8} {'ggml 1t':>8} "
          f"{'Nt/gguf-py':>11} {'1t/ggml':>8} {'Nt/ggml':>8}  {'floats':>6}")
    out = {}
    for t in types:
        nat = native.has_dequantize(t)
        q = quantize(x, t).repeat(reps, 1)  # (rows, bytes)
        qn = np.ascontiguousarray(q.numpy())
        gtype = gguf.GGMLQuantizationType[t]
        dequantize(q[:64], t, COLS)
        ours, _ = _median(lambda: dequantize(q, t, COLS), repeat)
        d_nt = dequantize(q, t, COLS).numpy()
        if nt > 1:
            with _threads(1):
                ours1, _ = _median(lambda: dequantize(q, t, COLS), repeat)
        else:
            ours1 = ours
        theirs, _ = _median(lambda: gguf.quants.dequantize(qn, gtype), repeat)
        ok = _mismatch(f"dequantize {t} ({_path_name(nat)} path)", d_nt, gguf.quants.dequantize(qn, gtype), "gguf-py")
        rg = None
        if ggml is not None:
            dg = np.empty(d_nt.shape, dtype=np.float32)
            ggml.to_float(qn[:64], t, dg[:64])  # warm-up
            medg, _ = _median(lambda: ggml.to_float(qn, t, dg), repeat)
            rg = n / medg
            ok &= _mismatch(f"dequantize {t} ({_path_name(nat)} path)", d_nt, dg, "ggml")
        r, r1, rp = n / ours, n / ours1, n / theirs
        out[t] = {"path": _path_name(nat), "ours": r, "ours_1t": r1, "gguf_py": rp, "ggml": rg}
        print(f"  {t:5} {_path_name(nat):>5} {r:8.1f} {r1:8.1f} {rp:8.1f} {_rate(rg):>8} {_ratio(r, rp):>11} "
              f"{_ratio(r1, rg):>8} {_ratio(r, rg):>8}  {'equal' if ok else 'DIFF':>6}")
    print("  floats: 'equal' when ours equal gguf-py's" + (" and ggml's" if ggml else "")
          + " (np.array_equal on all of them).")
    return out


EDGE_KINDS = ("gauss", "student_t", "zeros", "constant", "tiny", "subnormal", "fp16_edge", "sparse", "outlier",
              "mixed_blocks", "scale_overflow", "float32_edge", "near_pow2")


def _edge_rows(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, cols) float32 of one kind of input that stresses a quantizer (as tests/kernels/drawn.py draws them)."""
    g = rng.standard_normal((rows, cols))
    if kind == "student_t":
        x = rng.standard_t(3, (rows, cols))
    elif kind == "zeros":
        x = np.zeros((rows, cols))
    elif kind == "constant":
        x = np.full((rows, cols), rng.choice([-1, 1]) * 10.0 ** rng.uniform(-8, 4))
    elif kind == "tiny":
        x = g * 10.0 ** rng.uniform(-40, -4, (rows, 1))
    elif kind == "subnormal":
        x = g * 1e-41
    elif kind == "fp16_edge":
        x = g / np.abs(g).max() * 65504.0
    elif kind == "sparse":
        x = g * (rng.random((rows, cols)) < 0.05)
    elif kind == "outlier":
        x = g.copy()
        x[:, rng.integers(0, cols, 8)] *= 1000.0
    elif kind == "mixed_blocks":  # every 16 values at their own scale
        x = (g.reshape(rows, -1, 16) * 10.0 ** rng.uniform(-30, 30, (rows, cols // 16, 1))).reshape(rows, cols)
    elif kind == "scale_overflow":
        x = g * 10.0 ** rng.uniform(7, 30, (rows, 1))
    elif kind == "float32_edge":
        x = np.clip(g * 3e38, -3.4e38, 3.4e38)
    elif kind == "near_pow2":  # each block's largest magnitude a few float32 steps from a power of two
        x = g / np.abs(g).max() * 0.5
        k = rng.integers(-140, 127, (rows, cols // 32))
        steps = rng.integers(-48, 49, (rows, cols // 32))
        bits = np.ldexp(np.float32(1), k).astype(np.float32).view(np.uint32).astype(np.int64) + steps
        amax = np.clip(bits, 1, 0x7F7FFFFF).astype(np.uint32).view(np.float32).astype(np.float64)
        x = (x.reshape(rows, -1, 32) * amax[..., None])
        x[..., 5] = amax * rng.choice([-1.0, 1.0], amax.shape)
        x = x.reshape(rows, cols)
    else:
        x = g
    return x.astype(np.float32)


def check_edge_inputs(types, ggml: "Ggml", rows_per_kind: int = 8) -> None:
    """Bytes and floats against ggml itself on inputs drawn to stress a quantizer (no timing)."""
    from moetrace.kernels import dequantize, native, quantize, row_bytes

    rng = np.random.default_rng(2026)
    x = np.concatenate([_edge_rows(k, rows_per_kind, COLS, rng) for k in EDGE_KINDS])  # (kinds * rows, COLS)
    print(f"\nDrawn inputs against ggml: {x.shape[0]} rows of {COLS} ({rows_per_kind} each of "
          f"{', '.join(EDGE_KINDS)}), bytes and floats, np.array_equal")
    for t in types:
        qg = np.empty((x.shape[0], row_bytes(t, COLS)), dtype=np.uint8)
        ggml.quantize(x, t, qg)
        xt = torch.from_numpy(x)
        ok = _mismatch(f"drawn quantize {t} ({_path_name(native.has_quantize(t))} path)", quantize(xt, t).numpy(),
                       qg, "ggml")
        with native.disabled():
            ok &= _mismatch(f"drawn quantize {t} (torch path)", quantize(xt, t).numpy(), qg, "ggml")
        dg = np.empty(x.shape, dtype=np.float32)
        ggml.to_float(qg, t, dg)
        with np.errstate(all="ignore"):
            ok &= _mismatch(f"drawn dequantize {t}", dequantize(torch.from_numpy(qg), t, COLS).numpy(), dg, "ggml")
        print(f"  {t:5} {'equal' if ok else 'DIFF'}")


def bench_audit_layer(repeat, experts):
    from types import SimpleNamespace

    from moetrace.tracer.weights import audit as A
    from moetrace.tracer.sources import builtin as builtin
    from moetrace.tracer.weights import qcache as qcache
    from moetrace.tracer.weights import derive as W

    L = 7
    shape = builtin.PRESETS["qwen3-30b-a3b"]
    cfg = dict(builtin.hf_config_dict(shape), num_hidden_layers=48, num_experts=experts)
    src = SimpleNamespace(config=SimpleNamespace(**cfg), model_hash=f"bench-{experts}", model_id="bench")
    types = W.file_type_types(src, "q4_k_m", context=None)
    h, f, e = shape.hidden, shape.expert_width, experts
    qd, kvd = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    b = f"blk.{L}."
    tensors = {
        b + "ffn_gate_exps.weight": _student_t((e, f, h), h ** -0.5, 10),
        b + "ffn_up_exps.weight": _student_t((e, f, h), h ** -0.5, 11),
        b + "ffn_down_exps.weight": _student_t((e, h, f), f ** -0.5, 12),
        b + "attn_q.weight": _student_t((qd, h), h ** -0.5, 13),
        b + "attn_k.weight": _student_t((kvd, h), h ** -0.5, 14),
        b + "attn_v.weight": _student_t((kvd, h), h ** -0.5, 15),
        b + "attn_output.weight": _student_t((h, qd), qd ** -0.5, 16),
        b + "ffn_gate_inp.weight": _student_t((e, h), h ** -0.5, 17),
    }
    n = sum(t.numel() for t in tensors.values()) / 1e6
    used = sorted({types[k] for k in tensors})
    print(f"\nAudit of one layer at Qwen3-30B-A3B's widths: layer {L} of 48 under q4_k_m ({e} experts x gate/up "
          f"{f}x{h}, down {h}x{f}, attention and router; {n:.0f} M params; types {', '.join(used)})")
    dirs = []

    def cold():
        d = tempfile.mkdtemp(prefix="moetrace-kernbench-")
        for old in dirs:
            shutil.rmtree(old, ignore_errors=True)
        dirs[:] = [d]
        ctx = qcache.QuantContext(src.model_hash, qcache.QuantCache(d))
        A.audit_tensors(tensors, types, ctx)

    def warm():
        ctx = qcache.QuantContext(src.model_hash, qcache.QuantCache(dirs[0]))
        A.audit_tensors(tensors, types, ctx)
        assert ctx.cache.misses == 0

    try:
        med, times = _median(cold, repeat)
        print(f"  cold (quantize, cache write, dequantize, metrics): median {med:.1f} s of "
              f"{', '.join(f'{t:.1f}' for t in times)} ({n / med:.1f} M params/s)")
        wmed, wtimes = _median(warm, repeat)
        print(f"  warm (cache hit: dequantize, metrics):           median {wmed:.2f} s of "
              f"{', '.join(f'{t:.2f}' for t in wtimes)}")
        ref = tensors[b + "ffn_gate_exps.weight"]
        deq = ref.float()
        deq.add_(1e-3)
        mmed, _ = _median(lambda: A.matrix_metrics(ref, deq), repeat)
        print(f"  metrics alone, one {e}-expert projection (batched over experts): median {mmed:.2f} s")
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ggml-lib", default=os.environ.get(GGML_LIB_ENV) or None, metavar="PATH",
                    help=f"libggml-base.so, or the folder holding it, to measure ggml in this run "
                         f"(default: ${GGML_LIB_ENV})")
    ap.add_argument("--repeat", type=int, default=3, help="runs per kernel figure (the median is printed)")
    ap.add_argument("--layer-repeat", type=int, default=3, help="runs of the one-layer audit")
    ap.add_argument("--experts", type=int, default=128, help="experts in the audited layer")
    ap.add_argument("--types", default=",".join(DEFAULT_TYPES))
    ap.add_argument("--edge-types", default="MXFP4",
                    help="types whose bytes are also checked against ggml on drawn stress inputs (subnormals, "
                         "the float32 edge, amax next to powers of two, ...); needs --ggml-lib; '' for none")
    ap.add_argument("--with-torch-path", action="store_true",
                    help="also time the torch kernels (native.disabled()) where a C kernel is the default (slow)")
    ap.add_argument("--skip-layer", action="store_true", help="skip the one-layer audit (minutes at full width)")
    args = ap.parse_args()
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types + [e.strip().upper() for e in args.edge_types.split(",") if e.strip()]
               if t not in GGML_TYPE_IDS]
    if unknown:
        ap.error(f"--types: {', '.join(unknown)} not among {', '.join(GGML_TYPE_IDS)}")
    ggml = Ggml(args.ggml_lib) if args.ggml_lib else None

    from moetrace.kernels import native

    print(f"moetrace kernel benchmark: torch {torch.__version__}, CPU, {torch.get_num_threads()} threads "
          f"(torch.get_num_threads()), {os.cpu_count()} CPUs")
    print(f"  moetrace C kernels: {'built' if native.built() else 'not built'}, "
          f"{'enabled' if native.enabled() else 'disabled'}; quantize in C for: "
          f"{', '.join(t for t in types if native.has_quantize(t)) or 'none'}; dequantize in C for: "
          f"{', '.join(t for t in types if native.has_dequantize(t)) or 'none'}")
    if ggml is not None:
        print(f"  ggml {ggml.version} (commit {ggml.commit}) from {ggml.path}; type traits layout checked")
    else:
        print("  ggml: not given (--ggml-lib / $" + GGML_LIB_ENV + "), quantize compared to documented constants")
    print()
    bench_quantize(types, args.repeat, ggml, args.with_torch_path)
    bench_dequantize(types, args.repeat, ggml)
    edge = [t.strip().upper() for t in args.edge_types.split(",") if t.strip()]
    if ggml is not None and edge:
        check_edge_inputs(edge, ggml)
    if ggml is not None:
        ggml.lib.ggml_quantize_free()
    if not args.skip_layer:
        bench_audit_layer(args.layer_repeat, args.experts)
    print()
    if _MISMATCHES:
        print(f"Bit-exactness: {len(_MISMATCHES)} MISMATCH(ES):")
        for m in _MISMATCHES:
            print("  " + m)
        sys.exit(1)
    what = "ggml's quantize bytes and to_float floats, and gguf-py's floats" if ggml else "gguf-py's floats"
    print(f"Bit-exactness: every path matched {what} on the whole matrix.")


if __name__ == "__main__":
    main()
