"""llama.cpp importance-matrix files: the legacy .dat layout, byte by byte, and the GGUF format.

The legacy files here are written with struct following save_imatrix_legacy() of
tools/imatrix/imatrix.cpp; the expected values follow llama-quantize's loader (stored / ncall for
legacy files, in_sum2 / lround(count) for GGUF ones, 1 where a count is 0).
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrace.kernels import FormatError
from moetrace.kernels.imatrix import load_imatrix, read_imatrix, write_imatrix_gguf


def _legacy_bytes(entries, trailer=("wiki.train.raw", 10)) -> tuple[bytes, int]:
    """A legacy file: int32 n; per entry int32 len, name, int32 ncall, int32 nval, float32[nval]; trailer.

    Returns the bytes and the offset where the entries end.
    """
    out = struct.pack("<i", len(entries))
    for name, ncall, vals in entries:
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, len(vals))
        out += struct.pack(f"<{len(vals)}f", *vals)
    end = len(out)
    if trailer is not None:
        ds, last_chunk = trailer
        out += struct.pack("<i", last_chunk) + struct.pack("<i", len(ds)) + ds.encode()
    return out, end


# ncall = 10: the file stores mean * ncall, as save_imatrix_legacy does.
ENTRIES = [
    ("blk.0.attn_q.weight", 10, [10.0, 25.0, 0.5, 3.0]),
    ("blk.0.ffn_down_exps.weight", 10, [1.0, 2.0, 30.0, 40.0, 500.0, 600.0]),  # 3 experts x 2 columns
]


def test_legacy_layout(tmp_path):
    data, _ = _legacy_bytes(ENTRIES)
    p = tmp_path / "imatrix.dat"
    p.write_bytes(data)
    im = load_imatrix(p, n_expert=3)
    assert im.legacy and im.datasets == ["wiki.train.raw"] and im.chunk_count == 10
    q = im.values["blk.0.attn_q.weight"]
    assert q.dtype == np.float32 and q.shape == (4,)
    np.testing.assert_array_equal(q, np.float32([10.0, 25.0, 0.5, 3.0]) / np.float32(10))
    e = im.values["blk.0.ffn_down_exps.weight"]
    assert e.shape == (3, 2)
    np.testing.assert_array_equal(e, np.float32([[0.1, 0.2], [3.0, 4.0], [50.0, 60.0]]))
    assert read_imatrix(p, n_expert=3).keys() == im.values.keys()


def test_legacy_without_trailer_and_zero_ncall(tmp_path):
    data, _ = _legacy_bytes([("blk.1.attn_k.weight", 0, [2.0, 4.0])], trailer=None)
    p = tmp_path / "old.dat"
    p.write_bytes(data)
    im = load_imatrix(p)
    np.testing.assert_array_equal(im.values["blk.1.attn_k.weight"], np.float32([2.0, 4.0]))  # ncall 0: as stored
    assert im.datasets == [] and im.chunk_count == 0


def test_legacy_experts_need_n_expert(tmp_path):
    p = tmp_path / "imatrix.dat"
    p.write_bytes(_legacy_bytes(ENTRIES)[0])
    with pytest.raises(FormatError, match="ffn_down_exps.*n_expert"):
        read_imatrix(p)
    with pytest.raises(FormatError, match="not a multiple of n_expert=4"):
        read_imatrix(p, n_expert=4)


def test_legacy_every_truncation_is_an_error(tmp_path):
    data, end = _legacy_bytes(ENTRIES)
    p = tmp_path / "cut.dat"
    for cut in range(len(data)):
        p.write_bytes(data[:cut])
        if cut == end:  # exactly the entries, no trailer: a valid old-style file
            assert len(read_imatrix(p, n_expert=3)) == 2
            continue
        with pytest.raises(FormatError) as exc:
            read_imatrix(p, n_expert=3)
        assert "cut.dat" in str(exc.value), cut
        assert "truncated" in str(exc.value) or (cut < 4 and "entry count" in str(exc.value)) or cut == 0, cut


@pytest.mark.parametrize("patch, match", [
    (lambda d: struct.pack("<i", 0) + d[4:], "entry count is 0"),
    (lambda d: d[:4] + struct.pack("<i", -5) + d[8:], "name length of -5"),
    (lambda d: d + b"\x00\x01", "unexpected bytes"),
])
def test_legacy_corrupt(tmp_path, patch, match):
    p = tmp_path / "bad.dat"
    p.write_bytes(patch(_legacy_bytes(ENTRIES)[0]))
    with pytest.raises(FormatError, match=match):
        read_imatrix(p, n_expert=3)


def test_legacy_zero_values(tmp_path):
    raw = b"blk.0.attn_q.weight"
    data = struct.pack("<i", 1) + struct.pack("<i", len(raw)) + raw + struct.pack("<ii", 1, 0)
    p = tmp_path / "bad.dat"
    p.write_bytes(data)
    with pytest.raises(FormatError, match="'blk.0.attn_q.weight' has 0 values"):
        read_imatrix(p)


def test_missing_file(tmp_path):
    with pytest.raises(FormatError, match="cannot read imatrix file.*nope.gguf"):
        read_imatrix(tmp_path / "nope.gguf")


def test_gguf_roundtrip_and_layout(tmp_path):
    p = tmp_path / "imatrix.gguf"
    sums_dense = np.float32([3.0, 6.0, 9.0, 0.0])
    sums_exp = np.float32([[4.0, 8.0], [1.0, 1.0], [5.0, 5.0]])
    write_imatrix_gguf(p, {"blk.0.attn_q.weight": sums_dense, "blk.0.ffn_up_exps.weight": sums_exp},
                       {"blk.0.attn_q.weight": 3, "blk.0.ffn_up_exps.weight": np.array([4, 0, 2.5])},
                       in_sum={"blk.0.attn_q.weight": np.float32([3, -3, 0, 0])},
                       datasets=["calib.txt"], chunk_count=7, chunk_size=512)
    im = load_imatrix(p)
    assert not im.legacy and im.datasets == ["calib.txt"] and (im.chunk_count, im.chunk_size) == (7, 512)
    np.testing.assert_array_equal(im.values["blk.0.attn_q.weight"], np.float32([1, 2, 3, 0]))
    # counts: 4 -> /4; 0 -> values 1 (an expert nothing reached); 2.5 -> lround -> 3
    np.testing.assert_array_equal(im.values["blk.0.ffn_up_exps.weight"],
                                  np.float32([[1, 2], [1, 1], [5 / np.float32(3), 5 / np.float32(3)]]))
    np.testing.assert_array_equal(im.means["blk.0.attn_q.weight"], np.float32([1, -1, 0, 0]))
    # The file as llama-imatrix writes it: no architecture, ggml ne (n_per_row, n_mat) and (1, n_mat).
    r = gguf.GGUFReader(p)
    assert "general.architecture" not in r.fields
    assert bytes(r.fields["general.type"].parts[-1]).decode() == "imatrix"
    ne = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    assert ne["blk.0.ffn_up_exps.weight.in_sum2"] == [2, 3] and ne["blk.0.ffn_up_exps.weight.counts"] == [1, 3]
    assert ne["blk.0.attn_q.weight.in_sum2"] == [4, 1] and ne["blk.0.attn_q.weight.counts"] == [1, 1]


def test_gguf_entry_without_counts(tmp_path):
    p = tmp_path / "half.gguf"
    w = gguf.GGUFWriter(p, arch="")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FormatError, match=r"half\.gguf.*'blk\.0\.attn_q\.weight' has no '.*\.counts'"):
        read_imatrix(p)


def test_gguf_truncated(tmp_path):
    p = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(p, {"blk.0.attn_q.weight": np.ones(256, np.float32)}, {"blk.0.attn_q.weight": 1})
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match="imatrix.gguf"):
        read_imatrix(p)
    p.write_bytes(data[:40])
    with pytest.raises(FormatError, match="not a readable GGUF"):
        read_imatrix(p)


def test_writer_errors(tmp_path):
    p = tmp_path / "x.gguf"
    with pytest.raises(FormatError, match="different tensors"):
        write_imatrix_gguf(p, {"a.weight": np.ones(4)}, {"b.weight": 1})
    with pytest.raises(FormatError, match="do not fit 2 counts"):
        write_imatrix_gguf(p, {"a.weight": np.ones((3, 4))}, {"a.weight": [1, 2]})
    with pytest.raises(FormatError, match="NaN"):
        write_imatrix_gguf(p, {"a.weight": np.float32([1, np.nan])}, {"a.weight": 1})


@settings(max_examples=15, deadline=None)
@given(n_mat=st.integers(1, 4), n=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_gguf_roundtrip_property(n_mat, n, seed):
    rng = np.random.default_rng(seed)
    sums = rng.random((n_mat, n), dtype=np.float32) * 100
    counts = rng.integers(0, 5, n_mat).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.gguf"
        name = "blk.3.ffn_down_exps.weight" if n_mat > 1 else "blk.3.attn_v.weight"
        write_imatrix_gguf(p, {name: sums if n_mat > 1 else sums[0]}, {name: counts if n_mat > 1 else counts[0]})
        got = read_imatrix(p)[name]
    want = np.where(counts[:, None] > 0, sums / np.where(counts > 0, counts, 1)[:, None], np.float32(1))
    np.testing.assert_array_equal(got, want.astype(np.float32) if n_mat > 1 else want[0].astype(np.float32))
