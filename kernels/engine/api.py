"""``matmul``: what an inference engine returns for ``x @ W.T`` with W given as GGUF block bytes.

    from moetrace.kernels import matmul
    y = matmul(x, q, "Q4_K", n_per_row)            # (tokens, rows) float32, llama.cpp's CPU result

Paths (``path=``):

- ``llamacpp_cpu``: llama.cpp's CPU backend with ggml's generic (scalar reference) vec_dot. The
  activations are quantized to the weight type's ``vec_dot_type`` (Q8_K for the K-quants, Q8_0 for
  Q4_0/Q5_0/Q8_0/MXFP4, Q8_1 for Q4_1/Q5_1; :mod:`moetrace.kernels.engine.activations`), each (row, token)
  dot is ``ggml_vec_dot_<type>_<vec_dot_type>_generic``: integer block products and float32 sums in
  ggml's order. F32/F16/BF16 weights dot in their own type (:mod:`.engine.float_dots`). The
  integer-dot path runs in C (kernels/csrc/engine_cpu.c) over row ranges on several threads, or in
  torch (:mod:`.engine.cpu_torch`) with the same results where the extension is absent or disabled.
"""

from __future__ import annotations

import numpy as np
import torch

from moetrace.kernels import native
from moetrace.kernels.base import get_format, row_bytes
from moetrace.kernels.engine import activations, cpu_torch, float_dots
from moetrace.kernels.errors import FormatError

PATHS = ("llamacpp_cpu",)
# Tokens x elements per thread part below which one call beats the thread handoff (~20-50 us).
_MIN_ELEMS_PER_PART = 1 << 16


def vec_dot_type(type_name: str) -> str:
    """The type llama.cpp's CPU backend quantizes activations to for weights of ``type_name``."""
    return get_format(type_name).vec_dot_type


def matmul(x: torch.Tensor, q: torch.Tensor, type_name: str, n_per_row: int, path: str = "llamacpp_cpu") -> torch.Tensor:
    """An engine's result for ``W x`` per token.

    Args:
        x: (tokens, n_per_row) float activations (taken as float32).
        q: (rows, bytes per row) uint8 block bytes of ``type_name`` (for F32/F16/BF16 the raw
            little-endian values).
        type_name: the weight's GGML type (``Q4_K``).
        n_per_row: elements per weight row.
        path: the engine arithmetic; one of :data:`PATHS`.

    Returns:
        (tokens, rows) float32.

    Raises:
        FormatError: an unknown path or type, or shapes that do not fit.
    """
    if path not in PATHS:
        raise FormatError(f"unknown engine path {path!r}; valid paths: {', '.join(PATHS)}")
    fmt = get_format(type_name)
    nb = row_bytes(fmt.name, n_per_row)
    if x.ndim != 2 or x.shape[1] != n_per_row:
        raise FormatError(f"matmul takes x of shape (tokens, {n_per_row}), got {tuple(x.shape)}")
    if q.dtype != torch.uint8 or q.ndim != 2 or q.shape[1] != nb:
        raise FormatError(f"{fmt.name} rows of {n_per_row} elements are {nb} bytes; got a {q.dtype} tensor "
                          f"of shape {tuple(q.shape)}")
    x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
    q = q.detach().cpu().contiguous()
    if fmt.name in float_dots.FLOAT_TYPES:
        return float_dots.matmul(x, q, fmt.name, n_per_row)
    vdt = fmt.vec_dot_type
    dot_types = cpu_torch.LEGACY_TYPES + cpu_torch.FP4_TYPES + cpu_torch.K_TYPES
    if vdt not in activations.ACTIVATION_TYPES or fmt.name not in dot_types:
        raise FormatError(f"no llamacpp_cpu matmul for {fmt.name}; valid types: "
                          f"{', '.join(dot_types + tuple(float_dots.FLOAT_TYPES))}")
    x_q = activations.quantize(x, vdt)  # (tokens, activation bytes)
    if activations.compiled():
        return _matmul_c(x_q, q, fmt.name, n_per_row)
    return cpu_torch.matmul(x_q, q, fmt.name, n_per_row)


def _matmul_c(x_q: torch.Tensor, q: torch.Tensor, type_name: str, n: int) -> torch.Tensor:
    tokens, rows = x_q.shape[0], q.shape[0]
    out = np.empty((tokens, rows), dtype=np.float32)
    w, act = q.numpy(), x_q.numpy()

    def part(a: int, b: int) -> None:
        activations._cengine.matmul(type_name, w, w.shape[1], a, b, act, act.shape[1], tokens, n, out, rows)

    native._run_parts(part, rows, max(1, tokens) * n, _MIN_ELEMS_PER_PART)
    return torch.from_numpy(out)
