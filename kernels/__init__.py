"""GGUF block formats (bit-exact with ggml), llama.cpp file-type recipes, compute emulation, Triton kernels.

Public API::

    from moetrace.kernels import quantize, dequantize
    q = quantize(w, "Q4_K", imatrix=None)        # (rows, bytes_per_row) uint8
    w2 = dequantize(q, "Q4_K", w.shape[1])       # (rows, n_per_row) float32
    y = matmul(x, q, "Q4_K", w.shape[1])         # (tokens, rows) float32: llama.cpp's CPU result for W x
"""

from moetrace.kernels.errors import FormatError

# The formats and matmul import torch: they load on first use, so the torch-free parts of this
# package (layouts, recipes, the list of compute paths) answer at once, as `moetrace variants` needs.
# (matmul lives in engine/api.py: a submodule named like a lazily exported function would take
# its place in this namespace once imported.)
_LAZY = {"BLOCK_SIZES": "base", "FORMATS": "base", "BlockFormat": "base", "dequantize": "base", "get_format": "base",
         "quantize": "base", "row_bytes": "base", "matmul": "engine.api"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BLOCK_SIZES", "FORMATS", "BlockFormat", "FormatError", "dequantize", "get_format", "matmul", "quantize",
           "row_bytes"]
