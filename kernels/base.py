"""The block-format registry: one class per GGML type, sizes from one table.

Every GGUF block format is a subclass of :class:`BlockFormat` that works on whole arrays of
blocks at once (vectorized across blocks, never a Python loop over rows or blocks). Defining a
subclass with a ``name`` registers it. :func:`quantize` and :func:`dequantize` are the public
entry points that reshape rows into blocks and back.
"""

from __future__ import annotations

import gguf
import torch

from moetrace.kernels.errors import FormatError
# name -> (elements per block, bytes per block): the layout table (kernels/layouts.py), which
# torch, Triton and the C kernels all read; tests check it against gguf.GGML_QUANT_SIZES.
from moetrace.kernels.layouts import BLOCK_SIZES, LAYOUTS, QK_K  # noqa: F401 (re-exported to the formats)

FORMATS: dict[str, "BlockFormat"] = {}


class BlockFormat:
    """One GGUF block format.

    Subclasses set ``name`` (a key of :data:`BLOCK_SIZES`) and ``vec_dot_type`` (the type
    llama.cpp's CPU backend quantizes activations to for this weight type), and implement
    the two block methods. Defining the subclass registers an instance in :data:`FORMATS`.
    """

    name: str = ""
    vec_dot_type: str = ""
    # True where ggml's imatrix path needs the whole row (the legacy types' sigma2 is per row);
    # quantize() then passes n_per_row= to quantize_blocks.
    needs_row_length: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name not in BLOCK_SIZES:
                raise AssertionError(f"block format {cls.name!r} has no entry in BLOCK_SIZES")
            FORMATS[cls.name] = cls()

    @property
    def block_size(self) -> int:
        return BLOCK_SIZES[self.name][0]

    @property
    def type_size(self) -> int:
        return BLOCK_SIZES[self.name][1]

    @property
    def ggml_type(self) -> gguf.GGMLQuantizationType:
        return gguf.GGMLQuantizationType[self.name]

    def quantize_blocks(self, x: torch.Tensor, quant_weights: torch.Tensor | None) -> torch.Tensor:
        """Quantize blocks.

        Args:
            x: (n_blocks, block_size) float32.
            quant_weights: None (ggml's ``quantize_row_*_ref`` path) or (n_blocks, block_size)
                float32 importance weights, the imatrix entry of each element's column
                (ggml's ``quantize_row_*_impl`` path).

        Returns:
            (n_blocks, type_size) uint8: the block bytes exactly as ggml writes them.
        """
        raise NotImplementedError(f"{self.name} cannot be quantized by moetrace")

    def dequantize_blocks(self, q: torch.Tensor) -> torch.Tensor:
        """Dequantize blocks: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32."""
        raise NotImplementedError(f"{self.name} cannot be dequantized by moetrace")


def get_format(type_name: str) -> BlockFormat:
    """The registered format named ``type_name`` (case-insensitive), or a FormatError listing the valid ones."""
    _load_formats()
    key = type_name.upper()
    if key not in FORMATS:
        raise FormatError(f"unknown GGML type {type_name!r}; valid types: {', '.join(sorted(FORMATS))}")
    return FORMATS[key]


def row_bytes(type_name: str, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` elements in ``type_name``."""
    elems, size = BLOCK_SIZES[type_name.upper()]
    if n_per_row % elems:
        raise FormatError(f"a row of {n_per_row} elements does not split into {type_name} blocks of {elems}")
    return n_per_row // elems * size


def quantize(x: torch.Tensor, type_name: str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize rows into GGUF block bytes, bit-exact with ``ggml_quantize_chunk``.

    Args:
        x: (rows, n_per_row) float tensor (any float dtype; quantized from its float32 value).
        type_name: a GGML type name, e.g. ``"Q4_K"``.
        imatrix: optional (n_per_row,) importance matrix (per-column mean of squared activations).

    Returns:
        (rows, bytes_per_row) uint8 on x's device.
    """
    fmt = get_format(type_name)
    if x.ndim != 2:
        raise FormatError(f"quantize takes a 2-D (rows, n_per_row) tensor, got shape {tuple(x.shape)}")
    rows, n = x.shape
    nb = row_bytes(fmt.name, n)  # raises if n is not a multiple of the block size
    x = x.to(torch.float32)
    if imatrix is not None:
        imatrix = imatrix.to(device=x.device, dtype=torch.float32).reshape(-1)
        if imatrix.numel() != n:
            raise FormatError(f"imatrix has {imatrix.numel()} entries, the rows have {n}")
    if x.device.type == "cpu":
        from moetrace.kernels import native

        if native.has_quantize(fmt.name):
            return native.quantize(x, fmt.name, imatrix)  # checks for NaN/Inf itself
    if not _all_finite(x):
        raise FormatError(f"cannot quantize to {fmt.name}: the tensor holds NaN or Inf")
    blocks = x.reshape(-1, fmt.block_size)
    qw = None
    if imatrix is not None:
        qw = imatrix.expand(rows, n).reshape(-1, fmt.block_size)
    if qw is not None and fmt.needs_row_length:
        q = fmt.quantize_blocks(blocks, qw, n_per_row=n)
    else:
        q = fmt.quantize_blocks(blocks, qw)
    return q.reshape(rows, nb)


def _all_finite(x: torch.Tensor) -> bool:
    # numpy's check is a single fused pass; torch's isfinite().all() allocates a mask and cost
    # more than the whole C quantization of a Q8_0 matrix.
    if x.device.type == "cpu":
        import numpy as np

        return bool(np.isfinite(x.detach().numpy()).all())
    return bool(torch.isfinite(x).all())


def dequantize(q: torch.Tensor, type_name: str, n_per_row: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize GGUF block bytes, bit-exact with ggml's ``dequantize_row_*``.

    Args:
        q: (rows, bytes_per_row) uint8.
        type_name: the GGML type name.
        n_per_row: elements per row.
        dtype: the output dtype; values are computed in float32 and then cast.

    Returns:
        (rows, n_per_row) tensor of ``dtype`` on q's device.
    """
    fmt = get_format(type_name)
    nb = row_bytes(fmt.name, n_per_row)
    if q.dtype != torch.uint8 or q.ndim != 2 or q.shape[1] != nb:
        raise FormatError(
            f"{fmt.name} rows of {n_per_row} elements are {nb} bytes; got a {q.dtype} tensor of shape {tuple(q.shape)}"
        )
    rows = q.shape[0]
    blocks = q.reshape(-1, fmt.type_size)
    if q.device.type == "cpu":
        from moetrace.kernels import native

        if native.has_dequantize(fmt.name):
            return native.dequantize(blocks, fmt.name).reshape(rows, n_per_row).to(dtype)
    out = fmt.dequantize_blocks(blocks)
    return out.reshape(rows, n_per_row).to(dtype)


_formats_loaded = False


def _load_formats() -> None:
    # Importing the modules that define formats registers them (once: scanning the package
    # on every call cost more than dequantizing a small tensor).
    global _formats_loaded
    if _formats_loaded:
        return
    import importlib
    import pkgutil

    import moetrace.kernels as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("formats_"):
            importlib.import_module(f"moetrace.kernels.{info.name}")
    _formats_loaded = True
