"""GGUF block formats (bit-exact with ggml), llama.cpp file-type recipes, compute emulation, Triton kernels.

Public API::

    from moetrace.kernels import quantize, dequantize
    q = quantize(w, "Q4_K", imatrix=None)        # (rows, bytes_per_row) uint8
    w2 = dequantize(q, "Q4_K", w.shape[1])       # (rows, n_per_row) float32
    y = matmul(x, q, "Q4_K", w.shape[1])         # (tokens, rows) float32: llama.cpp's CPU result for W x
"""

from moetrace.kernels.base import BLOCK_SIZES, FORMATS, BlockFormat, dequantize, get_format, quantize, row_bytes
from moetrace.kernels.errors import FormatError
from moetrace.kernels.matmul import matmul

__all__ = ["BLOCK_SIZES", "FORMATS", "BlockFormat", "FormatError", "dequantize", "get_format", "matmul", "quantize",
           "row_bytes"]
