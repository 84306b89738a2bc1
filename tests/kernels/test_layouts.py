"""The block layout table (kernels/layouts.py): right against gguf-py, and the one source torch, Triton and C read."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from moetrace.kernels import BLOCK_SIZES, native
from moetrace.kernels.layouts import C_TYPES, LAYOUTS, c_header

CSRC = Path(__file__).resolve().parents[2] / "kernels" / "csrc"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_sizes_equal_gguf_quant_sizes(name):
    want = tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]])
    got = (LAYOUTS[name].elems, LAYOUTS[name].bytes)
    if name == "Q8_1":
        # gguf-py keeps Q8_1's older float32 d and s (40 bytes); ggml's block_q8_1 has two fp16 (36).
        assert want == (32, 40) and got == (32, 36)
    else:
        assert got == want


def test_fields_tile_the_block():
    for name, lay in LAYOUTS.items():
        ends = [lay.offset(f) + lay.size(f) for f, _ in lay.fields]
        starts = [lay.offset(f) for f, _ in lay.fields]
        assert starts == [0] + ends[:-1], name
        assert ends[-1] == lay.bytes, name
        assert len({f for f, _ in lay.fields}) == len(lay.fields), f"{name}: duplicate field name"


def test_registry_sizes_come_from_the_table():
    assert BLOCK_SIZES == {n: (lay.elems, lay.bytes) for n, lay in LAYOUTS.items()}


def test_compiled_kernels_use_the_table():
    """The C module's sizes come from layouts.h, generated from the table at build time."""
    if not native.built():
        pytest.skip("moetrace.kernels._ckernels is not built (no C compiler at install)")
    from moetrace.kernels import _ckernels

    assert _ckernels.block_sizes() == {n: (LAYOUTS[n].elems, LAYOUTS[n].bytes) for n in C_TYPES}
    header = CSRC / "layouts.h"
    assert header.read_text() == c_header(), "layouts.h is stale: rebuild (pip install -e .)"


def test_header_defines_every_field():
    text = c_header()
    for name in C_TYPES:
        lay = LAYOUTS[name]
        assert f"#define MT_{name}_BYTES {lay.bytes}\n" in text
        for field, size in lay.fields:
            assert f"#define MT_{name}_{field.upper()} {lay.offset(field)}\n" in text
            assert f"#define MT_{name}_{field.upper()}_SIZE {size}\n" in text


def test_the_quantizable_types_variants_offer_are_the_formats_with_quantizers():
    """tracer.variants lists quantizable types from the layout table (torch-free, for fast name checks);
    the format registry must implement a quantizer for exactly those."""
    from moetrace.kernels import base
    from moetrace.tracer.variants import quantizable_types

    base._load_formats()
    with_quantizer = {name for name, fmt in base.FORMATS.items()
                      if type(fmt).quantize_blocks is not base.BlockFormat.quantize_blocks}
    assert set(quantizable_types()) == with_quantizer - {"F32", "F16", "BF16", "Q8_K", "Q8_1"}
