"""Property suite, GGUF files written by moetrace's own writer (``moetrace quantize q4_k_m``).

Each case damages the file (truncation, flipped bytes in the header or the data, changed tensor
types, dimensions and offsets, changed numeric metadata) and reads it as ``--model FILE.gguf`` and
as ``--gguf FILE`` against the checkpoint it was written from: every layer, every global tensor,
then check_matches. The outcome is a result or one one-line MoetraceError.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_files import Blob, check_outcome, flip, gguf_layout, put, read_gguf

GGML_TYPES = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28,
              29, 30, 31, 34, 35, 39, 40, 1000, 2 ** 32 - 1]
DIMS = st.one_of(st.integers(0, 600), st.sampled_from([1, 32, 256, 512, 2 ** 31, 2 ** 63, 2 ** 64 - 1]))


@pytest.fixture(scope="module")
def gguf_work(trust_files, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf-work") / "w.gguf"
    shutil.copyfile(trust_files["gguf"], path)
    data = Blob(path.read_bytes())
    return {"path": path, "data": data, "layout": gguf_layout(path), "ref": trust_files["ref"]}


@st.composite
def gguf_damage(draw, data: bytes, layout: dict):
    head = layout["data_offset"]
    how = draw(st.sampled_from(["truncate", "flip", "flip-header", "type", "dims", "offset", "metadata"]))
    if how == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if how == "flip":
        return flip(data, draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), min_size=1,
                                        max_size=4)))
    if how == "flip-header":
        return flip(data, draw(st.lists(st.tuples(st.integers(0, head - 1), st.integers(1, 255)), min_size=1,
                                        max_size=3)))
    if how == "metadata":
        key, pos, dtype = draw(st.sampled_from(layout["numbers"]))
        if dtype.kind == "b":
            value = draw(st.booleans())
        elif dtype.kind == "f":
            value = draw(st.floats(allow_nan=True, allow_infinity=True, width=8 * dtype.itemsize))
        else:
            info = np.iinfo(dtype)
            value = draw(st.one_of(st.integers(int(info.min), int(info.max)), st.integers(max(int(info.min), -2), 70)))
        return put(data, pos, np.array([value], dtype=dtype).tobytes())
    name, dims_at, n_dims, type_at, offset_at = draw(st.sampled_from(layout["tensors"]))
    if how == "type":
        return put(data, type_at, np.array([draw(st.sampled_from(GGML_TYPES))], np.uint32).tobytes())
    if how == "dims":
        i = draw(st.integers(0, n_dims - 1))
        return put(data, dims_at + 8 * i, np.array([draw(DIMS)], np.uint64).tobytes())
    new = draw(st.one_of(st.integers(0, len(data)), st.sampled_from([2 ** 63, 2 ** 64 - 1, 32])))
    return put(data, offset_at, np.array([new], np.uint64).tobytes())


@given(data=st.data())
def test_damaged_gguf(gguf_work, data):
    path = gguf_work["path"]
    damaged = data.draw(gguf_damage(gguf_work["data"], gguf_work["layout"]))
    path.write_bytes(damaged)
    try:
        check_outcome("gguf", lambda: read_gguf(path, gguf_work["ref"]))
    finally:
        path.write_bytes(gguf_work["data"])


def test_pristine_gguf_reads_and_names_the_model(gguf_work):
    g = read_gguf(gguf_work["path"], gguf_work["ref"])
    assert g.num_layers == 2
    assert g.general_name == "builtin:tiny:layers=2" or not g.general_name.startswith("/")
